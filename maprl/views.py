"""View geometry shared by every layer: where a view lies, cutting it, and which centres are usable.

A *view* is the square of side ``view_size`` pixels centred at a (fractional) pixel position
(x = column, y = row). These helpers are pure numpy and know nothing of features or agents.
"""

from __future__ import annotations

import numpy as np

from maprl.errors import InputError


def view_origin(x: np.ndarray | float, y: np.ndarray | float, view_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Integer top-left corner of the view centred at (x, y)."""
    half = view_size / 2.0
    return (
        np.floor(np.asarray(x, float) - half + 0.5).astype(np.int64),
        np.floor(np.asarray(y, float) - half + 0.5).astype(np.int64),
    )


def crop_views(rgb: np.ndarray, xs: np.ndarray, ys: np.ndarray, view_size: int) -> np.ndarray:
    """Cut (N, V, V, 3) views centred at (xs, ys); centres must keep the window inside the map."""
    x0, y0 = view_origin(np.atleast_1d(xs), np.atleast_1d(ys), view_size)
    return np.stack([rgb[b : b + view_size, a : a + view_size] for a, b in zip(x0, y0, strict=True)])


def unit(v: np.ndarray) -> np.ndarray:
    """L2-normalise along the last axis (float32; zero vectors stay zero)."""
    norm = np.linalg.norm(v, axis=-1, keepdims=True)
    return (v / np.maximum(norm, 1e-8)).astype(np.float32)


def integral_image(img: np.ndarray) -> np.ndarray:
    """Summed-area table with a zero first row and column: (H+1, W+1, ...) float64."""
    out = np.zeros((img.shape[0] + 1, img.shape[1] + 1, *img.shape[2:]), np.float64)
    np.cumsum(np.cumsum(img, axis=0, dtype=np.float64), axis=1, out=out[1:, 1:])
    return out


def window_sums(sat: np.ndarray, side: int) -> np.ndarray:
    """Sums over every ``side`` x ``side`` window of the image behind ``sat``, indexed by top-left corner."""
    s = side
    return sat[s:, s:] - sat[:-s, s:] - sat[s:, :-s] + sat[:-s, :-s]


def valid_centres(valid: np.ndarray, view_size: int, max_nodata: float = 0.0) -> np.ndarray:
    """(H, W) bool: True where a view centred on that pixel lies on the map with at most
    ``max_nodata`` of its pixels (a fraction) without imagery."""
    h, w = valid.shape
    v = view_size
    out = np.zeros((h, w), bool)
    if v > h or v > w:
        return out
    half = v // 2  # an integer centre x has its window starting at x - v // 2
    if valid.all():  # no nodata (a synthetic map): every window fits, and a large map needs no counts
        out[half : half + h - v + 1, half : half + w - v + 1] = True
        return out
    counts = np.zeros((h + 1, w + 1), np.int32 if h * w < 2**31 else np.int64)  # exact, half float64's memory
    np.cumsum(~valid, axis=0, dtype=counts.dtype, out=counts[1:, 1:])
    np.cumsum(counts[1:, 1:], axis=1, out=counts[1:, 1:])
    bad = window_sums(counts, v)  # per top-left corner
    out[half : half + bad.shape[0], half : half + bad.shape[1]] = bad <= max_nodata * v * v + 0.5
    return out


def far_pairs(centres: np.ndarray, min_dist: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """Up to ``n`` random (i, j) index pairs into ``centres`` (M, 2) lying more than ``min_dist`` apart."""
    i = rng.integers(0, len(centres), size=(n * 4, 2))
    far = np.linalg.norm(centres[i[:, 0]] - centres[i[:, 1]], axis=1) > min_dist
    return i[far][:n]


def pixel_cosine(rgb: np.ndarray, a: np.ndarray, b: np.ndarray, view_size: int, batch: int = 64) -> np.ndarray:
    """Cosine of the raw uint8 pixels of the views centred at ``a`` and at ``b`` (both (N, 2))."""
    out = np.zeros(len(a))
    for s in range(0, len(a), batch):
        sl = slice(s, s + batch)
        va = crop_views(rgb, a[sl, 0], a[sl, 1], view_size).reshape(len(a[sl]), -1).astype(np.float32)
        vb = crop_views(rgb, b[sl, 0], b[sl, 1], view_size).reshape(len(va), -1).astype(np.float32)
        dot = np.einsum("ij,ij->i", va, vb, dtype=np.float64)
        norm = np.sqrt(
            np.einsum("ij,ij->i", va, va, dtype=np.float64) * np.einsum("ij,ij->i", vb, vb, dtype=np.float64)
        )
        out[sl] = np.clip(dot / np.maximum(norm, 1e-12), -1.0, 1.0)
    return out


def sample_centres(ok: np.ndarray, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` integer (x, y) centres drawn uniformly from a valid-centre mask."""
    counts = np.count_nonzero(ok, axis=1)  # per row: no index array of every valid pixel (GBs on a large map)
    ends = np.cumsum(counts)
    if len(ends) == 0 or ends[-1] == 0:
        raise InputError("the map has no valid area for a whole view; check nodata or tile.view_size")
    rank = rng.integers(0, int(ends[-1]), n)  # the rank-th valid centre in row-major order
    ys = np.searchsorted(ends, rank, side="right")
    xs = np.array([np.flatnonzero(ok[y])[k] for y, k in zip(ys, rank - ends[ys] + counts[ys], strict=True)], np.int64)
    return xs.astype(float), ys.astype(float)
