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
space, plus ``nav`` (M,) float32: see :mod:`maprl.nav.core` for its layout (with
``agent.portable``, ``nav`` alone; with ``env.stop_action``, its last value is the share of the
step budget left, which needs ``max_steps`` in the config: the env then truncates by itself and
no ``TimeLimit`` is needed).

## Action space
``env.actions: continuous`` (the default, the original design): ``Box(-1, 1, (2,), float32)``,
(ax, ay). The view centre moves to ``(x + ax * s, y + ay * s)`` with
``s = env.action_step * min(map width, map height)`` pixels, then is clipped to the map.
``discrete`` (8 compass moves) and ``candidates`` (fly to retrieval candidate k, refine, move
on), each optionally with an explicit STOP (``env.stop_action``), are specified in
:mod:`maprl.nav.actions`. A move whose new view would hold more than ``env.max_nodata`` of
pixels without imagery is not taken (the agent stays; ``info["blocked"]``). A NaN action, one
of another shape or a discrete action out of range is an error.

## Reward
See :mod:`maprl.nav.reward`, the one place it is defined: the original design's similarity +
bonus + success bonus - step penalty, plus optional potential-based distance shaping (training
only). With ``sim`` the cosine similarity of the two views in the feature space and the default
configuration (stop threshold 0.98, bonus band 0.08, scale 10, success bonus 100, step penalty
0.01, shaping 0) it is exactly the original design's reward.

## Episode end
Terminated when ``sim >= stop_threshold`` (the agent's own stop rule), or, with
``env.stop_action``, when the agent chooses STOP (then only that ends it); truncated after
``max_episode_steps`` (default 1000, through ``TimeLimit``).

## Info
``position`` and ``target`` (x, y pixels), ``target_id``, ``similarity``, ``distance_px``,
``distance_m`` (ground metres, also on a map in degrees; NaN on a plain pixel grid),
``stopped`` (own similarity passed the threshold, or the agent chose STOP), ``is_success``
(ground truth: the view centre lies within ``success_radius`` of the target, and with
``env.stop_action`` the agent stopped there), ``steps``, ``path_length_px``,
``start_distance_px`` and ``blocked``.

## Randomness
Only ``self.np_random``: the same ``reset(seed=...)`` and actions give the same rollout.
``reset(options={"target_id": i, "start": (x, y), "decoy": (x, y)})`` fixes an episode (see
:mod:`maprl.nav.core` for decoys; with ``decoy_rate`` > 0 one is drawn when none is given).
A ``decoy`` of two NaNs means none. An unknown ``target_id``, or a ``start``/``decoy`` that is
not two finite numbers on the map, raises a ``ValueError`` that says what is allowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pandas as pd
from gymnasium import spaces

from maprl.data.geo import MapData, read_map
from maprl.features.memory import MapMemory
from maprl.nav.actions import as_actions
from maprl.nav.core import NavConfig, NavCore, draw_decoy
from maprl.nav.reward import seed_reward
from maprl.nav.scene import Scene
from maprl.viz.plots import render_episode


def default_scene(view_size: int = 224, size: int = 512, seed: int = 0) -> Scene:
    """A small synthetic world with random targets, for ``gym.make`` with no map given."""
    from rasterio.transform import from_origin

    from maprl.config import TileParams
    from maprl.data.tile import build_targets
    from maprl.data.world import synthesize_world

    world = synthesize_world(size, seed)
    m = MapData(world.rgb, world.elevation, np.ones((size, size), bool), from_origin(0, size, 1, 1), None)
    tp = TileParams(n_targets=50, mode="random", view_size=view_size, write_crops=False)
    return Scene.build(m, build_targets(m, tp, seed, None), view_size)


def feature_obs_space(dim: int, nav_dim: int, portable: bool = False) -> spaces.Dict:
    """``target`` and ``current`` embeddings, plus ``nav`` when ``nav_dim`` > 0 (``portable``: ``nav`` only)."""
    emb = spaces.Box(-1.0, 1.0, (dim,), np.float32)
    keys: dict[str, spaces.Space[Any]] = {} if portable else {"target": emb, "current": emb}
    if nav_dim:
        keys["nav"] = spaces.Box(-np.inf, np.inf, (nav_dim,), np.float32)
    return spaces.Dict(keys)


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
        **config_kw: Any,
    ) -> None:
        if config is None:  # keywords such as action_step=0.1 or stop_threshold=0.9 (NavConfig.of)
            config = NavConfig.of(**{"max_steps": None, **config_kw})
        elif config_kw:
            raise TypeError(f"give either config or NavConfig keywords, not both ({', '.join(config_kw)})")
        self.cfg = config
        if scene is None:
            scene = self._load_scene(map_path, targets_path, view_size, similarity, config.env.max_nodata)
        self.scene = scene
        self.view_size = self.scene.view_size
        self.rows = self.scene.split_rows(split)
        self.core = NavCore(self.scene, 1, config, memory)
        self.obs_mode = obs
        self.render_mode = render_mode
        v = self.view_size
        if obs == "pixels":
            view_space = spaces.Box(0, 255, (v, v, 3), np.uint8)
            self.observation_space = spaces.Dict({"target": view_space, "current": view_space})  # type: ignore[assignment]
        elif obs == "features":
            self.observation_space = feature_obs_space(  # type: ignore[assignment]
                self.scene.space.dim, config.nav_dim(), config.agent.portable
            )
        else:
            raise ValueError(f"obs must be pixels or features, got {obs!r}")
        self.action_space = config.action_space()
        self._path: list[tuple[float, float]] = []

    @staticmethod
    def _load_scene(map_path: Any, targets_path: Any, view_size: int, similarity: str, max_nodata: float) -> Scene:
        if map_path is None:
            return default_scene(view_size)
        from maprl.data.tile import read_targets

        m = read_map(map_path)
        targets = read_targets(targets_path) if targets_path is not None else pd.DataFrame()
        return Scene.build(m, targets, view_size, similarity, max_nodata)

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

    def _row(self, target_id: Any) -> int:
        ids = self.scene.targets["id"].to_numpy()
        hit = np.flatnonzero(ids == target_id) if np.ndim(target_id) == 0 else np.array([], int)
        if len(hit) == 0:
            raise ValueError(
                f"options['target_id']={target_id!r} is not a target of this map; ids run {ids.min()}..{ids.max()}"
            )
        return int(hit[0])

    def _point(self, key: str, value: Any) -> np.ndarray:
        """An (x, y) option as a float array, checked: two finite numbers whose view centre is on the map."""
        try:
            xy = np.asarray(value, float)
        except (TypeError, ValueError):
            xy = np.array([])
        if xy.shape != (2,) or not np.isfinite(xy).all():
            raise ValueError(f"options[{key!r}] must be two finite numbers (x, y) in pixels, got {value!r}")
        s = self.scene
        if not (s.lo <= xy[0] <= s.hi_x and s.lo <= xy[1] <= s.hi_y):
            raise ValueError(
                f"options[{key!r}]={tuple(xy)} puts the view off the map; x must lie in [{s.lo}, {s.hi_x}] "
                f"and y in [{s.lo}, {s.hi_y}]"
            )
        return xy

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        super().reset(seed=seed)
        options = options or {}
        if "target_id" in options:
            row = self._row(options["target_id"])
        else:
            row = int(self.rows[self.np_random.integers(len(self.rows))])
        if options.get("start") is not None:
            start = self._point("start", options["start"])
        else:
            start = np.array(self.scene.sample_start(self.np_random), float)
        if options.get("decoy") is not None and np.isnan(np.asarray(options["decoy"], float)).all():
            decoy = np.full(2, np.nan)  # NaNs: explicitly no decoy
        elif options.get("decoy") is not None:
            decoy = self._point("decoy", options["decoy"])
        else:
            decoy = draw_decoy(self.scene, self.core.cfg, self.core.targets_xy[row], self.np_random)
        self.core.reset_agents(np.array([0]), np.array([row]), start[None], np.asarray(decoy, float)[None])
        self._path = [tuple(self.core.pos[0])]
        return self._obs(), {**self.core.info(0), "blocked": False}

    def step(self, action: Any) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        old = self.core.pos[0].copy()
        reward, terminated, truncated = self.core.step(as_actions(action, self.action_space, 1, single=True))
        moved = not np.allclose(self.core.pos[0], old)
        self._path.append(tuple(self.core.pos[0]))
        blocked = not moved and bool(np.any(self.core.prev_action[0] != 0))
        info = {**self.core.info(0), "blocked": blocked}
        return self._obs(), float(reward[0]), bool(terminated[0]), bool(truncated[0]), info

    def render(self) -> np.ndarray | None:
        if self.render_mode != "rgb_array":
            return None
        t = self.core.targets_xy[self.core.rows[0]]
        return render_episode(self.scene.map.rgb, self._path, (t[0], t[1]), self.view_size)
