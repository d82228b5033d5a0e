"""The batched vector env must behave exactly like N Gymnasium envs (features obs)."""

import dataclasses

import numpy as np
import pytest
import torch
from gymnasium.wrappers import TimeLimit

from maprl.features.memory import MapMemory
from maprl.learn.policies import MapRLNetwork, MapRLPolicy
from maprl.nav.core import NavConfig
from maprl.nav.env import SatelliteNavEnv
from maprl.nav.scene import Scene
from maprl.nav.vecenv import NavVecEnv

V = 32


@pytest.mark.parametrize("mem", ["none", "retrieval", "retrieval+decoys"])
def test_vecenv_matches_gym_envs_step_by_step(scene: Scene, memory: MapMemory, mem: str) -> None:
    memory_kind, decoys = mem.split("+")[0], mem.endswith("decoys")
    cfg = NavConfig.of(
        action_step=0.08, max_steps=6, stop_threshold=0.97, shaping=0.5, gamma=0.9, memory=memory_kind, success_radius=8
    )
    n = 3
    rng = np.random.default_rng(0)

    def episode() -> tuple[float, ...]:
        decoy = rng.uniform(30, 100, 2) if rng.random() < 0.5 else [np.nan] * 2
        return (int(rng.integers(4)), *rng.uniform(30, 100, 2), *decoy)

    episodes = [episode() for _ in range(40)]
    if not decoys:
        episodes = [e[:3] for e in episodes]
    venv = NavVecEnv(scene, n, cfg, memory=memory)
    venv.set_episodes(list(episodes))
    queue = list(episodes)
    gcfg = dataclasses.replace(cfg, max_steps=None)
    envs = [TimeLimit(SatelliteNavEnv(scene=scene, obs="features", config=gcfg, memory=memory), 6) for _ in range(n)]

    def gym_reset(env: TimeLimit) -> dict:
        row, x, y, *decoy = queue.pop(0)
        options = {"target_id": int(scene.targets["id"][row]), "start": (x, y), "decoy": decoy or None}
        return env.reset(options=options)[0]

    gobs = [gym_reset(e) for e in envs]
    vobs = venv.reset()
    for _ in range(25):
        for k in vobs:
            assert np.allclose(vobs[k], np.stack([o[k] for o in gobs]), atol=1e-6), k
        actions = rng.uniform(-1, 1, (n, 2)).astype(np.float32)
        vobs, vrew, vdone, vinfo = venv.step(actions)
        for i, env in enumerate(envs):
            o, r, term, trunc, info = env.step(actions[i])
            assert vrew[i] == pytest.approx(r, abs=1e-5)
            assert vdone[i] == (term or trunc)
            if vdone[i]:
                assert vinfo[i]["TimeLimit.truncated"] == (trunc and not term)
                assert vinfo[i]["distance_px"] == pytest.approx(info["distance_px"])
                assert np.allclose(vinfo[i]["terminal_observation"]["nav"], o["nav"], atol=1e-6)
                o = gym_reset(env)
            gobs[i] = o


def test_decoys_replace_the_top_candidate_and_visits_are_flagged(scene: Scene, memory: MapMemory) -> None:
    cfg = NavConfig.of(max_steps=50, memory="retrieval", n_candidates=3, success_radius=8, decoy_rate=0.5)
    assert cfg.nav_dim() == 5 + 8 * 3 + 1
    venv = NavVecEnv(scene, 64, cfg, memory=memory, seed=1)
    venv.reset()
    core = venv.core
    true_top = core.cands[core.rows]
    decoyed = ~np.all(core.ep_cands == true_top, axis=(1, 2))
    assert 0.3 < decoyed.mean() < 0.7
    assert np.array_equal(core.ep_cands[decoyed, 1:], true_top[decoyed, :-1])  # true candidates move down a rank
    far = np.hypot(*(core.ep_cands[decoyed, 0] - core.targets_xy[core.rows[decoyed]]).T)
    assert (far >= 4 * 8).all()
    # flying onto candidate 1 flags it, and the observation shows the flag
    venv.step((core.ep_cands[:, 1] - core.pos) / core.step_px)
    arrived = np.hypot(*(core.pos - core.ep_cands[:, 1]).T) < 1e-6
    assert arrived.any() and core.visited[arrived, 1].all()
    assert np.array_equal(venv.core.observe()["nav"][:, 5 + 7 :: 8][arrived], core.visited[arrived].astype(np.float32))


def test_vecenv_seeded_reset_is_deterministic(scene: Scene) -> None:
    cfg = NavConfig.of(max_steps=5)

    def roll(seed: int) -> np.ndarray:
        venv = NavVecEnv(scene, 4, cfg)
        venv.seed(seed)
        venv.reset()
        return venv.core.pos.copy()

    assert np.array_equal(roll(3), roll(3)) and not np.array_equal(roll(3), roll(4))


def test_feature_extractor_and_policy_forward(scene: Scene, memory: MapMemory) -> None:
    cfg = NavConfig.of(max_steps=5, memory="retrieval")
    venv = NavVecEnv(scene, 2, cfg, memory=memory)
    ext = MapRLNetwork(venv.observation_space)
    assert ext.features_dim == 64 + cfg.nav_dim()
    obs = {k: torch.as_tensor(v) for k, v in venv.reset().items()}
    assert ext(obs).shape == (2, ext.features_dim)
    policy = MapRLPolicy(venv.observation_space, venv.action_space, lambda _: 3e-4)
    actions, values, logp = policy(obs)
    assert actions.shape == (2, 2) and values.shape == (2, 1)


def test_pixel_policy_forward(scene: Scene) -> None:
    env = SatelliteNavEnv(scene=scene, obs="pixels")
    ext = MapRLNetwork(env.observation_space, input_size=32)  # type: ignore[arg-type]
    obs, _ = env.reset(seed=0)
    batch = {k: torch.as_tensor(v[None]).float() for k, v in obs.items()}
    assert ext(batch).shape == (1, 64) and ext.head[0].in_features == 2560


def test_vec_env_methods_respect_indices_and_call_once(scene: Scene) -> None:
    """Defect: env_method called the method N times on the one object and ignored ``indices``."""
    venv = NavVecEnv(scene, 4, NavConfig.of(max_steps=5))
    calls: list[int] = []
    venv.count = lambda: calls.append(1) or len(calls)  # type: ignore[attr-defined]
    assert venv.env_method("count", indices=[1, 3]) == [1, 1] and calls == [1]
    assert venv.env_method("count", indices=[]) == [] and calls == [1]
    assert venv.get_attr("num_envs", indices=[0, 2]) == [4, 4] and len(venv.get_attr("num_envs")) == 4
    venv.set_attr("render_mode", None)
    with pytest.raises(ValueError, match="shared by all 4 agents"):
        venv.set_attr("render_mode", "rgb_array", indices=[1])
