"""Download a map (RGB + elevation) from Google Earth Engine.

:func:`fetch_earthengine` is the entry point. It

1. initialises Earth Engine (stored user credentials or a service account),
2. builds one 4-band image: a cloud-masked Sentinel-2 median composite (or a NAIP median)
   plus a DEM, bands ``red, green, blue, elevation`` as float32,
3. lays a north-up grid in the UTM zone of the bbox centre at ``scale`` metres per pixel,
4. fetches the grid tile by tile with ``ee.data.computePixels`` (GeoTIFF bytes), retrying
   transient failures with exponential backoff, and mosaics the tiles,
5. writes the map GeoTIFF with :func:`maprl.geo.write_map`, marking no-data pixels invalid.

Display range: Sentinel-2 surface reflectance (``COPERNICUS/S2_SR_HARMONIZED`` stores
reflectance x 10000) is mapped linearly from 0..3000 to 0..255 and clamped, i.e. a
reflectance of 0.3 or more is white. NAIP bands are already 0..255.

Everything that talks to Earth Engine goes through ``ee.data.computePixels`` and
``getInfo``, so tests can fake that boundary without the network.
"""

from __future__ import annotations

import http.client
import math
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from rasterio.crs import CRS
from rasterio.io import MemoryFile
from rasterio.transform import Affine

from maprl.config import EarthEngineParams
from maprl.errors import EarthEngineError
from maprl.data.geo import NODATA, lonlat_to_crs, utm_crs, write_map

BAND_IDS = ("red", "green", "blue", "elevation")
S2_COLLECTION = "COPERNICUS/S2_SR_HARMONIZED"
CLOUD_SCORE_COLLECTION = "GOOGLE/CLOUD_SCORE_PLUS/V1/S2_HARMONIZED"
NAIP_COLLECTION = "USDA/NAIP/DOQQ"
SRTM_IMAGE = "USGS/SRTMGL1_003"
GLO30_COLLECTION = "COPERNICUS/DEM/GLO30"
S2_DISPLAY_MAX = 3000.0  # reflectance x 10000 mapped to 255

MAX_REQUEST_BYTES = 48 * 1024 * 1024  # computePixels limit on uncompressed pixels per request
MAX_SIDE_PX = 32768  # computePixels limit on pixels per side
REQUEST_BYTES_MARGIN = 0.9  # stay well under the byte limit
BACKOFF_BASE_S = 1.0
BACKOFF_MAX_S = 60.0

_TRANSIENT_RE = re.compile(
    r"\b(429|500|502|503|504)\b|too many (requests|concurrent)|rate.?limit|quota|capacity exceeded"
    r"|service unavailable|unavailable|internal error|backend error|timed? ?out|timeout|deadline"
    r"|try again|temporarily",
    re.IGNORECASE,
)
_QUOTA_RE = re.compile(
    r"\b429\b|too many (requests|concurrent)|rate.?limit|quota|capacity exceeded|timed? ?out|deadline",
    re.IGNORECASE,
)

T = TypeVar("T")


def _ee() -> Any:
    """Import ``ee`` lazily: it is slow to import and only this source needs it."""
    import ee

    return ee


# --------------------------------------------------------------------------- initialise


def _credential_error_types() -> tuple[type[BaseException], ...]:
    import google.auth.exceptions

    return (_ee().EEException, google.auth.exceptions.GoogleAuthError)


def init_earthengine(p: EarthEngineParams) -> None:
    """Initialise Earth Engine from ``p``; raise :class:`EarthEngineError` saying how to fix it."""
    ee = _ee()
    credentials: Any = None
    if p.credentials == "service_account":
        key = Path(p.key_file or "").expanduser()
        if not key.is_file():
            raise EarthEngineError(
                f"service-account key file {key} does not exist; set fetch.earthengine.key_file to the "
                "JSON key downloaded for the service account"
            )
        try:
            credentials = ee.ServiceAccountCredentials(p.service_account, key_file=str(key))
        except (ValueError, OSError) + _credential_error_types() as err:
            raise EarthEngineError(
                f"cannot load service-account key {key}: {err}; check it is the account's JSON key"
            ) from None
    elif not p.project:
        raise EarthEngineError(
            "Earth Engine needs a Google Cloud project: set fetch.earthengine.project to a project ID "
            "that is registered for Earth Engine (https://code.earthengine.google.com/register)"
        )
    try:
        if credentials is None:
            ee.Initialize(project=p.project)
        else:
            ee.Initialize(credentials, project=p.project)
    except _credential_error_types() as err:
        raise EarthEngineError(
            f"Earth Engine initialisation failed: {err}\n"
            "Run `earthengine authenticate` once on this machine, or set fetch.earthengine.credentials: "
            "service_account with service_account and key_file; also check that project "
            f"{p.project!r} is registered for Earth Engine."
        ) from None
    except _connection_error_types() as err:
        raise EarthEngineError(
            f"cannot reach Earth Engine to initialise ({err}); check the network connection and retry"
        ) from None
    # Retries are ours (call_with_retries, p.max_retries, injectable sleep), not the client's
    # hidden ones, so a rate-limited run waits as configured and tests stay deterministic.
    ee.data.setMaxRetries(0)


# --------------------------------------------------------------------------- image


def _end_exclusive(ee: Any, end_date: str) -> Any:
    """``filterDate`` excludes its end; advance a day so ``end_date`` itself is included."""
    return ee.Date(end_date).advance(1, "day")


def _rgb_sentinel2(ee: Any, p: EarthEngineParams, region: Any) -> tuple[Any, Any]:
    dates = (p.start_date, _end_exclusive(ee, p.end_date))
    s2 = ee.ImageCollection(S2_COLLECTION).filterBounds(region).filterDate(*dates)
    scores = ee.ImageCollection(CLOUD_SCORE_COLLECTION)
    threshold = p.cloud_score_min

    def mask_clouds(img: Any) -> Any:
        return img.updateMask(img.select("cs_cdf").gte(threshold))

    composite = s2.linkCollection(scores, ["cs_cdf"]).map(mask_clouds).median()
    bands = composite.select(["B4", "B3", "B2"], list(BAND_IDS[:3]))
    rgb = bands.divide(S2_DISPLAY_MAX).multiply(255).clamp(0, 255)
    return rgb, s2


def _rgb_naip(ee: Any, p: EarthEngineParams, region: Any) -> tuple[Any, Any]:
    dates = (p.start_date, _end_exclusive(ee, p.end_date))
    naip = ee.ImageCollection(NAIP_COLLECTION).filterBounds(region).filterDate(*dates)
    rgb = naip.select(["R", "G", "B"], list(BAND_IDS[:3])).median()
    return rgb, naip


def _dem(ee: Any, dem: str) -> Any:
    if dem == "srtm":
        return ee.Image(SRTM_IMAGE).select(["elevation"], ["elevation"])
    return ee.ImageCollection(GLO30_COLLECTION).select("DEM").mosaic().rename("elevation")


def build_image(p: EarthEngineParams) -> tuple[Any, Any]:
    """Return ``(image, collection)``: the 4-band float32 image and the imagery collection.

    The image has bands ``red, green, blue, elevation``; masked pixels (clouds, no scene,
    no DEM) are filled with :data:`maprl.geo.NODATA` so they come back recognisable.
    ``collection`` is the filtered imagery collection, used to check it is not empty.
    """
    ee = _ee()
    region = ee.Geometry.Rectangle(list(p.bbox))
    if p.collection == "sentinel2":
        rgb, collection = _rgb_sentinel2(ee, p, region)
    else:
        rgb, collection = _rgb_naip(ee, p, region)
    image = rgb.addBands(_dem(ee, p.dem)).select(list(BAND_IDS)).toFloat().unmask(NODATA)
    return image, collection


# --------------------------------------------------------------------------- grid


@dataclass(frozen=True)
class Grid:
    """A north-up pixel grid: ``transform`` maps (col, row) to CRS metres."""

    crs: CRS
    transform: Affine
    width: int
    height: int


@dataclass(frozen=True)
class Tile:
    """One computePixels request: a window of the grid."""

    col_off: int
    row_off: int
    width: int
    height: int


def plan_grid(bbox: tuple[float, float, float, float], scale: float) -> Grid:
    """A grid in the UTM zone of the bbox centre covering the bbox, snapped to ``scale``.

    The bbox outline (corners and points along each edge) is projected to UTM and the grid
    is its bounding rectangle, with the origin on a multiple of ``scale``.
    """
    west, south, east, north = bbox
    crs = utm_crs((south + north) / 2, (west + east) / 2)
    steps = np.linspace(0.0, 1.0, 9)
    lons = [west + (east - west) * t for t in steps]
    lats = [south + (north - south) * t for t in steps]
    outline = [(lon, south) for lon in lons] + [(lon, north) for lon in lons]
    outline += [(west, lat) for lat in lats] + [(east, lat) for lat in lats]
    xy = np.array([lonlat_to_crs(crs, lon, lat) for lon, lat in outline])
    x0 = math.floor(xy[:, 0].min() / scale) * scale
    y0 = math.ceil(xy[:, 1].max() / scale) * scale
    width = max(1, math.ceil((xy[:, 0].max() - x0) / scale))
    height = max(1, math.ceil((y0 - xy[:, 1].min()) / scale))
    return Grid(crs=crs, transform=Affine(scale, 0.0, x0, 0.0, -scale, y0), width=width, height=height)


def tile_side(max_request_px: int, n_bands: int = len(BAND_IDS), bytes_per_value: int = 4) -> int:
    """Largest square tile side within ``max_request_px`` and the per-request limits."""
    budget = int(MAX_REQUEST_BYTES * REQUEST_BYTES_MARGIN) // (n_bands * bytes_per_value)
    return max(1, min(max_request_px, MAX_SIDE_PX, math.isqrt(budget)))


def plan_tiles(width: int, height: int, side: int) -> list[Tile]:
    """Split a ``width`` x ``height`` grid into tiles of at most ``side`` pixels, row by row."""
    return [
        Tile(col, row, min(side, width - col), min(side, height - row))
        for row in range(0, height, side)
        for col in range(0, width, side)
    ]


def tile_request(image: Any, grid: Grid, tile: Tile) -> dict[str, Any]:
    """The ``ee.data.computePixels`` request for one tile."""
    t = grid.transform * Affine.translation(tile.col_off, tile.row_off)
    return {
        "expression": image,
        "fileFormat": "GEO_TIFF",
        "bandIds": list(BAND_IDS),
        "grid": {
            "dimensions": {"width": tile.width, "height": tile.height},
            "affineTransform": {
                "scaleX": t.a,
                "shearX": t.b,
                "translateX": t.c,
                "shearY": t.d,
                "scaleY": t.e,
                "translateY": t.f,
            },
            "crsCode": f"EPSG:{grid.crs.to_epsg()}",
        },
    }


# --------------------------------------------------------------------------- retries


def _connection_error_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [
        ConnectionError,
        TimeoutError,
        socket.gaierror,
        http.client.HTTPException,
    ]
    try:
        import google.auth.exceptions

        types.append(google.auth.exceptions.TransportError)
    except ImportError:  # pragma: no cover - google-auth ships with earthengine-api
        pass
    try:
        import requests

        types += [requests.exceptions.ConnectionError, requests.exceptions.Timeout]
    except ImportError:  # pragma: no cover
        pass
    try:
        import httplib2

        types.append(httplib2.HttpLib2Error)
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)


def is_transient(err: BaseException) -> bool:
    """True for errors worth retrying: rate limits, server errors, timeouts, lost connections."""
    if isinstance(err, _connection_error_types()):
        return True
    return isinstance(err, _ee().EEException) and bool(_TRANSIENT_RE.search(str(err)))


def _give_up_message(what: str, err: BaseException, attempts: int, p: EarthEngineParams) -> str:
    if _QUOTA_RE.search(str(err)):
        return (
            f"Earth Engine kept refusing {what} after {attempts} attempts (quota, rate limit or "
            f"capacity): {err}\nWait a few minutes and run again; reduce fetch.earthengine.bbox or "
            "increase fetch.earthengine.scale to need fewer requests, raise fetch.earthengine.max_retries, "
            f"and check the Earth Engine quota of project {p.project!r} in the Cloud console."
        )
    return (
        f"Earth Engine {what} failed after {attempts} attempts: {err}\n"
        "Check the network connection and run again, or raise fetch.earthengine.max_retries."
    )


def _fatal_message(what: str, err: BaseException) -> str:
    msg = f"Earth Engine {what} failed: {err}"
    text = str(err).lower()
    if "memory" in text or "request size" in text or "too large" in text:
        msg += "\nLower fetch.earthengine.max_request_px (smaller tiles) or increase fetch.earthengine.scale."
    elif "not found" in text or "permission" in text or "denied" in text:
        msg += "\nCheck that the project is registered for Earth Engine and can read the collection."
    return msg


def call_with_retries(
    fn: Callable[[], T], what: str, p: EarthEngineParams, sleep: Callable[[float], None] = time.sleep
) -> T:
    """Call ``fn``; retry transient errors up to ``p.max_retries`` times with exponential backoff.

    Waits ``BACKOFF_BASE_S * 2**attempt`` seconds (capped at ``BACKOFF_MAX_S``) through ``sleep``.
    Non-transient Earth Engine errors and exhausted retries raise :class:`EarthEngineError`.
    """
    ee = _ee()
    for attempt in range(p.max_retries + 1):
        try:
            return fn()
        except (ee.EEException, *_connection_error_types()) as err:
            if not is_transient(err):
                raise EarthEngineError(_fatal_message(what, err)) from None
            if attempt == p.max_retries:
                raise EarthEngineError(_give_up_message(what, err, attempt + 1, p)) from None
            sleep(min(BACKOFF_BASE_S * 2**attempt, BACKOFF_MAX_S))
    raise AssertionError("unreachable")  # pragma: no cover


# --------------------------------------------------------------------------- decode and mosaic


def decode_tile(data: bytes, tile: Tile) -> np.ndarray:
    """GeoTIFF bytes to a (4, h, w) float32 array; no-data pixels become NaN.

    No-data is: non-finite values, the GeoTIFF's nodata value, :data:`NODATA`, and pixels
    whose red, green and blue are all zero (masked imagery exported without a mask).
    """
    try:
        with MemoryFile(data) as mem, mem.open() as src:
            arr = src.read(out_dtype=np.float32)
            nodata = src.nodata
    except Exception as err:  # rasterio raises several types for corrupt bytes
        raise EarthEngineError(f"Earth Engine returned an unreadable GeoTIFF for a tile: {err}") from None
    expected = (len(BAND_IDS), tile.height, tile.width)
    if arr.shape != expected:
        raise EarthEngineError(f"Earth Engine returned a tile of shape {arr.shape}, expected {expected}")
    bad = ~np.all(np.isfinite(arr), axis=0)
    bad |= np.any(arr == NODATA, axis=0)
    if nodata is not None and not math.isnan(nodata):
        bad |= np.any(arr == nodata, axis=0)
    bad |= np.all(arr[:3] == 0, axis=0)
    arr[:, bad] = np.nan
    return arr


def mosaic(tiles: list[Tile], arrays: list[np.ndarray], width: int, height: int) -> np.ndarray:
    """Place tile arrays at their offsets in a (4, height, width) array; gaps stay NaN."""
    full = np.full((len(BAND_IDS), height, width), np.nan, np.float32)
    for tile, arr in zip(tiles, arrays, strict=True):
        full[:, tile.row_off : tile.row_off + tile.height, tile.col_off : tile.col_off + tile.width] = arr
    return full


def _progress(items: list[Tile], enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(items, desc="Earth Engine tiles", unit="tile", disable=not enabled)


# --------------------------------------------------------------------------- entry point


def _check_not_empty(collection: Any, p: EarthEngineParams, sleep: Callable[[float], None]) -> None:
    size = call_with_retries(lambda: collection.size().getInfo(), "collection size query", p, sleep)
    if size == 0:
        raise EarthEngineError(
            f"no {p.collection} images matched bbox {list(p.bbox)} between {p.start_date} and "
            f"{p.end_date}; widen fetch.earthengine.start_date/end_date or the bbox"
            + (" (NAIP covers the United States only)" if p.collection == "naip" else "")
        )


def fetch_earthengine(
    p: EarthEngineParams,
    out_path: Path,
    *,
    progress: bool = True,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """Download the map for ``p`` into ``out_path`` (4-band GeoTIFF) and return its metadata.

    Raises :class:`EarthEngineError` for missing credentials or project, an empty collection,
    non-transient Earth Engine errors, and transient ones that outlast ``p.max_retries``.
    ``sleep`` is called for backoff waits (inject a fake in tests).
    """
    init_earthengine(p)
    image, collection = build_image(p)
    _check_not_empty(collection, p, sleep)
    grid = plan_grid(p.bbox, p.scale)
    tiles = plan_tiles(grid.width, grid.height, tile_side(p.max_request_px))
    ee = _ee()
    arrays = []
    for i, tile in enumerate(_progress(tiles, progress)):
        request = tile_request(image, grid, tile)
        what = f"computePixels request {i + 1}/{len(tiles)}"
        data: bytes = call_with_retries(partial(ee.data.computePixels, request), what, p, sleep)
        arrays.append(decode_tile(data, tile))
    full = mosaic(tiles, arrays, grid.width, grid.height)
    valid = np.all(np.isfinite(full), axis=0)
    rgb = np.moveaxis(np.clip(np.nan_to_num(full[:3]), 0, 255), 0, -1)
    write_map(out_path, rgb, np.nan_to_num(full[3]), grid.transform, grid.crs, valid)
    return {
        "source": "earthengine",
        "collection": p.collection,
        "dem": p.dem,
        "date_range": [p.start_date, p.end_date],
        "bbox_lonlat": list(p.bbox),
        "crs": f"EPSG:{grid.crs.to_epsg()}",
        "metres_per_pixel": p.scale,
        "width": grid.width,
        "height": grid.height,
        "n_requests": len(tiles),
        "valid_fraction": float(valid.mean()),
    }
