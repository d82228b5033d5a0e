"""Load what the learning stages share: the scene, the map memory and the stop threshold."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from maprl.config import Params
from maprl.data.geo import read_map
from maprl.data.splits import with_validation
from maprl.data.tile import read_targets
from maprl.errors import InputError
from maprl.features.cache import load_space
from maprl.features.memory import MapMemory
from maprl.nav.core import NavConfig
from maprl.nav.scene import Scene
from maprl.views import valid_centres


@dataclass
class Runtime:
    scene: Scene
    memory: MapMemory | None
    stop_threshold: float


def pooled_memory(scene: Scene, stride: int, min_separation: float) -> MapMemory:
    """A map memory of the scene's own feature space on a ``stride`` grid (tests and benchmarks)."""
    ok = valid_centres(scene.map.valid, scene.view_size)
    ys, xs = np.nonzero(ok[::stride, ::stride])
    pos = np.stack([xs * stride, ys * stride], 1).astype(float)
    return MapMemory(pos, scene.space.embed_at(pos[:, 0], pos[:, 1]), min_separation)


def read_stop_threshold(features_dir: str | Path) -> float:
    """The stop threshold the encode stage calibrated (``calibration.json``)."""
    calib = Path(features_dir) / "calibration.json"
    if not calib.exists():
        raise InputError(f"{calib} does not exist; run `dvc repro encode` first")
    try:
        value = float(json.loads(calib.read_text())["stop_threshold"])
    except (ValueError, KeyError, TypeError) as err:
        raise InputError(f"{calib} is not a calibration written by the encode stage ({err}); rerun encode") from None
    if not -1.0 <= value <= 1.0:  # NaN fails this too
        raise InputError(f"{calib}: stop_threshold {value} is not a cosine similarity in [-1, 1]; rerun encode")
    return value


def load_runtime(params: Params, map_path: str | Path, targets_path: str | Path, features_dir: str | Path) -> Runtime:
    """The scene in the encode stage's feature space, its map memory and the calibrated stop threshold."""
    m = read_map(map_path)
    targets = read_targets(targets_path, m, params.tile.view_size)
    targets = with_validation(targets, params.train.val_fraction, params.base.seed)
    stop = read_stop_threshold(features_dir)
    space = load_space(features_dir, m)
    memory = MapMemory(space.grid_positions(), space.grid_embeddings(), 2 * params.evaluate.success_radius)
    view = params.tile.view_size
    return Runtime(Scene(m, targets, space, view, params.env.max_nodata), memory, stop)


def nav_config(
    params: Params, rt: Runtime, *, max_steps: int, shaping: float, gamma: float = 0.99, decoy_rate: float = 0.0
) -> NavConfig:
    """The env configuration of ``params`` on a loaded runtime."""
    return NavConfig(
        env=params.env,
        agent=params.agent,
        stop_threshold=rt.stop_threshold,
        success_radius=params.evaluate.success_radius,
        max_steps=max_steps,
        shaping=shaping,
        gamma=gamma,
        decoy_rate=decoy_rate,
    )


def data_fingerprint(rt: Runtime) -> dict[str, Any]:
    """Content hashes of what a trial sees: map pixels, targets and splits, feature cache, stop threshold."""
    sc = rt.scene

    def digest(*arrays: np.ndarray) -> str:
        h = hashlib.sha256()
        for a in arrays:
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()[:16]

    feats = rt.memory.embeddings if rt.memory is not None else np.zeros(0)
    return {
        "map": digest(sc.map.rgb, sc.map.valid),
        "targets": digest(sc.targets_xy, sc.targets["split"].to_numpy().astype(str)),
        "features": digest(feats),
        "stop_threshold": round(float(rt.stop_threshold), 6),
    }
