"""Load what the learning stages share: the scene, the map memory and the stop threshold."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from maprl.config import Params
from maprl.features import valid_centres
from maprl.geo import read_map
from maprl.memory import MapMemory
from maprl.navcore import NavConfig
from maprl.scene import Scene
from maprl.tiling import read_targets


@dataclass
class Runtime:
    scene: Scene
    memory: MapMemory | None
    stop_threshold: float


def with_validation(targets: pd.DataFrame, fraction: float, seed: int) -> pd.DataFrame:
    """Relabel part of the train split as ``val``: whole spatial blocks if blocks exist, else rows."""
    out = targets.copy()
    train = out["split"] == "train"
    rng = np.random.default_rng([seed, 1])
    blocks = out.loc[train, "block"].unique() if "block" in out else np.array([-1])
    if len(blocks) > 1 and (blocks >= 0).all():
        n = max(1, round(len(blocks) * fraction))
        val = train & out["block"].isin(rng.permutation(blocks)[:n])
    else:
        idx = np.flatnonzero(train.to_numpy())
        val = out.index.isin(out.index[rng.permutation(idx)[: max(1, round(len(idx) * fraction))]])
    out.loc[val, "split"] = "val"
    return out


def pooled_memory(scene: Scene, stride: int, min_separation: float) -> MapMemory:
    ok = valid_centres(scene.map.valid, scene.view_size)
    ys, xs = np.nonzero(ok[::stride, ::stride])
    pos = np.stack([xs * stride, ys * stride], 1).astype(float)
    return MapMemory(pos, scene.space.embed_at(pos[:, 0], pos[:, 1]), min_separation)


def load_runtime(params: Params, map_path: str | Path, targets_path: str | Path, features_dir: str | Path) -> Runtime:
    """The scene in the encode stage's feature space, its map memory and the calibrated stop threshold.

    Without an encode output (``features_dir`` missing) it falls back to the ``pooled`` space and
    ``env.success_threshold``; tests and the Gymnasium env use that.
    """
    from maprl.encoders import PooledGrid, load_space

    m = read_map(map_path)
    targets = with_validation(read_targets(targets_path), params.train.val_fraction, params.base.seed)
    view = params.tile.view_size
    calib = Path(features_dir) / "calibration.json"
    if calib.exists():
        space = load_space(features_dir, m)
        stop = float(json.loads(calib.read_text())["stop_threshold"])
    else:
        space, stop = PooledGrid(m, view, 16), float(params.env.success_threshold)
    memory = MapMemory(space.grid_positions(), space.grid_embeddings(), 2 * params.evaluate.success_radius)
    return Runtime(Scene(m, targets, space, view), memory, stop)


def nav_config(params: Params, rt: Runtime, *, max_steps: int, shaping: float, decoy_rate: float = 0.0) -> NavConfig:
    e, a = params.env, params.agent
    return NavConfig(
        action_step=e.action_step,
        max_steps=max_steps,
        stop_threshold=rt.stop_threshold,
        bonus_threshold=e.bonus_threshold,
        bonus_scale=e.bonus_scale,
        success_bonus=e.success_bonus,
        step_penalty=e.step_penalty,
        shaping=shaping,
        success_radius=params.evaluate.success_radius,
        memory=a.memory,
        n_candidates=a.n_candidates,
        include_position=a.include_position,
        include_prev_action=a.include_prev_action,
        decoy_rate=decoy_rate,
    )
