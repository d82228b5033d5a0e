"""Evaluate the agent and the baselines on the same fixed episodes.

An episode is (target row, start position). :func:`make_episodes` draws them once from a
seed; :func:`evaluate_methods` runs every method on exactly those, one batched
:class:`~maprl.vecenv.NavVecEnv` per method, with the same step, step budget and stop rule.

Per episode (one row of ``episodes.csv``):

* ``success``: ground truth, the final view centre lies within ``success_radius`` of the
  target centre. An agent that stops far away fails.
* ``stopped``: the agent's own stop rule fired (similarity >= ``stop_threshold``).
* ``spl``: success weighted by path length (Anderson et al. 2018), ``S * l / max(p, l)`` with
  ``l`` the start distance to the target centre and ``p`` the path flown; 0 on failure.
* ``final_feature_cosine`` (the env's similarity) and ``final_pixel_cosine`` (raw uint8
  pixels of the final view against the target photo), ``episode_reward`` (sum).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from maprl.baselines import AgentController, Controller, ControllerFactory
from maprl.config import EvaluateParams
from maprl.features import crop_views
from maprl.geo import atomic_path, write_json
from maprl.memory import MapMemory
from maprl.navcore import DECOY_DISTANCE_RADII, NavConfig
from maprl.scene import Scene
from maprl.vecenv import NavVecEnv

EPISODE_COLUMNS = ["episode", "split", "target_row", "target_id", "start_x", "start_y"]
HEADLINE = "agent"


# -- episodes ------------------------------------------------------------------------------------
def make_episodes(
    scene: Scene, split: str, n: int, seed: int, decoy_rate: float = 0.0, decoy_distance: float = 0.0
) -> pd.DataFrame:
    """``n`` fixed episodes on ``split``: targets cycle through a shuffled split, starts uniform valid.

    With ``decoy_rate`` > 0 that share of episodes also gets a decoy for the top retrieval
    candidate, at least ``decoy_distance`` px from its target (see :mod:`maprl.navcore`);
    ``decoy_x`` / ``decoy_y`` are NaN where there is none.
    """
    rng = np.random.default_rng(seed)
    rows = scene.split_rows(split)
    order = np.resize(rng.permutation(rows), n)  # every target once before any twice
    starts = np.array([scene.sample_start(rng) for _ in range(n)], float).reshape(n, 2)
    decoys = np.full((n, 2), np.nan)
    if decoy_rate > 0:
        xy = scene.targets[["x", "y"]].to_numpy(float)[order]
        for i in np.flatnonzero(rng.random(n) < decoy_rate):
            decoys[i] = scene.sample_far(rng, xy[i], decoy_distance)
    return pd.DataFrame(
        {
            "episode": np.arange(n),
            "split": split,
            "target_row": order.astype(np.int64),
            "target_id": scene.targets["id"].to_numpy()[order],
            "start_x": starts[:, 0],
            "start_y": starts[:, 1],
            "decoy_x": decoys[:, 0],
            "decoy_y": decoys[:, 1],
        }
    )


def make_split_episodes(scene: Scene, splits: Sequence[str], n: int, seed: int) -> pd.DataFrame:
    """:func:`make_episodes` for each split (its own seed derived from ``seed``), concatenated."""
    frames = []
    for k, split in enumerate(splits):
        sub_seed = int(np.random.SeedSequence([seed, k]).generate_state(1)[0])
        frames.append(make_episodes(scene, split, n, sub_seed))
    return pd.concat(frames, ignore_index=True)


DECOY_SPLIT = "test_decoy"


def make_decoy_episodes(scene: Scene, n: int, seed: int, rate: float, success_radius: float) -> pd.DataFrame:
    """The decoy stress test: ``n`` test-split episodes labelled ``test_decoy`` (seeded apart from the others)."""
    sub_seed = int(np.random.SeedSequence([seed, 99]).generate_state(1)[0])
    ep = make_episodes(scene, "test", n, sub_seed, rate, DECOY_DISTANCE_RADII * success_radius)
    return ep.assign(split=DECOY_SPLIT)


def _episode_tuples(episodes: pd.DataFrame) -> list[tuple[float, ...]]:
    cols = ["target_row", "start_x", "start_y"] + (["decoy_x", "decoy_y"] if "decoy_x" in episodes else [])
    return [(int(r[0]), *map(float, r[1:])) for r in episodes[cols].to_numpy(float)]


# -- one batched run -------------------------------------------------------------------------------
class _Rollout:
    """Per-agent bookkeeping of each agent's first episode."""

    def __init__(self, venv: NavVecEnv, record_paths: bool) -> None:
        n = venv.num_envs
        self.venv, self.record = venv, record_paths
        self.active = np.ones(n, bool)
        self.reward = np.zeros(n)
        self.infos: list[dict[str, Any]] = [{} for _ in range(n)]
        self.paths: list[list[np.ndarray]] = [[venv.core.pos[i].copy()] for i in range(n)]

    def record_step(self, reward: np.ndarray, done: np.ndarray, infos: list[dict[str, Any]]) -> None:
        live = self.active.copy()
        self.reward[live] += reward[live]
        for i in np.flatnonzero(live):
            if done[i]:  # the env has auto-reset this agent: its final state is in the info
                self.infos[i] = infos[i]
                self.active[i] = False
                pos = np.array(infos[i]["position"], float)
            else:
                pos = self.venv.core.pos[i].copy()
            if self.record:
                self.paths[i].append(pos)

    def path_arrays(self) -> list[np.ndarray]:
        return [np.stack(p) for p in self.paths] if self.record else []


def pixel_cosine(scene: Scene, pos: np.ndarray, rows: np.ndarray, batch: int = 64) -> np.ndarray:
    """Cosine of the raw uint8 pixels of the views at ``pos`` (N, 2) and the target photos ``rows``."""
    txy = scene.targets[["x", "y"]].to_numpy(float)[rows]
    out = np.zeros(len(pos))
    for s in range(0, len(pos), batch):
        sl = slice(s, s + batch)
        a = crop_views(scene.map.rgb, pos[sl, 0], pos[sl, 1], scene.view_size)
        b = crop_views(scene.map.rgb, txy[sl, 0], txy[sl, 1], scene.view_size)
        a, b = a.reshape(len(a), -1).astype(np.float32), b.reshape(len(b), -1).astype(np.float32)
        dot = np.einsum("ij,ij->i", a, b, dtype=np.float64)
        norm = np.sqrt(np.einsum("ij,ij->i", a, a, dtype=np.float64) * np.einsum("ij,ij->i", b, b, dtype=np.float64))
        out[sl] = np.clip(dot / np.maximum(norm, 1e-12), -1.0, 1.0)
    return out


def spl(success: np.ndarray, shortest: np.ndarray, path: np.ndarray) -> np.ndarray:
    """Success weighted by path length: ``S * l / max(p, l)`` (1 for a success with l = p = 0)."""
    s, lo, p = np.asarray(success, float), np.asarray(shortest, float), np.asarray(path, float)
    denom = np.maximum(p, lo)
    ratio = np.divide(lo, denom, out=np.ones_like(lo), where=denom > 0)
    return s * ratio


def _episode_frame(venv: NavVecEnv, episodes: pd.DataFrame, r: _Rollout) -> pd.DataFrame:
    info = pd.DataFrame(r.infos)
    df = episodes.reset_index(drop=True).copy()
    final = np.array(info["position"].tolist(), float).reshape(len(df), 2)
    target = np.array(info["target"].tolist(), float).reshape(len(df), 2)
    df["success"] = info["is_success"].astype(bool)
    df["stopped"] = info["stopped"].astype(bool)
    df["steps"] = info["steps"].astype(np.int64)
    df["start_distance_px"] = info["start_distance_px"].astype(float)
    df["final_distance_px"] = info["distance_px"].astype(float)
    df["final_distance_m"] = info["distance_m"].astype(float)
    df["path_length_px"] = info["path_length_px"].astype(float)
    df["spl"] = spl(df["success"].to_numpy(), df["start_distance_px"].to_numpy(), df["path_length_px"].to_numpy())
    df["final_feature_cosine"] = info["similarity"].astype(float)
    df["final_pixel_cosine"] = pixel_cosine(venv.scene, final, df["target_row"].to_numpy(np.int64))
    df["episode_reward"] = r.reward
    df["final_x"], df["final_y"] = final[:, 0], final[:, 1]
    df["target_x"], df["target_y"] = target[:, 0], target[:, 1]
    return df


def run_episodes(
    venv: NavVecEnv, controller: Controller, episodes: pd.DataFrame, record_paths: bool = True
) -> tuple[pd.DataFrame, list[np.ndarray]]:
    """Run agent i on episode i until every agent has finished its first episode.

    Returns one row per episode (the columns of ``episodes`` plus the outcome) and, with
    ``record_paths``, each agent's positions from start to end, (T_i + 1, 2).
    """
    if venv.num_envs != len(episodes):
        raise ValueError(f"the vector env has {venv.num_envs} agents but there are {len(episodes)} episodes")
    fixed = _episode_tuples(episodes)
    venv.set_episodes(fixed)
    obs = venv.reset()
    controller.reset(venv)
    rollout = _Rollout(venv, record_paths)
    while rollout.active.any():
        venv.set_episodes(fixed)  # agents that finished replay known episodes (ignored), not random ones
        actions = controller.act(obs, venv)  # type: ignore[arg-type]
        obs, reward, done, infos = venv.step(actions)
        rollout.record_step(np.asarray(reward, float), np.asarray(done, bool), list(infos))
    return _episode_frame(venv, episodes, rollout), rollout.path_arrays()


def make_eval_env(scene: Scene, config: NavConfig, n: int, memory: MapMemory | None = None) -> NavVecEnv:
    """A vector env of ``n`` agents for fixed episodes on any split."""
    return NavVecEnv(scene, n, config, split="all", memory=memory, seed=0)


def evaluate_methods(
    scene: Scene,
    memory: MapMemory | None,
    config: NavConfig,
    methods: Mapping[str, ControllerFactory],
    episodes: pd.DataFrame,
    record_paths: bool = True,
) -> tuple[pd.DataFrame, dict[str, list[np.ndarray]]]:
    """Run every method on the same episodes: rows gain a ``method`` column; paths by method."""
    frames, paths = [], {}
    for name, factory in methods.items():
        venv = make_eval_env(scene, config, len(episodes), memory)
        df, paths[name] = run_episodes(venv, factory(), episodes, record_paths)
        df.insert(0, "method", name)
        frames.append(df)
    return pd.concat(frames, ignore_index=True), paths


def evaluate_model(model: Any, rt: Any, config: NavConfig, split: str, n: int, seed: int) -> dict[str, Any]:
    """Periodic evaluation during training: the model on ``n`` fixed episodes of ``split``.

    ``rt`` needs ``scene`` and ``memory`` attributes. Returns :func:`summarise` for the split.
    """
    episodes = make_episodes(rt.scene, split, n, seed)
    venv = make_eval_env(rt.scene, config, n, rt.memory)
    df, _ = run_episodes(venv, AgentController(model), episodes, record_paths=False)
    return summarise(df, [])[split]


# -- summaries -----------------------------------------------------------------------------------------
def bin_labels(edges: Sequence[float]) -> list[str]:
    """``[250, 500]`` -> ``["0-250", "250-500", "500+"]``."""
    e = [0.0, *sorted(float(x) for x in edges)]
    return [f"{a:g}-{b:g}" for a, b in itertools.pairwise(e)] + [f"{e[-1]:g}+"]


def distance_bin(start_distance: np.ndarray, edges: Sequence[float]) -> np.ndarray:
    """Bin label of each start distance."""
    labels = np.array(bin_labels(edges))
    return labels[np.digitize(np.asarray(start_distance, float), sorted(float(x) for x in edges))]


def _num(x: Any) -> float | None:
    x = float(x)
    return None if not np.isfinite(x) else x


def _split_summary(d: pd.DataFrame, edges: Sequence[float]) -> dict[str, Any]:
    bins = distance_bin(d["start_distance_px"].to_numpy(), edges)
    by_bin = {lab: d["success"].to_numpy()[bins == lab] for lab in bin_labels(edges)}
    return {
        "episodes": len(d),
        "success_rate": _num(d["success"].mean()),
        "spl": _num(d["spl"].mean()),
        "stop_rate": _num(d["stopped"].mean()),
        "false_stop_rate": _num((d["stopped"] & ~d["success"]).mean()),
        "final_distance_px_mean": _num(d["final_distance_px"].mean()),
        "final_distance_px_median": _num(d["final_distance_px"].median()),
        "final_distance_m_mean": _num(d["final_distance_m"].mean()),
        "final_distance_m_median": _num(d["final_distance_m"].median()),
        "steps_mean": _num(d["steps"].mean()),
        "final_feature_cosine_mean": _num(d["final_feature_cosine"].mean()),
        "final_pixel_cosine_mean": _num(d["final_pixel_cosine"].mean()),
        "mean_episode_reward": _num(d["episode_reward"].mean()),
        "success_by_distance": {k: _num(v.mean()) if len(v) else None for k, v in by_bin.items()},
        "episodes_by_distance": {k: len(v) for k, v in by_bin.items()},
    }


def summarise(df: pd.DataFrame, bins: Sequence[float]) -> dict[str, dict[str, Any]]:
    """Per split: rates, distances, steps, cosines, reward and success by start-distance bin.

    NaN (e.g. metres on a pixel-grid map, an empty bin) becomes ``None`` so the JSON is strict.
    """
    return {str(s): _split_summary(df[df["split"] == s], bins) for s in pd.unique(df["split"])}


def methods_table(df: pd.DataFrame, bins: Sequence[float]) -> pd.DataFrame:
    """Tidy table: one row per method and split with the scalar summary metrics."""
    rows = []
    for method, d in df.groupby("method", sort=False):
        for split, s in summarise(d, bins).items():
            scalars = {k: v for k, v in s.items() if not isinstance(v, dict)}
            rows.append({"method": method, "split": split, **scalars})
    return pd.DataFrame(rows)


def distance_table(df: pd.DataFrame, bins: Sequence[float]) -> pd.DataFrame:
    """Tidy table: success rate and SPL per method, split and start-distance bin."""
    d = df.assign(bin=distance_bin(df["start_distance_px"].to_numpy(), bins))
    edges = [0.0, *sorted(float(x) for x in bins), float("inf")]
    rows = []
    for (method, split), g in d.groupby(["method", "split"], sort=False):
        for k, lab in enumerate(bin_labels(bins)):
            sel = g[g["bin"] == lab]
            rows.append(
                {
                    "method": method,
                    "split": split,
                    "bin": lab,
                    "bin_lo": edges[k],
                    "bin_hi": edges[k + 1],
                    "episodes": len(sel),
                    "success_rate": _num(sel["success"].mean()) if len(sel) else None,
                    "spl": _num(sel["spl"].mean()) if len(sel) else None,
                }
            )
    return pd.DataFrame(rows)


# -- outputs ----------------------------------------------------------------------------------------
def metrics_dict(
    df: pd.DataFrame, bins: Sequence[float], stop_threshold: float | None = None, headline: str = HEADLINE
) -> dict[str, Any]:
    """``{"agent": {split: ...}, "baselines": {method: {split: ...}}, "stop_threshold": ...}``."""
    out: dict[str, Any] = {"baselines": {}, "stop_threshold": stop_threshold}
    for method, d in df.groupby("method", sort=False):
        summary = summarise(d, bins)
        if method == headline:
            out[headline] = summary
        else:
            out["baselines"][str(method)] = summary
    return out


def _write_csv(frame: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def _show_indices(d: pd.DataFrame, k: int) -> list[int]:
    """Positions (within one method's rows) of the first ``k`` test episodes (any split if none)."""
    test = np.flatnonzero(d["split"].to_numpy() == "test")
    pick = test if len(test) else np.arange(len(d))
    return [int(i) for i in pick[:k]]


def _write_trajectories(
    df: pd.DataFrame, paths: Mapping[str, list[np.ndarray]], scene: Scene, out: Path, k: int
) -> None:
    from maprl.plotting import plot_trajectories

    methods = [m for m in paths if len(paths[m])]
    if not methods:
        return
    first = df[df["method"] == methods[0]].reset_index(drop=True)
    show = _show_indices(first, k)
    targets = [(float(first.at[i, "target_x"]), float(first.at[i, "target_y"])) for i in show]
    ok, rows = [], []
    for m in methods:
        d = df[df["method"] == m].reset_index(drop=True)
        ok.append([bool(d.at[i, "success"]) for i in show])
        rows.append([paths[m][i] for i in show])
    titles = [f"{first.at[i, 'split']} episode {first.at[i, 'episode']}" for i in show]
    with atomic_path(out) as tmp:
        plot_trajectories(scene.map.rgb, methods, rows, targets, ok, scene.view_size, str(tmp), titles)


def _write_gif(df: pd.DataFrame, paths: Mapping[str, list[np.ndarray]], scene: Scene, out: Path, frames: int) -> None:
    from maprl.plotting import episode_frames, save_gif

    candidates = [m for m in (HEADLINE, *paths) if m in paths and len(paths[m])]
    if not candidates:
        return
    method = candidates[0]
    d = df[df["method"] == method].reset_index(drop=True)
    i = _show_indices(d, 1)[0]
    target = (float(d.at[i, "target_x"]), float(d.at[i, "target_y"]))
    with atomic_path(out) as tmp:
        save_gif(episode_frames(scene.map.rgb, paths[method][i], target, scene.view_size, frames), str(tmp))


def write_outputs(
    df: pd.DataFrame,
    paths: Mapping[str, list[np.ndarray]],
    scene: Scene,
    out_dir: str | Path,
    metrics_path: str | Path,
    params: EvaluateParams,
    seed: int,
    *,
    stop_threshold: float | None = None,
    n_trajectories: int = 4,
) -> dict[str, Any]:
    """Write episodes.csv, methods.csv, success_by_distance.csv, trajectories.png, episode.gif and the metrics JSON.

    Returns the metrics dict. ``df`` and ``paths`` come from :func:`evaluate_methods`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bins = params.distance_bins
    _write_csv(df, out / "episodes.csv")
    _write_csv(methods_table(df, bins), out / "methods.csv")
    _write_csv(distance_table(df, bins), out / "success_by_distance.csv")
    _write_trajectories(df, paths, scene, out / "trajectories.png", n_trajectories)
    _write_gif(df, paths, scene, out / "episode.gif", params.gif_steps)
    metrics = metrics_dict(df, bins, stop_threshold)
    metrics.update(
        seed=seed,
        episodes_per_split=params.episodes,
        max_steps=params.max_steps,
        success_radius=params.success_radius,
        decoy_rate=params.decoy_rate,
        methods=[str(m) for m in pd.unique(df["method"])],
    )
    write_json(metrics_path, metrics)
    return metrics


# -- the evaluate stage -----------------------------------------------------------------------------
def load_model(path: str | Path, algo: str) -> Any:
    """Load a trained policy (PPO or RecurrentPPO) with a clear error if it is missing."""
    path = Path(path)
    if not path.exists():
        from maprl.errors import InputError

        raise InputError(f"policy {path} does not exist; run `dvc repro train` first")
    if algo == "recurrent_ppo":
        from sb3_contrib import RecurrentPPO

        return RecurrentPPO.load(path, device="cpu")
    from stable_baselines3 import PPO

    return PPO.load(path, device="cpu")


def run_evaluate(
    params: Any,
    map_path: str | Path,
    targets_path: str | Path,
    features_dir: str | Path,
    models_dir: str | Path,
    out_dir: str | Path,
    metrics_path: str | Path,
) -> dict[str, Any]:
    """Evaluate both agents and every baseline on the same fixed episodes of each split."""
    from maprl.baselines import default_baselines
    from maprl.runtime import load_runtime, nav_config
    from maprl.stages import agent_params

    rt = load_runtime(params, map_path, targets_path, features_dir)
    p = params.evaluate
    episodes = make_split_episodes(rt.scene, ["train", "test"], p.episodes, params.base.seed)
    if p.decoy_rate > 0:
        decoys = make_decoy_episodes(rt.scene, p.episodes, params.base.seed, p.decoy_rate, p.success_radius)
        episodes = pd.concat([episodes, decoys], ignore_index=True)
    frames, paths = [], {}
    for name, agent in (("agent", "memory"), ("agent_original", "original")):
        ap = agent_params(params, agent)
        model = load_model(Path(models_dir) / agent / "policy.zip", ap.train.algo)
        cfg = nav_config(ap, rt, max_steps=p.max_steps, shaping=0.0)
        df, pth = evaluate_methods(
            rt.scene, rt.memory, cfg, {name: functools.partial(AgentController, model)}, episodes
        )
        frames.append(df)
        paths.update(pth)
    cfg = dataclasses.replace(nav_config(params, rt, max_steps=p.max_steps, shaping=0.0), memory="retrieval")
    df, pth = evaluate_methods(
        rt.scene, rt.memory, cfg, default_baselines(rt.scene, rt.memory, params.base.seed), episodes
    )
    frames.append(df)
    paths.update(pth)
    return write_outputs(
        pd.concat(frames, ignore_index=True), paths, rt.scene, out_dir, metrics_path, p, params.base.seed,
        stop_threshold=rt.stop_threshold,
    )  # fmt: skip
