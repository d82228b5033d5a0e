"""The ``fetch`` stage: imagery from a source into ``map.tif`` plus a ``map.json`` sidecar.

Sources: ``synthetic`` (the embedded procedural world, needs no account), ``file`` (any
local GeoTIFF, JPEG or PNG) and ``earthengine`` (Sentinel-2 or NAIP plus a DEM). The query
domains of ``fetch.queries`` go beside the map, in ``queries/`` (see :mod:`maprl.data.queries`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.errors import RasterioIOError
from rasterio.transform import Affine, from_origin
from rasterio.windows import Window
from tqdm.auto import tqdm

from maprl.config import FetchParams, Params
from maprl.data.geo import BAND_NAMES, MapData, lonlat_to_crs, read_map, utm_crs, write_map
from maprl.data.world import World, synthesize_worlds
from maprl.errors import InputError
from maprl.io import staged_dir, write_json, write_metrics
from maprl.views import valid_centres


def fetch_synthetic(p: FetchParams, seed: int, out_tif: Path) -> tuple[dict[str, Any], dict[str, World]]:
    """Render the procedural world and place it at (center_lat, center_lon) in its UTM zone.

    The world is built once and rendered in summer (the map) and in every season a synthetic
    query domain asks for; returns the map's metadata and the renderings by season.
    """
    seasons = ["summer", *(q.season for q in p.queries if q.source == "synthetic")]
    worlds = synthesize_worlds(p.size, seed, p.metres_per_pixel, seasons)
    world = worlds["summer"]
    crs = utm_crs(p.center_lat, p.center_lon)
    cx, cy = lonlat_to_crs(crs, p.center_lon, p.center_lat)
    half = p.size * p.metres_per_pixel / 2
    transform = from_origin(cx - half, cy + half, p.metres_per_pixel, p.metres_per_pixel)
    write_map(out_tif, world.rgb, world.elevation, transform, crs)
    meta = {
        "source": "synthetic",
        "seed": seed,
        "water_fraction": float(world.water.mean()),
        "road_fraction": float(world.roads.mean()),
        "building_fraction": float(world.buildings.mean()),
    }
    return meta, worlds


def stretch_to_uint8(data: np.ndarray, mask: np.ndarray, display: bool = False) -> np.ndarray:
    """Scale any band dtype to 0-255 (float32).

    uint8 and ``display`` bands (already 0-255, e.g. a map this project wrote) pass through,
    clipped; others get a 2-98 % stretch over the pixels where ``mask`` is True.
    """
    if data.dtype == np.uint8 or display:
        return np.clip(data.astype(np.float32), 0, 255)
    vals = data[:, mask] if mask.any() else data.reshape(data.shape[0], -1)
    lo, hi = np.nanpercentile(vals, 2), np.nanpercentile(vals, 98)
    return np.clip((data.astype(np.float32) - lo) / max(hi - lo, 1e-6) * 255, 0, 255)


def read_strips(
    src: rasterio.DatasetReader, scale: float, window: Window | None = None, strip: int = 1024
) -> tuple[np.ndarray, np.ndarray, Affine]:
    """Read ``window`` (default: all) strip by strip, never whole, resampled by ``scale``.

    Returns the bands, the dataset mask (True where valid) and the transform of the result.
    """
    win = window or Window(0, 0, src.width, src.height)
    out_h, out_w = max(1, round(win.height * scale)), max(1, round(win.width * scale))
    data = np.empty((src.count, out_h, out_w), src.dtypes[0])
    mask = np.empty((out_h, out_w), bool)
    for r0 in tqdm(range(0, out_h, strip), desc="read", unit="strip", leave=False):
        r1 = min(out_h, r0 + strip)
        part = Window(win.col_off, win.row_off + r0 / scale, win.width, (r1 - r0) / scale)
        shape = (r1 - r0, out_w)
        data[:, r0:r1] = src.read(window=part, out_shape=(src.count, *shape), resampling=Resampling.average)
        mask[r0:r1] = src.dataset_mask(window=part, out_shape=shape, resampling=Resampling.nearest) > 0
    transform = src.window_transform(win) @ Affine.scale(win.width / out_w, win.height / out_h)
    return data, mask, transform


def available_memory() -> int:
    """Bytes of memory available now (``MemAvailable`` of /proc/meminfo; physical pages elsewhere)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


# peak working memory per map pixel: the float32 4-band map written, its re-read copy, rgb and masks
BYTES_PER_MAP_PIXEL = 40


def require_memory(need: int, what: str, fix: Callable[[float], str]) -> None:
    """Raise InputError when ``need`` bytes exceed the memory available now.

    The message is ``what`` followed by the sizes and ``fix(share)``, where share is the
    fraction of ``need`` that would fit.
    """
    have = available_memory()
    if need > have:
        raise InputError(
            f"{what} need about {need / 2**30:.1f} GiB, but {have / 2**30:.1f} GiB is available. {fix(have / need)}"
        )


def check_fits_in_memory(path: Path, src: rasterio.DatasetReader, scale: float) -> None:
    """Refuse an image whose map would not fit in the memory available, before allocating anything."""
    h, w = max(1, round(src.height * scale)), max(1, round(src.width * scale))
    need = h * w * (BYTES_PER_MAP_PIXEL + src.count * np.dtype(src.dtypes[0]).itemsize)
    require_memory(
        need,
        f"fetch.path: {path} is {src.width}x{src.height} pixels; at fetch.resample {scale} the map would be "
        f"{w}x{h} and",
        lambda share: f"Lower fetch.resample (e.g. {max(0.01, scale * share**0.5 * 0.8):.2g}) or crop the image",
    )


def _elevation_band(src: rasterio.DatasetReader) -> int | None:
    names = [(d or "").lower() for d in src.descriptions]
    return names.index("elevation") if "elevation" in names else None


def colour_bands(src: rasterio.DatasetReader) -> list[int]:
    """0-based indices of the three colour bands: the first three not described as elevation.

    A single colour band is repeated, so it becomes grey.
    """
    elev_idx = _elevation_band(src)
    colour = [i for i in range(src.count) if i != elev_idx][:3]
    return (colour * 3)[:3]


def is_display_range(src: rasterio.DatasetReader) -> bool:
    """True for a map GeoTIFF this project wrote (bands red, green, blue, elevation): colours are 0-255."""
    return tuple(src.descriptions) == BAND_NAMES


def source_valid(data: np.ndarray, mask: np.ndarray, colour: list[int]) -> np.ndarray:
    """Valid pixels of an image read from a file: in its mask, finite, and not black in every colour band."""
    finite = np.all(np.isfinite(data.astype(np.float32)), axis=0)
    return mask & finite & ~np.all(data[colour] == 0, axis=0)


def fetch_file(p: FetchParams, out_tif: Path) -> dict[str, Any]:
    """Read a local image; a non-georeferenced one gets a pixel grid (crs null in map.json)."""
    path = Path(p.path or "")
    if not path.exists():
        raise InputError(f"fetch.path: {path} does not exist")
    try:
        with rasterio.open(path) as src:
            check_fits_in_memory(path, src, p.resample)
            data, mask, transform = read_strips(src, p.resample)
            elev_idx, colour, display, crs = _elevation_band(src), colour_bands(src), is_display_range(src), src.crs
    except RasterioIOError as err:
        raise InputError(
            f"fetch.path: cannot read {path} as an image ({err}); is it a valid GeoTIFF/JPEG/PNG?"
        ) from None
    valid = source_valid(data, mask, colour)
    rgb = np.moveaxis(stretch_to_uint8(np.nan_to_num(data[colour]), valid, display), 0, -1)
    elevation = data[elev_idx].astype(np.float32) if elev_idx is not None else np.zeros(valid.shape, np.float32)
    if crs is None:
        transform = Affine.scale(1 / p.resample)  # a pixel grid in source pixels
    write_map(out_tif, rgb, elevation, transform, crs, valid)
    return {"source": "file", "path": str(path), "resample": p.resample, "has_elevation": elev_idx is not None}


def _bounds_lonlat(m: MapData) -> list[float] | None:
    if m.crs is None:
        return None
    lon, lat = m.pixel_to_lonlat(np.array([0, m.width, 0, m.width]) - 0.5, np.array([0, 0, m.height, m.height]) - 0.5)
    return [float(lon.min()), float(lat.min()), float(lon.max()), float(lat.max())]


def describe_map(m: MapData) -> dict[str, Any]:
    """Fields of map.json that come from the map itself."""
    return {
        "crs": m.crs.to_string() if m.crs is not None else None,
        "georeferenced": m.crs is not None,
        "bounds_lonlat": _bounds_lonlat(m),
        "metres_per_pixel": m.metres_per_pixel if m.crs is not None else None,
        "width": m.width,
        "height": m.height,
        "valid_fraction": float(m.valid.mean()),
        "bands": ["red", "green", "blue", "elevation"],
    }


def usable_fraction(m: MapData, view_size: int) -> float:
    """Share of the map's pixels that can centre a whole view; an error when none can."""
    share = float(valid_centres(m.valid, view_size).mean())
    if share == 0:
        raise InputError(
            f"no {view_size}x{view_size} view fits on valid imagery of this {m.width}x{m.height} map; "
            "lower tile.view_size, or check nodata and fetch.resample"
        )
    return share


def _fetch_map(params: Params, tif: Path) -> tuple[dict[str, Any], dict[str, World] | None]:
    """Write the map from its source; also the synthetic renderings by season (None for other sources)."""
    p = params.fetch
    if p.source == "synthetic":
        return fetch_synthetic(p, params.base.seed, tif)
    if p.source == "file":
        return fetch_file(p, tif), None
    from maprl.data.earthengine import fetch_earthengine

    return fetch_earthengine(p.earthengine, tif), None


def run_fetch(
    params: Params, out_dir: str | Path, metrics_path: str | Path, timing_path: str | Path | None = None
) -> dict[str, Any]:
    """Run the fetch stage: ``map.tif``, ``map.json`` and ``queries/`` in ``out_dir``, fetch metrics and timing.

    Everything is written into a temporary folder and checked first; only then does it replace
    ``out_dir`` whole, so a map that fails a check never replaces the previous one.
    """
    from maprl.data.queries import fetch_queries  # queries reads rasters with this module's helpers

    t0 = time.perf_counter()
    with staged_dir(out_dir) as tmp:
        tif = tmp / "map.tif"
        meta, worlds = _fetch_map(params, tif)
        m = read_map(tif)
        meta.update(describe_map(m))
        metrics: dict[str, Any] = {
            "valid_fraction": meta["valid_fraction"],
            "usable_view_fraction": usable_fraction(m, params.tile.view_size),
        }
        del m
        queries = fetch_queries(params.fetch, params.base.seed, tif, tmp, worlds)
        if queries:
            meta["queries"] = queries
            metrics["queries"] = {q["name"]: {k: q[k] for k in ("valid_fraction", "overlap_fraction")} for q in queries}
        metrics["seconds"] = round(time.perf_counter() - t0, 2)
        write_json(tmp / "map.json", meta)
    write_metrics(metrics_path, timing_path, metrics)
    return metrics
