"""The ``fetch`` stage: imagery from a source into ``map.tif`` plus a ``map.json`` sidecar.

Sources: ``synthetic`` (the embedded procedural world, needs no account), ``file`` (any
local GeoTIFF, JPEG or PNG) and ``earthengine`` (Sentinel-2 or NAIP plus a DEM).
"""

from __future__ import annotations

import os
import time
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
from maprl.errors import InputError
from maprl.views import valid_centres
from maprl.data.geo import MapData, lonlat_to_crs, read_map, utm_crs, write_map
from maprl.io import staged_dir, write_json, write_metrics
from maprl.data.world import synthesize_world


def fetch_synthetic(p: FetchParams, seed: int, out_tif: Path) -> dict[str, Any]:
    """Render the procedural world and place it at (center_lat, center_lon) in its UTM zone."""
    world = synthesize_world(p.size, seed, p.metres_per_pixel)
    crs = utm_crs(p.center_lat, p.center_lon)
    cx, cy = lonlat_to_crs(crs, p.center_lon, p.center_lat)
    half = p.size * p.metres_per_pixel / 2
    transform = from_origin(cx - half, cy + half, p.metres_per_pixel, p.metres_per_pixel)
    write_map(out_tif, world.rgb, world.elevation, transform, crs)
    return {
        "source": "synthetic",
        "seed": seed,
        "water_fraction": float(world.water.mean()),
        "road_fraction": float(world.roads.mean()),
        "building_fraction": float(world.buildings.mean()),
    }


def _stretch_to_uint8(data: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Scale any band dtype to 0-255; uint8 passes through, others get a 2-98 % stretch."""
    if data.dtype == np.uint8:
        return data.astype(np.float32)
    vals = data[:, mask] if mask.any() else data.reshape(data.shape[0], -1)
    lo, hi = np.nanpercentile(vals, 2), np.nanpercentile(vals, 98)
    return np.clip((data.astype(np.float32) - lo) / max(hi - lo, 1e-6) * 255, 0, 255)


def _read_file_strips(src: rasterio.DatasetReader, scale: float, strip: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Read the file window by window (never whole), resampled by ``scale``: (bands, mask)."""
    out_h, out_w = max(1, round(src.height * scale)), max(1, round(src.width * scale))
    data = np.empty((src.count, out_h, out_w), src.dtypes[0])
    mask = np.empty((out_h, out_w), bool)
    for r0 in tqdm(range(0, out_h, strip), desc="read", unit="strip", leave=False):
        r1 = min(out_h, r0 + strip)
        win = Window(0, r0 / scale, src.width, (r1 - r0) / scale)
        shape = (r1 - r0, out_w)
        data[:, r0:r1] = src.read(window=win, out_shape=(src.count, *shape), resampling=Resampling.average)
        mask[r0:r1] = src.dataset_mask(window=win, out_shape=shape, resampling=Resampling.nearest) > 0
    return data, mask


def available_memory() -> int:
    """Bytes of memory available now (``MemAvailable`` of /proc/meminfo; physical pages elsewhere)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


BYTES_PER_MAP_PIXEL = 40  # peak working memory per map pixel: the float32 4-band map written, its re-read copy, rgb and masks


def check_fits_in_memory(path: Path, src: rasterio.DatasetReader, scale: float) -> None:
    """Refuse an image whose map would not fit in the memory available, before allocating anything."""
    h, w = max(1, round(src.height * scale)), max(1, round(src.width * scale))
    need = h * w * (BYTES_PER_MAP_PIXEL + src.count * np.dtype(src.dtypes[0]).itemsize)
    have = available_memory()
    if need > have:
        raise InputError(
            f"fetch.path: {path} is {src.width}x{src.height} pixels; at fetch.resample {scale} the map would be "
            f"{w}x{h} and need about {need / 2**30:.1f} GiB, but {have / 2**30:.1f} GiB is available. "
            f"Lower fetch.resample (e.g. {max(0.01, scale * (have / need) ** 0.5 * 0.8):.2g}) or crop the image"
        )


def _elevation_band(src: rasterio.DatasetReader) -> int | None:
    names = [(d or "").lower() for d in src.descriptions]
    return names.index("elevation") if "elevation" in names else None


def fetch_file(p: FetchParams, out_tif: Path) -> dict[str, Any]:
    """Read a local image; a non-georeferenced one gets a pixel grid (crs null in map.json)."""
    path = Path(p.path or "")
    if not path.exists():
        raise InputError(f"fetch.path: {path} does not exist")
    try:
        with rasterio.open(path) as src:
            check_fits_in_memory(path, src, p.resample)
            data, mask = _read_file_strips(src, p.resample)
            elev_idx = _elevation_band(src)
            crs = src.crs
            transform = src.transform @ Affine.scale(src.width / data.shape[2], src.height / data.shape[1])
    except RasterioIOError as err:
        raise InputError(
            f"fetch.path: cannot read {path} as an image ({err}); is it a valid GeoTIFF/JPEG/PNG?"
        ) from None
    finite = np.all(np.isfinite(data.astype(np.float32)), axis=0)
    colour = [i for i in range(data.shape[0]) if i != elev_idx][:3]
    colour = (colour * 3)[:3]  # a single band becomes grey
    empty = np.all(data[colour] == 0, axis=0)
    valid = mask & finite & ~empty
    rgb = np.moveaxis(_stretch_to_uint8(np.nan_to_num(data[colour]), valid), 0, -1)
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


def run_fetch(
    params: Params, out_dir: str | Path, metrics_path: str | Path, timing_path: str | Path | None = None
) -> dict[str, Any]:
    """Run the fetch stage: ``map.tif`` and ``map.json`` in ``out_dir``, fetch metrics and timing.

    Everything is written into a temporary folder and checked first; only then does it replace
    ``out_dir`` whole, so a map that fails a check never replaces the previous one.
    """
    p = params.fetch
    t0 = time.perf_counter()
    with staged_dir(out_dir) as tmp:
        tif = tmp / "map.tif"
        if p.source == "synthetic":
            meta = fetch_synthetic(p, params.base.seed, tif)
        elif p.source == "file":
            meta = fetch_file(p, tif)
        else:
            from maprl.data.earthengine import fetch_earthengine

            meta = fetch_earthengine(p.earthengine, tif)
        m = read_map(tif)
        meta.update(describe_map(m))
        metrics = {
            "seconds": round(time.perf_counter() - t0, 2),
            "valid_fraction": meta["valid_fraction"],
            "usable_view_fraction": usable_fraction(m, params.tile.view_size),
        }
        write_json(tmp / "map.json", meta)
    write_metrics(metrics_path, timing_path, metrics)
    return metrics
