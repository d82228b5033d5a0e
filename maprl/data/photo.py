"""Reading a user's photo: any JPEG, PNG or GeoTIFF, of any size, as RGB uint8.

:func:`read_photo` decodes the whole file (so a truncated one fails here, not half-way through
a batch), applies the EXIF orientation, converts grayscale, RGBA, palette, CMYK and 16-bit
images to RGB uint8 and says in :attr:`Photo.notes` what it converted. A georeferenced GeoTIFF
also gives its ground sample distance. :func:`to_map_gsd` resamples a photo to the map's
ground sample distance.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import rasterio
from PIL import Image, ImageOps, UnidentifiedImageError
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError

from maprl.data.geo import MapData
from maprl.errors import InputError

MIN_SIDE = 8
"""Smallest photo side, pixels: a smaller image holds too little to match."""
GEOTIFF_SUFFIXES = (".tif", ".tiff")


@dataclass
class Photo:
    """A decoded photo: RGB uint8 pixels and what was done to them."""

    rgb: np.ndarray  # (H, W, 3) uint8
    path: str = ""
    gsd_m: float | None = None  # ground sample distance from the file (a georeferenced GeoTIFF), metres
    notes: list[str] = field(default_factory=list)  # conversions, in the order they were made

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        return int(self.rgb.shape[1]), int(self.rgb.shape[0])


def _stretch16(a: np.ndarray) -> np.ndarray:
    """A high-bit-depth band stack to uint8 by a 2-98 % percentile stretch."""
    a = a.astype(np.float64)
    finite = a[np.isfinite(a)]
    if finite.size == 0:
        return np.zeros(a.shape, np.uint8)
    lo, hi = np.percentile(finite, [2, 98])
    return np.clip((np.nan_to_num(a, nan=lo) - lo) / max(hi - lo, 1e-9) * 255, 0, 255).round().astype(np.uint8)


def _to_rgb(a: np.ndarray, notes: list[str], what: str) -> np.ndarray:
    """(H, W) or (H, W, C) array of any dtype to (H, W, 3) uint8."""
    if a.dtype != np.uint8:
        bits = f"{a.dtype.itemsize * 8}-bit {'float' if a.dtype.kind == 'f' else 'integer'}"
        notes.append(f"{bits} {what} stretched to 8 bits (2-98 % percentiles)")
        a = _stretch16(a)
    if a.ndim == 2 or a.shape[2] == 1:
        notes.append(f"grayscale {what} repeated into red, green and blue")
        return np.repeat(a.reshape(*a.shape[:2], 1), 3, axis=2)
    if a.shape[2] == 2:  # grey + alpha
        notes.append(f"grayscale {what} with alpha: alpha dropped, grey repeated into red, green and blue")
        return np.repeat(a[:, :, :1], 3, axis=2)
    if a.shape[2] > 3:
        notes.append(f"{a.shape[2]}-band {what}: the first three bands used as red, green and blue")
    return np.ascontiguousarray(a[:, :, :3])


def _read_pil(path: Path) -> tuple[np.ndarray, list[str]]:
    notes: list[str] = []
    with Image.open(path) as opened:
        opened.load()  # decode everything now: a truncated file fails here
        orientation = opened.getexif().get(0x0112, 1)
        img: Image.Image = opened
        if orientation not in (None, 1):
            img = ImageOps.exif_transpose(opened)
            notes.append(f"EXIF orientation {orientation} applied")
        mode = img.mode
        if mode in ("P", "PA"):
            notes.append("palette image converted to RGB")
            img = img.convert("RGBA" if "transparency" in img.info or mode == "PA" else "RGB")
        elif mode == "CMYK":
            notes.append("CMYK image converted to RGB")
            img = img.convert("RGB")
        elif mode == "1":
            notes.append("1-bit image converted to grayscale")
            img = img.convert("L")
        if img.mode in ("RGBA", "LA"):
            notes.append(f"{img.mode} image: alpha channel dropped")
            img = img.convert("RGB" if img.mode == "RGBA" else "L")
        arr = np.asarray(img)
    return _to_rgb(arr, notes, "image"), notes


def _read_geotiff(path: Path) -> tuple[np.ndarray, list[str], float | None]:
    notes: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path) as src:
            data = src.read()
            gsd = _geotiff_gsd(src)
    return _to_rgb(np.moveaxis(data, 0, -1), notes, "GeoTIFF"), notes, gsd


def _geotiff_gsd(src: rasterio.DatasetReader) -> float | None:
    """Ground metres per pixel of a georeferenced raster, at its centre (None without a CRS)."""
    if src.crs is None:
        return None
    shape_only = np.broadcast_to(np.zeros((1, 1, 3), np.uint8), (src.height, src.width, 3))  # no pixels held
    grid = MapData(shape_only, np.zeros((1, 1), np.float32), np.ones((1, 1), bool), src.transform, src.crs)
    return float(grid.metres_per_pixel)


def read_photo(path: str | Path) -> Photo:
    """Decode the photo at ``path`` to RGB uint8; a bad file is an :class:`InputError` naming it and the fix."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"photo {path} does not exist; check the path")
    if path.is_dir():
        raise InputError(f"photo {path} is a directory; give image files (e.g. {path}/*.jpg)")
    gsd: float | None = None
    try:
        if path.suffix.lower() in GEOTIFF_SUFFIXES:
            rgb, notes, gsd = _read_geotiff(path)
        else:
            rgb, notes = _read_pil(path)
    except UnidentifiedImageError:
        raise InputError(f"photo {path} is not an image maprl can read; give a JPEG, PNG or GeoTIFF") from None
    except (OSError, SyntaxError, ValueError, RasterioIOError, Image.DecompressionBombError) as err:
        raise InputError(
            f"photo {path} is corrupt or truncated ({type(err).__name__}: {str(err)[:160]}); re-export or download it"
        ) from None
    h, w = rgb.shape[:2]
    if min(h, w) < MIN_SIDE:
        raise InputError(f"photo {path} is {w}x{h} pixels; maprl needs at least {MIN_SIDE}x{MIN_SIDE}")
    return Photo(rgb, str(path), gsd, notes)


def resize(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    """``rgb`` resized to ``width`` x ``height`` with an antialiasing filter (Lanczos)."""
    if (width, height) == (rgb.shape[1], rgb.shape[0]):
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((width, height), Image.Resampling.LANCZOS))


def to_map_gsd(rgb: np.ndarray, photo_gsd: float, map_gsd: float) -> np.ndarray:
    """``rgb`` resampled from ``photo_gsd`` to ``map_gsd`` metres per pixel (both > 0)."""
    factor = photo_gsd / map_gsd
    h, w = rgb.shape[:2]
    return resize(rgb, max(1, round(w * factor)), max(1, round(h * factor)))


def square_view(rgb: np.ndarray, view: int) -> tuple[np.ndarray, str | None]:
    """The centred ``view`` x ``view`` square of a photo at map scale, and a note if it had to be magnified.

    A photo larger than a view is cut to its central view (its centre is what is located); a
    smaller one is cut to its central square and enlarged to the view, which is said.
    """
    h, w = rgb.shape[:2]
    side = min(h, w)
    if side >= view:
        top, left = (h - view) // 2, (w - view) // 2
        return np.ascontiguousarray(rgb[top : top + view, left : left + view]), None
    top, left = (h - side) // 2, (w - side) // 2
    note = (
        f"the photo covers {side} map pixels, less than one view ({view}); its central square was enlarged to a "
        "view, so its scale is off: give --gsd or a wider photo"
    )
    return resize(np.ascontiguousarray(rgb[top : top + side, left : left + side]), view, view), note
