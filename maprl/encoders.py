"""Learned feature spaces: CNN encoders, self-supervised pretraining and a dense feature cache.

An encoder maps a (B, 3, S, S) batch, ImageNet-normalised from uint8, to (B, D) features: a
fully convolutional trunk followed by global average pooling.

* ``mobilenet_v2``: torchvision's MobileNetV2 ``.features`` (classifier removed), D = 1280,
  network stride 32. Weights ``imagenet`` (torchvision weights API, or ``weights_path``),
  ``random`` or ``ssl``.
* ``nature_cnn``: the conv stack of SB3's NatureCNN (8x8/4, 4x4/2, 3x3/1), padded so the
  stride is exactly 8, then a 1x1 conv to D = 256.
* ``impala_cnn``: IMPALA's residual CNN (3 stages of conv, max-pool /2 and two residual
  blocks; 16, 32, 32 channels), stride 8, then a 1x1 conv to D = 256.

``ssl`` weights: random init, then SimCLR-style contrastive pretraining (InfoNCE) on views
of the map itself. The two views of a pair show the same place under photometric jitter
(brightness, contrast, per-channel gain) and small geometric jitter (shift, rotation, scale);
the other places in the batch are the negatives. It uses the whole valid map, train and test
areas alike: it sees pixels only, never a target position or split, like any map
preprocessing. BatchNorm statistics of a ``random``/``ssl`` MobileNetV2 are re-estimated on
map views (AdaBN), as its default running statistics do not match any real input.

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

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from tqdm.auto import tqdm

from maprl.config import EncoderParams
from maprl.errors import InputError, ParamsError
from maprl.features import FeatureSpace, PooledFeatures, crop_views, unit, valid_centres
from maprl.geo import MapData, atomic_path

KINDS = ("mobilenet_v2", "nature_cnn", "impala_cnn")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CACHE_FILE = "cache.npz"
ENCODER_FILE = "encoder.pt"
_BATCH = 64
WHITEN_REG = 1e-3  # eigenvalue floor of the whitening, relative to the largest
DEFAULT_BORDER = {"mobilenet_v2": 0, "nature_cnn": 2, "impala_cnn": 2}  # cells; see Pooling


# -- networks ------------------------------------------------------------------------------
class Encoder(nn.Module):
    """A fully convolutional ``trunk`` then global average pooling: (B, 3, S, S) -> (B, D)."""

    def __init__(self, trunk: nn.Module, kind: str, dim: int, stride: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.kind, self.dim, self.stride = kind, dim, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x).mean(dim=(2, 3))


def nature_cnn_trunk(dim: int = 256) -> nn.Sequential:
    """SB3 NatureCNN's convolutions, padded to an exact stride of 8, and a 1x1 conv to ``dim``."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 8, stride=4, padding=2),
        nn.ReLU(),
        nn.Conv2d(32, 64, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(64, 64, 3, stride=1, padding=1),
        nn.ReLU(),
        nn.Conv2d(64, dim, 1),
        nn.ReLU(),
    )


class ResidualBlock(nn.Module):
    """IMPALA residual block: x + conv(relu(conv(relu(x))))."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv1(F.relu(self.conv0(F.relu(x))))


def impala_cnn_trunk(channels: tuple[int, ...] = (16, 32, 32), dim: int = 256) -> nn.Sequential:
    """IMPALA CNN stages (conv, max-pool /2, two residual blocks), then ReLU and a 1x1 conv to ``dim``."""
    layers: list[nn.Module] = []
    c_in = 3
    for c in channels:
        layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.MaxPool2d(3, stride=2, padding=1)]
        layers += [ResidualBlock(c), ResidualBlock(c)]
        c_in = c
    return nn.Sequential(*layers, nn.ReLU(), nn.Conv2d(c_in, dim, 1), nn.ReLU())


def _imagenet_state_dict(weights_path: str | None) -> dict[str, Any]:
    """MobileNetV2 ImageNet weights from ``weights_path`` or the torch hub cache (never a silent download)."""
    from torchvision.models import MobileNet_V2_Weights

    w = MobileNet_V2_Weights.IMAGENET1K_V1
    if weights_path:
        if not Path(weights_path).exists():
            raise InputError(f"encoder.weights_path {weights_path} does not exist")
        return dict(torch.load(weights_path, map_location="cpu", weights_only=True))
    try:
        return dict(w.get_state_dict(progress=False, check_hash=True))
    except (OSError, RuntimeError) as err:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(w.url).name
        raise InputError(
            f"cannot load ImageNet weights for mobilenet_v2 ({type(err).__name__}: {err}). Offline, download "
            f"{w.url} elsewhere and put it at {cached} (that is $TORCH_HOME/hub/checkpoints/; TORCH_HOME="
            f"{os.environ.get('TORCH_HOME', 'unset, default ~/.cache/torch')}), or set encoder.weights_path to "
            "the .pth file, or use encoder.weights: ssl or random, which need no download"
        ) from None


def mobilenet_v2_trunk(weights: str, weights_path: str | None = None) -> nn.Module:
    """MobileNetV2 ``.features``: randomly initialised, or with ImageNet weights."""
    from torchvision.models import mobilenet_v2

    model = mobilenet_v2()
    if weights == "imagenet":
        try:
            model.load_state_dict(_imagenet_state_dict(weights_path))
        except RuntimeError as err:
            raise InputError(f"the ImageNet state dict does not fit torchvision's MobileNetV2: {err}") from None
    return model.features


def build_encoder(kind: str, weights: str = "random", seed: int = 0, weights_path: str | None = None) -> Encoder:
    """An encoder of ``kind``; ``imagenet`` loads pretrained weights, ``random``/``ssl`` a seeded init.

    ``ssl`` only sets the initial weights here; :func:`pretrain_ssl` trains them.
    """
    if kind not in KINDS:
        raise ParamsError(f"encoder.kind: unknown encoder {kind!r}; choose one of {', '.join(KINDS)}")
    if weights == "imagenet" and kind != "mobilenet_v2":
        raise ParamsError("encoder.weights: imagenet exists only for kind: mobilenet_v2; use ssl or random")
    torch.manual_seed(seed)
    if kind == "mobilenet_v2":
        enc = Encoder(mobilenet_v2_trunk(weights, weights_path), kind, 1280, 32)
    elif kind == "nature_cnn":
        enc = Encoder(nature_cnn_trunk(), kind, 256, 8)
    else:
        enc = Encoder(impala_cnn_trunk(), kind, 256, 8)
    return enc.eval()


# -- pixels to tensors ---------------------------------------------------------------------
def normalise(pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) floats in 0..1 to ImageNet-normalised inputs."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (pixels - mean) / std


def to_unit_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 to (N, 3, H, W) float32 in 0..1."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)


def views_to_input(views: np.ndarray, input_size: int) -> torch.Tensor:
    """(N, V, V, 3) uint8 views, resized (antialiased bilinear) to ``input_size`` and normalised."""
    x = to_unit_tensor(views)
    if x.shape[-1] != input_size:
        x = F.interpolate(x, size=(input_size, input_size), mode="bilinear", antialias=True, align_corners=False)
    return normalise(x)


def sample_centres(ok: np.ndarray, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` integer (x, y) centres drawn uniformly from a valid-centre mask."""
    flat = np.flatnonzero(ok)
    if len(flat) == 0:
        raise InputError("the map has no valid area for a whole view; check nodata or tile.view_size")
    ys, xs = np.unravel_index(flat[rng.integers(0, len(flat), n)], ok.shape)
    return xs.astype(float), ys.astype(float)


@torch.no_grad()
def recalibrate_batchnorm(encoder: Encoder, views: np.ndarray, input_size: int, batch: int = 32) -> None:
    """AdaBN: re-estimate BatchNorm running statistics on map views (no-op without BatchNorm)."""
    bns = [m for m in encoder.modules() if isinstance(m, nn.BatchNorm2d)]
    if not bns:
        return
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the batches below
    encoder.train()
    for i in range(0, len(views), batch):
        encoder(views_to_input(views[i : i + batch], input_size))
    for bn in bns:
        bn.momentum = 0.1
    encoder.eval()


# -- self-supervised pretraining ----------------------------------------------------------
def _affine_thetas(n: int, pad: float, g: torch.Generator, shift: float, rot_deg: float, scale: float) -> torch.Tensor:
    """Random (n, 2, 3) affine maps from output to input coords: rotation, scale, shift."""
    ang = (torch.rand(n, generator=g) * 2 - 1) * math.radians(rot_deg)
    s = (1 + (torch.rand(n, generator=g) * 2 - 1) * scale) / pad
    t = (torch.rand(n, 2, generator=g) * 2 - 1) * 2 * shift / pad
    cos, sin = torch.cos(ang) * s, torch.sin(ang) * s
    return torch.stack([torch.stack([cos, -sin, t[:, 0]], 1), torch.stack([sin, cos, t[:, 1]], 1)], 1)


def _photometric(x: torch.Tensor, g: torch.Generator, strength: float = 0.2) -> torch.Tensor:
    """Brightness, contrast and per-channel gain (a hue/white-balance shift) jitter, on 0..1 pixels."""
    n = x.shape[0]
    gain = 1 + (torch.rand(n, 3, 1, 1, generator=g) * 2 - 1) * strength / 2
    contrast = 1 + (torch.rand(n, 1, 1, 1, generator=g) * 2 - 1) * strength
    bright = (torch.rand(n, 1, 1, 1, generator=g) * 2 - 1) * strength / 2
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x * gain - mean) * contrast + mean + bright).clamp(0, 1)


def augment(crops: torch.Tensor, pad: float, out: int, g: torch.Generator) -> torch.Tensor:
    """One random view per padded crop (B, 3, P, P) in 0..1: geometric then photometric jitter, normalised.

    The crop side is ``pad`` times the view; the output is the central view, shifted by up to
    6% of the view, rotated by up to 10 degrees and scaled by up to 10%, at ``out`` pixels.
    """
    theta = _affine_thetas(len(crops), pad, g, shift=0.06, rot_deg=10.0, scale=0.1)
    grid = F.affine_grid(theta, [len(crops), 3, out, out], align_corners=False)
    x = F.grid_sample(crops, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return normalise(_photometric(x, g))


def info_nce(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent loss: each view's positive is its pair, the other 2B - 2 views are negatives."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.T / temperature
    sim.fill_diagonal_(float("-inf"))
    n = len(z1)
    labels = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return F.cross_entropy(sim, labels)


def _ssl_batch(
    rgb: np.ndarray, ok: np.ndarray, side: int, scale: float, n: int, rng: np.random.Generator
) -> torch.Tensor:
    """``n`` padded crops (side x side map pixels) resized by ``scale``, as 0..1 tensors."""
    xs, ys = sample_centres(ok, n, rng)
    crops = to_unit_tensor(crop_views(rgb, xs, ys, side))
    size = max(8, round(side * scale))
    return F.interpolate(crops, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def _ssl_step(encoder: Encoder, head: nn.Module, opt: torch.optim.Optimizer, crops: torch.Tensor, pad: float,
              p: EncoderParams, g: torch.Generator) -> float:  # fmt: skip
    """One InfoNCE step on two augmented views of each crop; returns the loss."""
    views = torch.cat([augment(crops, pad, p.input_size, g), augment(crops, pad, p.input_size, g)])
    z = head(encoder(views))
    loss = info_nce(z[: len(crops)], z[len(crops) :], p.ssl_temperature)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return float(loss.item())


def pretrain_ssl(
    encoder: Encoder, rgb: np.ndarray, valid: np.ndarray, view_size: int, p: EncoderParams, seed: int
) -> list[float]:
    """SimCLR/InfoNCE pretraining of ``encoder`` in place on views of the map; returns the loss per step.

    Positives: two jittered views of the same place. Negatives: the other places in the batch.
    Places are drawn from the whole valid map (pixels only, no targets or splits).
    """
    torch.manual_seed(seed)
    rng, g = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    pad = 1.25  # crops 25% larger than the view leave room for the geometric jitter
    side = math.ceil(view_size * pad)
    ok = valid_centres(valid, side)
    head = nn.Sequential(nn.Linear(encoder.dim, 256), nn.ReLU(), nn.Linear(256, 128))
    opt = torch.optim.Adam([*encoder.parameters(), *head.parameters()], lr=p.ssl_lr, weight_decay=1e-6)
    encoder.train()
    losses = []
    for _ in tqdm(range(p.ssl_steps), desc="ssl", unit="step", leave=False):
        crops = _ssl_batch(rgb, ok, side, p.input_size / view_size, p.ssl_batch_size, rng)
        losses.append(_ssl_step(encoder, head, opt, crops, pad, p, g))
    encoder.eval()
    return losses


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


def integral(fmap: np.ndarray) -> np.ndarray:
    """Summed-area table (h+1, w+1, D) float64 of a feature map."""
    out = np.zeros((fmap.shape[0] + 1, fmap.shape[1] + 1, fmap.shape[2]), np.float64)
    np.cumsum(np.cumsum(fmap, axis=0, dtype=np.float64), axis=1, out=out[1:, 1:])
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
        sat = integral(feature_map(encoder, rgb_t, int(offsets[i]), int(offsets[j]), pooling.input_size / v))
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
        out += [pooling.pool(integral(f), zero, zero) for f in fmaps]
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
        arrays |= {
            f"pooling_{k}": np.array(getattr(pl, k))
            for k in ("view_size", "input_size", "net_stride", "border", "grid")
        }
        with atomic_path(out / CACHE_FILE) as tmp, tmp.open("wb") as f:
            np.savez(f, **arrays)
        with atomic_path(out / ENCODER_FILE) as tmp:
            torch.save({"kind": self.encoder.kind, "state_dict": self.encoder.state_dict()}, tmp)


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


def train_encoder(p: EncoderParams, m: MapData, view_size: int, seed: int) -> tuple[Encoder, list[float]]:
    """Build the encoder of ``p`` and, for ``ssl`` weights, pretrain it; returns it and the loss curve."""
    torch.set_num_threads(p.torch_threads)
    encoder = build_encoder(p.kind, p.weights, seed, p.weights_path)
    losses = pretrain_ssl(encoder, m.rgb, m.valid, view_size, p, seed) if p.weights == "ssl" else []
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
    torch.set_num_threads(p.torch_threads)
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
    with np.load(path) as npz:
        data = dict(npz)
    if str(data["kind"]) == "pooled":
        if m is None:
            raise ValueError("loading a pooled feature cache needs the map")
        return PooledGrid(m, int(data["view_size"]), int(data["stride"]))
    space = _load_encoder_space(Path(out_dir), data)
    view = space.view_size
    if m is not None and (space.xs[-1] + view - view // 2 > m.width or space.ys[-1] + view - view // 2 > m.height):
        raise InputError(f"feature cache in {out_dir} was made for a larger map; rerun the encode stage")
    return space


def _load_encoder_space(out_dir: Path, data: dict[str, Any]) -> EncoderFeatures:
    ckpt = out_dir / ENCODER_FILE
    if not ckpt.exists():
        raise InputError(f"encoder weights {ckpt} do not exist; run `dvc repro encode` first")
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    encoder = build_encoder(str(data["kind"]), "random")
    encoder.load_state_dict(state["state_dict"])
    geometry = {k: int(data[f"pooling_{k}"]) for k in ("view_size", "input_size", "net_stride", "border", "grid")}
    matrix = data["matrix"] if data["matrix"].size else None
    projection = Projection(data["mean"], matrix)
    axes = (data["xs"], data["ys"])
    return EncoderFeatures(
        encoder, data["grid"], data["node_ok"], projection, axes, Pooling(**geometry), str(data["name"])
    )
