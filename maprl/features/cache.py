"""The dense feature cache: a trained encoder (:mod:`maprl.features.nets`, optionally pretrained by
:mod:`maprl.features.ssl`) run once over the whole map, so an agent step is a lookup.

:class:`EncoderFeatures` is the dense cache. The encoder runs fully convolutionally over the
whole map, resized by ``input_size / view_size``, once per map offset needed to reach the
``cache_stride`` grid (the network stride is coarser); each grid view reads the features of
the cells under it through an integral image. A view's descriptor (:class:`Pooling`) drops
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
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from tqdm.auto import tqdm

from maprl.config import EncoderParams
from maprl.data.geo import MapData
from maprl.errors import InputError, ParamsError
from maprl.features.nets import (
    Encoder,
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


@torch.inference_mode()
def feature_map(encoder: Encoder, rgb_t: torch.Tensor, ox: int, oy: int, scale: float) -> np.ndarray:
    """Trunk features of the map shifted by (ox, oy) and resized by ``scale``: (h, w, D) float32."""
    x = rgb_t[:, :, oy:, ox:]
    if scale != 1.0:  # an explicit scale factor keeps map pixel u at resized pixel u * scale exactly
        x = F.interpolate(x, scale_factor=scale, mode="bilinear", antialias=True, recompute_scale_factor=False)
    return encoder.trunk(normalise(x))[0].permute(1, 2, 0).numpy()


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


def dense_grid(encoder: Encoder, rgb: np.ndarray, pooling: Pooling, stride: int, shifts: int = 0) -> np.ndarray:
    """Raw descriptors of every cache-grid view: (ny, nx, grid^2 * D) float32.

    One fully convolutional pass per (x, y) map offset; each node reads the pass whose cells
    align best with its view and pools the (fractional) cells the view covers.
    """
    v, cell = pooling.view_size, pooling.cell
    gx, gy = grid_axes(rgb.shape[1], rgb.shape[0], v, stride)
    x0, y0 = gx - v // 2, gy - v // 2
    offsets = pass_offsets(cell, stride, shifts)
    px, py = _nearest_pass(x0, offsets, cell), _nearest_pass(y0, offsets, cell)
    rgb_t = to_unit_tensor(rgb[None])
    out = np.zeros((len(gy), len(gx), encoder.dim * pooling.grid**2), np.float32)
    passes = [(i, j) for j in range(len(offsets)) for i in range(len(offsets))]
    for i, j in tqdm(passes, desc="feature cache", unit="pass", leave=False):
        cols, rows = np.flatnonzero(px == i), np.flatnonzero(py == j)
        if len(cols) == 0 or len(rows) == 0:
            continue
        sat = integral_image(feature_map(encoder, rgb_t, int(offsets[i]), int(offsets[j]), pooling.input_size / v))
        rr, cc = (a.ravel() for a in np.meshgrid(rows, cols, indexing="ij"))
        out[rr, cc] = pooling.pool(sat, (y0[rr] - offsets[j]) / cell, (x0[cc] - offsets[i]) / cell)
    return out


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
    """Bilinear interpolation of a (ny, nx, D) grid at fractional node coords, renormalised."""
    ny, nx = grid.shape[:2]
    fy, fx = np.clip(fy, 0, ny - 1), np.clip(fx, 0, nx - 1)
    y0, x0 = np.floor(fy).astype(np.int64), np.floor(fx).astype(np.int64)
    y1, x1 = np.minimum(y0 + 1, ny - 1), np.minimum(x0 + 1, nx - 1)
    wy, wx = (fy - y0)[:, None].astype(np.float32), (fx - x0)[:, None].astype(np.float32)
    top = grid[y0, x0].astype(np.float32) * (1 - wx) + grid[y0, x1].astype(np.float32) * wx
    bottom = grid[y1, x0].astype(np.float32) * (1 - wx) + grid[y1, x1].astype(np.float32) * wx
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
        whiten: bool = True, out_dim: int = 0,
    ) -> EncoderFeatures:  # fmt: skip
        """Run the encoder over the map, fit the projection on the valid nodes and cache the grid."""
        pooling.check()
        raw = dense_grid(encoder, m.rgb, pooling, stride, shifts)
        axes = grid_axes(m.width, m.height, pooling.view_size, stride)
        ok = valid_centres(m.valid, pooling.view_size)[np.ix_(axes[1], axes[0])]
        proj = fit_projection(raw[ok] if ok.any() else raw.reshape(-1, raw.shape[-1]), whiten, out_dim)
        grid = proj(raw.reshape(-1, raw.shape[-1])).reshape(*raw.shape[:2], -1).astype(np.float16)
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
        return _bilinear(self.grid, fy, fx)

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
