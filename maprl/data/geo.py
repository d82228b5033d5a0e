"""Geo I/O: the map GeoTIFF, its JSON sidecar, and coordinate transforms.

The map on disk is a 4-band float32 GeoTIFF: bands 1-3 are red, green and blue in the
0-255 display range, band 4 is elevation in metres. ``NODATA`` marks pixels with no
imagery; later stages never sample a view that touches one.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.errors import RasterioIOError
from rasterio.transform import Affine
from rasterio.warp import transform as warp_transform
from rasterio.windows import Window

from maprl.errors import InputError
from maprl.io import atomic_path

NODATA = -9999.0
BAND_NAMES = ("red", "green", "blue", "elevation")
READ_STRIP_BYTES = 64 << 20  # float32 bands read at a time


@dataclass
class MapData:
    """A map held in memory, ready for sampling views."""

    rgb: np.ndarray  # (H, W, 3) uint8
    elevation: np.ndarray  # (H, W) float32, metres
    valid: np.ndarray  # (H, W) bool, True where imagery exists
    transform: Affine
    crs: CRS | None  # None for a plain pixel grid

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])

    @cached_property
    def metres_per_pixel_xy(self) -> tuple[float, float]:
        """Ground metres of one pixel step along x and along y, at the map centre.

        A projected CRS gives its units (metres); a geographic CRS (degrees, e.g. EPSG:4326) is
        measured in the local UTM zone; a plain pixel grid (no CRS) gives NaN.
        """
        if self.crs is None:
            return float("nan"), float("nan")
        t = self.transform
        if not self.crs.is_geographic:
            return float(np.hypot(t.a, t.d)), float(np.hypot(t.b, t.e))
        cx, cy = self.width / 2, self.height / 2
        lon, lat = self.pixel_to_lonlat(np.array([cx, cx + 1, cx]), np.array([cy, cy, cy + 1]))
        xs, ys = warp_transform("EPSG:4326", utm_crs(float(lat[0]), float(lon[0])), lon.tolist(), lat.tolist())
        return float(np.hypot(xs[1] - xs[0], ys[1] - ys[0])), float(np.hypot(xs[2] - xs[0], ys[2] - ys[0]))

    @property
    def metres_per_pixel(self) -> float:
        """Mean ground metres per pixel (see :attr:`metres_per_pixel_xy`)."""
        mx, my = self.metres_per_pixel_xy
        return (mx + my) / 2

    def distance_m(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Ground distance in metres between pixel positions ``a`` and ``b`` (..., 2); NaN without a CRS."""
        mx, my = self.metres_per_pixel_xy
        d = np.asarray(a, float) - np.asarray(b, float)
        return np.hypot(d[..., 0] * mx, d[..., 1] * my)

    def pixel_to_crs(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pixel centres (column x, row y, fractional allowed) to map CRS coordinates."""
        t = self.transform
        col, row = np.asarray(x, float) + 0.5, np.asarray(y, float) + 0.5
        return t.a * col + t.b * row + t.c, t.d * col + t.e * row + t.f

    def pixel_to_lonlat(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pixel centres (column x, row y, fractional allowed) to lon/lat degrees."""
        xs, ys = self.pixel_to_crs(x, y)
        if self.crs is None:
            return np.full_like(np.asarray(xs, float), np.nan), np.full_like(np.asarray(ys, float), np.nan)
        lon, lat = warp_transform(self.crs, "EPSG:4326", np.atleast_1d(xs).tolist(), np.atleast_1d(ys).tolist())
        return np.asarray(lon), np.asarray(lat)


def utm_crs(lat: float, lon: float) -> CRS:
    """The WGS84 UTM zone CRS containing a point."""
    zone = int((lon + 180) // 6) % 60 + 1
    return CRS.from_epsg((32600 if lat >= 0 else 32700) + zone)


def lonlat_to_crs(crs: CRS, lon: float, lat: float) -> tuple[float, float]:
    xs, ys = warp_transform("EPSG:4326", crs, [lon], [lat])
    return float(xs[0]), float(ys[0])


def write_map(
    path: str | Path,
    rgb: np.ndarray,
    elevation: np.ndarray,
    transform: Affine,
    crs: CRS | None,
    valid: np.ndarray | None = None,
) -> None:
    """Write the 4-band map GeoTIFF atomically; pixels where ``valid`` is False get NODATA."""
    h, w = elevation.shape
    data = np.empty((4, h, w), np.float32)
    data[:3] = np.moveaxis(rgb, -1, 0)
    data[3] = elevation
    if valid is not None:
        data[:, ~valid] = NODATA
    profile = {
        "driver": "GTiff",
        "width": w,
        "height": h,
        "count": 4,
        "dtype": "float32",
        "crs": crs,
        "transform": transform,
        "nodata": NODATA,
        "tiled": True,
        "blockxsize": 256,
        "blockysize": 256,
        "compress": "deflate",
        "predictor": 3,
    }
    with atomic_path(path) as tmp, rasterio.open(tmp, "w", **profile) as dst:
        dst.write(data)
        dst.descriptions = BAND_NAMES
        dst.update_tags(4, units="metres")


def read_map(path: str | Path) -> MapData:
    """Read the map GeoTIFF written by the fetch stage.

    Read in strips of rows (about ``READ_STRIP_BYTES`` of float32 bands each) straight into the
    uint8 colours, float32 elevation and bool validity, so a large map never sits in memory as
    float32 bands; the result equals reading every band at once.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"map {path} does not exist; run `dvc repro fetch` first")
    try:
        with rasterio.open(path) as src:
            if src.count < 4:
                raise InputError(f"map {path} has {src.count} bands; expected red, green, blue, elevation")
            h, w, nodata = src.height, src.width, src.nodata
            rgb, elevation, valid = np.empty((h, w, 3), np.uint8), np.empty((h, w), np.float32), np.empty((h, w), bool)
            rows = max(1, READ_STRIP_BYTES // (4 * w * src.count))
            for r in range(0, h, rows):
                data = src.read(window=Window(0, r, w, min(rows, h - r)), out_dtype=np.float32)
                ok = np.all(np.isfinite(data), axis=0)
                if nodata is not None:
                    ok &= ~np.any(data == nodata, axis=0)
                valid[r : r + rows] = ok
                rgb[r : r + rows] = np.clip(np.nan_to_num(np.moveaxis(data[:3], 0, -1)), 0, 255)
                elevation[r : r + rows] = np.where(ok, data[3], np.nan)
            transform, crs = src.transform, src.crs
    except RasterioIOError as err:
        raise InputError(f"cannot read map {path}: {err}") from None
    return MapData(rgb=rgb, elevation=elevation, valid=valid, transform=transform, crs=crs)
