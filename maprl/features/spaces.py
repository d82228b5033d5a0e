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

from maprl.views import crop_views, integral_image, unit, view_origin


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
        """Descriptors of the views with top-left corners (x0, y0): one gather of the (grid+1)^2
        cell corners per view from the summed-area table, then box sums by differences."""
        e, n = self._edges, len(x0)
        rows = y0[:, None, None] + e[None, :, None]  # (n, g+1, 1)
        cols = x0[:, None, None] + e[None, None, :]  # (n, 1, g+1)
        if sat.ndim == 4:  # one table per view
            h, w = sat.shape[1:3]
            flat = (np.arange(n)[:, None, None] * h + rows) * w + cols
        else:
            flat = rows * sat.shape[1] + cols
        table = sat.reshape(-1, sat.shape[-1])
        corners = np.take(table, flat.ravel(), axis=0).reshape(n, len(e), len(e), -1)  # (n, g+1, g+1, C)
        sums = corners[:, 1:, 1:] - corners[:, :-1, 1:] - corners[:, 1:, :-1] + corners[:, :-1, :-1]
        side = np.diff(e)
        desc = (sums / (side[:, None] * side[None, :])[None, :, :, None]).reshape(n, -1)
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
