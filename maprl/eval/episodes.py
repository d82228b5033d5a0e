"""Fixed episodes and one batched run of a controller over them.

An episode is (target row, start position[, decoy]). :func:`make_episodes` draws them once from
a seed; :func:`evaluate_methods` runs every method on exactly those, one batched
:class:`~maprl.nav.vecenv.NavVecEnv` per method, with the same step, step budget and stop rule.
The outcome columns of a run are described in :mod:`maprl.eval.metrics`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from maprl.eval.baselines import Controller, ControllerFactory
from maprl.eval.metrics import spl
from maprl.features.memory import MapMemory
from maprl.nav.core import DECOY_DISTANCE_RADII, NavConfig
from maprl.nav.scene import Scene
from maprl.nav.vecenv import NavVecEnv
from maprl.views import pixel_cosine

EPISODE_COLUMNS = ["episode", "split", "target_row", "target_id", "start_x", "start_y"]


def make_episodes(
    scene: Scene, split: str, n: int, seed: int, decoy_rate: float = 0.0, decoy_distance: float = 0.0
) -> pd.DataFrame:
    """``n`` fixed episodes on ``split``: targets cycle through a shuffled split, starts uniform valid.

    With ``decoy_rate`` > 0 that share of episodes also gets a decoy for the top retrieval
    candidate, at least ``decoy_distance`` px from its target (see :mod:`maprl.nav.core`);
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
    sc = venv.scene
    df["final_pixel_cosine"] = pixel_cosine(
        sc.map.rgb, final, sc.targets_xy[df["target_row"].to_numpy(np.int64)], sc.view_size
    )
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
