"""The ``tile`` stage: where to put target views, then their pixels, then the split.

Following torchgeo's samplers, *where to sample* (:func:`sample_targets`, pure geometry on
the valid-centre mask with an explicit RNG) is separate from *reading pixels*
(:func:`write_crops`).

Split modes:

* ``spatial`` (default): the map is cut into ``block_size`` blocks, whole blocks go to test,
  and every target view lies wholly inside one block. No training crop overlaps a test
  crop, so test success measures finding places the agent never saw as targets.
* ``random``: the original design; test crops anywhere, so they often overlap training
  crops and test numbers flatter the agent.

Query domains (``fetch.queries``, written by fetch under ``data/map/queries/``): a target is
only placed where its view has imagery in the map *and* in every query domain, and its photo
is cut from each domain at the same map pixel (``crops/<domain>/``). ``domains.csv`` lists
the domains, ``same`` (the map itself) first.

Informativeness floor (``tile.min_texture``): a place whose view has a mean grey gradient
(:func:`texture`) below the floor (open water, bare uniform fields, cloud) is never a target;
no method can localise a photo of nothing. The share of candidate centres it removes is in
the metrics.
"""

from __future__ import annotations

from typing import Any
import time
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from maprl.config import Params, TileParams
from maprl.errors import InputError
from maprl.views import crop_views, integral_image, valid_centres, view_origin
from maprl.data.geo import MapData, read_map
from maprl.data.queries import query_names, read_query
from maprl.data.splits import hold_out
from maprl.io import atomic_path, staged_dir, write_metrics

COLUMNS = ["id", "x", "y", "lon", "lat", "split", "block", "texture"]
REQUIRED = ("id", "x", "y", "split")  # what the later stages read


def _pick(candidates: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Draw n flat indices from a candidate list (with replacement only if it is too short)."""
    return candidates[rng.choice(len(candidates), size=n, replace=n > len(candidates))]


def block_interiors(ok: np.ndarray, block: int, view: int) -> np.ndarray:
    """Block id per pixel where a centred view lies wholly inside that block, else -1."""
    h, w = ok.shape
    ys, xs = np.mgrid[0:h, 0:w]
    bx, by = xs // block, ys // block
    half = view // 2
    inside = ((xs - half) >= bx * block) & ((xs - half + view) <= np.minimum((bx + 1) * block, w))
    inside &= ((ys - half) >= by * block) & ((ys - half + view) <= np.minimum((by + 1) * block, h))
    nbx = -(-w // block)
    return np.where(ok & inside, by * nbx + bx, -1)


def _test_blocks(block_ids: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    blocks = np.unique(block_ids[block_ids >= 0])
    if len(blocks) < 2:
        raise InputError(
            f"tile.block_size: only {len(blocks)} block(s) can hold a whole view; "
            "lower tile.block_size or use tile.mode: random"
        )
    return hold_out(blocks, fraction, rng)


def sample_targets(ok: np.ndarray, p: TileParams, rng: np.random.Generator) -> pd.DataFrame:
    """Choose target centres and their split (no pixels read). ``ok`` is the valid-centre mask."""
    n_test = int(np.clip(round(p.n_targets * p.test_fraction), 1, p.n_targets - 1))
    if p.mode == "random":
        flat = np.flatnonzero(ok)
        if len(flat) == 0:
            raise InputError("the map has no valid area for a whole view; check nodata or tile.view_size")
        idx = _pick(flat, p.n_targets, rng)
        split = np.array(["test"] * n_test + ["train"] * (p.n_targets - n_test))
        block = np.full(p.n_targets, -1)
    else:
        ids = block_interiors(ok, p.block_size, p.view_size)
        is_test = np.isin(ids, _test_blocks(ids, p.test_fraction, rng))
        idx = np.concatenate(
            [
                _pick(np.flatnonzero(is_test), n_test, rng),
                _pick(np.flatnonzero((ids >= 0) & ~is_test), p.n_targets - n_test, rng),
            ]
        )
        split = np.array(["test"] * n_test + ["train"] * (p.n_targets - n_test))
        block = ids.ravel()[idx]
    order = rng.permutation(p.n_targets)
    ys, xs = np.unravel_index(idx[order], ok.shape)
    return pd.DataFrame(
        {
            "id": np.arange(p.n_targets),
            "x": xs.astype(float),
            "y": ys.astype(float),
            "split": split[order],
            "block": block[order],
        }
    )


def texture(views: np.ndarray) -> np.ndarray:
    """Difficulty hint: mean gradient magnitude of the grey view (low = featureless, harder)."""
    grey = views.astype(np.float32).mean(axis=-1)
    gx = np.abs(np.diff(grey, axis=2)).mean(axis=(1, 2))
    gy = np.abs(np.diff(grey, axis=1)).mean(axis=(1, 2))
    return gx + gy


def texture_map(rgb: np.ndarray, view: int) -> np.ndarray:
    """(H, W) :func:`texture` of the view centred on every pixel (0 where no whole view fits)."""
    grey = rgb.astype(np.float32).mean(axis=-1)
    h, w = grey.shape
    out = np.zeros((h, w), np.float32)
    if view > h or view > w:
        return out
    sx = integral_image(np.abs(np.diff(grey, axis=1)))  # (H+1, W)
    sy = integral_image(np.abs(np.diff(grey, axis=0)))  # (H, W+1)
    v = view
    tx = sx[v:, v - 1 :] - sx[:-v, v - 1 :] - sx[v:, : -(v - 1)] + sx[:-v, : -(v - 1)]
    ty = sy[v - 1 :, v:] - sy[: -(v - 1), v:] - sy[v - 1 :, :-v] + sy[: -(v - 1), :-v]
    n = h - v + 1, w - v + 1
    tex = tx[: n[0], : n[1]] / (v * (v - 1)) + ty[: n[0], : n[1]] / (v * (v - 1))
    half = v // 2
    out[half : half + n[0], half : half + n[1]] = tex
    return out


def write_crops(rgb: np.ndarray, targets: pd.DataFrame, view: int, crops_dir: Path | None) -> np.ndarray:
    """Read target pixels of ``rgb``; write one PNG per target when ``crops_dir`` is given. Returns texture."""
    tex = np.empty(len(targets))
    if crops_dir is not None:
        crops_dir.mkdir(parents=True, exist_ok=True)
    for start in tqdm(range(0, len(targets), 64), desc="crops", unit="batch", leave=False):
        rows = targets.iloc[start : start + 64]
        views = crop_views(rgb, rows["x"].to_numpy(), rows["y"].to_numpy(), view)
        tex[start : start + len(rows)] = texture(views)
        if crops_dir is not None:
            for tid, v in zip(rows["id"], views, strict=True):
                iio.imwrite(crops_dir / f"{int(tid):05d}.png", v)
    return tex


Domains = dict[str, tuple[np.ndarray, np.ndarray]]
"""Query domains by name: (rgb (H, W, 3) uint8, valid (H, W) bool) on the map's grid."""


def candidate_centres(m: MapData, p: TileParams, domains: Domains) -> tuple[np.ndarray, dict[str, float]]:
    """Centres a target may take: whole views valid in the map and every domain, above the texture floor.

    Also returns what each rule removed, as shares of the map's valid view centres.
    """
    valid = m.valid.copy()
    for _, dvalid in domains.values():
        valid &= dvalid
    ok_map = valid_centres(m.valid, p.view_size)
    ok = valid_centres(valid, p.view_size)
    base = max(int(ok_map.sum()), 1)
    skipped = {"query_nodata": float((ok_map & ~ok).sum() / base)}
    if p.min_texture > 0:
        flat = ok & (texture_map(m.rgb, p.view_size) < p.min_texture)
        ok &= ~flat
        skipped["low_texture"] = float(flat.sum() / base)
    else:
        skipped["low_texture"] = 0.0
    if not ok.any():
        raise InputError(
            f"no {p.view_size}px view has imagery in the map and every query domain with texture >= "
            f"tile.min_texture {p.min_texture}; lower tile.min_texture or tile.view_size, or check fetch.queries"
        )
    return ok, skipped


def build_targets(
    m: MapData, p: TileParams, seed: int, crops_dir: Path | None, domains: Domains | None = None
) -> pd.DataFrame:
    """The targets table (:data:`COLUMNS`); with ``crops_dir``, each target's photo from the map and every domain."""
    domains = domains or {}
    ok, skipped = candidate_centres(m, p, domains)
    targets = sample_targets(ok, p, np.random.default_rng(seed))
    lon, lat = m.pixel_to_lonlat(targets["x"].to_numpy(), targets["y"].to_numpy())
    targets["lon"], targets["lat"] = lon, lat
    targets["texture"] = write_crops(m.rgb, targets, p.view_size, crops_dir)
    for name, (rgb, _) in domains.items():
        write_crops(rgb, targets, p.view_size, crops_dir / name if crops_dir is not None else None)
    targets.attrs["skipped"] = skipped
    return targets[COLUMNS]


def read_domains(map_path: str | Path) -> Domains:
    """Every query domain that fetch wrote beside ``map_path``."""
    folder = Path(map_path).parent
    return {name: read_query(folder, name) for name in query_names(folder)}


def read_targets(path: str | Path, m: MapData | None = None, view_size: int | None = None) -> pd.DataFrame:
    """The targets table, checked (:func:`check_targets`); given the map and view size, every
    target's view must also lie inside the map."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"targets {path} do not exist; run `dvc repro tile` first")
    try:
        targets = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise InputError(f"targets {path} is not a readable CSV ({err}); rerun `dvc repro tile`") from None
    check_targets(targets, path)
    if m is not None and view_size is not None:
        x0, y0 = view_origin(targets["x"].to_numpy(float), targets["y"].to_numpy(float), view_size)
        outside = (x0 < 0) | (y0 < 0) | (x0 + view_size > m.width) | (y0 + view_size > m.height)
        if outside.any():
            row = targets.iloc[int(np.flatnonzero(outside)[0])]
            raise InputError(
                f"targets {path}: {int(outside.sum())} target view(s) of {view_size} px leave the {m.width}x{m.height} "
                f"map (first: id {row['id']} at x={row['x']}, y={row['y']}); were they tiled on another map? "
                "rerun `dvc repro tile`"
            )
    return targets


def check_targets(targets: pd.DataFrame, path: str | Path) -> None:
    """A targets table needs :data:`REQUIRED` columns, finite numeric centres, unique ids and a known split."""
    missing = [c for c in REQUIRED if c not in targets.columns]
    if missing:
        raise InputError(f"targets {path} lacks column(s) {', '.join(missing)}; it needs {', '.join(REQUIRED)}")
    if targets.empty:
        raise InputError(f"targets {path} has no rows; rerun `dvc repro tile`")
    for col in ("id", "x", "y"):
        values = pd.to_numeric(targets[col], errors="coerce").to_numpy(float)
        if not np.all(np.isfinite(values)):
            bad = int(np.flatnonzero(~np.isfinite(values))[0])
            raise InputError(
                f"targets {path}: column {col} must hold finite numbers (row {bad}: {targets[col].iat[bad]!r})"
            )
    if targets["id"].duplicated().any():
        raise InputError(
            f"targets {path}: ids must be unique (id {targets['id'][targets['id'].duplicated()].iat[0]} repeats)"
        )
    unknown = sorted(set(targets["split"].astype(str)) - {"train", "test"})
    if unknown:
        raise InputError(f"targets {path}: split must be train or test, found {', '.join(unknown)}")


def run_tile(
    params: Params,
    map_path: str | Path,
    out_dir: str | Path,
    metrics_path: str | Path,
    timing_path: str | Path | None = None,
) -> dict[str, Any]:
    """Run the tile stage: ``targets.csv`` (+ crops/, preview.png) in ``out_dir`` and split metrics.

    The folder is written whole into a temporary sibling and then swapped in, so a rerun with
    fewer targets leaves no stale crops, and a failure leaves the previous folder as it was.
    """
    t0 = time.perf_counter()
    m = read_map(map_path)
    p = params.tile
    domains = read_domains(map_path)
    with staged_dir(out_dir) as out:
        targets = build_targets(m, p, params.base.seed, out / "crops" if p.write_crops else None, domains)
        targets.to_csv(out / "targets.csv", index=False, float_format="%.7f")
        pd.DataFrame({"domain": ["same", *domains], "crops": ["crops", *(f"crops/{d}" for d in domains)]}).to_csv(
            out / "domains.csv", index=False
        )
        write_preview(m, targets, p.view_size, out / "preview.png")
    counts = targets["split"].value_counts()
    metrics = {
        "n_train": int(counts.get("train", 0)),
        "n_test": int(counts.get("test", 0)),
        "test_fraction": float(counts.get("test", 0) / len(targets)),
        "mode": p.mode,
        "n_test_blocks": int(targets.loc[targets["split"] == "test", "block"].nunique()) if p.mode == "spatial" else 0,
        "domains": ["same", *domains],
        "skipped_view_centres": {k: round(v, 6) for k, v in targets.attrs["skipped"].items()},
        "min_texture": p.min_texture,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    write_metrics(metrics_path, timing_path, metrics)
    return metrics


def write_preview(m: MapData, targets: pd.DataFrame, view: int, path: Path, n_crops: int = 8) -> None:
    """The README picture: map, elevation, targets by split and a sample of target crops."""
    from maprl.viz.plots import save_preview

    sample = targets.groupby("split", group_keys=False).head(n_crops // 2)
    crops = list(crop_views(m.rgb, sample["x"].to_numpy(), sample["y"].to_numpy(), view))
    with atomic_path(path) as tmp:
        save_preview(m.rgb, m.elevation, targets, crops, str(tmp), title="maprl default world and targets")
