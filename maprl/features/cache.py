"""The dense feature cache: a trained encoder (:mod:`maprl.features.nets`, optionally pretrained by
:mod:`maprl.features.ssl`) run once over the whole map, so an agent step is a lookup.

:class:`EncoderFeatures` is the dense cache. The encoder runs fully convolutionally over the
whole map, resized by ``input_size / view_size``, once per map offset needed to reach the
``cache_stride`` grid (the network stride is coarser); each grid view reads the features of
the cells under it through an integral image. On a large map the pass runs on overlapping tiles
(:func:`feature_map`, ``TILE``; margins cover the receptive field, so the stitched cells equal
one pass's up to float rounding), the pooling goes strip by strip and the projection below is
fitted on at most ``FIT_NODES`` nodes, so memory stays bounded (a 2048 px map is one tile and
one strip, and its cache is the same as before tiling, byte for byte). A view's descriptor (:class:`Pooling`) drops
``border`` cells at each edge, whose receptive field crosses the view edge (there a lone photo
sees padding while the map sees its surroundings), and averages ``pool_grid x pool_grid``
boxes of the rest, so a photo and the same place on the map get the same descriptor. It is
then centred on the map's mean descriptor and PCA-whitened (:func:`fit_projection`, fitted
on the map's own grid views) and L2-normalised: all-positive ReLU features make unrelated
places look alike (cosine near 1) until centred and whitened. ``embed_at`` interpolates
bilinearly between grid nodes and renormalises: a step is a lookup.
"""

from __future__ import annotations

import io
import math
import pickle
import zipfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from tqdm.auto import tqdm

from maprl.config import EncoderParams
from maprl.data.geo import MapData
from maprl.errors import InputError, ParamsError
from maprl.features.nets import (
    Encoder,
    LocalNorm,
    build_encoder,
    configure_torch,
    normalise,
    recalibrate_batchnorm,
    to_unit_tensor,
    views_to_input,
)
from maprl.features.spaces import FeatureSpace, PooledFeatures
from maprl.features.ssl import pretrain_ssl
from maprl.io import atomic_path, write_bytes
from maprl.views import crop_views, integral_image, sample_centres, unit, valid_centres

CACHE_FILE = "cache.npz"
ENCODER_FILE = "encoder.pt"
_BATCH = 64
TILE = 4096  # map pixels: the trunk runs on tiles about this large (the default 2048 px map is one)
STRIP_NODES = 16384  # grid nodes pooled at a time (the default 2048 px map's 13225 are one strip)
FIT_NODES = 65536  # the projection is fitted on at most this many valid nodes (a fixed random subset)
LOOKUP_FLOAT32_BYTES = 2**29  # grids up to this size as float32 are also kept as float32 for embed_at (exact)
WHITEN_REG = 1e-3  # eigenvalue floor of the whitening, relative to the largest
DEFAULT_BORDER = {"mobilenet_v2": 0, "nature_cnn": 2, "impala_cnn": 2}  # cells; see Pooling


# -- dense cache geometry ------------------------------------------------------------------
def grid_axes(width: int, height: int, view_size: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Integer view centres of the cache grid along x and y (views wholly inside the map)."""
    half = view_size // 2  # the centre whose view starts at pixel 0
    xs = np.arange(0, width - view_size + 1, stride) + half
    ys = np.arange(0, height - view_size + 1, stride) + half
    return xs.astype(np.int64), ys.astype(np.int64)


def pass_offsets(cell: float, stride: int, shifts: int) -> np.ndarray:
    """Map offsets (pixels) of the shifted encoder passes along one axis."""
    n = shifts or max(1, math.ceil(cell / stride - 1e-6))
    return np.unique(np.round(np.arange(n) * cell / n).astype(np.int64))


def trunk_geometry(trunk: nn.Module, length: int) -> tuple[int, int]:
    """Receptive-field radius of ``trunk`` (input pixels, to either side of an output cell's start,
    :class:`LocalNorm`'s two blurs included) and its output length for an input ``length`` long."""
    radius, jump = 0, 1
    for mod in trunk.modules():
        if isinstance(mod, LocalNorm):
            radius += 2 * mod.radius * jump
        elif isinstance(mod, nn.Conv2d | nn.MaxPool2d):
            k, s, p, d = (
                int(np.atleast_1d(getattr(mod, a))[0]) for a in ("kernel_size", "stride", "padding", "dilation")
            )
            radius += max(p, d * (k - 1) - p) * jump
            length = (length + 2 * p - d * (k - 1) - 1) // s + 1
            jump *= s
    return radius, length


def _spans(length: int, cell: Fraction, tile: int, margin: int) -> list[tuple[int, int, int, int]]:
    """Tiles along one axis of ``length`` map pixels: (first, end) map pixel of each crop, and the
    (first, end) of its output cells to keep (end -1: to the crop's end). Crops start on cell
    boundaries (a multiple of ``cell.denominator`` cells, so on whole pixels) and reach ``margin``
    cells past the kept ones (clipped at the map's edges, which the untiled pass also sees)."""
    if length <= tile:
        return [(0, length, 0, -1)]
    step = max(1, int(tile / cell) // cell.denominator) * cell.denominator
    margin = -(-margin // cell.denominator) * cell.denominator
    out = []
    for a in range(0, math.ceil(length / cell), step):
        lo, last = max(0, a - margin), (a + step + margin) * cell >= length
        end = length if last else int((a + step + margin) * cell)
        out.append((int(lo * cell), end, a - lo, -1 if last else a - lo + step))
        if last:
            break
    return out


@torch.inference_mode()
def feature_map(
    encoder: Encoder, rgb: np.ndarray, ox: int, oy: int, scale: float, cell: Fraction, tile: int = TILE
) -> np.ndarray:
    """Trunk features of the map shifted by (ox, oy) and resized by ``scale``: (h, w, D) float32.

    Run on overlapping tiles of about ``tile`` map pixels (one tile if the map is no larger),
    each with a margin covering the receptive field and the resize kernel, so memory stays
    bounded; the kept cells equal the untiled pass's up to float rounding."""
    rgb = rgb[oy:, ox:]
    radius, _ = trunk_geometry(encoder.trunk, 0)
    margin = math.ceil((radius + 2 / scale + encoder.stride) / encoder.stride)  # cells
    rows, cols = (_spans(n, cell, tile, margin) for n in rgb.shape[:2])

    def run(y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
        x = to_unit_tensor(rgb[None, y0:y1, x0:x1])
        if scale != 1.0:  # an explicit scale factor keeps map pixel u at resized pixel u * scale exactly
            x = F.interpolate(x, scale_factor=scale, mode="bilinear", antialias=True, recompute_scale_factor=False)
        return encoder.trunk(normalise(x))[0].permute(1, 2, 0)

    if len(rows) == 1 and len(cols) == 1:
        return run(0, rgb.shape[0], 0, rgb.shape[1]).numpy()
    h, w = (trunk_geometry(encoder.trunk, math.floor(n * scale))[1] for n in rgb.shape[:2])
    out = np.empty((h, w, encoder.dim), np.float32)
    r = 0
    for y0, y1, ky0, ky1 in tqdm(rows, desc="feature tiles", unit="row", leave=False):
        c = 0
        for x0, x1, kx0, kx1 in cols:
            part = run(y0, y1, x0, x1)[ky0 : None if ky1 < 0 else ky1, kx0 : None if kx1 < 0 else kx1]
            out[r : r + part.shape[0], c : c + part.shape[1]] = part.numpy()
            c += part.shape[1]
        r += part.shape[0]
    if (r, c) != (h, w):
        raise RuntimeError(f"tiled feature map is {r}x{c} cells, expected {h}x{w}")
    return out


def _corner(sat: np.ndarray, r: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Integral at fractional cell coords (exact: the integral of a piecewise-constant map is bilinear)."""
    r0 = np.clip(np.floor(r).astype(np.int64), 0, sat.shape[0] - 2)
    c0 = np.clip(np.floor(c).astype(np.int64), 0, sat.shape[1] - 2)
    fr, fc = (r - r0)[:, None], (c - c0)[:, None]
    top = sat[r0, c0] * (1 - fc) + sat[r0, c0 + 1] * fc
    bottom = sat[r0 + 1, c0] * (1 - fc) + sat[r0 + 1, c0 + 1] * fc
    return top * (1 - fr) + bottom * fr


def box_mean(sat: np.ndarray, r0: np.ndarray, c0: np.ndarray, extent: float) -> np.ndarray:
    """Mean feature over boxes [r0, r0+extent) x [c0, c0+extent) in cell units, clipped to the map."""
    h, w = sat.shape[0] - 1, sat.shape[1] - 1
    r1, c1 = np.clip(r0 + extent, 0, h), np.clip(c0 + extent, 0, w)
    r0, c0 = np.clip(r0, 0, h), np.clip(c0, 0, w)
    total = _corner(sat, r1, c1) - _corner(sat, r0, c1) - _corner(sat, r1, c0) + _corner(sat, r0, c0)
    area = np.maximum((r1 - r0) * (c1 - c0), 1e-9)[:, None]
    return (total / area).astype(np.float32)


@dataclass(frozen=True)
class Pooling:
    """How a view's feature cells become one vector.

    Drop ``border`` cells at each edge (their receptive field crosses the view edge, so a lone
    photo and the same place inside the map disagree there), then average ``grid x grid``
    equal boxes of the rest (fractional cells weighted by area) and concatenate them.
    """

    view_size: int
    input_size: int
    net_stride: int
    border: int = 0
    grid: int = 1

    @property
    def cell(self) -> float:
        """Map pixels per feature cell."""
        return self.net_stride * self.view_size / self.input_size

    @property
    def box(self) -> float:
        """Side of one pooling box, in cells."""
        return (self.input_size / self.net_stride - 2 * self.border) / self.grid

    def check(self) -> None:
        if self.box <= 0:
            cells = self.input_size / self.net_stride
            raise ParamsError(
                f"encoder.border: {self.border} cells at each edge leave nothing of a {cells:g}-cell view; "
                "lower encoder.border or raise encoder.input_size"
            )

    def pool(self, sat: np.ndarray, r0: np.ndarray, c0: np.ndarray) -> np.ndarray:
        """Descriptors (N, grid^2 * D) of the views whose first cell is at (r0, c0)."""
        b, k, box = self.border, self.grid, self.box
        parts = [box_mean(sat, r0 + b + i * box, c0 + b + j * box, box) for i in range(k) for j in range(k)]
        return np.concatenate(parts, axis=1)


def _nearest_pass(origins: np.ndarray, offsets: np.ndarray, cell: float) -> np.ndarray:
    """Index of the pass whose cell boundaries lie closest to each view origin."""
    phase = np.mod(origins[:, None] - offsets[None, :], cell)
    return np.argmin(np.minimum(phase, cell - phase), axis=1)


class PassMaps:
    """The trunk run over the map once per pass offset, pooled into raw node descriptors on demand.

    Pooling goes strip by strip (about ``STRIP_NODES`` nodes, each strip's integral image only),
    so memory is the feature maps plus one strip; a map of up to ``STRIP_NODES`` nodes is one strip.
    """

    def __init__(
        self, encoder: Encoder, rgb: np.ndarray, pooling: Pooling, stride: int, shifts: int = 0, tile: int = TILE
    ) -> None:
        v, cell = pooling.view_size, pooling.cell
        self.pooling, self.cell = pooling, cell
        gx, gy = grid_axes(rgb.shape[1], rgb.shape[0], v, stride)
        self.x0, self.y0 = gx - v // 2, gy - v // 2
        self.offsets = pass_offsets(cell, stride, shifts)
        self.px, self.py = _nearest_pass(self.x0, self.offsets, cell), _nearest_pass(self.y0, self.offsets, cell)
        self.shape = (len(gy), len(gx))
        self.dim = encoder.dim * pooling.grid**2
        exact = Fraction(pooling.net_stride * v, pooling.input_size)
        passes = [(i, j) for j in np.unique(self.py) for i in np.unique(self.px)]
        self.maps = {
            (int(i), int(j)): feature_map(
                encoder, rgb, int(self.offsets[i]), int(self.offsets[j]), pooling.input_size / v, exact, tile
            )
            for i, j in tqdm(passes, desc="feature cache", unit="pass", leave=False)
        }
        rows = max(1, STRIP_NODES // self.shape[1])
        self.strips = [range(a, min(a + rows, self.shape[0])) for a in range(0, self.shape[0], rows)]

    def descriptors(self, nodes: np.ndarray) -> np.ndarray:
        """Raw descriptors (N, D) of the grid nodes with (sorted) flat indices ``nodes``."""
        nodes = np.asarray(nodes, np.int64)
        rr, cc = np.divmod(nodes, self.shape[1])
        out = np.zeros((len(nodes), self.dim), np.float32)
        v, cell = self.pooling.view_size, self.cell
        for strip in self.strips:
            s = np.flatnonzero((rr >= strip.start) & (rr < strip.stop))
            for (i, j), fmap in self.maps.items():
                k = s[(self.px[cc[s]] == i) & (self.py[rr[s]] == j)]
                if len(k) == 0:
                    continue
                ox, oy = self.offsets[i], self.offsets[j]
                lo = max(0, math.floor((self.y0[strip.start] - oy) / cell))
                hi = min(fmap.shape[0], math.ceil((self.y0[strip.stop - 1] - oy + v) / cell) + 2)
                sat = integral_image(fmap[lo:hi])
                out[k] = self.pooling.pool(sat, (self.y0[rr[k]] - oy) / cell - lo, (self.x0[cc[k]] - ox) / cell)
        return out

    def strip_nodes(self) -> list[np.ndarray]:
        """Flat node indices of each strip."""
        return [np.arange(s.start * self.shape[1], s.stop * self.shape[1]) for s in self.strips]


def dense_grid(
    encoder: Encoder, rgb: np.ndarray, pooling: Pooling, stride: int, shifts: int = 0, tile: int = TILE
) -> np.ndarray:
    """Raw descriptors of every cache-grid view: (ny, nx, grid^2 * D) float32.

    One fully convolutional pass per (x, y) map offset (tiled, see :func:`feature_map`); each node
    reads the pass whose cells align best with its view and pools the (fractional) cells the view covers.
    """
    maps = PassMaps(encoder, rgb, pooling, stride, shifts, tile)
    return maps.descriptors(np.arange(maps.shape[0] * maps.shape[1])).reshape(*maps.shape, maps.dim)


@torch.inference_mode()
def view_descriptors(encoder: Encoder, views: np.ndarray, pooling: Pooling, batch: int = _BATCH) -> np.ndarray:
    """Raw descriptors of (N, V, V, 3) uint8 photos, pooled exactly as the cache pools the map."""
    encoder.eval()
    zero = np.zeros(1)
    out = []
    for i in range(0, len(views), batch):
        fmaps = encoder.trunk(views_to_input(views[i : i + batch], pooling.input_size)).permute(0, 2, 3, 1).numpy()
        out += [pooling.pool(integral_image(f), zero, zero) for f in fmaps]
    return np.concatenate(out) if out else np.zeros((0, encoder.dim * pooling.grid**2), np.float32)


# -- whitening -----------------------------------------------------------------------------
@dataclass
class Projection:
    """Centre on the map's mean descriptor, optionally PCA-whiten and cut, then L2-normalise."""

    mean: np.ndarray  # (D_in,)
    matrix: np.ndarray | None = None  # (D_in, D_out), None: centring only

    @property
    def dim(self) -> int:
        return int(len(self.mean) if self.matrix is None else self.matrix.shape[1])

    def __call__(self, raw: np.ndarray) -> np.ndarray:
        x = raw - self.mean
        return unit(x if self.matrix is None else x @ self.matrix)


def fit_projection(raw: np.ndarray, whiten: bool, out_dim: int = 0, reg: float = WHITEN_REG) -> Projection:
    """Fit on (N, D) raw descriptors of map views: mean, and whitening of the top ``out_dim`` axes.

    Each principal axis is divided by sqrt(eigenvalue + reg * largest eigenvalue), so weak,
    noisy directions are not blown up.
    """
    mean = raw.mean(axis=0).astype(np.float32)
    if not whiten:
        return Projection(mean)
    x = (raw - mean).astype(np.float64)
    ev, vec = np.linalg.eigh(x.T @ x / max(1, len(x) - 1))
    ev, vec = ev[::-1], vec[:, ::-1]
    keep = out_dim or len(ev)
    matrix = vec[:, :keep] / np.sqrt(np.maximum(ev[:keep], 0) + reg * max(ev[0], 1e-12))
    return Projection(mean, matrix.astype(np.float32))


# -- feature spaces with a grid ------------------------------------------------------------
class MapSpace(FeatureSpace, Protocol):
    """A feature space with a dense grid of cached embeddings over the map (the map memory)."""

    def grid_positions(self) -> np.ndarray: ...

    def grid_embeddings(self) -> np.ndarray: ...

    def save(self, out_dir: str | Path) -> None: ...


def _bilinear(grid: np.ndarray, fy: np.ndarray, fx: np.ndarray) -> np.ndarray:
    """Bilinear interpolation of a (ny, nx, D) grid (float16 or float32) at fractional node coords, renormalised."""
    ny, nx = grid.shape[:2]
    fy, fx = np.clip(fy, 0, ny - 1), np.clip(fx, 0, nx - 1)
    y0, x0 = np.floor(fy).astype(np.int64), np.floor(fx).astype(np.int64)
    y1, x1 = np.minimum(y0 + 1, ny - 1), np.minimum(x0 + 1, nx - 1)
    wy, wx = (fy - y0)[:, None].astype(np.float32), (fx - x0)[:, None].astype(np.float32)

    def node(r: np.ndarray, c: np.ndarray) -> np.ndarray:
        return grid[r, c].astype(np.float32, copy=False)

    top = node(y0, x0) * (1 - wx) + node(y0, x1) * wx
    bottom = node(y1, x0) * (1 - wx) + node(y1, x1) * wx
    return unit(top * (1 - wy) + bottom * wy)


def _node_positions(xs: np.ndarray, ys: np.ndarray, node_ok: np.ndarray) -> np.ndarray:
    r, c = np.nonzero(node_ok)
    return np.stack([xs[c], ys[r]], 1).astype(float)


class EncoderFeatures:
    """CNN embeddings: computed for a photo (``embed_view``), a grid lookup on the map (``embed_at``)."""

    def __init__(
        self,
        encoder: Encoder,
        grid: np.ndarray,
        node_ok: np.ndarray,
        projection: Projection,
        axes: tuple[np.ndarray, np.ndarray],
        pooling: Pooling,
        name: str = "",
    ) -> None:
        self.encoder = encoder.eval()
        self.grid = grid  # (ny, nx, D) float16 unit vectors
        # embed_at reads a float32 copy where it is small: the same values (float16 -> 32 is exact), half the time
        self._lookup = grid.astype(np.float32) if grid.size * 4 <= LOOKUP_FLOAT32_BYTES else grid
        self.node_ok = node_ok  # (ny, nx) bool: the node's view lies on valid imagery
        self.projection, self.pooling = projection, pooling
        self.xs, self.ys = axes
        self.view_size, self.input_size = pooling.view_size, pooling.input_size
        self.dim = int(grid.shape[-1])
        self.stride = int(self.xs[1] - self.xs[0]) if len(self.xs) > 1 else pooling.view_size
        self.name = name or encoder.kind

    @classmethod
    def build(
        cls, encoder: Encoder, m: MapData, pooling: Pooling, stride: int, shifts: int = 0, *,
        whiten: bool = True, out_dim: int = 0, tile: int = TILE,
    ) -> EncoderFeatures:  # fmt: skip
        """Run the encoder over the map, fit the projection on the valid nodes and cache the grid."""
        pooling.check()
        maps = PassMaps(encoder, m.rgb, pooling, stride, shifts, tile)
        axes = grid_axes(m.width, m.height, pooling.view_size, stride)
        ok = valid_centres(m.valid, pooling.view_size)[np.ix_(axes[1], axes[0])]
        fit = np.flatnonzero(ok) if ok.any() else np.arange(ok.size)
        if len(fit) > FIT_NODES:  # a fixed random subset: the fit's cost stays bounded on large maps
            fit = np.sort(np.random.default_rng(0).choice(fit, FIT_NODES, replace=False))
        proj = fit_projection(maps.descriptors(fit), whiten, out_dim)
        grid = np.empty((*ok.shape, proj.dim), np.float16)
        flat = grid.reshape(-1, proj.dim)
        for nodes in maps.strip_nodes():
            flat[nodes] = proj(maps.descriptors(nodes)).astype(np.float16)
        return cls(encoder, grid, ok, proj, axes, pooling)

    @classmethod
    def load(cls, out_dir: str | Path, m: MapData | None = None) -> EncoderFeatures:
        """Reload ``cache.npz`` and ``encoder.pt`` from ``out_dir`` (``m``, if given, is checked to fit)."""
        space = load_space(out_dir, m)
        if not isinstance(space, cls):
            raise InputError(f"{out_dir} holds a {space.name} cache, not an encoder's")
        return space

    def embed_view(self, views: np.ndarray) -> np.ndarray:
        single = views.ndim == 3
        batch = views[None] if single else views
        out = self.projection(view_descriptors(self.encoder, batch, self.pooling))
        return out[0] if single else out

    def embed_at(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        fx = (np.atleast_1d(np.asarray(xs, float)) - self.xs[0]) / self.stride
        fy = (np.atleast_1d(np.asarray(ys, float)) - self.ys[0]) / self.stride
        return _bilinear(self._lookup, fy, fx)

    def grid_positions(self) -> np.ndarray:
        """(G, 2) float (x, y) centres of the valid grid nodes."""
        return _node_positions(self.xs, self.ys, self.node_ok)

    def grid_embeddings(self) -> np.ndarray:
        """(G, D) float32 embeddings of the valid grid nodes, in :meth:`grid_positions` order."""
        return self.grid[self.node_ok].astype(np.float32)

    def save(self, out_dir: str | Path) -> None:
        """Write ``cache.npz`` and ``encoder.pt`` (state dict and kind), each atomically."""
        out, pl, proj = Path(out_dir), self.pooling, self.projection
        matrix = np.zeros((0, 0), np.float32) if proj.matrix is None else proj.matrix
        arrays: dict[str, Any] = {"grid": self.grid, "node_ok": self.node_ok, "mean": proj.mean, "matrix": matrix}
        arrays |= {"xs": self.xs, "ys": self.ys, "kind": np.array(self.encoder.kind), "name": np.array(self.name)}
        arrays["local_norm"] = np.array(self.encoder.local_norm)
        arrays |= {
            f"pooling_{k}": np.array(getattr(pl, k))
            for k in ("view_size", "input_size", "net_stride", "border", "grid")
        }
        with atomic_path(out / CACHE_FILE) as tmp, tmp.open("wb") as f:
            np.savez(f, **arrays)
        save_encoder(out / ENCODER_FILE, self.encoder.kind, self.encoder.state_dict())


def save_encoder(path: Path, kind: str, state_dict: dict[str, Any]) -> None:
    """``encoder.pt``, byte-reproducible: saved through memory, so no temporary file name ends up
    inside the archive (``torch.save`` to a path names the archive's folder after the file)."""
    buf = io.BytesIO()
    torch.save({"kind": kind, "state_dict": state_dict}, buf)
    write_bytes(path, buf.getvalue())


class PooledGrid:
    """:class:`~maprl.features.PooledFeatures` plus the grid interface of :class:`EncoderFeatures`."""

    name = "pooled"

    def __init__(self, m: MapData, view_size: int, stride: int) -> None:
        self.inner = PooledFeatures(m.rgb, view_size)
        self.view_size, self.dim, self.stride = view_size, self.inner.dim, stride
        self.xs, self.ys = grid_axes(m.width, m.height, view_size, stride)
        self.node_ok = valid_centres(m.valid, view_size)[np.ix_(self.ys, self.xs)]

    def embed_view(self, views: np.ndarray) -> np.ndarray:
        return self.inner.embed_view(views)

    def embed_at(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        return self.inner.embed_at(xs, ys)

    def grid_positions(self) -> np.ndarray:
        return _node_positions(self.xs, self.ys, self.node_ok)

    def grid_embeddings(self) -> np.ndarray:
        pos = self.grid_positions()
        return self.inner.embed_at(pos[:, 0], pos[:, 1])

    def save(self, out_dir: str | Path) -> None:
        """Write ``cache.npz`` with the grid (the map itself rebuilds the pooled space on load)."""
        with atomic_path(Path(out_dir) / CACHE_FILE) as tmp, tmp.open("wb") as f:
            np.savez(f, kind=np.array("pooled"), view_size=self.view_size, stride=self.stride,
                     positions=self.grid_positions(), embeddings=self.grid_embeddings())  # fmt: skip


# -- building and loading ------------------------------------------------------------------
def map_views(m: MapData, view_size: int, n: int, seed: int) -> np.ndarray:
    """``n`` random valid views of the map (for BatchNorm statistics)."""
    xs, ys = sample_centres(valid_centres(m.valid, view_size), n, np.random.default_rng([seed, 7]))
    return crop_views(m.rgb, xs, ys, view_size)


def train_encoder(
    p: EncoderParams,
    m: MapData,
    view_size: int,
    seed: int,
    domains: list[tuple[np.ndarray, np.ndarray]] | None = None,
    forbidden: np.ndarray | None = None,
) -> tuple[Encoder, list[float]]:
    """Build the encoder of ``p`` and, for ``ssl`` weights, pretrain it; returns it and the loss curve.

    ``domains`` and ``forbidden`` (the test area) feed SSL's cross-domain pairs (:func:`pretrain_ssl`).
    """
    configure_torch(p.torch_threads)
    encoder = build_encoder(p.kind, p.weights, seed, p.weights_path, p.local_norm * p.input_size)
    losses = pretrain_ssl(encoder, m.rgb, m.valid, view_size, p, seed, domains, forbidden) if p.weights == "ssl" else []
    if p.weights != "imagenet":
        recalibrate_batchnorm(encoder, map_views(m, view_size, 256, seed), p.input_size)
    return encoder, losses


def pooling_for(p: EncoderParams, encoder: Encoder, view_size: int) -> Pooling:
    """The descriptor geometry of ``p`` for ``encoder`` (border defaults per kind)."""
    border = DEFAULT_BORDER[encoder.kind] if p.border is None else p.border
    pooling = Pooling(view_size, p.input_size, encoder.stride, border, p.pool_grid)
    pooling.check()
    return pooling


def build_space(p: EncoderParams, encoder: Encoder, m: MapData, view_size: int) -> EncoderFeatures:
    """Cache a trained ``encoder`` over map ``m`` as ``p`` says."""
    configure_torch(p.torch_threads)
    pooling = pooling_for(p, encoder, view_size)
    return EncoderFeatures.build(
        encoder, m, pooling, p.cache_stride, p.cache_shifts, whiten=p.whiten, out_dim=p.out_dim
    )


def make_space(p: EncoderParams, m: MapData, view_size: int, seed: int = 0) -> MapSpace:
    """The feature space of ``p`` on map ``m``: trains (ssl) and caches an encoder, or wraps ``pooled``."""
    if p.kind == "pooled":
        return PooledGrid(m, view_size, p.cache_stride)
    encoder, _ = train_encoder(p, m, view_size, seed)
    return build_space(p, encoder, m, view_size)


def load_space(out_dir: str | Path, m: MapData | None = None) -> MapSpace:
    """Reload a space saved by ``save``; ``m`` (the same map) is needed for ``pooled`` only."""
    path = Path(out_dir) / CACHE_FILE
    if not path.exists():
        raise InputError(f"feature cache {path} does not exist; run `dvc repro encode` first")
    damaged = (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile, pickle.UnpicklingError, RuntimeError)
    try:
        with np.load(path) as npz:
            data = dict(npz)
        kind = str(data["kind"])
    except damaged as err:
        raise _damaged(out_dir, err) from None
    if kind == "pooled":
        if m is None:
            raise ValueError("loading a pooled feature cache needs the map")
        return PooledGrid(m, int(data["view_size"]), int(data["stride"]))
    try:
        space = _load_encoder_space(Path(out_dir), data)
    except damaged as err:
        raise _damaged(out_dir, err) from None
    view = space.view_size
    if m is not None and (space.xs[-1] + view - view // 2 > m.width or space.ys[-1] + view - view // 2 > m.height):
        raise InputError(f"feature cache in {out_dir} was made for a larger map; rerun the encode stage")
    return space


def _damaged(out_dir: str | Path, err: Exception) -> InputError:
    return InputError(
        f"feature cache in {out_dir} is damaged or incomplete ({type(err).__name__}: {err}); "
        "rerun `dvc repro encode` (or `dvc checkout data/features`)"
    )


def _load_encoder_space(out_dir: Path, data: dict[str, Any]) -> EncoderFeatures:
    ckpt = out_dir / ENCODER_FILE
    if not ckpt.exists():
        raise InputError(f"encoder weights {ckpt} do not exist; run `dvc repro encode` first")
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
    except (OSError, EOFError, RuntimeError, pickle.UnpicklingError) as err:
        raise InputError(
            f"encoder weights {ckpt} are damaged ({type(err).__name__}: {str(err)[:120]}); "
            "rerun `dvc repro encode` (or `dvc checkout data/features`)"
        ) from None
    encoder = build_encoder(str(data["kind"]), "random", local_norm=float(data.get("local_norm", 0.0)))
    encoder.load_state_dict(state["state_dict"])
    geometry = {k: int(data[f"pooling_{k}"]) for k in ("view_size", "input_size", "net_stride", "border", "grid")}
    matrix = data["matrix"] if data["matrix"].size else None
    projection = Projection(data["mean"], matrix)
    axes = (data["xs"], data["ys"])
    return EncoderFeatures(
        encoder, data["grid"], data["node_ok"], projection, axes, Pooling(**geometry), str(data["name"])
    )
