"""Self-supervised (SimCLR-style InfoNCE) pretraining of an encoder on views of the map itself.

The two views of a pair show the same place; the other places in the batch are the negatives.

* ``augment: mild`` (default): photometric jitter (brightness, contrast,
  per-channel gain) and small geometric jitter (shift, rotation up to 10°, scale ±10 %).
* ``augment: degrade``: the mild jitter, then one image degradation of
  :mod:`maprl.data.perturb` at a strength up to 1 (blur, noise, JPEG, haze or cloud).
  With local normalisation (``encoder.local_norm``) undoing colour changes and the heading
  search undoing rotation, the mild jitter plus cross-domain pairs measured best; ``degrade``
  and ``strong`` lost more in distinctiveness than they gained (``benchmarks/bench_queries.py``).
* ``augment: strong``: any rotation, scale 0.5–2 and a shift, then two random
  photometric perturbations of :mod:`maprl.data.perturb` at strengths up to 1 (brightness,
  contrast, gamma, colour cast, saturation, grayscale, haze, blur, noise, JPEG, cloud).
* **Cross-domain pairs** (``cross_domain``, when the map has query domains): that share of
  pairs takes its second view from a query domain at the same place (another season or
  date). Such places are drawn only where the padded crop lies outside the test area
  (``forbidden``): the test area never supplies a positive pair.

Single-domain pairs use the whole valid map, train and test areas alike: they see the map's
own pixels only, never a target position or split, like any map preprocessing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from tqdm.auto import tqdm

from maprl.config import EncoderParams
from maprl.data.perturb import GEOMETRIC, KINDS, random_perturbation
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


PHOTOMETRIC = tuple(k for k in KINDS if k not in GEOMETRIC)


DEGRADATIONS = ("blur", "noise", "jpeg", "haze", "cloud")
"""What ``augment: degrade`` adds to the mild jitter: the image degradations that local
normalisation (``encoder.local_norm``) does not undo."""


def _perturbed(x: torch.Tensor, rng: np.random.Generator, kinds: tuple[str, ...], n: int) -> torch.Tensor:
    """``n`` random perturbations of ``kinds`` (:mod:`maprl.data.perturb`) per view, strengths up to 1."""
    imgs = (x.permute(0, 2, 3, 1).numpy() * 255 + 0.5).clip(0, 255).astype(np.uint8)
    out = np.stack([random_perturbation(im, 1.0, rng, kinds=kinds, n=n) for im in imgs])
    return torch.from_numpy(out).permute(0, 3, 1, 2).float() / 255


def augment(
    crops: torch.Tensor, pad: float, out: int, g: torch.Generator, rng: np.random.Generator | None = None,
    mode: str = "mild",
) -> torch.Tensor:  # fmt: skip
    """One random view per padded crop (B, 3, P, P) in 0..1: geometric then photometric change, normalised.

    The crop side is ``pad`` times the view; the output is the central view at ``out`` pixels.
    ``mild``: shifted by up to 6 % of the view, rotated by up to 10° and scaled by up to 10 %,
    with brightness, contrast and gain jitter. ``degrade``: the same, then one of
    :data:`DEGRADATIONS` drawn from ``rng``. ``strong``: any rotation, scale 0.5-2 (``pad``
    must be 2), then two photometric perturbations drawn from ``rng``.
    """
    if mode != "strong":
        theta = _affine_thetas(len(crops), pad, g, shift=0.06, rot_deg=10.0, scale=0.1)
    else:
        theta = _affine_thetas(len(crops), pad, g, shift=0.06, rot_deg=180.0, scale=0.0)
        zoom = torch.exp2(torch.rand(len(crops), generator=g) * 2 - 1)  # 0.5 .. 2
        theta[:, :, :2] /= zoom[:, None, None]
    grid = F.affine_grid(theta, [len(crops), 3, out, out], align_corners=False)
    x = F.grid_sample(crops, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    if mode == "strong":
        return normalise(_perturbed(x, rng or np.random.default_rng(0), PHOTOMETRIC, 2))
    x = _photometric(x, g)
    return normalise(_perturbed(x, rng or np.random.default_rng(0), DEGRADATIONS, 1) if mode == "degrade" else x)


def info_nce(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent loss: each view's positive is its pair, the other 2B - 2 views are negatives."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.T / temperature
    sim.fill_diagonal_(float("-inf"))
    n = len(z1)
    labels = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return F.cross_entropy(sim, labels)


def _resized(views: np.ndarray, scale: float) -> torch.Tensor:
    crops = to_unit_tensor(views)
    size = max(8, round(views.shape[1] * scale))
    return F.interpolate(crops, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


@dataclass
class Sources:
    """Where SSL pairs come from: the map, and query domains over the allowed (train) area."""

    rgb: np.ndarray  # the map (H, W, 3)
    ok: np.ndarray  # centres whose padded crop lies on valid map imagery
    others: list[np.ndarray] = field(default_factory=list)  # query domains on the map's grid
    cross_ok: np.ndarray | None = None  # centres whose padded crop is valid everywhere and outside the test area


def _ssl_batch(
    src: Sources, side: int, scale: float, n: int, cross: float, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` pairs of padded crops (side x side map pixels) resized by ``scale``, as 0..1 tensors.

    A ``cross`` share of pairs takes its second crop from a random query domain at the same place.
    """
    n_cross = int(round(n * cross)) if src.others and src.cross_ok is not None and src.cross_ok.any() else 0
    xs, ys = sample_centres(src.ok, n - n_cross, rng)
    first = crop_views(src.rgb, xs, ys, side)
    second = first
    if n_cross:
        cx, cy = sample_centres(src.cross_ok, n_cross, rng)  # type: ignore[arg-type]
        pick = rng.integers(len(src.others), size=n_cross)
        other = np.stack([crop_views(src.others[k], cx[i : i + 1], cy[i : i + 1], side)[0] for i, k in enumerate(pick)])
        same = crop_views(src.rgb, cx, cy, side)
        first, second = np.concatenate([first, same]), np.concatenate([first, other])
    return _resized(first, scale), _resized(second, scale)


def _ssl_step(encoder: Encoder, head: nn.Module, opt: torch.optim.Optimizer, crops: tuple[torch.Tensor, torch.Tensor],
              pad: float, p: EncoderParams, g: torch.Generator, rng: np.random.Generator | None) -> float:  # fmt: skip
    """One InfoNCE step on the augmented views of each pair of crops; returns the loss."""
    a, b = crops
    views = torch.cat(
        [augment(a, pad, p.input_size, g, rng, p.augment), augment(b, pad, p.input_size, g, rng, p.augment)]
    )
    z = head(encoder(views))
    loss = info_nce(z[: len(a)], z[len(a) :], p.ssl_temperature)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return float(loss.item())


def pretrain_ssl(
    encoder: Encoder,
    rgb: np.ndarray,
    valid: np.ndarray,
    view_size: int,
    p: EncoderParams,
    seed: int,
    domains: list[tuple[np.ndarray, np.ndarray]] | None = None,
    forbidden: np.ndarray | None = None,
) -> list[float]:
    """SimCLR/InfoNCE pretraining of ``encoder`` in place on views of the map; returns the loss per step.

    Positives: two changed views of the same place (see the module docstring), a share of them
    across ``domains`` ((rgb, valid) on the map's grid) outside the ``forbidden`` (test) area.
    Negatives: the other places in the batch.
    """
    torch.manual_seed(seed)
    rng, g = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    strong = p.augment == "strong"
    pad = 2.0 if strong else 1.25  # room for the geometric change (scale 0.5 needs twice the view)
    side = math.ceil(view_size * pad)
    src = _sources(rgb, valid, side, domains or [], forbidden)
    aug_rng = np.random.default_rng([seed, 5])
    head = nn.Sequential(nn.Linear(encoder.dim, 256), nn.ReLU(), nn.Linear(256, 128))
    opt = torch.optim.Adam([*encoder.parameters(), *head.parameters()], lr=p.ssl_lr, weight_decay=1e-6)
    encoder.train()
    losses = []
    for _ in tqdm(range(p.ssl_steps), desc="ssl", unit="step", leave=False):
        crops = _ssl_batch(src, side, p.input_size / view_size, p.ssl_batch_size, p.cross_domain, rng)
        losses.append(_ssl_step(encoder, head, opt, crops, pad, p, g, aug_rng))
    encoder.eval()
    return losses


def _sources(
    rgb: np.ndarray, valid: np.ndarray, side: int, domains: list[tuple[np.ndarray, np.ndarray]],
    forbidden: np.ndarray | None,
) -> Sources:  # fmt: skip
    ok = valid_centres(valid, side)
    if not domains:
        return Sources(rgb, ok)
    allowed = valid.copy()
    for _, dvalid in domains:
        allowed &= dvalid
    if forbidden is not None:
        allowed &= ~forbidden
    return Sources(rgb, ok, [d for d, _ in domains], valid_centres(allowed, side))
