"""The ``grid`` stage: the published active geo-localization protocol on this project's map.

AiRLoc, GOMAA-Geo (NeurIPS 2024) and GeoExplorer (ICCV 2025) cut an image into a 5x5 grid of
patches; the agent sees the patch it stands on and the goal patch, moves one cell at a time (4
moves, a budget of 10) and succeeds if it reaches the goal, with start-goal distances C = 4..8.
Here the map is cut into non-overlapping grid images of ``size * patch`` pixels (every pixel with
imagery), split into train and test images (whole images: no test image shares a pixel with a
training image), and every patch is embedded once with the map's encoder (the encode stage's, as
target photos are: the patch crop resized to the encoder's input, heading 0).

Per setting of ``grid.settings``: PPO with the project's policy (:class:`~maprl.learn.policies.MapRLPolicy`)
on :class:`~maprl.nav.grid.GridNavEnv` over the training images, ``grid.seeds`` times, each
evaluated deterministically on the same fixed test episodes (``grid.pairs`` per test image and
distance); the no-learning baselines of :mod:`maprl.eval.grid` on the same episodes, and their
exact expectation over every pair. Writes ``metrics/grid.json``, ``data/grid/success_by_c.csv``
(for ``dvc plots``), ``data/grid/episodes.csv`` and ``data/grid/success_by_c.png``.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from maprl.config import GridParams, GridSetting, Params
from maprl.data.geo import MapData, read_map
from maprl.data.splits import hold_out
from maprl.errors import InputError
from maprl.eval import grid as baselines
from maprl.eval.metrics import interval_estimates
from maprl.features.cache import load_space
from maprl.features.nets import configure_torch
from maprl.features.spaces import FeatureSpace
from maprl.io import staged_dir, write_csv, write_metrics
from maprl.nav.grid import GridCore, GridNavEnv, GridNavVecEnv
from maprl.parallel import ordered_map

PUBLISHED = {
    "dataset": "Massachusetts Buildings (not this project's map: context only, not comparable)",
    "setting": "5x5 grid, budget 10, C = 4..8, 5 pairs per image and distance",
    "average_success": {
        "GOMAA-Geo (NeurIPS 2024, reported)": 0.644,
        "GeoExplorer (ICCV 2025, reported)": 0.7305,
        "GOMAA-Geo (third-party retrain of the official code)": 0.604,
        "GeoExplorer (third-party retrain of the official code)": 0.328,
    },
}
"""Published averages of the same protocol on another dataset: context for the README table."""


# -- grid images ---------------------------------------------------------------------------
def grid_origins(m: MapData, side: int) -> np.ndarray:
    """(I, 2) top-left (x, y) of the non-overlapping ``side`` x ``side`` squares tiling the map from its
    corner, row-major, keeping those whose every pixel has imagery."""
    out = [
        (x, y)
        for y in range(0, m.height - side + 1, side)
        for x in range(0, m.width - side + 1, side)
        if m.valid[y : y + side, x : x + side].all()
    ]
    return np.array(out, np.int64).reshape(-1, 2)


def resize_views(views: np.ndarray, side: int) -> np.ndarray:
    """(N, S, S, 3) uint8 -> (N, side, side, 3) uint8, bilinear (antialiased when shrinking)."""
    if views.shape[1] == side:
        return views
    import torch
    from torch.nn import functional as F  # noqa: N812

    x = torch.from_numpy(np.ascontiguousarray(views)).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(side, side), mode="bilinear", antialias=side < views.shape[1], align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def embed_patches(space: FeatureSpace, rgb: np.ndarray, origins: np.ndarray, size: int, patch: int) -> np.ndarray:
    """(I, size, size, D) embedding of every patch of every grid image: its crop resized to the view
    size and embedded as a target photo is (``space.embed_view``, heading 0)."""
    out = np.zeros((len(origins), size, size, space.dim), np.float32)
    for i, (x, y) in enumerate(origins):
        crops = [rgb[y + r * patch : y + (r + 1) * patch, x + c * patch : x + (c + 1) * patch] for r in range(size)
                 for c in range(size)]  # fmt: skip
        views = resize_views(np.stack(crops), space.view_size)
        out[i] = np.asarray(space.embed_view(views), np.float32).reshape(size, size, -1)
    return np.clip(out, -1.0, 1.0)


def _setting_seed(seed: int, name: str) -> list[int]:
    return [seed, zlib.crc32(name.encode())]


def split_images(n_images: int, fraction: float, seed: int, name: str) -> np.ndarray:
    """Sorted ids of the test images (whole images held out: :func:`maprl.data.splits.hold_out`)."""
    if n_images < 2:
        raise InputError(f"grid setting {name}: only {n_images} grid image(s) fit on the map; lower size or patch")
    return hold_out(np.arange(n_images), fraction, np.random.default_rng([*_setting_seed(seed, name), 1]))


# -- the agent -----------------------------------------------------------------------------
def env_kwargs(s: GridSetting, p: GridParams) -> dict[str, Any]:
    """The :class:`~maprl.nav.grid.GridNavEnv` keywords of a setting."""
    return {"size": s.size, "budget": s.budget, "c_min": s.c_min, "c_max": s.c_max, "step_cost": p.step_cost,
            "shaping": p.shaping, "gamma": p.gamma}  # fmt: skip


def route_actions(routes: list[np.ndarray], core: GridCore) -> np.ndarray:
    """(agents,) the move each agent's blind route (:func:`~maprl.eval.grid.best_blind_routes`, from its
    start cell) makes next; an agent at the end of a shorter route moves up (or the first in-grid move)."""
    out = np.zeros(core.n_agents, np.int64)
    for i in range(core.n_agents):
        route, t = routes[int(core.start[i])], int(core.steps[i])
        moves = core.nb[core.pos[i]]
        nxt = int(route[t + 1]) if t + 1 < len(route) else int(moves[moves >= 0][0])
        out[i] = int(np.flatnonzero(moves == nxt)[0])
    return out


def clone_blind_route(
    model: Any, venv: GridNavVecEnv, routes: list[np.ndarray], steps: int, seed: int, epochs: int = 20
) -> float:
    """Fit ``model.policy`` to the blind route's moves on ``steps`` agent-steps of its own rollouts in
    ``venv`` (behaviour cloning, :func:`~maprl.learn.imitation.fit_actions`); returns the share of the
    route's moves the cloned policy takes (deterministically) on those states."""
    import torch

    from maprl.learn.imitation import fit_actions

    obs: Any = venv.reset()
    batches: list[dict[str, np.ndarray]] = []
    actions: list[np.ndarray] = []
    for _ in range(max(1, steps // venv.num_envs)):
        act = route_actions(routes, venv.core)
        batches.append({k: v.copy() for k, v in obs.items()})
        actions.append(act)
        obs, _, _, _ = venv.step(act)
    obs_t = {k: torch.as_tensor(np.concatenate([b[k] for b in batches])) for k in batches[0]}
    target = torch.as_tensor(np.concatenate(actions))
    fit_actions(model.policy, obs_t, target, epochs, 256, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        taken = model.policy.get_distribution(obs_t).distribution.probs.argmax(1)
    venv.reset()
    return float((taken == target).float().mean())


def train_agent(embeddings: np.ndarray, s: GridSetting, p: GridParams, seed: int, timesteps: int | None = None) -> Any:
    """PPO with :class:`~maprl.learn.policies.MapRLPolicy` on ``p.n_envs`` grid agents over ``embeddings``;
    with ``grid.warm_start: blind_route`` the policy first clones the best image-blind route."""
    from stable_baselines3 import PPO

    from maprl.learn.policies import MapRLPolicy

    configure_torch(p.torch_threads)
    venv = GridNavVecEnv(embeddings, p.n_envs, seed=seed, **env_kwargs(s, p))
    model = PPO(
        MapRLPolicy, venv, learning_rate=p.learning_rate, n_steps=p.n_steps,
        batch_size=min(p.batch_size, p.n_steps * p.n_envs), n_epochs=p.n_epochs, gamma=p.gamma,
        gae_lambda=p.gae_lambda, ent_coef=p.ent_coef, seed=seed, device="cpu", verbose=0,
    )  # fmt: skip
    if p.warm_start == "blind_route" and p.imitate:
        routes = baselines.best_blind_routes(s.size, s.budget, s.c_min, s.c_max, p.blind_max_nodes).routes
        clone_blind_route(model, venv, routes, p.imitate, seed, p.imitate_epochs)
    model.learn(total_timesteps=timesteps or p.timesteps)
    return model


def episode_seed(seed: int, name: str, episode: int) -> int:
    """The env seed of a test episode (it draws the replacement of an off-grid move)."""
    return int(np.random.SeedSequence([*_setting_seed(seed, name), 2, episode]).generate_state(1)[0])


def evaluate_agent(
    model: Any, embeddings: np.ndarray, episodes: pd.DataFrame, s: GridSetting, p: GridParams, seed: int
) -> np.ndarray:
    """(E,) bool: each fixed episode run with the deterministic policy; ``episodes.image`` indexes ``embeddings``."""
    envs = [GridNavEnv(embeddings, **env_kwargs(s, p)) for _ in range(len(episodes))]
    obs = []
    for env, ep in zip(envs, episodes.itertuples(), strict=True):
        start, goal = divmod(int(ep.start), s.size), divmod(int(ep.goal), s.size)
        options = {"image": int(ep.image), "start": start, "goal": goal}
        obs.append(env.reset(seed=episode_seed(seed, s.name, int(ep.episode)), options=options)[0])
    success = np.zeros(len(envs), bool)
    alive = np.ones(len(envs), bool)
    while alive.any():
        idx = np.flatnonzero(alive)
        batch = {k: np.stack([obs[i][k] for i in idx]) for k in obs[0]}
        actions, _ = model.predict(batch, deterministic=True)
        for i, a in zip(idx, actions, strict=True):
            obs[i], _, terminated, truncated, info = envs[i].step(int(a))
            success[i] = bool(info["is_success"])
            alive[i] = not (terminated or truncated)
    return success


def train_and_evaluate(
    _: None, job: tuple[np.ndarray, np.ndarray, pd.DataFrame, GridSetting, GridParams, int, int]
) -> np.ndarray:
    """One training seed ``seed + i`` of a setting, on the train images; (E,) success on the test episodes."""
    train_emb, test_emb, episodes, s, p, seed, i = job
    return evaluate_agent(train_agent(train_emb, s, p, seed + i), test_emb, episodes, s, p, seed)


def bootstrap_interval(scores: np.ndarray, reps: int, seed: int) -> tuple[float, float]:
    """95 % interval of the mean of (seeds, episodes) 0/1 scores: rliable's stratified bootstrap
    (Agarwal et al. 2021, as ``maprl report``), resampling the episodes and, for each, the seeds."""
    _, interval = interval_estimates(
        {"agent": scores.astype(float)}, lambda x: np.array([x.mean()]), reps, seed, task_bootstrap=True
    )
    return float(interval["agent"][0, 0]), float(interval["agent"][1, 0])


def _rounded(d: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 4) for k, v in d.items()}


def agent_results(
    success: np.ndarray, c: np.ndarray, s: GridSetting, reps: int, seed: int
) -> dict[str, Any]:  # fmt: skip
    """Per distance and on average: the mean over seeds and episodes, its interval, and each seed's value."""
    keys = [str(k) for k in range(s.c_min, s.c_max + 1)]
    per_seed = [baselines.by_distance(row.astype(float), c, s.c_min, s.c_max) for row in success]
    mean = {k: float(np.mean([r[k] for r in per_seed])) for k in [*keys, "average"]}
    ci: dict[str, list[float]] = {}
    for k in keys:
        ci[k] = [round(v, 4) for v in bootstrap_interval(success[:, c == int(k)], reps, seed)]
    # the average over C: every distance holds the same number of episodes, so it is the mean over all
    ci["average"] = [round(v, 4) for v in bootstrap_interval(success, reps, seed)]
    return {
        "success": _rounded(mean),
        "ci95": ci,
        "per_seed": [_rounded(r) for r in per_seed],
    }


# -- baselines -----------------------------------------------------------------------------
def baseline_results(
    s: GridSetting, p: GridParams, episodes: pd.DataFrame, seed: int
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The no-learning baselines: metrics (on the test episodes, and the exact expectation over all
    pairs) and each one's (cells, cells) success probability."""
    n, b, lo, hi = s.size, s.budget, s.c_min, s.c_max
    start, goal, c = (episodes[k].to_numpy(int) for k in ("start", "goal", "c"))
    saw = baselines.self_avoiding_success(n, b, p.saw_max_states)
    saw_method = "exact (every walk enumerated with its probability)"
    if saw is None:
        rng = np.random.default_rng([*_setting_seed(seed, s.name), 3])
        saw = baselines.self_avoiding_success_mc(n, b, p.saw_rollouts, rng)
        saw_method = f"Monte Carlo, {p.saw_rollouts} seeded walks per start cell"
    blind = baselines.best_blind_routes(n, b, lo, hi, p.blind_max_nodes)
    probs = {
        "random_walk": baselines.random_walk_success(n, b),
        "self_avoiding_walk": saw,
        "blind_route": blind.covers.astype(float),
    }
    methods = {
        "random_walk": "exact (dynamic programming, the goal absorbing)",
        "self_avoiding_walk": f"{saw_method}; stuck (every neighbour visited): uniform over the in-grid neighbours",
        "blind_route": f"{blind.method} search: per start cell, the self-avoiding route covering the most goal weight",
    }
    out = {
        name: {
            "method": methods[name],
            "test": _rounded(baselines.by_distance(prob[start, goal], c, lo, hi)),
            "all_pairs": _rounded(baselines.expected_by_distance(prob, n, lo, hi)),
        }
        for name, prob in probs.items()
    }
    return out, probs


BASELINES = ("random_walk", "self_avoiding_walk", "blind_route")


# -- the stage -----------------------------------------------------------------------------
@dataclass
class SettingRun:
    metrics: dict[str, Any]
    episodes: pd.DataFrame  # the test episodes, with each method's success (expected, for the walks)
    seconds: float


@dataclass(frozen=True)
class SettingPlan:
    """A setting made ready: its images split, embedded, its fixed test episodes and its seed jobs."""

    setting: GridSetting
    train_ids: np.ndarray
    test_ids: np.ndarray
    episodes: pd.DataFrame
    signal: float
    jobs: list[tuple[np.ndarray, np.ndarray, pd.DataFrame, GridSetting, GridParams, int, int]]


def plan_setting(
    params: Params, s: GridSetting, m: MapData, space: FeatureSpace, hide_images: bool = False
) -> SettingPlan:
    """Grid images, their embeddings, the fixed test episodes and one :func:`train_and_evaluate` job per seed.

    ``hide_images`` (an ablation, ``benchmarks/bench_grid.py``): the agent sees zero vectors instead of
    the patch embeddings, so it can only learn an image-blind policy."""
    p, seed = params.grid, params.base.seed
    origins = grid_origins(m, s.size * s.patch)
    test_ids = split_images(len(origins), p.test_fraction, seed, s.name)
    train_ids = np.setdiff1d(np.arange(len(origins)), test_ids)
    emb = embed_patches(space, m.rgb, origins, s.size, s.patch)
    signal = baselines.directional_signal(emb[test_ids], s.size)
    if hide_images:
        emb = np.zeros_like(emb)
    rng = np.random.default_rng([*_setting_seed(seed, s.name), 0])
    episodes = baselines.grid_episodes(range(len(test_ids)), s.size, s.c_min, s.c_max, p.pairs, rng)
    jobs = [(emb[train_ids], emb[test_ids], episodes, s, p, seed, i) for i in range(p.seeds)]
    return SettingPlan(s, train_ids, test_ids, episodes, signal, jobs)


def finish_setting(params: Params, plan: SettingPlan, success: np.ndarray) -> tuple[dict[str, Any], pd.DataFrame]:
    """The setting's metrics and its test episodes with each method's success (expected, for the walks),
    from ``success``, the (seeds, E) outcomes of its jobs."""
    p, seed, s, episodes = params.grid, params.base.seed, plan.setting, plan.episodes
    c = episodes["c"].to_numpy(int)
    base, probs = baseline_results(s, p, episodes, seed)
    start, goal = episodes["start"].to_numpy(int), episodes["goal"].to_numpy(int)
    table = episodes.assign(setting=s.name, image=plan.test_ids[episodes["image"].to_numpy(int)])
    for i, row in enumerate(success):
        table[f"agent_seed{i}"] = row.astype(int)
    for name in BASELINES:
        table[name] = np.round(probs[name][start, goal], 6)
    metrics = {
        **s.model_dump(exclude={"name"}),
        "images": {"train": len(plan.train_ids), "test": len(plan.test_ids), "side_px": s.size * s.patch},
        "test_episodes": len(episodes),
        "directional_signal_test": round(plan.signal, 4),
        "agent": {
            "seeds": p.seeds,
            "timesteps": p.timesteps,
            "warm_start": p.warm_start,
            "imitate": p.imitate if p.warm_start != "none" else 0,
            **agent_results(success, c, s, p.bootstrap_reps, seed),
        },
        **base,
    }
    return metrics, table


def run_setting(
    params: Params, s: GridSetting, m: MapData, space: FeatureSpace, hide_images: bool = False
) -> SettingRun:
    """One setting alone: :func:`plan_setting`, its seeds in ``grid.workers`` processes, :func:`finish_setting`."""
    t0 = time.perf_counter()
    plan = plan_setting(params, s, m, space, hide_images)
    success = ordered_map(train_and_evaluate, plan.jobs, params.grid.workers, desc=f"grid {s.name}", unit="seed")
    metrics, table = finish_setting(params, plan, np.stack(success))
    return SettingRun(metrics, table, time.perf_counter() - t0)


def curves(name: str, r: dict[str, Any]) -> pd.DataFrame:
    """Success by distance of every method in one setting (the test episodes), for ``dvc plots``."""
    cs = [str(k) for k in range(r["c_min"], r["c_max"] + 1)]
    out = pd.DataFrame({"c": [int(k) for k in cs]})
    out["agent"] = [r["agent"]["success"][k] for k in cs]
    out["agent_ci_low"] = [r["agent"]["ci95"][k][0] for k in cs]
    out["agent_ci_high"] = [r["agent"]["ci95"][k][1] for k in cs]
    for b in BASELINES:
        out[b] = [r[b]["test"][k] for k in cs]
    return out.assign(setting=name)


def plot_curves(frames: dict[str, pd.DataFrame], path: Path) -> None:
    """One panel per setting: success by distance, the agent with its interval and each baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(frames), figsize=(5 * len(frames), 3.8), squeeze=False)
    for ax, (name, f) in zip(axes[0], frames.items(), strict=True):
        ax.fill_between(f["c"], f["agent_ci_low"], f["agent_ci_high"], color="tab:blue", alpha=0.2)
        ax.plot(f["c"], f["agent"], "o-", color="tab:blue", label="agent (PPO, mean over seeds, 95 % CI)")
        for b, style, colour in zip(
            BASELINES, ("s--", "^--", "D-"), ("tab:grey", "tab:orange", "tab:green"), strict=True
        ):
            ax.plot(f["c"], f[b], style, color=colour, label=b.replace("_", " "))
        ax.set(title=name, xlabel="start-goal distance C (cells)", ylabel="success rate (test episodes)", ylim=(0, 1))
        ax.set_xticks(f["c"])
    axes[0][-1].legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_grid(
    params: Params,
    map_path: str | Path,
    features_dir: str | Path,
    out_dir: str | Path,
    metrics_path: str | Path,
    timing_path: str | Path | None = None,
) -> dict[str, Any]:
    """The ``grid`` stage: every setting of ``grid.settings``; returns the metrics written to ``metrics_path``."""
    t0 = time.perf_counter()
    configure_torch(params.grid.torch_threads)
    m = read_map(map_path)
    space = load_space(features_dir, m)
    plans = [plan_setting(params, s, m, space) for s in params.grid.settings]
    jobs = [job for plan in plans for job in plan.jobs]  # every seed of every setting in one pool
    t_train = time.perf_counter()
    success = ordered_map(train_and_evaluate, jobs, params.grid.workers, desc="grid", unit="seed")
    t_train = time.perf_counter() - t_train
    runs, first = {}, 0
    for plan in plans:
        runs[plan.setting.name] = finish_setting(params, plan, np.stack(success[first : first + len(plan.jobs)]))
        first += len(plan.jobs)
    frames = {name: curves(name, metrics) for name, (metrics, _) in runs.items()}
    with staged_dir(out_dir) as tmp:
        write_csv(tmp / "episodes.csv", pd.concat([table for _, table in runs.values()], ignore_index=True))
        (tmp / "curves").mkdir()
        for name, f in frames.items():
            write_csv(tmp / "curves" / f"{name}.csv", f.drop(columns="setting"))
        plot_curves(frames, tmp / "success_by_c.png")
    metrics = {
        "seed": params.base.seed,
        "protocol": (
            "a grid of patches, 4 moves; the agent sees its patch and the goal patch; success: it reaches the "
            "goal cell within the budget; pairs per test image and distance drawn uniformly among the pairs "
            "at that distance; success per distance C and the average over C"
        ),
        "published": PUBLISHED,
        "settings": {name: metrics for name, (metrics, _) in runs.items()},
        "settings_order": list(runs),
        "seconds": {"total": round(time.perf_counter() - t0, 1), "agent_seeds": round(t_train, 1)},
    }
    write_metrics(metrics_path, timing_path, metrics)
    return {k: v for k, v in metrics.items() if k != "published"}
