"""CNN encoders: (B, 3, S, S) ImageNet-normalised pixels to (B, D) features.

A fully convolutional trunk followed by global average pooling:

* ``mobilenet_v2``: torchvision's MobileNetV2 ``.features`` (classifier removed), D = 1280,
  network stride 32. Weights ``imagenet`` (torchvision weights API, or ``weights_path``),
  ``random`` or ``ssl`` (see :mod:`maprl.features.ssl`).
* ``nature_cnn``: the conv stack of SB3's NatureCNN (8x8/4, 4x4/2, 3x3/1), padded so the
  stride is exactly 8, then a 1x1 conv to D = 256.
* ``impala_cnn``: IMPALA's residual CNN (3 stages of conv, max-pool /2 and two residual
  blocks; 16, 32, 32 channels), stride 8, then a 1x1 conv to D = 256.

With ``local_norm`` > 0 every encoder first standardises its input locally (:class:`LocalNorm`:
each channel minus its Gaussian-weighted local mean, over its local standard deviation), so a
photo that is brighter, less contrasted or colour-cast gives nearly the same features as the map.

BatchNorm statistics of a ``random``/``ssl`` MobileNetV2 are re-estimated on map views
(AdaBN, :func:`recalibrate_batchnorm`), as its default running statistics fit no real input.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from maprl.errors import InputError, ParamsError

KINDS = ("mobilenet_v2", "nature_cnn", "impala_cnn")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def configure_torch(threads: int) -> None:
    """The one place torch's run-to-run settings are made: a fixed thread count (sums split over
    threads add up in another order with another count) and deterministic algorithms (a warning,
    not an error, where an op has none). The CPU code paths are pinned in :mod:`maprl` itself."""
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)


class Encoder(nn.Module):
    """A fully convolutional ``trunk`` then global average pooling: (B, 3, S, S) -> (B, D)."""

    def __init__(self, trunk: nn.Module, kind: str, dim: int, stride: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.kind, self.dim, self.stride = kind, dim, stride
        self.local_norm = 0.0  # LocalNorm sigma in input pixels (0: none); see build_encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x).mean(dim=(2, 3))


class LocalNorm(nn.Module):
    """Local standardisation per channel: ``(x - G*x) / sqrt(G*(x - G*x)^2 + eps^2)``, G a Gaussian of
    ``sigma`` input pixels (separable, edges replicated). No weights: a fixed first layer."""

    def __init__(self, sigma: float, eps: float = 0.1) -> None:
        super().__init__()
        radius = max(1, int(3 * sigma))
        t = torch.arange(-radius, radius + 1, dtype=torch.float32)
        k = torch.exp(-0.5 * (t / sigma) ** 2)
        self.kernel = (k / k.sum()).view(1, 1, 1, -1)  # a plain attribute: not in the state dict
        self.radius, self.eps = radius, eps

    def _blur(self, x: torch.Tensor) -> torch.Tensor:
        c, r = x.shape[1], self.radius
        kx = self.kernel.expand(c, 1, 1, -1)
        x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), kx, groups=c)
        return F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), kx.transpose(2, 3), groups=c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centred = x - self._blur(x)
        return centred / torch.sqrt(self._blur(centred * centred) + self.eps**2)


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


def build_encoder(
    kind: str, weights: str = "random", seed: int = 0, weights_path: str | None = None, local_norm: float = 0.0
) -> Encoder:
    """An encoder of ``kind``; ``imagenet`` loads pretrained weights, ``random``/``ssl`` a seeded init.

    ``local_norm`` > 0 puts a :class:`LocalNorm` of that many input pixels first (0: none).

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
    if local_norm > 0:
        enc.trunk = nn.Sequential(LocalNorm(local_norm), enc.trunk)
    enc.local_norm = float(local_norm)
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
