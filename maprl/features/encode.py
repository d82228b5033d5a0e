"""The ``encode`` stage: build (and for ``ssl`` pretrain) the encoder, cache it over the map, calibrate the stop rule.

Outputs in ``out_dir``: ``cache.npz`` and ``encoder.pt`` (see :mod:`maprl.features.cache`),
``calibration.json`` (the stop threshold and what it does), ``ssl_loss.csv`` and
``photos.npz`` (every target's photo from the map and from each query domain, embedded at
its best of ``heading_search`` headings: :mod:`maprl.features.photos`); plus the metrics JSON:

* ``cache_agreement``: cosine between the cached ``embed_at`` and the exact ``embed_view``
  of the same crop, at random valid positions (mostly off the grid) and at grid nodes;
* ``retrieval_accuracy``: share of targets whose nearest cached grid embedding lies within
  the success radius of the truth, per split (photos from the map itself);
* ``retrieval_by_domain``: the same per query domain (``same`` is the map), with the share of
  photos whose heading search kept the true (unrotated) heading;
* ``far_pair_similarity``: similarity of unrelated views (more than one view apart) in raw
  pixels (high, as all pixels are positive) and in the encoder's space;
* ``stop``: the calibration below.

Stop-threshold calibration (train targets only): the success radius is
``evaluate.success_radius`` (56 px = ``view_size / 4`` by default). For every train target,
the similarity between its photo (``embed_view`` of its crop) and the cached embedding of
every valid grid node more than two radii away is a *far* sample; nodes within one radius
are *near* samples. The threshold is the ``stop_quantile`` quantile of the far samples plus
``stop_margin``, so a view far from the target almost never passes it. Reported with it: the
share of far samples that pass (train, and test targets as a held-out check), the share of
near samples that pass (the recall), and the median similarity at the target itself and at
half a radius from it. The threshold must stay below the on-target similarity or an agent
could never stop.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from maprl.config import EncoderParams, Params
from maprl.data.geo import MapData, read_map
from maprl.data.splits import test_area
from maprl.data.tile import Domains, read_domains, read_targets
from maprl.features.cache import ENCODER_FILE, MapSpace, PooledGrid, build_space, save_encoder, train_encoder
from maprl.features.memory import MapMemory
from maprl.features.nets import configure_torch
from maprl.features.photos import PHOTOS_FILE, Embedded, embed_photos, save_photo_embeddings, target_photos
from maprl.io import atomic_path, staged_dir, write_json, write_metrics
from maprl.views import crop_views, far_pairs, pixel_cosine, sample_centres, valid_centres


# -- building ------------------------------------------------------------------------------
def encode_map(
    p: EncoderParams, m: MapData, view_size: int, seed: int, domains: Domains | None = None,
    forbidden: np.ndarray | None = None,
) -> tuple[MapSpace, dict[str, Any]]:  # fmt: skip
    """Train (ssl) and cache the encoder of ``p`` on ``m``; returns the space and timings / loss curve.

    ``domains`` and ``forbidden`` (the test area) give SSL its cross-domain pairs."""
    configure_torch(p.torch_threads)
    t0 = time.perf_counter()
    if p.kind == "pooled":
        space: MapSpace = PooledGrid(m, view_size, p.cache_stride)
        return space, {"seconds_ssl": 0.0, "seconds_cache": time.perf_counter() - t0, "ssl_loss": []}
    encoder, losses = train_encoder(p, m, view_size, seed, list((domains or {}).values()), forbidden)
    t1 = time.perf_counter()
    space = build_space(p, encoder, m, view_size)
    return space, {"seconds_ssl": t1 - t0, "seconds_cache": time.perf_counter() - t1, "ssl_loss": losses}


# -- measurements --------------------------------------------------------------------------
def _random_positions(ok: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` continuous (x, y) positions whose rounded centre is a valid view centre."""
    xs, ys = sample_centres(ok, n, rng)  # not np.nonzero(ok): GBs of indices on a large map
    return np.stack([xs, ys], 1) + rng.uniform(-0.49, 0.49, (n, 2))


def cache_agreement(space: MapSpace, m: MapData, rng: np.random.Generator, n: int = 200) -> dict[str, float]:
    """Cosine between ``embed_at`` and the exact ``embed_view`` at ``n`` positions (3/4 off-grid, 1/4 nodes)."""
    ok = valid_centres(m.valid, space.view_size)
    nodes = space.grid_positions()
    pos = np.concatenate([_random_positions(ok, n - n // 4, rng), nodes[rng.integers(0, len(nodes), n // 4)]])
    views = crop_views(m.rgb, pos[:, 0], pos[:, 1], space.view_size)
    cos = np.sum(space.embed_at(pos[:, 0], pos[:, 1]) * space.embed_view(views), axis=1)
    off = cos[: n - n // 4]
    return {
        "mean": float(cos.mean()),
        "p05": float(np.percentile(cos, 5)),
        "off_grid_mean": float(off.mean()),
        "on_grid_mean": float(cos[n - n // 4 :].mean()),
        "n": int(n),
    }


def photo_embeddings(
    space: MapSpace, m: MapData, targets: pd.DataFrame, domains: Domains, n_headings: int, radius: float,
    accept: float | None = None,
) -> dict[str, Embedded]:  # fmt: skip
    """Every target's photo from the map (``same``) and each query domain, embedded at its best heading
    (:func:`~maprl.features.photos.embed_photos`; ``accept`` is the stop threshold)."""
    memory = MapMemory(space.grid_positions(), space.grid_embeddings(), 2 * radius)
    xy = targets[["x", "y"]].to_numpy(float)
    sources = {"same": m.rgb, **{name: rgb for name, (rgb, _) in domains.items()}}
    return {
        name: embed_photos(space, memory, target_photos(rgb, xy, space.view_size), n_headings, accept=accept)
        for name, rgb in sources.items()
    }


def domain_retrieval(
    space: MapSpace, targets: pd.DataFrame, photos: dict[str, Embedded], radius: float
) -> dict[str, dict[str, float]]:
    """Retrieval top-1 per domain and split, and the share of photos kept at their true heading."""
    xy, split = targets[["x", "y"]].to_numpy(float), targets["split"].to_numpy()
    out = {}
    for name, e in photos.items():
        row = {
            s: retrieval_accuracy(space, e.embeddings[split == s], xy[split == s], radius) for s in ("train", "test")
        }
        row["heading_kept"] = float(np.mean(e.heading_deg == 0)) if len(e.heading_deg) else float("nan")
        out[name] = row
    return out


def retrieval_accuracy(space: MapSpace, queries: np.ndarray, truth: np.ndarray, radius: float) -> float:
    """Share of queries whose most similar grid embedding lies within ``radius`` of the truth (T, 2)."""
    if len(queries) == 0:
        return float("nan")
    emb = space.grid_embeddings()
    step = max(1, SIMS_MAX // len(emb))  # queries per product (the default map's targets: all at once)
    best = np.concatenate([np.argmax(queries[i : i + step] @ emb.T, axis=1) for i in range(0, len(queries), step)])
    return float(np.mean(np.linalg.norm(space.grid_positions()[best] - truth, axis=1) <= radius))


def far_pair_similarity(space: MapSpace, m: MapData, rng: np.random.Generator, n: int = 1000) -> dict[str, float]:
    """Similarity of unrelated views (centres more than a view apart): raw pixels vs the space."""
    centres = space.grid_positions()
    pairs = far_pairs(centres, space.view_size, n, rng)
    a, b = centres[pairs[:, 0]], centres[pairs[:, 1]]
    pix = pixel_cosine(m.rgb, a, b, space.view_size)
    mine = np.sum(space.embed_at(a[:, 0], a[:, 1]) * space.embed_at(b[:, 0], b[:, 1]), axis=1)
    return {
        "n_pairs": len(pairs),
        "pixels_mean": float(pix.mean()),
        "pixels_p99": float(np.percentile(pix, 99)),
        "encoder_mean": float(mine.mean()),
        "encoder_p99": float(np.percentile(mine, 99)),
    }


# -- stop threshold ------------------------------------------------------------------------
SIMS_MAX = 1 << 26  # similarities (query x grid node) held at once; the default map's stay in one product
FAR_KEEP = 1 << 22  # on a large map, the far samples kept: the largest (the quantile and rates need no more)


def near_far_similarities(
    space: MapSpace, queries: np.ndarray, truth: np.ndarray, radius: float, keep: int = 0
) -> tuple[np.ndarray, np.ndarray, int]:
    """Similarities of target photos to grid nodes within ``radius`` (near) and beyond ``2 * radius`` (far),
    and the number of far samples; with ``keep``, only the ``keep`` largest far samples are returned."""
    pos, emb = space.grid_positions(), space.grid_embeddings()
    batch = max(1, min(64, (1 << 24) // len(pos)))  # 64 queries unless the grid is large
    near, far, n_far = [], [], 0
    for start in range(0, len(queries), batch):
        sims = queries[start : start + batch] @ emb.T
        dist = np.linalg.norm(pos[None, :, :] - truth[start : start + batch, None, :], axis=2)
        near.append(sims[dist <= radius])
        far.append(sims[dist > 2 * radius])
        n_far += len(far[-1])
        if keep and sum(len(f) for f in far) > 2 * keep:
            far = [_largest(np.concatenate(far), keep)]
    return np.concatenate(near), _largest(np.concatenate(far), keep) if keep else np.concatenate(far), n_far


def _largest(x: np.ndarray, k: int) -> np.ndarray:
    return np.partition(x, len(x) - k)[len(x) - k :] if len(x) > k else x


def _quantile(far: np.ndarray, n: int, q: float) -> np.floating[Any]:
    """The ``q`` quantile (linear) of ``n`` samples of which ``far`` holds the largest (all: numpy's),
    in their dtype."""
    if len(far) == n:
        return np.quantile(far, q)
    top, v = np.sort(far), q * (n - 1)
    i = int(np.floor(v))
    a, b = top[i - (n - len(top))], top[min(i + 1, n - 1) - (n - len(top))]
    return top.dtype.type(a + (b - a) * (v - i))


def offset_similarity(space: MapSpace, m: MapData, queries: np.ndarray, truth: np.ndarray, offset: float) -> float:
    """Median similarity of each target photo to the cached view ``offset`` px from it (random direction)."""
    rng = np.random.default_rng(0)
    ang = rng.uniform(0, 2 * np.pi, len(truth))
    pos = truth + offset * np.stack([np.cos(ang), np.sin(ang)], 1)
    lo = space.view_size / 2 - 0.5
    pos[:, 0] = np.clip(pos[:, 0], lo, m.width - lo - 1)
    pos[:, 1] = np.clip(pos[:, 1], lo, m.height - lo - 1)
    return float(np.median(np.sum(space.embed_at(pos[:, 0], pos[:, 1]) * queries, axis=1)))


def calibrate_stop(
    space: MapSpace,
    m: MapData,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    radius: float,
    p: EncoderParams,
) -> dict[str, Any]:
    """Stop threshold from far similarities of the train targets (see the module docstring).

    ``train`` and ``test`` are (target embeddings, target xy) pairs; test only reports.
    """
    nodes = len(space.grid_positions())
    big = len(train[0]) * nodes > SIMS_MAX  # keep only the largest far samples, not all of them
    keep = max(FAR_KEEP, int(np.ceil((1 - p.stop_quantile) * len(train[0]) * nodes)) + 2) if big else 0
    near, far, n_far = near_far_similarities(space, *train, radius, keep)
    threshold = float(_quantile(far, n_far, p.stop_quantile) + p.stop_margin) if n_far else 1.0
    near_test, far_test, n_far_test = (
        near_far_similarities(space, *test, radius, keep) if len(test[0]) else (near[:0], far[:0], 0)
    )
    at0 = offset_similarity(space, m, *train, 0.0)
    return {
        "stop_threshold": threshold,
        "radius": radius,
        "quantile": p.stop_quantile,
        "margin": p.stop_margin,
        "far_quantile_value": threshold - p.stop_margin,
        "far_max": float(far.max()) if len(far) else float("nan"),
        "far_pass_rate": _rate(far, threshold, n_far),
        "far_pass_rate_test": _rate(far_test, threshold, n_far_test),
        "near_recall": _rate(near, threshold),
        "near_recall_test": _rate(near_test, threshold),
        "median_similarity_0px": at0,
        "median_similarity_half_radius": offset_similarity(space, m, *train, radius / 2),
        "threshold_below_on_target": bool(threshold < at0),
        "n_targets": len(train[0]),
        "n_far": n_far,
        "n_near": len(near),
    }


def _rate(sims: np.ndarray, threshold: float, n: int | None = None) -> float:
    """Share of ``n`` samples (default: ``sims``, else ``sims`` holds their largest) at or above ``threshold``."""
    if n is not None and n != len(sims):
        return float(np.count_nonzero(sims >= threshold) / n)
    return float(np.mean(sims >= threshold)) if len(sims) else float("nan")


# -- the stage -----------------------------------------------------------------------------
def _split(targets: pd.DataFrame, emb: np.ndarray, split: str) -> tuple[np.ndarray, np.ndarray]:
    rows = (targets["split"] == split).to_numpy()
    return emb[rows], targets.loc[rows, ["x", "y"]].to_numpy(float)


def measure(
    space: MapSpace, m: MapData, targets: pd.DataFrame, p: EncoderParams, seed: int, radius: float | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Quality metrics of a cached space and its stop calibration: (metrics, calibration), both from
    the targets' photos cut from the map itself, as they are. ``radius`` is the success radius
    (default ``view_size / 4``).
    """
    rng = np.random.default_rng([seed, 11])
    radius = radius or space.view_size / 4
    same = photo_embeddings(space, m, targets, {}, 1, radius)["same"].embeddings
    train, test = _split(targets, same, "train"), _split(targets, same, "test")
    calibration = calibrate_stop(space, m, train, test, radius, p)
    metrics = {
        "dim": int(space.dim),
        "grid_nodes": len(space.grid_positions()),
        "cache_agreement": cache_agreement(space, m, rng),
        "retrieval_accuracy": {
            "train": retrieval_accuracy(space, *train, radius),
            "test": retrieval_accuracy(space, *test, radius),
            "radius": radius,
        },
        "far_pair_similarity": far_pair_similarity(space, m, rng),
    }
    return metrics, calibration


def _save_outputs(
    space: MapSpace, out: Path, calibration: dict[str, Any], losses: list[float], targets: pd.DataFrame,
    photos: dict[str, Embedded], n_headings: int,
) -> None:  # fmt: skip
    space.save(out)
    save_photo_embeddings(out / PHOTOS_FILE, targets["id"].to_numpy(), photos, n_headings)
    if isinstance(space, PooledGrid):  # keep the stage's outputs the same for every kind
        save_encoder(out / ENCODER_FILE, "pooled", {})
    write_json(out / "calibration.json", calibration)
    with atomic_path(out / "ssl_loss.csv") as tmp:
        pd.DataFrame({"step": np.arange(len(losses)), "loss": losses}).to_csv(tmp, index=False)


def run_encode(
    params: Params,
    map_path: str | Path,
    targets_path: str | Path,
    out_dir: str | Path,
    metrics_path: str | Path,
    timing_path: str | Path | None = None,
) -> dict[str, Any]:
    """Run the encode stage; returns the metrics written to ``metrics_path`` (timings to ``timing_path``).

    The output folder is written whole into a temporary sibling, then swapped in."""
    t0 = time.perf_counter()
    p, view, seed = params.encoder, params.tile.view_size, params.base.seed
    m = read_map(map_path)
    targets = read_targets(targets_path, m, view)
    domains = read_domains(map_path)
    forbidden = test_area(targets, (m.height, m.width), view, params.tile.block_size)
    space, info = encode_map(p, m, view, seed, domains, forbidden)
    t1 = time.perf_counter()
    radius = params.evaluate.success_radius
    metrics, calibration = measure(space, m, targets, p, seed, radius)  # the stop rule, from the map's own photos
    photos = photo_embeddings(space, m, targets, domains, p.heading_search, radius, calibration["stop_threshold"])
    metrics["retrieval_by_domain"] = domain_retrieval(space, targets, photos, radius)
    info["seconds_photos"] = time.perf_counter() - t1
    with staged_dir(out_dir) as tmp:
        _save_outputs(space, tmp, calibration, info["ssl_loss"], targets, photos, p.heading_search)
    losses = info["ssl_loss"]
    metrics.update(
        encoder={
            "kind": p.kind,
            "weights": p.weights,
            "input_size": p.input_size,
            "cache_stride": p.cache_stride,
            "augment": p.augment,
            "cross_domain": p.cross_domain,
            "heading_search": p.heading_search,
        },
        seconds={
            "total": round(time.perf_counter() - t0, 2),
            "ssl": round(info["seconds_ssl"], 2),
            "cache": round(info["seconds_cache"], 2),
            "photos": round(info["seconds_photos"], 2),
        },
        ssl={"steps": len(losses), "loss_first": _mean(losses[:10]), "loss_last": _mean(losses[-10:])},
        stop={k: calibration[k] for k in ("stop_threshold", "near_recall", "far_pass_rate", "median_similarity_0px")},
    )
    write_metrics(metrics_path, timing_path, metrics)
    return metrics


def _mean(losses: list[float]) -> float | None:
    """Mean of a few losses (one step's loss is noisy); None without ssl."""
    return float(np.mean(losses)) if losses else None
