"""Feature spaces in which the agent compares its current view with the target.

A feature space turns a view into a unit vector, either from pixels (``embed_view``, used
for a target photo) or from a precomputed cache over the map (``embed_at``, used at every
step, so a step is a lookup and never a CNN forward pass). Similarity is the dot product.

Spaces here:

* ``pooled``: the view average-pooled to an 8x8x3 grid, mean-centred and L2-normalised.
  Cached through one integral image of the map, so cached and direct embeddings agree
  exactly.
* ``pixels``: raw-pixel cosine over the whole view, as in the original project. Kept for
  comparison; it is high even between unrelated views because all pixels are positive.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class FeatureSpace(Protocol):
    """What the environment needs from a feature space."""

    name: str
    dim: int
    view_size: int

    def embed_view(self, views: np.ndarray) -> np.ndarray:
        """(N, V, V, 3) or (V, V, 3) uint8 views to (N, D) or (D,) float32 unit vectors."""
        ...

    def embed_at(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """Embeddings of the views centred at pixel positions (xs, ys): (N, D) float32."""
        ...


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
    norm = np.linalg.norm(v, axis=-1, keepdims=True)
    return (v / np.maximum(norm, 1e-8)).astype(np.float32)


def integral_image(img: np.ndarray) -> np.ndarray:
    """Summed-area table with a zero first row and column: (H+1, W+1, C) float64."""
    out = np.zeros((img.shape[0] + 1, img.shape[1] + 1, *img.shape[2:]), np.float64)
    np.cumsum(np.cumsum(img, axis=0, dtype=np.float64), axis=1, out=out[1:, 1:])
    return out


class PooledFeatures:
    """Average-pooled ``grid x grid x 3`` descriptor, mean-centred and normalised."""

    name = "pooled"

    def __init__(self, rgb: np.ndarray, view_size: int, grid: int = 8) -> None:
        self.view_size = view_size
        self.grid = grid
        self.dim = grid * grid * 3
        self._edges = np.round(np.linspace(0, view_size, grid + 1)).astype(np.int64)
        self._sat = integral_image(rgb.astype(np.float32))

    def _describe(self, sat: np.ndarray, x0: np.ndarray, y0: np.ndarray) -> np.ndarray:
        e = self._edges
        r0, r1 = y0[:, None] + e[None, :-1], y0[:, None] + e[None, 1:]
        c0, c1 = x0[:, None] + e[None, :-1], x0[:, None] + e[None, 1:]
        R0, R1 = r0[:, :, None], r1[:, :, None]
        C0, C1 = c0[:, None, :], c1[:, None, :]
        if sat.ndim == 4:  # one table per view
            n = np.arange(len(x0))[:, None, None]
            sums = sat[n, R1, C1] - sat[n, R0, C1] - sat[n, R1, C0] + sat[n, R0, C0]
        else:
            sums = sat[R1, C1] - sat[R0, C1] - sat[R1, C0] + sat[R0, C0]
        area = ((r1 - r0)[:, :, None] * (c1 - c0)[:, None, :])[..., None]
        desc = (sums / area).reshape(len(x0), -1)
        return unit(desc - desc.mean(axis=1, keepdims=True))

    def embed_at(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        x0, y0 = view_origin(np.atleast_1d(xs), np.atleast_1d(ys), self.view_size)
        return self._describe(self._sat, x0, y0)

    def embed_view(self, views: np.ndarray) -> np.ndarray:
        single = views.ndim == 3
        batch = views[None] if single else views
        sat = np.stack([integral_image(v.astype(np.float32)) for v in batch])
        zeros = np.zeros(len(batch), np.int64)
        out = self._describe(sat, zeros, zeros)
        return out[0] if single else out


class PixelFeatures:
    """Raw-pixel cosine over the whole view (the original project's similarity)."""

    name = "pixels"

    def __init__(self, rgb: np.ndarray, view_size: int) -> None:
        self.view_size = view_size
        self.dim = view_size * view_size * 3
        self._rgb = rgb

    def embed_view(self, views: np.ndarray) -> np.ndarray:
        single = views.ndim == 3
        batch = views[None] if single else views
        out = unit(batch.reshape(len(batch), -1).astype(np.float32))
        return out[0] if single else out

    def embed_at(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        return self.embed_view(crop_views(self._rgb, xs, ys, self.view_size))


def make_feature_space(name: str, rgb: np.ndarray, view_size: int) -> FeatureSpace:
    """Build a feature space by name (``pooled`` or ``pixels``)."""
    if name == "pooled":
        return PooledFeatures(rgb, view_size)
    if name == "pixels":
        return PixelFeatures(rgb, view_size)
    raise ValueError(f"unknown feature space {name!r}; choose pooled or pixels")


def valid_centres(valid: np.ndarray, view_size: int) -> np.ndarray:
    """(H, W) bool: True where a view centred on that pixel lies wholly on valid imagery."""
    h, w = valid.shape
    v = view_size
    out = np.zeros((h, w), bool)
    if v > h or v > w:
        return out
    sat = integral_image((~valid).astype(np.float32)[..., None])[..., 0]
    bad = sat[v:, v:] - sat[:-v, v:] - sat[v:, :-v] + sat[:-v, :-v]  # per top-left corner
    half = v // 2  # an integer centre x has its window starting at x - v // 2
    out[half : half + bad.shape[0], half : half + bad.shape[1]] = bad < 0.5
    return out


def lookalike_rate(
    space: FeatureSpace, centres: np.ndarray, rng: np.random.Generator, n_pairs: int = 2000, threshold: float = 0.9
) -> dict[str, float]:
    """How often two places more than one view apart look alike in ``space``.

    ``centres`` is an (M, 2) array of valid (x, y) centres. Returns the share of far pairs
    whose similarity is at least ``threshold`` and the 99th percentile of far-pair similarity.
    """
    i = rng.integers(0, len(centres), size=(n_pairs * 4, 2))
    d = np.linalg.norm(centres[i[:, 0]] - centres[i[:, 1]], axis=1)
    i = i[d > space.view_size][:n_pairs]
    a = space.embed_at(centres[i[:, 0], 0], centres[i[:, 0], 1])
    b = space.embed_at(centres[i[:, 1], 0], centres[i[:, 1], 1])
    sims = np.sum(a * b, axis=1)
    return {
        "n_pairs": len(sims),
        "threshold": threshold,
        "lookalike_rate": float(np.mean(sims >= threshold)),
        "far_pair_similarity_p99": float(np.percentile(sims, 99)),
        "far_pair_similarity_mean": float(np.mean(sims)),
    }
