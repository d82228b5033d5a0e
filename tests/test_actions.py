"""Action spaces (continuous, discrete, candidates), the explicit STOP, the richer nav vector and init_from."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env as gym_check_env
from gymnasium.wrappers import TimeLimit
from stable_baselines3.common.env_checker import check_env as sb3_check_env

from maprl.config import AGENTS, SEARCH_AGENT, agent_variant
from maprl.errors import ParamsError
from maprl.features.memory import MapMemory
from maprl.learn.training import build_model, init_model
from maprl.nav.actions import COMPASS, n_discrete
from maprl.nav.core import NavConfig
from maprl.nav.env import SatelliteNavEnv
from maprl.nav.scene import Scene
from maprl.nav.vecenv import NavVecEnv

from conftest import tiny_params

V = 32
SPACES = [(kind, stop) for kind in ("continuous", "discrete", "candidates") for stop in (False, True)]


def config(kind: str, stop: bool, **kw: object) -> NavConfig:
    base = {"action_step": 0.08, "max_steps": 8, "stop_threshold": 0.97, "success_radius": 8.0}
    return NavConfig.of(**{**base, "actions": kind, "stop_action": stop, "memory": "retrieval", **kw})


def env(scene: Scene, memory: MapMemory, cfg: NavConfig) -> SatelliteNavEnv:
    return SatelliteNavEnv(scene=scene, obs="features", config=cfg, memory=memory)  # max_steps: for the budget left


@pytest.mark.parametrize(("kind", "stop"), SPACES)
def test_every_action_space_passes_both_checkers_and_the_batched_env(
    scene: Scene, memory: MapMemory, kind: str, stop: bool
) -> None:
    cfg = config(kind, stop, sim_history=3, candidate_view_sim=True, candidate_seen_sim=True)
    e = env(scene, memory, cfg)
    assert e.action_space == cfg.action_space()
    if kind != "continuous":
        assert e.action_space.n == n_discrete(kind, stop, cfg.agent.n_candidates)  # type: ignore[attr-defined]
    gym_check_env(e, skip_render_check=True)
    sb3_check_env(e, warn=False)
    venv = NavVecEnv(scene, 4, cfg, memory=memory, seed=0)
    obs = venv.reset()
    assert obs["nav"].shape == (4, cfg.nav_dim())
    for _ in range(20):
        obs, reward, done, infos = venv.step(np.stack([venv.action_space.sample() for _ in range(4)]))
        assert np.isfinite(reward).all() and venv.observation_space.contains({k: v[0] for k, v in obs.items()})


@pytest.mark.parametrize(("kind", "stop"), SPACES)
def test_vecenv_matches_gym_envs_for_every_action_space(scene: Scene, memory: MapMemory, kind: str, stop: bool) -> None:
    cfg = config(kind, stop, sim_history=2, candidate_view_sim=True, candidate_seen_sim=True, shaping=0.5, gamma=0.9)
    n, rng = 3, np.random.default_rng(1)
    episodes = [(int(rng.integers(4)), *rng.uniform(30, 100, 2)) for _ in range(200)]
    venv = NavVecEnv(scene, n, cfg, memory=memory)
    venv.set_episodes(list(episodes))
    queue = list(episodes)
    envs = [TimeLimit(env(scene, memory, cfg), 8) for _ in range(n)]

    def reset(e: TimeLimit) -> dict:
        row, x, y = queue.pop(0)
        return e.reset(options={"target_id": int(scene.targets["id"][row]), "start": (x, y)})[0]

    gobs, vobs = [reset(e) for e in envs], venv.reset()
    for _ in range(20):
        for k in vobs:
            assert np.allclose(vobs[k], np.stack([o[k] for o in gobs]), atol=1e-6), k
        actions = np.stack([venv.action_space.sample() for _ in range(n)])
        vobs, vrew, vdone, _ = venv.step(actions)
        for i, e in enumerate(envs):
            o, r, term, trunc, _ = e.step(actions[i])
            assert vrew[i] == pytest.approx(r, abs=1e-5) and vdone[i] == (term or trunc)
            gobs[i] = reset(e) if vdone[i] else o


@pytest.mark.parametrize("kind", ["continuous", "discrete", "candidates"])
def test_stop_ends_the_episode_and_succeeds_only_inside_the_radius(scene: Scene, memory: MapMemory, kind: str) -> None:
    cfg = config(kind, True)
    e = env(scene, memory, cfg)
    stop = np.array([0.0, 0.0, 1.0], np.float32) if kind == "continuous" else e.action_space.n - 1  # type: ignore[attr-defined]
    target = scene.targets_xy[0]
    e.reset(options={"target_id": int(scene.targets["id"][0]), "start": tuple(target)})
    _, r_in, term, trunc, info = e.step(stop)
    assert term and not trunc and info["stopped"] and info["is_success"] and info["position"] == tuple(target)
    e.reset(options={"target_id": int(scene.targets["id"][0]), "start": (target[0] - 30, target[1] - 30)})
    _, r_out, term, _, info = e.step(stop)
    assert term and info["stopped"] and not info["is_success"]
    assert r_in - r_out == pytest.approx(cfg.env.success_bonus + cfg.env.stop_penalty, abs=1.0)


def test_without_stop_the_agent_does_not_succeed_by_passing_through(scene: Scene, memory: MapMemory) -> None:
    """With STOP, standing on the target (similarity 1 > threshold) neither ends the episode nor counts."""
    e = env(scene, memory, config("discrete", True))
    target = scene.targets_xy[0]
    e.reset(options={"target_id": int(scene.targets["id"][0]), "start": (target[0], target[1] + e.core.step_px)})
    _, _, term, _, info = e.step(0)  # north: onto the target
    assert info["position"] == pytest.approx(tuple(target)) and info["similarity"] > 0.97
    assert not term and not info["stopped"] and not info["is_success"]


def test_discrete_moves_follow_the_compass(scene: Scene, memory: MapMemory) -> None:
    e = env(scene, memory, config("discrete", False))
    step = e.core.step_px
    for k, (dx, dy) in enumerate(COMPASS):
        e.reset(options={"target_id": int(scene.targets["id"][0]), "start": (80.0, 80.0)})
        _, _, _, _, info = e.step(k)
        assert info["position"] == pytest.approx((80.0 + dx * step, 80.0 + dy * step))


@pytest.mark.parametrize("j", [0, 1, 2])
def test_candidate_actions_fly_towards_the_chosen_candidate(scene: Scene, memory: MapMemory, j: int) -> None:
    e = env(scene, memory, config("candidates", True, action_step=0.04))
    e.reset(options={"target_id": int(scene.targets["id"][1]), "start": (20.0, 110.0)})
    goal = e.core.ep_cands[0, j].copy()
    d = [float(np.hypot(*(e.core.pos[0] - goal)))]
    for _ in range(40):
        e.step(j)
        d.append(float(np.hypot(*(e.core.pos[0] - goal))))
    assert d[-1] < 1e-6, "it arrives"
    moving = np.diff(d)[: int(np.argmax(np.array(d) < 1e-6))]
    assert (moving < 0).all() and np.allclose(moving[:-1], moving[0]), "equal steps straight at it"
    assert -moving[0] >= e.core.step_px - 1e-9, "at least a full step on the longer axis"


@pytest.mark.parametrize(("short", "lands"), [(0.3, True), (0.6, False)])
def test_a_flight_that_would_end_within_the_visit_radius_lands_on_the_candidate(
    scene: Scene, memory: MapMemory, short: float, lands: bool
) -> None:
    """Defect: a flight could stop a few pixels short of a candidate, mark it visited and record a
    similarity far below the candidate's own, so the searcher moved on from a right candidate."""
    cfg = config("candidates", True, action_step=0.1, success_radius=16.0)
    e = env(scene, memory, cfg)
    e.reset(options={"target_id": int(scene.targets["id"][1]), "start": (20.0, 110.0)})
    goal = e.core.ep_cands[0, 0].copy()
    away = e.core.centre - goal
    away /= np.hypot(*away)
    full = e.core.step_px / np.abs(away).max()  # a full step on the longer axis
    start = goal + away * (full + short * cfg.success_radius)
    e.reset(options={"target_id": int(scene.targets["id"][1]), "start": tuple(start)})
    e.step(0)
    gap = float(np.hypot(*(e.core.pos[0] - goal)))
    if lands:
        assert gap < 1e-6 and e.core.cand_seen[0, 0] == e.core.sim[0]
    else:
        assert gap == pytest.approx(short * cfg.success_radius) and not e.core.visited[0, 0]
        e.step(0)
        assert float(np.hypot(*(e.core.pos[0] - goal))) < 1e-6


def test_move_on_visits_unvisited_candidates_in_rank_order(scene: Scene, memory: MapMemory) -> None:
    cfg = config("candidates", False, action_step=0.2)
    e = env(scene, memory, cfg)
    k = cfg.agent.n_candidates
    e.reset(options={"target_id": int(scene.targets["id"][2]), "start": (20.0, 110.0)})
    order = []
    for _ in range(30):
        e.step(k + 1)
        at = np.flatnonzero(e.core.at_candidates()[0])
        if len(at) and (not order or order[-1] != at[0]):
            order.append(int(at[0]))
        if e.core.visited[0].all():
            break
    assert order == sorted(order) and e.core.visited[0].all()


def test_seen_similarity_is_the_best_match_at_each_visited_candidate(scene: Scene, memory: MapMemory) -> None:
    cfg = config("candidates", False, action_step=0.2, candidate_seen_sim=True, portable=True)
    e = env(scene, memory, cfg)
    k = cfg.agent.n_candidates
    obs, _ = e.reset(options={"target_id": int(scene.targets["id"][2]), "start": (20.0, 110.0)})
    assert np.all(obs["nav"][-k:] == -1.0)  # nothing visited yet
    best = np.full(k, -np.inf)
    for _ in range(30):
        nav = e.step(k + 1)[0]["nav"]
        at = e.core.at_candidates()[0]
        best = np.where(at, np.maximum(best, e.core.sim[0]), best)
        want = np.where(np.isfinite(best), best - cfg.stop_threshold, -1.0)
        assert np.allclose(nav[-k:], want, atol=1e-6)
    assert e.core.visited[0].all()  # every candidate's entry was checked against a real visit


@pytest.mark.parametrize("at_best", [False, True])
def test_stop_at_best_refuses_stop_where_a_visited_candidate_matched_better(
    scene: Scene, memory: MapMemory, at_best: bool
) -> None:
    k = 3
    stop = k + 2
    ends = {}
    for refuse in (False, True):
        cfg = config("candidates", True, action_step=0.2, max_steps=40, stop_at_best=refuse)
        e = env(scene, memory, cfg)
        e.reset(options={"target_id": int(scene.targets["id"][2]), "start": (20.0, 110.0)})
        while not e.core.visited[0].all():
            e.step(k + 1)
        seen = e.core.cand_seen[0]
        assert seen.max() > seen.min()  # the candidates match the photo differently
        go = int(seen.argmax() if at_best else seen.argmin())
        while not e.core.at_candidates()[0, go]:
            e.step(go)
        _, _, term, _, info = e.step(stop)
        ends[refuse] = term
        if refuse and not at_best:  # refused: it flies back towards the best-matching candidate instead
            assert not info["stopped"]
            while not e.core.at_candidates()[0, int(seen.argmax())]:
                assert not e.step(stop)[2]
            assert e.step(stop)[2]
    assert ends == {False: True, True: at_best}


def test_stop_at_best_ends_the_search_when_move_on_has_nowhere_left_to_go(scene: Scene, memory: MapMemory) -> None:
    k = 3
    for ends in (False, True):
        cfg = config("candidates", True, action_step=0.2, max_steps=60, stop_at_best=ends)
        e = env(scene, memory, cfg)
        e.reset(options={"target_id": int(scene.targets["id"][2]), "start": (20.0, 110.0)})
        stopped = []
        for _ in range(40):
            _, _, term, trunc, info = e.step(k + 1)  # move on, and on
            stopped.append(info["stopped"])
            if term or trunc:
                break
        assert e.core.visited[0].all()
        if ends:  # at the best-matching candidate, after the visits, and only there
            assert stopped[-1] and not any(stopped[:-1]) and e.core.at_candidates()[0, e.core.cand_seen[0].argmax()]
        else:
            assert not any(stopped)


def test_refine_never_lowers_the_similarity(scene: Scene, memory: MapMemory) -> None:
    cfg = config("candidates", False, action_step=0.2)
    e = env(scene, memory, cfg)
    e.reset(options={"target_id": int(scene.targets["id"][0]), "start": (76.0, 63.0)})
    sims = [float(e.core.sim[0])]
    for _ in range(6):
        sims.append(e.step(cfg.agent.n_candidates)[4]["similarity"])
    assert (np.diff(sims) >= -1e-6).all() and sims[-1] > sims[0]


def test_nav_extras_and_portable_observation(scene: Scene, memory: MapMemory) -> None:
    full = config("candidates", True, sim_history=3, candidate_view_sim=True)
    e = env(scene, memory, full)
    obs, _ = e.reset(options={"target_id": int(scene.targets["id"][0]), "start": (80.0, 80.0)})
    k = full.agent.n_candidates
    assert obs["nav"].shape == (full.nav_dim(),)
    assert np.allclose(obs["nav"][-(4 + k) : -(k + 1)], e.core.sim[0])  # history starts as the first similarity
    assert obs["nav"][-1] == 1.0  # the whole step budget is left
    e.step(0)
    first = float(obs["nav"][4])
    nav = e.step(0)[0]["nav"]
    assert nav[-1] == pytest.approx(1 - 2 / 8)
    assert nav[-(4 + k)] == pytest.approx(float(e.core.sim_hist[0, 0])) and e.core.sim_hist[0, 1] == pytest.approx(
        first, abs=1e-6
    )
    cvs = np.einsum("kd,d->k", e.core.cand_embs[0], e.core.cur_emb[0])
    assert np.allclose(nav[-(k + 1) : -1], cvs, atol=1e-6)
    portable = env(scene, memory, dataclasses.replace(full, agent=full.agent.model_copy(update={"portable": True})))
    pobs, _ = portable.reset(options={"target_id": int(scene.targets["id"][0]), "start": (80.0, 80.0)})
    assert set(pobs) == {"nav"} and pobs["nav"][4] == pytest.approx(float(portable.core.sim[0]) - 0.97, abs=1e-6)


def test_candidates_need_the_map_memory() -> None:
    with pytest.raises(ValueError, match="candidates"):
        NavConfig.of(actions="candidates", memory="none")
    with pytest.raises(ParamsError, match="env.actions: candidates needs agent.memory"):
        tiny_params(env={"actions": "candidates"}, agent={"memory": "none"})


def test_every_agent_variant_is_consistent() -> None:
    params = tiny_params(env={"actions": "candidates", "stop_action": True})
    for agent in AGENTS:
        p = agent_variant(params, agent)
        assert p.env.actions != "candidates" or p.agent.memory == "retrieval", agent
    search = agent_variant(tiny_params(), "search")
    assert search.env.actions == SEARCH_AGENT["env"]["actions"] and search.env.stop_action
    assert agent_variant(params, "original").env.stop_action is False


def test_init_from_fine_tunes_and_rejects_another_observation_space(
    scene: Scene, memory: MapMemory, tmp_path: Path
) -> None:
    p = tiny_params(train={"n_steps": 16, "batch_size": 32, "n_envs": 2, "hparams": "params"}).train
    cfg = config("candidates", True)
    model = build_model(p, NavVecEnv(scene, 2, cfg, memory=memory), seed=0)
    model.learn(32)
    model.save(tmp_path / "policy.zip")
    start = p.model_copy(update={"init_from": str(tmp_path / "policy.zip")})
    tuned = init_model(start, NavVecEnv(scene, 2, cfg, memory=memory), seed=1)
    for a, b in zip(model.policy.state_dict().values(), tuned.policy.state_dict().values(), strict=True):
        assert np.array_equal(a.numpy(), b.numpy())
    tuned.learn(32)  # and it trains on
    other = dataclasses.replace(cfg, agent=cfg.agent.model_copy(update={"sim_history": 2}))
    with pytest.raises(ParamsError, match=r"train.init_from: .*policy.zip was trained with the observation space"):
        init_model(start, NavVecEnv(scene, 2, other, memory=memory), seed=1)


def test_dagger_labels_the_states_the_learner_reaches_with_the_experts_actions(scene: Scene, memory: MapMemory) -> None:
    from maprl.learn.imitation import _rollout, clone_expert

    cfg = config("candidates", True, action_step=0.2)
    k = cfg.agent.n_candidates
    venv = NavVecEnv(scene, 4, cfg, memory=memory, seed=0)
    own, _ = _rollout(venv, [venv.core], 40)  # the expert's own moves
    obs, labels = _rollout(venv, [venv.core], 40, act=lambda o: np.full(4, k + 2))  # a learner that stops at once
    budget_left = lambda rollout: np.concatenate([o["nav"][:, -1] for o in rollout])  # noqa: E731
    assert (budget_left(own) < 1).any()  # the expert's rollout goes on past the first step
    assert len(obs) == 10 and (budget_left(obs) == 1).all()  # the learner's states: every episode's first
    assert all(((a == k + 1) | (a == k + 2)).all() for a in labels)  # the expert only moves on or stops
    assert sum((a == k + 1).sum() for a in labels) > 0  # ...and there it would have moved on
    p = tiny_params(train={"n_steps": 16, "batch_size": 32, "n_envs": 4, "hparams": "params"}).train
    shares = [clone_expert(build_model(p, venv, seed=0), venv, [venv.core], 64, rounds=r) for r in (1, 2)]
    assert all(0.0 <= s <= 1.0 for s in shares)
