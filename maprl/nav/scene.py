"""A ``Scene`` is one map prepared for navigation: pixels, valid area, features, targets.

It is built once and shared by every environment copy (and the batched vector env), so
per-env memory stays small and a step is only a feature lookup.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from maprl.data.geo import MapData
from maprl.features.spaces import FeatureSpace, make_feature_space
from maprl.views import crop_views, valid_centres, view_origin

ProbeSims = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""Probe centres xs, ys (n, M) -> the similarity of each agent's target to the view there (n, M)."""


@dataclass
class Scene:
    map: MapData
    targets: pd.DataFrame  # columns id, x, y, split (at least)
    space: FeatureSpace
    view_size: int
    max_nodata: float = 0.0  # share of a view without imagery that a move may enter
    ok: np.ndarray = field(init=False)  # (H, W) bool: centres of whole valid views (starts, targets)
    can_enter: np.ndarray = field(init=False)  # (H, W) bool: centres a move may reach (<= max_nodata)
    targets_xy: np.ndarray = field(init=False)  # (T, 2) float target centres
    lo: float = field(init=False)
    hi_x: float = field(init=False)
    hi_y: float = field(init=False)
    _target_embs: np.ndarray | None = field(init=False, default=None, repr=False)
    _photos: np.ndarray | None = field(init=False, default=None, repr=False)
    domain: str = field(init=False, default="same")  # where the target photos come from

    def __post_init__(self) -> None:
        self.ok = valid_centres(self.map.valid, self.view_size)
        self.can_enter = (
            self.ok if self.max_nodata == 0 else valid_centres(self.map.valid, self.view_size, self.max_nodata)
        )
        self.targets_xy = self.targets[["x", "y"]].to_numpy(float) if len(self.targets) else np.zeros((0, 2))
        if not self.ok.any():
            raise ValueError("no position on this map has a whole valid view; the map is too small or empty")
        v = self.view_size
        self.lo = v / 2 - 0.5
        self.hi_x = self.map.width - v / 2 - 0.5
        self.hi_y = self.map.height - v / 2 - 0.5

    @classmethod
    def build(
        cls, m: MapData, targets: pd.DataFrame, view_size: int, similarity: str = "pooled", max_nodata: float = 0.0
    ) -> Scene:
        space = make_feature_space(similarity, m.rgb, view_size)
        return cls(m, targets.reset_index(drop=True), space, view_size, max_nodata)

    @property
    def step_scale(self) -> float:
        """Pixels per unit of ``action_step``: the map's shorter side."""
        return float(min(self.map.width, self.map.height))

    def clip(self, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.clip(xs, self.lo, self.hi_x), np.clip(ys, self.lo, self.hi_y)

    def _lookup(self, mask: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        x0, y0 = view_origin(xs, ys, self.view_size)
        half = self.view_size // 2
        return mask[y0 + half, x0 + half]

    def is_valid(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """Whether the views centred at (xs, ys) lie wholly on valid imagery."""
        return self._lookup(self.ok, xs, ys)

    def best_probe(self, pos: np.ndarray, moves: np.ndarray, sims_at: ProbeSims) -> tuple[np.ndarray, np.ndarray]:
        """For each of n agents at ``pos`` (n, 2): which of ``moves`` (M, 2, pixels) leads to the view most
        similar to its target by ``sims_at`` (probe centres xs, ys, each (n, M), to similarities (n, M);
        :meth:`embedding_sims` for the feature space's), and that similarity (-inf where every probe's
        view leaves the valid imagery). Moves are clipped to the map."""
        n, m = len(pos), len(moves)
        cand = pos[:, None, :] + moves[None]  # (n, M, 2)
        cx, cy = self.clip(cand[..., 0].ravel(), cand[..., 1].ravel())
        sims = sims_at(cx.reshape(n, m), cy.reshape(n, m))
        sims[~self.is_valid(cx, cy).reshape(n, m)] = -np.inf
        best = np.argmax(sims, axis=1)
        return best, sims[np.arange(n), best]

    def embedding_sims(self, targets: np.ndarray) -> ProbeSims:
        """:meth:`best_probe`'s similarity in the feature space: each agent's target embedding (``targets``,
        (n, D)) against the cached view at each probe."""

        def sims(xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
            emb = self.space.embed_at(xs.ravel(), ys.ravel()).reshape(*xs.shape, -1)
            return np.einsum("nmd,nd->nm", emb, targets)

        return sims

    def move(self, xs: np.ndarray, ys: np.ndarray, dx: np.ndarray, dy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Apply a move, clip it to the map, and stay put where the new view would hold more than
        ``max_nodata`` of pixels without imagery."""
        nx, ny = self.clip(xs + dx, ys + dy)
        keep = self._lookup(self.can_enter, nx, ny)
        return np.where(keep, nx, xs), np.where(keep, ny, ys)

    def sample_start(self, rng: np.random.Generator) -> tuple[float, float]:
        """Uniform valid centre, by rejection sampling (falls back to an exhaustive draw)."""
        for _ in range(1000):
            x, y = rng.uniform(self.lo, self.hi_x), rng.uniform(self.lo, self.hi_y)
            if self.is_valid(np.array([x]), np.array([y]))[0]:
                return float(x), float(y)
        ys, xs = np.nonzero(self.ok)
        i = rng.integers(len(xs))
        return float(xs[i]), float(ys[i])

    def sample_far(self, rng: np.random.Generator, xy: np.ndarray, min_distance: float) -> tuple[float, float]:
        """A uniform valid centre at least ``min_distance`` px from ``xy`` (the farthest of 64 tries if none is)."""
        best, best_d = (0.0, 0.0), -1.0
        for _ in range(64):
            x, y = self.sample_start(rng)
            d = float(np.hypot(x - xy[0], y - xy[1]))
            if d >= min_distance:
                return x, y
            if d > best_d:
                best, best_d = (x, y), d
        return best

    def view(self, x: float, y: float) -> np.ndarray:
        return crop_views(self.map.rgb, np.array([x]), np.array([y]), self.view_size)[0]

    def with_photos(self, photos: np.ndarray, embeddings: np.ndarray, domain: str) -> Scene:
        """This scene with other target photos (T, V, V, 3) and their embeddings (T, D): shares everything else."""
        if len(photos) != len(self.targets) or len(embeddings) != len(self.targets):
            raise ValueError(f"need one photo and embedding per target ({len(self.targets)})")
        out = copy.copy(self)
        out._photos, out._target_embs, out.domain = photos, np.asarray(embeddings, np.float32), domain
        return out

    def with_targets(self, targets: pd.DataFrame, photos: np.ndarray, embeddings: np.ndarray) -> Scene:
        """This scene with another targets table (e.g. several photos per place) and their photos and embeddings."""
        out = copy.copy(self)
        out.targets = targets.reset_index(drop=True)
        out.targets_xy = out.targets[["x", "y"]].to_numpy(float)
        out._target_embs = None
        return out.with_photos(photos, embeddings, self.domain)

    def target_photo(self, row: int) -> np.ndarray:
        """The photo of target ``row`` (V, V, 3) uint8, as an agent is given it."""
        if self._photos is not None:
            return self._photos[row]
        x, y = self.targets_xy[row]
        return crop_views(self.map.rgb, np.array([x]), np.array([y]), self.view_size)[0]

    def target_embeddings(self, batch: int = 64) -> np.ndarray:
        """(T, D) embeddings of every target photo (by default its crop of the map, computed once)."""
        if self._target_embs is None:
            xy = self.targets_xy
            chunks = [
                self.space.embed_view(
                    crop_views(self.map.rgb, xy[i : i + batch, 0], xy[i : i + batch, 1], self.view_size)
                )
                for i in range(0, len(xy), batch)
            ]
            self._target_embs = np.concatenate(chunks) if chunks else np.zeros((0, self.space.dim), np.float32)
        return self._target_embs

    def split_rows(self, split: str) -> np.ndarray:
        """Row indices of the targets of a split (``all`` for every target)."""
        if split == "all":
            return np.arange(len(self.targets))
        rows = np.flatnonzero(self.targets["split"].to_numpy() == split)
        if len(rows) == 0:
            raise ValueError(f"no targets in split {split!r}")
        return rows
