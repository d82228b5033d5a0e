"""Query domains: imagery of the map's place from which target photos are cut instead of the map.

Each domain of ``fetch.queries`` is written as ``<map_dir>/queries/<name>.tif``: a 3-band uint8
RGB GeoTIFF on exactly the map's grid (same CRS, transform, width and height) with an internal
mask marking where it has imagery. A target at map pixel (x, y) therefore has its query photo
at the same pixel (x, y) of every domain.

Sources: ``synthetic`` (the same procedural world rendered in another season), ``file`` (any
georeferenced raster, reprojected onto the map grid by its coordinates) and ``earthengine``
(the map's area from other dates).
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.errors import RasterioIOError
from rasterio.transform import Affine, array_bounds
from rasterio.warp import reproject, transform_bounds
from rasterio.windows import Window, from_bounds

from maprl.config import EarthEngineParams, FetchParams, QueryParams
from maprl.data.fetch import (
    colour_bands,
    is_display_range,
    read_strips,
    require_memory,
    source_valid,
    stretch_to_uint8,
)
from maprl.data.geo import MapData, read_map
from maprl.data.world import World, synthesize_worlds
from maprl.errors import InputError
from maprl.io import atomic_path

QUERY_DIR = "queries"
MIN_OVERLAP = 0.5  # share of the map's valid area a query domain must cover
OVERSAMPLE = 2.0  # a finer source is read at this many samples per map pixel, then warped
BYTES_PER_READ_PIXEL = 16  # besides a float32 copy of each band: the float32 colour with NaN holes, masks
BYTES_PER_GRID_PIXEL = 24  # warped colour (float32), masks and the uint8 result on the map grid
RERUN = "rerun `dvc repro fetch`"

Domain = tuple[np.ndarray, np.ndarray, dict[str, Any]]
"""One query domain on the map grid: rgb (H, W, 3) uint8, valid (H, W) bool, its source fields."""


@dataclass(frozen=True)
class Grid:
    """The map's pixel grid: every query domain is resampled onto it."""

    crs: CRS
    transform: Affine
    width: int
    height: int


def query_path(map_dir: str | Path, name: str) -> Path:
    """Where query domain ``name`` of the map in ``map_dir`` lives."""
    return Path(map_dir) / QUERY_DIR / f"{name}.tif"


# --------------------------------------------------------------------------- align a raster


def map_grid(map_tif: str | Path) -> Grid:
    """The grid of a map GeoTIFF; an InputError when it has none (a plain pixel grid)."""
    try:
        with rasterio.open(map_tif) as src:
            crs, transform, width, height = src.crs, src.transform, src.width, src.height
    except RasterioIOError as err:
        raise InputError(f"cannot read map {map_tif} ({err}); {RERUN}") from None
    if crs is None:
        raise InputError(
            f"map {map_tif} has no coordinate reference system, so no query domain can be aligned to it; "
            "fetch a georeferenced map or set fetch.queries: []"
        )
    return Grid(crs, transform, width, height)


def _check_georeferenced(src: rasterio.DatasetReader, path: Path, key: str) -> None:
    if src.crs is None or src.transform.is_identity:
        raise InputError(
            f"{key}: {path} is not georeferenced (no CRS or geotransform), so it cannot be placed on the map; "
            "give a GeoTIFF with its CRS (e.g. `gdal_translate -a_srs EPSG:... -a_ullr ...`)"
        )


def _no_overlap(path: Path, key: str, grid: Grid) -> InputError:
    bounds = [round(v, 1) for v in array_bounds(grid.height, grid.width, grid.transform)]
    return InputError(
        f"{key}: {path} does not overlap the map (map bounds [west, south, east, north] {bounds} in {grid.crs}); "
        "give imagery of the map's place"
    )


def _source_window(src: rasterio.DatasetReader, grid: Grid, path: Path, key: str) -> tuple[Window, float]:
    """The part of the source under the map, padded for interpolation, and the read scale.

    A source much finer than the map is read at :data:`OVERSAMPLE` samples per map pixel
    (averaged), so memory stays near the map's size whatever the source's resolution.
    """
    left, bottom, right, top = array_bounds(grid.height, grid.width, grid.transform)
    try:
        bounds = transform_bounds(grid.crs, src.crs, left, bottom, right, top, densify_pts=21)
    except Exception as err:  # CRSError, or GDAL's error when the map's area lies outside the source CRS's domain
        raise InputError(f"{key}: cannot express the map's area in the CRS of {path} ({err})") from None
    full = from_bounds(*bounds, transform=src.transform)
    ratio = max(abs(full.width) / grid.width, abs(full.height) / grid.height)
    scale = min(1.0, OVERSAMPLE / ratio) if ratio > 0 else 1.0
    pad = 2 / scale
    c0, r0 = math.floor(full.col_off - pad), math.floor(full.row_off - pad)
    c1, r1 = math.ceil(full.col_off + full.width + pad), math.ceil(full.row_off + full.height + pad)
    c0, r0, c1, r1 = max(c0, 0), max(r0, 0), min(c1, src.width), min(r1, src.height)
    if c1 <= c0 or r1 <= r0:
        raise _no_overlap(path, key, grid)
    return Window(c0, r0, c1 - c0, r1 - r0), scale


def _check_memory(src: rasterio.DatasetReader, window: Window, scale: float, grid: Grid, key: str) -> None:
    read_px = max(1, round(window.width * scale)) * max(1, round(window.height * scale))
    per_read = src.count * (np.dtype(src.dtypes[0]).itemsize + 4) + BYTES_PER_READ_PIXEL
    require_memory(
        read_px * per_read + grid.width * grid.height * BYTES_PER_GRID_PIXEL,
        f"{key}: {src.name} ({src.width}x{src.height} pixels) read onto the {grid.width}x{grid.height} map grid would",
        lambda _: "Crop the image to the map's area, or fetch a smaller map",
    )


def _warp(
    colour: np.ndarray, valid: np.ndarray, transform: Affine, crs: CRS, grid: Grid
) -> tuple[np.ndarray, np.ndarray]:
    """Colour bilinearly and validity by nearest pixel onto ``grid``; pixels no valid source covers are invalid."""
    src = np.where(valid, colour.astype(np.float32), np.float32(np.nan))
    dst = np.full((colour.shape[0], grid.height, grid.width), np.nan, np.float32)
    inside = np.zeros((grid.height, grid.width), np.uint8)
    common = {"src_transform": transform, "src_crs": crs, "dst_transform": grid.transform, "dst_crs": grid.crs}
    reproject(src, dst, src_nodata=np.nan, dst_nodata=np.nan, resampling=Resampling.bilinear, **common)
    reproject(valid.astype(np.uint8), inside, dst_nodata=0, resampling=Resampling.nearest, **common)
    return dst, (inside > 0) & np.all(np.isfinite(dst), axis=0)


def align_to_map(src_path: str | Path, map_tif: str | Path, key: str = "query") -> tuple[np.ndarray, np.ndarray]:
    """Reproject any georeferenced raster onto the map's grid, by CRS coordinates.

    Colour bands as in :func:`maprl.data.fetch.fetch_file` (the first three not described as
    elevation; one band becomes grey; non-uint8 stretched 2-98 % over the map's area).
    Returns ``(rgb (H, W, 3) uint8, valid (H, W) bool)`` on the map grid; pixels outside the
    source, in its mask or nodata, or black in every band are invalid. ``key`` names the
    setting the path came from, for error messages.
    """
    grid, path = map_grid(map_tif), Path(src_path)
    if not path.exists():
        raise InputError(f"{key}: {path} does not exist; fix the path or remove the query domain")
    try:
        with rasterio.open(path) as src:
            _check_georeferenced(src, path, key)
            window, scale = _source_window(src, grid, path, key)
            _check_memory(src, window, scale, grid, key)
            data, mask, transform = read_strips(src, scale, window)
            colour, crs = colour_bands(src), src.crs
            display = is_display_range(src) or data.dtype == np.uint8
    except RasterioIOError as err:
        raise InputError(f"{key}: cannot read {path} as a raster ({err}); is it a valid GeoTIFF?") from None
    warped, valid = _warp(data[colour], source_valid(data, mask, colour), transform, crs, grid)
    del data, mask
    if not valid.any():
        raise _no_overlap(path, key, grid)
    rgb = np.where(valid, np.rint(stretch_to_uint8(warped, valid, display)), 0).astype(np.uint8)
    return np.moveaxis(rgb, 0, -1), valid


# --------------------------------------------------------------------------- write and read


def write_query(path: str | Path, rgb: np.ndarray, valid: np.ndarray, grid: Grid) -> None:
    """Write one query domain atomically: 3-band uint8 RGB on ``grid``, ``valid`` as internal mask."""
    h, w = valid.shape
    if (h, w) != (grid.height, grid.width):
        raise ValueError(f"query {path} is {w}x{h} but the map grid is {grid.width}x{grid.height}")
    profile = {
        "driver": "GTiff",
        "width": w,
        "height": h,
        "count": 3,
        "dtype": "uint8",
        "crs": grid.crs,
        "transform": grid.transform,
        "tiled": True,
        "blockxsize": 256,
        "blockysize": 256,
        "compress": "deflate",
        "predictor": 2,
    }
    data = np.where(valid[..., None], rgb, 0).astype(np.uint8)
    with (
        atomic_path(path) as tmp,
        rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True),
        rasterio.open(tmp, "w", **profile) as dst,
    ):
        dst.write(np.moveaxis(data, -1, 0))
        dst.write_mask(np.where(valid, 255, 0).astype(np.uint8))
        dst.descriptions = ("red", "green", "blue")


def query_names(map_dir: str | Path) -> list[str]:
    """Names of the query domains of the map in ``map_dir`` (from map.json; [] for maps without any,
    and for a map with no map.json beside it, i.e. not written by the fetch stage)."""
    meta_path = Path(map_dir) / "map.json"
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as err:
        raise InputError(f"cannot read {meta_path} ({err}); {RERUN}") from None
    return [str(q["name"]) for q in meta.get("queries", [])]


def read_query(map_dir: str | Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Query domain ``name`` of the map in ``map_dir``: ``(rgb (H, W, 3) uint8, valid (H, W) bool)``."""
    path = query_path(map_dir, name)
    if not path.exists():
        raise InputError(f"query domain {name!r}: {path} does not exist; {RERUN}")
    grid = map_grid(Path(map_dir) / "map.tif")
    try:
        with rasterio.open(path) as src:
            if src.count != 3 or src.dtypes[0] != "uint8":
                raise InputError(f"query domain {name!r}: {path} is not a 3-band uint8 RGB GeoTIFF; {RERUN}")
            shape = (src.height, src.width)
            rgb, valid = src.read(), src.dataset_mask() > 0
    except RasterioIOError as err:
        raise InputError(f"query domain {name!r}: cannot read {path} ({err}); {RERUN}") from None
    if shape != (grid.height, grid.width):
        raise InputError(
            f"query domain {name!r}: {path} is {shape[1]}x{shape[0]} but the map is {grid.width}x{grid.height}; {RERUN}"
        )
    return np.moveaxis(rgb, 0, -1), valid


# --------------------------------------------------------------------------- fetch


def _synthetic_worlds(p: FetchParams, seed: int, worlds: dict[str, World] | None) -> dict[str, World]:
    """The renderings the synthetic domains need: ``worlds`` if given, else built once here."""
    seasons = sorted({q.season for q in p.active_queries if q.source == "synthetic"})
    if worlds is not None and set(seasons) <= worlds.keys():
        return worlds
    return synthesize_worlds(p.size, seed, p.metres_per_pixel, seasons) if seasons else {}


def _earthengine(p: FetchParams, q: QueryParams, map_tif: Path, out_dir: Path, key: str) -> Domain:
    from maprl.data.earthengine import fetch_earthengine

    dates = {"start_date": q.start_date, "end_date": q.end_date} if q.start_date else {}
    ee_p = EarthEngineParams.model_validate({**p.earthengine.model_dump(), **dates})
    with tempfile.TemporaryDirectory(prefix=f".{q.name}.", dir=out_dir) as tmp:
        tif = Path(tmp) / f"{q.name}.tif"
        fetch_earthengine(ee_p, tif)
        rgb, valid = align_to_map(tif, map_tif, key)
    return rgb, valid, {"collection": ee_p.collection, "date_range": [ee_p.start_date, ee_p.end_date]}


def _fetch_one(p: FetchParams, i: int, map_tif: Path, out_dir: Path, worlds: dict[str, World]) -> Domain:
    """Query domain ``i`` on the map grid."""
    q, key = p.queries[i], f"fetch.queries[{i}]"
    if q.source == "synthetic":
        rgb = worlds[q.season].rgb
        return rgb, np.ones(rgb.shape[:2], bool), {"season": q.season}
    if q.source == "file":
        rgb, valid = align_to_map(Path(q.path or ""), map_tif, f"{key}.path")
        return rgb, valid, {"path": q.path}
    return _earthengine(p, q, map_tif, out_dir, key)


def _check_overlap(info: dict[str, Any], i: int) -> None:
    """A domain must cover at least :data:`MIN_OVERLAP` of the map's valid area."""
    if info["overlap_fraction"] >= MIN_OVERLAP:
        return
    where = {k: info[k] for k in ("path", "season", "collection", "date_range") if k in info}
    raise InputError(
        f"fetch.queries[{i}] ({info['name']!r}, {where}): only {info['overlap_fraction']:.0%} of the map's valid "
        f"area has imagery in this query domain (at least {MIN_OVERLAP:.0%} needed); give imagery that covers "
        "the map's place, or remove the domain from fetch.queries"
    )


def fetch_queries(
    p: FetchParams, seed: int, map_tif: Path, out_dir: Path, worlds: dict[str, World] | None = None
) -> list[dict[str, Any]]:
    """Write every domain of ``p.queries`` into ``out_dir/queries/`` on the grid of ``map_tif``.

    ``worlds`` are synthetic renderings by season already built with the map (built here if
    absent). Returns per domain its name, source, file, source fields (path, season or dates),
    valid_fraction and overlap_fraction (share of the map's valid pixels also valid in it).
    """
    for q in p.queries:
        if q not in p.active_queries:
            print(f"fetch.queries: {q.name} (source synthetic) re-renders the synthetic world; skipped for "
                  f"fetch.source {p.source}")  # fmt: skip
    if not p.active_queries:
        return []
    m: MapData = read_map(map_tif)
    grid = map_grid(map_tif)
    worlds = _synthetic_worlds(p, seed, worlds)
    infos = []
    for i, q in enumerate(p.queries):
        if q not in p.active_queries:
            continue
        rgb, valid, fields = _fetch_one(p, i, map_tif, out_dir, worlds)
        overlap = float((valid & m.valid).sum() / max(1, m.valid.sum()))
        info = {"name": q.name, "source": q.source, "file": f"{QUERY_DIR}/{q.name}.tif", **fields}
        info |= {"valid_fraction": float(valid.mean()), "overlap_fraction": overlap}
        _check_overlap(info, i)
        write_query(query_path(out_dir, q.name), rgb, valid, grid)
        infos.append(info)
    return infos
