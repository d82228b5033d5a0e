"""Load what the learning stages share: the scene, the map memory and the stop threshold."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from maprl.config import Params
from maprl.data.geo import MapData, read_map
from maprl.data.splits import with_validation
from maprl.data.tile import read_domains, read_targets
from maprl.errors import InputError
from maprl.features.cache import MapSpace, load_space
from maprl.features.matching import OrientationMatcher
from maprl.features.memory import MapMemory
from maprl.features.photos import Embedded, embed_photos, load_photo_embeddings, randomized_photos, target_photos
from maprl.nav.core import NavConfig
from maprl.nav.scene import Scene
from maprl.views import valid_centres


@dataclass
class Runtime:
    """The scene (target photos from the map itself), its map memory, the stop threshold, and the
    query domains: their imagery on the map's grid and the encode stage's photo embeddings."""

    scene: Scene
    memory: MapMemory | None
    stop_threshold: float
    imagery: dict[str, np.ndarray] = field(default_factory=dict)  # domain -> (H, W, 3); "same" is the map
    photos: dict[str, Embedded] = field(default_factory=dict)  # domain -> embedded target photos
    n_headings: int = 1  # headings a photo is tried at (encoder.heading_search)

    def __post_init__(self) -> None:
        self.imagery.setdefault("same", self.scene.map.rgb)

    @property
    def domains(self) -> list[str]:
        return list(self.photos) or ["same"]

    def domain_scene(self, domain: str) -> Scene:
        """The scene whose target photos come from ``domain`` (as encode embedded them)."""
        if domain not in self.photos:
            raise InputError(f"no query domain {domain!r}; domains are {', '.join(self.domains)}")
        xy = self.scene.targets_xy
        photos = target_photos(self.imagery[domain], xy, self.scene.view_size)
        return self.scene.with_photos(photos, self.photos[domain].embeddings, domain)

    def randomized_scene(self, split: str, strength: float, copies: int, seed: int, tiers: bool = False) -> Scene:
        """Domain randomization: the scene with ``copies`` randomized photos of each ``split`` target.

        Each copy is cut from a random domain (the map or a query domain) at the target and changed
        by two random perturbations up to ``strength``, then embedded at its best heading. The
        other splits keep their photos, so evaluation episodes do not change. With ``tiers`` (a
        curriculum), copy c is perturbed only up to ``strength * (c + 1) / copies``, the ``split``
        targets keep their own photo too, and the targets' ``strength_cap`` column says each photo's cap.
        """
        sc = self.scene
        rng = np.random.default_rng([seed, 23])
        rows = sc.split_rows(split)
        keep = np.arange(len(sc.targets)) if tiers else np.setdiff1d(np.arange(len(sc.targets)), rows)
        names = list(self.imagery)
        photos, order = [sc.target_photo(int(r)) for r in keep], list(keep)
        caps = [0.0] * len(keep)
        for c in range(copies):
            cap = strength * (c + 1) / copies if tiers else strength
            pick = rng.integers(len(names), size=len(rows))
            for k, name in enumerate(names):
                mine = rows[pick == k]
                xy = sc.targets_xy[mine]
                photos += list(randomized_photos(self.imagery[name], xy, sc.view_size, cap, rng))
                order += list(mine)
                caps += [cap] * len(mine)
        stack = np.stack(photos)
        emb = embed_photos(sc.space, self.memory, stack, self.n_headings, accept=self.stop_threshold).embeddings
        targets = sc.targets.iloc[order]
        if tiers:
            targets = targets.assign(strength_cap=caps)
        return sc.with_targets(targets, stack, emb)


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


def map_memory(params: Params, space: MapSpace, m: MapData) -> MapMemory:
    """The map memory over the feature space's grid; with ``agent.retriever: orientation`` it carries an
    :class:`OrientationMatcher` of the map's pixels (the encoder's heading search, candidates separated
    by two success radii, as the memory's)."""
    memory = MapMemory(space.grid_positions(), space.grid_embeddings(), 2 * params.evaluate.success_radius)
    if params.agent.retriever == "orientation":
        memory.matcher = pixel_matcher(params, m)
    return memory


def pixel_matcher(params: Params, m: MapData) -> OrientationMatcher:
    """The map's :class:`OrientationMatcher` as ``agent.retriever: orientation`` uses it: the encoder's heading
    search, candidates two success radii apart, the coarse search at 1/``view // 64`` (at least 1/2)."""
    view = params.tile.view_size
    ok = valid_centres(m.valid, view)
    radius = params.evaluate.success_radius
    return OrientationMatcher(m.rgb, ok, view, 2 * radius, params.encoder.heading_search, max(2, view // 64))


def load_runtime(params: Params, map_path: str | Path, targets_path: str | Path, features_dir: str | Path) -> Runtime:
    """The scene in the encode stage's feature space, its map memory and the calibrated stop threshold."""
    m = read_map(map_path)
    targets = read_targets(targets_path, m, params.tile.view_size)
    targets = with_validation(targets, params.train.val_fraction, params.base.seed)
    stop = read_stop_threshold(features_dir)
    space = load_space(features_dir, m)
    memory = map_memory(params, space, m)
    view = params.tile.view_size
    photos, n_headings = load_photo_embeddings(features_dir, targets["id"].to_numpy())
    imagery = {"same": m.rgb, **{name: rgb for name, (rgb, _) in read_domains(map_path).items()}}
    missing = sorted(set(photos) - set(imagery))
    if missing:
        raise InputError(
            f"{features_dir} has photos of domain(s) {', '.join(missing)} that the map lacks; rerun encode"
        )
    rt = Runtime(Scene(m, targets, space, view, params.env.max_nodata), memory, stop, imagery, photos, n_headings)
    rt.scene = rt.domain_scene("same")
    return rt


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


def _digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def asset_fingerprint(rt: Runtime) -> dict[str, Any]:
    """Content hashes of what a trained policy belongs to: map pixels, feature cache, stop threshold."""
    feats = rt.memory.embeddings if rt.memory is not None else np.zeros(0)
    m = rt.scene.map
    return {
        "map": _digest(m.rgb, m.valid),
        "features": _digest(feats),
        "stop_threshold": round(float(rt.stop_threshold), 6),
    }


def fingerprint_differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two (nested) fingerprints."""
    out: list[str] = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += fingerprint_differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}")
    return out


def data_fingerprint(rt: Runtime) -> dict[str, Any]:
    """:func:`asset_fingerprint` plus the targets, their splits and photos: what a training trial sees."""
    sc = rt.scene
    return asset_fingerprint(rt) | {
        "targets": _digest(sc.targets_xy, sc.targets["split"].to_numpy().astype(str)),
        "photos": _digest(sc.target_embeddings()),
    }


def load_map_runtime(params: Params, map_path: str | Path, features_dir: str | Path) -> Runtime:
    """The map, its feature space and memory and the stop threshold, without targets (for locating photos)."""
    m = read_map(map_path)
    stop = read_stop_threshold(features_dir)
    space = load_space(features_dir, m)
    memory = map_memory(params, space, m)
    targets = pd.DataFrame({"id": np.zeros(0, np.int64), "x": np.zeros(0), "y": np.zeros(0), "split": []})
    scene = Scene(m, targets, space, params.tile.view_size, params.env.max_nodata)
    return Runtime(scene, memory, stop, n_headings=params.encoder.heading_search)
