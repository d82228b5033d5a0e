"""Windows of the real multi-date imagery in ``../shared/data`` (see its README): NAIP of one North
Dakota tile on several dates, co-registered to within a pixel but with bounds a few metres apart.

The windows are cut in ``tmp_path`` (never copied into the repository). Skipped, saying why,
where the shared data folder is absent.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.windows import Window

from maprl.data.geo import write_map
from maprl.data.queries import align_to_map
from maprl.data.tile import texture

NAIP = Path(__file__).resolve().parents[2] / "shared" / "data" / "naip-nd"
pytestmark = pytest.mark.skipif(not NAIP.is_dir(), reason=f"real imagery not found at {NAIP}")


def _window(name: str, out: Path, col: int = 300, row: int = 250, side: int = 160) -> Path:
    """A ``side`` px window of a NAIP date as its own GeoTIFF (its own bounds, all four bands)."""
    with rasterio.open(NAIP / f"{name}.tif") as src:
        win = Window(col, row, side, side)
        data = src.read(window=win)
        profile = {**src.profile, "width": side, "height": side, "transform": src.window_transform(win)}
    with rasterio.open(out, "w", **profile) as dst:
        dst.write(data)
    return out


def _map_from(window: Path, out: Path) -> tuple[Path, np.ndarray]:
    with rasterio.open(window) as src:
        rgb = np.moveaxis(src.read([1, 2, 3]), 0, -1)
        write_map(out, rgb, np.zeros(rgb.shape[:2], np.float32), src.transform, src.crs)
    return out, rgb


def _grad(rgb: np.ndarray) -> np.ndarray:
    g = rgb.astype(np.float32).mean(axis=-1)
    return np.hypot(*np.gradient(g))


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def test_another_date_lands_on_the_map_grid_by_coordinates(tmp_path: Path) -> None:
    """2016 over a 2020 map, each cut with its own bounds: aligned, the field edges coincide best at shift 0."""
    map_tif, rgb20 = _map_from(_window("naip_20200831", tmp_path / "w20.tif"), tmp_path / "map.tif")
    # the 2016 window starts 7 px to the right and 5 px lower: only coordinates can put it back
    other = _window("naip_20160816", tmp_path / "w16.tif", col=307, row=255)
    rgb16, valid = align_to_map(other, map_tif)
    assert rgb16.shape == rgb20.shape and valid.dtype == bool
    assert not valid[:, :6].any() and not valid[:4].any() and valid[8:, 8:].all()  # left and top edges empty
    g20, g16 = _grad(rgb20)[10:150, 10:150], _grad(rgb16)[10:150, 10:150]
    at0 = _corr(g20, g16)
    shifted = [_corr(g20[:, k:], g16[:, : g16.shape[1] - k]) for k in (2, 3)]
    assert at0 > 0.2 and at0 > max(shifted) + 0.05


def test_dates_differ_in_colour_more_than_in_structure(tmp_path: Path) -> None:
    """The realistic gap: the same fields, other colours (why photos of another date are hard)."""
    map_tif, rgb20 = _map_from(_window("naip_20200831", tmp_path / "w20.tif"), tmp_path / "map.tif")
    rgb14, _ = align_to_map(_window("naip_20140720", tmp_path / "w14.tif"), map_tif)
    colour = _corr(rgb20.astype(np.float32).mean(-1), rgb14.astype(np.float32).mean(-1))
    structure = _corr(_grad(rgb20), _grad(rgb14))
    assert structure > 0.2 and abs(colour) < 0.9
    assert texture(rgb20[None])[0] > 2.0  # a window of fields clears the default informativeness floor
