"""Self-supervised (SimCLR-style InfoNCE) pretraining of an encoder on views of the map itself.

The two views of a pair show the same place under photometric jitter (brightness, contrast,
per-channel gain) and small geometric jitter (shift, rotation, scale); the other places in
the batch are the negatives. It uses the whole valid map, train and test areas alike: it
sees pixels only, never a target position or split, like any map preprocessing.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from tqdm.auto import tqdm

from maprl.config import EncoderParams
from maprl.features.nets import Encoder, normalise, to_unit_tensor
from maprl.views import crop_views, sample_centres, valid_centres


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
