"""``MapRLNetwork`` (an SB3 features extractor) and ``MapRLPolicy`` (an ActorCriticPolicy).

The original design: MobileNetV2 embeds the target and the current view, the two 1280-d
vectors are concatenated (2560) and a head Linear(2560, 128) -> ReLU -> Linear(128, 64)
-> ReLU gives the policy's features. On feature observations the same head runs on the
cached embeddings, and the ``nav`` vector (position, retrieval estimate, their offset...)
is appended unchanged, because a short, explicit layout is what PPO learns from fastest.
"""

from __future__ import annotations

from typing import Any

import torch
from gymnasium import spaces
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from torch import nn


def _head(in_dim: int, hidden: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, out), nn.ReLU())


class PixelTrunk(nn.Module):
    """MobileNetV2 (torchvision, classifier removed) on one view -> 1280-d."""

    def __init__(self, input_size: int = 224, weights: Any = None) -> None:
        super().__init__()
        from torchvision.models import mobilenet_v2

        self.net = mobilenet_v2(weights=weights).features
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.input_size = input_size
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
        self.out_dim = 1280

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != 3:  # channel-last
            x = x.permute(0, 3, 1, 2)
        if x.shape[-1] != self.input_size:
            x = nn.functional.interpolate(x, size=self.input_size, mode="bilinear", align_corners=False)
        mean, std = self.get_buffer("mean"), self.get_buffer("std")
        x = (x - mean) / std
        return torch.flatten(self.pool(self.net(x)), 1)


class MapRLNetwork(BaseFeaturesExtractor):
    """Target + current -> 2560 -> 128 -> 64, plus the ``nav`` vector when present."""

    def __init__(self, observation_space: spaces.Dict, hidden: int = 128, out: int = 64, input_size: int = 224) -> None:
        target = observation_space.spaces.get("target")
        nav = observation_space.spaces.get("nav")
        nav_dim = int(nav.shape[0]) if nav is not None and nav.shape is not None else 0
        self.views = target is not None  # false: a portable policy, the nav vector alone
        super().__init__(observation_space, features_dim=(out if self.views else 0) + nav_dim)
        shape = target.shape if isinstance(target, spaces.Box) and target.shape is not None else (0,)
        self.pixels = len(shape) == 3
        self.trunk: PixelTrunk | None = PixelTrunk(input_size) if self.pixels else None
        emb_dim = self.trunk.out_dim if self.trunk is not None else int(shape[0])
        self.head = _head(2 * emb_dim, hidden, out) if self.views else None
        self.nav_dim = nav_dim

    def forward(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.head is None:
            return obs["nav"]
        t, c = obs["target"], obs["current"]
        if self.trunk is not None:
            both = self.trunk(torch.cat([t, c], dim=0).float())
            t, c = both[: len(t)], both[len(t) :]
        feats = self.head(torch.cat([t, c], dim=1))
        return torch.cat([feats, obs["nav"]], dim=1) if self.nav_dim else feats


class MapRLPolicy(ActorCriticPolicy):
    """ActorCriticPolicy whose features come from :class:`MapRLNetwork`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("features_extractor_class", MapRLNetwork)
        kwargs.setdefault("net_arch", {"pi": [64, 64], "vf": [64, 64]})
        super().__init__(*args, **kwargs)
