"""``maprl/SatelliteNav-v0``: fly a view over a map until it shows the target.

## Description
An agent holds a square view of side ``view_size`` (V) over a georeferenced map. Each
episode draws a target crop from one split of the tiled targets and a uniform valid
start; the agent moves its view until it matches the target.

## Observation space
``obs="pixels"`` (the original design), a ``Dict``:

| key     | space                          | meaning                               |
|---------|--------------------------------|---------------------------------------|
| target  | Box(0, 255, (V, V, 3), uint8)  | the target view (the photo to locate) |
| current | Box(0, 255, (V, V, 3), uint8)  | what the agent sees now               |

``obs="features"``: ``target`` and ``current`` are (D,) float32 embeddings from the feature
space, plus ``nav`` (M,) float32: see :mod:`maprl.navcore` for its layout.

## Action space
``Box(-1, 1, (2,), float32)``: (ax, ay). The view centre moves to
``(x + ax * s, y + ay * s)`` with ``s = action_step * min(map width, map height)`` pixels,
then is clipped to the map. A move whose view would touch nodata is not taken.

## Reward
With ``sim`` the cosine similarity of the current and target views in the feature space:

    bonus  = bonus_scale * max(0, sim - bonus_threshold) / (1 - bonus_threshold)
    reward = sim + bonus + success_bonus * [sim >= success_threshold] - step_penalty
             + shaping * (distance_before - distance_after) / s

Defaults: bonus_threshold 0.90, bonus_scale 10, success_threshold 0.98, success_bonus 100,
step_penalty 0.01 and shaping 0 (the original design; training may turn on this
potential-based distance shaping, which uses the simulator's ground truth).

## Episode end
Terminated when ``sim >= success_threshold`` (the agent's own stop rule); truncated after
``max_episode_steps`` (default 1000, through ``TimeLimit``).

## Info
``position`` and ``target`` (x, y pixels), ``target_id``, ``similarity``, ``distance_px``,
``distance_m`` (NaN on a pixel-grid map), ``stopped`` (own similarity passed the
threshold), ``is_success`` (ground truth: the view centre lies within ``success_radius``
of the target), ``steps``, ``path_length_px``, ``start_distance_px`` and ``blocked``.

## Randomness
Only ``self.np_random``: the same ``reset(seed=...)`` and actions give the same rollout.
``reset(options={"target_id": i, "start": (x, y), "decoy": (x, y)})`` fixes an episode (see
:mod:`maprl.navcore` for decoys; with ``decoy_rate`` > 0 one is drawn when none is given).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pandas as pd
from gymnasium import spaces

from maprl.geo import MapData, read_map
from maprl.memory import MapMemory
from maprl.navcore import NavConfig, NavCore, draw_decoy, seed_reward
from maprl.plotting import render_episode
from maprl.scene import Scene


def default_scene(view_size: int = 224, size: int = 512, seed: int = 0) -> Scene:
    """A small synthetic world with random targets, for ``gym.make`` with no map given."""
    from rasterio.transform import from_origin

    from maprl.config import TileParams
    from maprl.tiling import build_targets
    from maprl.world import synthesize_world

    world = synthesize_world(size, seed)
    m = MapData(world.rgb, world.elevation, np.ones((size, size), bool), from_origin(0, size, 1, 1), None)
    tp = TileParams(n_targets=50, mode="random", view_size=view_size, write_crops=False)
    return Scene.build(m, build_targets(m, tp, seed, None), view_size)


def feature_obs_space(dim: int, nav_dim: int) -> spaces.Dict:
    emb = spaces.Box(-1.0, 1.0, (dim,), np.float32)
    return spaces.Dict({"target": emb, "current": emb, "nav": spaces.Box(-np.inf, np.inf, (nav_dim,), np.float32)})


class SatelliteNavEnv(gym.Env[dict[str, np.ndarray], np.ndarray]):
    metadata = {"render_modes": ["rgb_array"], "render_fps": 8}

    def __init__(
        self,
        map_path: str | Path | None = None,
        targets_path: str | Path | None = None,
        *,
        scene: Scene | None = None,
        split: str = "train",
        obs: str = "pixels",
        view_size: int = 224,
        similarity: str = "pooled",
        config: NavConfig | None = None,
        memory: MapMemory | None = None,
        render_mode: str | None = None,
        **reward_kw: Any,
    ) -> None:
        self.scene = scene if scene is not None else self._load_scene(map_path, targets_path, view_size, similarity)
        self.view_size = self.scene.view_size
        self.rows = self.scene.split_rows(split)
        if config is None:
            reward_kw.setdefault("stop_threshold", reward_kw.pop("success_threshold", 0.98))
            config = NavConfig(max_steps=None, **reward_kw)
        self.cfg = config
        self.core = NavCore(self.scene, 1, config, memory)
        self.obs_mode = obs
        self.render_mode = render_mode
        v = self.view_size
        if obs == "pixels":
            view_space = spaces.Box(0, 255, (v, v, 3), np.uint8)
            self.observation_space = spaces.Dict({"target": view_space, "current": view_space})  # type: ignore[assignment]
        elif obs == "features":
            self.observation_space = feature_obs_space(self.scene.space.dim, config.nav_dim())  # type: ignore[assignment]
        else:
            raise ValueError(f"obs must be pixels or features, got {obs!r}")
        self.action_space = spaces.Box(-1.0, 1.0, (2,), np.float32)
        self._path: list[tuple[float, float]] = []

    @staticmethod
    def _load_scene(map_path: Any, targets_path: Any, view_size: int, similarity: str) -> Scene:
        if map_path is None:
            return default_scene(view_size)
        from maprl.tiling import read_targets

        m = read_map(map_path)
        targets = read_targets(targets_path) if targets_path is not None else pd.DataFrame()
        return Scene.build(m, targets, view_size, similarity)

    def reward(self, sim: float) -> tuple[float, bool]:
        """The original design's reward for similarity ``sim`` and whether it is a success."""
        r, s = seed_reward(np.array([sim]), self.cfg)
        return float(r[0]), bool(s[0])

    def _obs(self) -> dict[str, np.ndarray]:
        if self.obs_mode == "features":
            return {k: v[0] for k, v in self.core.observe().items()}
        row = self.core.rows[0]
        t = self.core.targets_xy[row]
        return {"target": self.scene.view(t[0], t[1]), "current": self.scene.view(*self.core.pos[0])}

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        super().reset(seed=seed)
        options = options or {}
        if "target_id" in options:
            row = int(np.flatnonzero(self.scene.targets["id"].to_numpy() == options["target_id"])[0])
        else:
            row = int(self.rows[self.np_random.integers(len(self.rows))])
        start = options.get("start") or self.scene.sample_start(self.np_random)
        decoy = options.get("decoy")
        if decoy is None:
            decoy = draw_decoy(self.scene, self.core.cfg, self.core.targets_xy[row], self.np_random)
        self.core.reset_agents(np.array([0]), np.array([row]), np.array([start], float), np.array([decoy], float))
        self._path = [tuple(self.core.pos[0])]
        return self._obs(), {**self.core.info(0), "blocked": False}

    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        old = self.core.pos[0].copy()
        reward, terminated, truncated = self.core.step(np.asarray(action)[None])
        moved = not np.allclose(self.core.pos[0], old)
        self._path.append(tuple(self.core.pos[0]))
        blocked = not moved and bool(np.any(np.asarray(action) != 0))
        info = {**self.core.info(0), "blocked": blocked}
        return self._obs(), float(reward[0]), bool(terminated[0]), bool(truncated[0]), info

    def render(self) -> np.ndarray | None:
        if self.render_mode != "rgb_array":
            return None
        t = self.core.targets_xy[self.core.rows[0]]
        return render_episode(self.scene.map.rgb, self._path, (t[0], t[1]), self.view_size)
