"""Target photos: cut from a query domain, optionally perturbed, embedded at their best heading.

A *photo* is what a user gives maprl: a view of the target place, taken from other imagery (a
query domain: another date, season or sensor) and possibly changed (:mod:`maprl.data.perturb`).
Its heading is unknown, so :func:`embed_photos` tries ``headings`` rotations of it and keeps
the one whose best match in the map memory is most similar (heading search); the rotation
it kept is the estimated heading.

Geometric perturbations (rotation, scale, tilt) change what the frame shows, so they are
applied to a context crop around the target (:func:`~maprl.data.perturb.context_side`) and
the photo is its centre: a rotated photo is full of imagery, as a real one would be.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from maprl.data.perturb import (
    context_side,
    crop_centre,
    perturb,
    perturb_params,
    quarter_turns,
    random_perturbation,
    rotate,
)
from maprl.errors import InputError
from maprl.features.memory import MapMemory
from maprl.features.spaces import FeatureSpace
from maprl.io import atomic_path
from maprl.views import crop_views, view_origin


def cut_context(rgb: np.ndarray, x: float, y: float, view: int, side: int) -> np.ndarray:
    """The ``side`` x ``side`` crop centred like the view at (x, y); map edges are mirrored."""
    x0, y0 = view_origin(x, y, view)
    left, top = int(x0) - (side - view) // 2, int(y0) - (side - view) // 2
    h, w = rgb.shape[:2]
    a, b = max(left, 0), max(top, 0)
    c, d = min(left + side, w), min(top + side, h)
    crop = rgb[b:d, a:c]
    pad = ((b - top, top + side - d), (a - left, left + side - c), (0, 0))
    return np.pad(crop, pad, mode="reflect") if any(p for pair in pad for p in pair) else crop.copy()


def target_photos(rgb: np.ndarray, xy: np.ndarray, view: int) -> np.ndarray:
    """(N, V, V, 3) unchanged photos of the targets at ``xy`` (N, 2), cut from ``rgb``."""
    if len(xy) == 0:
        return np.zeros((0, view, view, 3), np.uint8)
    return crop_views(rgb, xy[:, 0], xy[:, 1], view)


def perturbed_photos(
    rgb: np.ndarray, xy: np.ndarray, view: int, kind: str, strength: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Photos of the targets at ``xy`` under one perturbation, and the true heading change (degrees, 0 if none)."""
    out = np.empty((len(xy), view, view, 3), np.uint8)
    angles = np.zeros(len(xy))
    side = context_side(view)
    for i, (x, y) in enumerate(xy):
        ctx = cut_context(rgb, float(x), float(y), view, side)
        drawn = perturb_params(kind, strength, rng)
        angles[i] = float(drawn.get("angle_deg", 0.0))
        out[i] = crop_centre(perturb(ctx, kind, strength, rng, params=drawn), view)
    return out, angles


def randomized_photos(
    rgb: np.ndarray, xy: np.ndarray, view: int, max_strength: float, rng: np.random.Generator, n_kinds: int = 2
) -> np.ndarray:
    """Domain randomization: each target's photo under ``n_kinds`` random perturbations up to ``max_strength``."""
    side = context_side(view)
    out = np.empty((len(xy), view, view, 3), np.uint8)
    for i, (x, y) in enumerate(xy):
        ctx = cut_context(rgb, float(x), float(y), view, side)
        out[i] = crop_centre(random_perturbation(ctx, max_strength, rng, n=n_kinds), view)
    return out


@dataclass
class Embedded:
    """Photos embedded at their best heading."""

    embeddings: np.ndarray  # (N, D) float32
    heading_deg: np.ndarray  # (N,) rotation that aligned each photo with the map (counter-clockwise +)
    top_similarity: np.ndarray  # (N,) similarity of the best map-memory match at that heading


def headings(n: int) -> np.ndarray:
    """``n`` evenly spaced rotations, degrees, starting at 0."""
    return np.arange(n) * (360.0 / n)


def _turned(photos: np.ndarray, angle: float, done: dict[float, np.ndarray]) -> np.ndarray:
    """(N, V, V, 3) ``photos`` turned by ``angle``. A quarter turn of a turn in ``done`` (of the same photos) is
    reused where that is bit-identical (:func:`~maprl.data.perturb.quarter_turns`); turns under 90 degrees go there."""
    if angle == 0:
        return photos
    split = quarter_turns(angle) if photos.shape[1] == photos.shape[2] else None
    if split is not None and split[0] in done:
        return np.ascontiguousarray(np.rot90(done[split[0]], split[1], axes=(1, 2)))
    turned = np.stack([rotate(p, angle) for p in photos])
    if 0.0 < angle % 360.0 < 90.0:
        done[angle % 360.0] = turned
    return turned


def embed_photos(
    space: FeatureSpace, memory: MapMemory | None, photos: np.ndarray, n_headings: int = 1, batch: int = 64,
    accept: float | None = None,
) -> Embedded:  # fmt: skip
    """Embed photos, each at the heading (of ``n_headings``) whose best map-memory match is most similar.

    Without a memory or with one heading, photos are embedded as they are. With ``accept`` (the
    calibrated stop threshold), a photo whose match as it is already reaches it keeps heading 0
    and is not turned: a match that strong almost never lies far from the truth, and the other
    headings are then only chances of a false match (and most of the cost).
    """
    n = len(photos)
    if n == 0:
        return Embedded(np.zeros((0, space.dim), np.float32), np.zeros(0), np.zeros(0))
    angles = headings(n_headings) if memory is not None else np.zeros(1)
    best_emb = np.zeros((n, space.dim), np.float32)
    best_sim = np.full(n, -np.inf)
    best_angle = np.zeros(n)
    todo = np.arange(n)
    done: dict[float, np.ndarray] = {}  # turns of photos[todo] that a later quarter turn can reuse
    for angle in angles:
        turned = _turned(photos[todo], float(angle), done)
        emb = np.concatenate([space.embed_view(turned[i : i + batch]) for i in range(0, len(todo), batch)])
        sim = memory.best_similarity(emb) if memory is not None else np.full(len(todo), np.inf)
        better = sim > best_sim[todo]
        rows = todo[better]
        best_emb[rows], best_sim[rows], best_angle[rows] = emb[better], sim[better], angle
        if angle == 0 and accept is not None:
            todo = todo[best_sim[todo] < accept]
            done.clear()
        if len(todo) == 0:
            break
    top = best_sim if memory is not None else np.full(n, np.nan)
    return Embedded(best_emb, best_angle, top)


PHOTOS_FILE = "photos.npz"


def save_photo_embeddings(path: Path, target_ids: np.ndarray, by_domain: dict[str, Embedded], n_headings: int) -> None:
    """``photos.npz``: each domain's target-photo embeddings, headings and top similarities, in target order."""
    arrays: dict[str, Any] = {"target_id": np.asarray(target_ids), "domains": np.array(list(by_domain))}
    arrays["n_headings"] = np.array(n_headings)
    for name, e in by_domain.items():
        arrays |= {f"emb_{name}": e.embeddings, f"heading_{name}": e.heading_deg, f"top_{name}": e.top_similarity}
    with atomic_path(path) as tmp, tmp.open("wb") as f:
        np.savez(f, **arrays)


def load_photo_embeddings(features_dir: str | Path, target_ids: np.ndarray) -> tuple[dict[str, Embedded], int]:
    """The encode stage's photo embeddings by domain (checked against the targets) and its heading count."""
    path = Path(features_dir) / PHOTOS_FILE
    if not path.exists():
        raise InputError(f"{path} does not exist; run `dvc repro encode`")
    try:
        with np.load(path) as npz:
            data = dict(npz)
        names = [str(d) for d in data["domains"]]
        out = {d: Embedded(data[f"emb_{d}"], data[f"heading_{d}"], data[f"top_{d}"]) for d in names}
        n_headings = int(data["n_headings"])
    except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as err:
        raise InputError(f"{path} is damaged ({type(err).__name__}: {err}); rerun `dvc repro encode`") from None
    if not np.array_equal(data["target_id"], np.asarray(target_ids)):
        raise InputError(f"{path} was made for other targets; rerun `dvc repro encode`")
    return out, n_headings
