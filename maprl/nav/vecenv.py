"""``NavVecEnv``: an SB3 ``VecEnv`` stepping N agents at once with numpy on the feature cache.

It behaves exactly like N copies of ``SatelliteNavEnv(obs="features")`` wrapped in a
``TimeLimit`` and SB3's ``DummyVecEnv`` (auto-reset, ``terminal_observation``,
``TimeLimit.truncated``); ``tests/test_vecenv.py`` checks this step by step. Agent i draws
its episodes from its own generator, ``SeedSequence(seed).spawn(n)[i]``, unless a fixed
episode list is given with :meth:`set_episodes` (evaluation).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from stable_baselines3.common.vec_env.base_vec_env import VecEnv, VecEnvObs, VecEnvStepReturn

from maprl.features.memory import MapMemory
from maprl.nav.core import NavConfig, NavCore, draw_decoy
from maprl.nav.env import feature_obs_space
from maprl.nav.scene import Scene


class _OneObjectVecEnv(VecEnv):
    """What :class:`NavVecEnv`, :class:`MultiWorldVecEnv` and :class:`~maprl.nav.grid.GridNavVecEnv`
    share: one object steps every agent."""

    def close(self) -> None:
        return None

    # One object steps every agent, so attributes and methods belong to all of them at once:
    # ``get_attr`` reads once, ``set_attr`` writes once and ``env_method`` calls once, and each
    # answers with one entry per requested index, as SB3 expects.
    def get_attr(self, attr_name: str, indices: Any = None) -> list[Any]:
        value = getattr(self, attr_name)
        return [value for _ in self._get_indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices: Any = None) -> None:
        if len(list(self._get_indices(indices))) not in (0, self.num_envs):
            raise ValueError(
                f"{type(self).__name__}.set_attr({attr_name!r}) sets an attribute shared by all "
                f"{self.num_envs} agents; it cannot be set for some indices only"
            )
        setattr(self, attr_name, value)

    def env_method(self, method_name: str, *args: Any, indices: Any = None, **kwargs: Any) -> list[Any]:
        n = len(list(self._get_indices(indices)))
        result = getattr(self, method_name)(*args, **kwargs) if n else None
        return [result] * n

    def env_is_wrapped(self, wrapper_class: type, indices: Any = None) -> list[bool]:
        return [False for _ in self._get_indices(indices)]

    def get_images(self) -> Sequence[np.ndarray | None]:
        return [None] * self.num_envs

    def _reset_idx(self, idx: np.ndarray) -> None:
        raise NotImplementedError

    def _step_result(
        self, core: Any, reward: np.ndarray, terminated: np.ndarray, truncated: np.ndarray
    ) -> VecEnvStepReturn:
        """SB3's step return after ``core`` (``observe(idx)``, ``info(i)``) moved every agent: where an
        episode ended, its info, terminal observation and ``TimeLimit.truncated``, and the agent reset
        (``_reset_idx``); as ``DummyVecEnv`` auto-resets."""
        done = terminated | truncated
        finished = np.flatnonzero(done)
        infos: list[dict[str, Any]] = [{} for _ in range(self.num_envs)]
        if len(finished):  # info dicts and terminal observations only where an episode ended
            terminal = core.observe(finished)
            for j, i in enumerate(finished):
                infos[i] = core.info(int(i))
                infos[i]["terminal_observation"] = {k: v[j] for k, v in terminal.items()}
                infos[i]["TimeLimit.truncated"] = bool(truncated[i])
            self._reset_idx(finished)
        return core.observe(), reward.astype(np.float32), done, infos


class NavVecEnv(_OneObjectVecEnv):
    def __init__(
        self,
        scene: Scene,
        n_envs: int,
        config: NavConfig,
        *,
        split: str = "train",
        memory: MapMemory | None = None,
        seed: int = 0,
    ) -> None:
        if config.max_steps is None:
            raise ValueError("the vector env needs config.max_steps")
        self.scene, self.cfg = scene, config
        self.core = NavCore(scene, n_envs, config, memory)
        self.rows = self._all_rows = scene.split_rows(split)
        self.level = 1.0  # curriculum: how far towards the whole training distribution (set_curriculum)
        obs_space = feature_obs_space(scene.space.dim, config.nav_dim(), config.agent.portable)
        self.render_mode = None
        super().__init__(n_envs, obs_space, self.core.action_space)
        self._rngs = self._make_rngs(seed)
        self._episodes: list[tuple[float, ...]] | None = None
        self.cores = [self.core]  # as in MultiWorldVecEnv
        self._actions: np.ndarray = np.zeros((n_envs, *(self.action_space.shape or ())), self.action_space.dtype)

    def _make_rngs(self, seed: int | None) -> list[np.random.Generator]:
        return [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(self.num_envs)]

    # -- episodes ---------------------------------------------------------------------------
    def set_episodes(self, episodes: Sequence[tuple[float, ...]]) -> None:
        """Fix the next episodes as (target row, start x, start y[, decoy x, decoy y]).

        Agent i gets episode i first; a missing or NaN decoy means none.
        """
        self._episodes = list(episodes)

    def _draw(self, i: int) -> tuple[int, np.ndarray, np.ndarray]:
        if self._episodes:
            row, x, y, *decoy = self._episodes.pop(0)
            return int(row), np.array([x, y], float), np.array(decoy or (np.nan, np.nan), float)
        rng = self._rngs[i]
        row = int(self.rows[rng.integers(len(self.rows))])
        start = np.array(self.scene.sample_start(rng), float)
        return row, start, draw_decoy(self.scene, self.cfg, self.core.targets_xy[row], rng, self.level)

    def set_curriculum(self, level: float) -> None:
        """Draw the next episodes from the easier ``level`` (0..1) of the training distribution: decoys in
        ``level`` times ``decoy_rate`` of them, and only target photos whose perturbation cap (the targets'
        ``strength_cap`` column, where there is one) is at most ``level`` times the largest."""
        self.level = float(level)
        self.rows = self._all_rows
        if "strength_cap" in self.scene.targets:
            cap = self.scene.targets["strength_cap"].to_numpy(float)[self._all_rows]
            self.rows = self._all_rows[cap <= self.level * cap.max() + 1e-9]

    def _reset_idx(self, idx: Iterable[int]) -> None:
        idx = np.fromiter(idx, np.int64)
        if len(idx) == 0:
            return
        drawn = [self._draw(int(i)) for i in idx]
        rows, starts, decoys = (np.stack([d[j] for d in drawn]) for j in range(3))
        self.core.reset_agents(idx, rows.astype(np.int64), starts, decoys)

    # -- state, for checkpoints ---------------------------------------------------------------
    def get_state(self) -> dict[str, Any]:
        """Everything the next steps depend on: each agent's episode and each agent's generator."""
        return {
            "num_envs": self.num_envs,
            "core": {k: getattr(self.core, k).copy() for k in NavCore.STATE},
            "rngs": [rng.bit_generator.state for rng in self._rngs],
            "episodes": None if self._episodes is None else list(self._episodes),
            "level": self.level,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Continue exactly where :meth:`get_state` was taken (same scene, config and number of agents)."""
        if state["num_envs"] != self.num_envs:
            raise ValueError(f"state of {state['num_envs']} agents given to an env of {self.num_envs}")
        for k in NavCore.STATE:
            getattr(self.core, k)[...] = state["core"][k]
        for rng, rng_state in zip(self._rngs, state["rngs"], strict=True):
            rng.bit_generator.state = rng_state
        self._episodes = None if state["episodes"] is None else list(state["episodes"])
        self.set_curriculum(state.get("level", 1.0))

    # -- VecEnv API -------------------------------------------------------------------------
    def reset(self) -> VecEnvObs:
        if self._seeds[0] is not None:
            self._rngs = self._make_rngs(self._seeds[0])
        self._reset_seeds()
        self._reset_idx(range(self.num_envs))
        return self.core.observe()

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = np.asarray(actions)

    def step_wait(self) -> VecEnvStepReturn:
        return self._step_result(self.core, *self.core.step(self._actions))


class MultiWorldVecEnv(_OneObjectVecEnv):
    """Several :class:`NavVecEnv` (one per map, the same spaces) stepped as one vector env.

    Agent i of the whole belongs to the sub-env that holds it, in order; ``train.worlds`` trains
    one policy across maps with it. Only a portable observation (``agent.portable``) means the same
    thing on maps whose encoders differ.
    """

    def __init__(self, envs: Sequence[NavVecEnv]) -> None:
        if not envs:
            raise ValueError("MultiWorldVecEnv needs at least one env")
        first = envs[0]
        for e in envs[1:]:
            if e.observation_space != first.observation_space or e.action_space != first.action_space:
                raise ValueError("every world's env must have the same observation and action spaces")
        self.envs = list(envs)
        self.render_mode = None
        self._bounds = np.cumsum([0] + [e.num_envs for e in envs])
        super().__init__(int(self._bounds[-1]), first.observation_space, first.action_space)

    @property
    def cores(self) -> list[NavCore]:
        return [e.core for e in self.envs]

    def _join(self, parts: Sequence[VecEnvObs]) -> dict[str, np.ndarray]:
        keys = parts[0].keys()  # type: ignore[union-attr]
        return {k: np.concatenate([p[k] for p in parts]) for k in keys}  # type: ignore[index]

    @property
    def level(self) -> float:
        return self.envs[0].level

    def set_curriculum(self, level: float) -> None:
        for e in self.envs:
            e.set_curriculum(level)

    def get_state(self) -> dict[str, Any]:
        return {"worlds": [e.get_state() for e in self.envs]}

    def set_state(self, state: dict[str, Any]) -> None:
        for e, s in zip(self.envs, state["worlds"], strict=True):
            e.set_state(s)

    def reset(self) -> VecEnvObs:
        if self._seeds[0] is not None:
            for k, e in enumerate(self.envs):
                e.seed(int(self._seeds[0]) + 1000 * k)
        self._reset_seeds()
        return self._join([e.reset() for e in self.envs])

    def step_async(self, actions: np.ndarray) -> None:
        a = np.asarray(actions)
        for k, e in enumerate(self.envs):
            e.step_async(a[self._bounds[k] : self._bounds[k + 1]])

    def step_wait(self) -> VecEnvStepReturn:
        outs = [e.step_wait() for e in self.envs]
        obs = self._join([o[0] for o in outs])
        infos = [info for o in outs for info in o[3]]
        return obs, np.concatenate([o[1] for o in outs]), np.concatenate([o[2] for o in outs]), infos
