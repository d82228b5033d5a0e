"""``maprl/GridNav-v0``: find a goal patch on a grid of patches with 4 moves (the published protocol).

## Description
The task of AiRLoc, GOMAA-Geo (NeurIPS 2024) and GeoExplorer (ICCV 2025): an image is cut into an
``n`` x ``n`` grid of patches. The agent starts on one cell and is shown the patch of a goal cell;
it moves one cell at a time and never sees the whole image, only the patch it stands on and the
goal patch. An episode succeeds when the agent steps onto the goal cell within ``budget`` moves.
Cells are numbered row-major, ``cell = row * n + col``; rows grow downwards.

The env holds patch *embeddings*, not pixels: ``embeddings[i, row, col]`` is the (D,) unit vector of
patch (row, col) of grid image ``i`` (the ``grid`` stage embeds every patch once with the map's
encoder, so a step is a lookup). Without ``embeddings``, ``gym.make("maprl/GridNav-v0")`` builds
four images of seeded random unit vectors (for API checks, not for learning).

## Observation space
A ``Dict`` the project's policy (:class:`~maprl.learn.policies.MapRLPolicy`) reads as it reads the
feature observations of ``maprl/SatelliteNav-v0``:

| key     | space                           | meaning                                  |
|---------|---------------------------------|------------------------------------------|
| target  | Box(-1, 1, (D,), float32)       | the goal patch's embedding               |
| current | Box(-1, 1, (D,), float32)       | the embedding of the patch the agent is on |
| nav     | Box(-1, 1, (13,), float32)      | the agent's own state, below             |

``nav``: [0, 1] the current row and column divided by ``n - 1``; [2, 3] the start cell's row and
column, likewise; [4] the share of the budget left; [5:9] per move (up, down, left, right) -1 if it
leads off the grid, 1 if it leads to a cell visited this episode, 0 otherwise; [9:13] the last move,
one-hot (zeros before the first move). Why these: the position, the start and the budget left are
what a fixed route needs (with the start and the position, a self-avoiding route is a function of
the observation, so the best image-blind route is a policy this observation can express: the
learned agent has that baseline within reach and must add what the patches tell it); the visited
and off-grid flags let a feed-forward policy avoid wasting moves on cells it has seen or on the
grid's edge, without a full visited mask whose size grows with ``n``; the last move gives the
direction it came from. The goal's position and the distance to it are never observed.

## Action space
``Discrete(4)``: 0 up, 1 down, 2 left, 3 right. A move that would leave the grid is replaced by a
move drawn uniformly among the moves that stay on it (from ``self.np_random``); it costs a step
like any other (``info["off_grid"]``). With this convention a policy drawing its 4 actions
uniformly at random *is* the random walk over in-grid neighbours, whose success on 5x5 with
``budget`` 10 is 0.145, 0.074, 0.054, 0.022 and 0.018 for distances 4..8, the figures quoted for
the published protocol (staying in place and losing the step instead gives 0.100, 0.053, 0.028,
0.013 and 0.005). An action outside 0..3 is an error.

## Reward
``success_reward`` (default 1) on reaching the goal, minus ``step_cost`` per move, plus potential-based
shaping (Ng et al. 1999) ``shaping * (gamma * phi(s') - phi(s))`` with ``phi = -distance / (2 (n - 1))``
from the true Manhattan distance to the goal: privileged information in the reward only (it leaves
the optimal policies unchanged and is 0 with ``shaping: 0``), never in the observation.

## Episode end
Terminated when the agent stands on the goal cell (a success: the agent reaches the goal at any
step); truncated after ``budget`` moves (the env truncates by itself; no ``TimeLimit`` is needed).

## Starting state
Image uniform among the env's images, distance ``C`` uniform in ``c_min..c_max``, then a (start,
goal) pair uniform among the ordered pairs at Manhattan distance ``C``: the distribution of the
evaluation's episodes. ``reset(options={"image": i, "start": (row, col), "goal": (row, col)})``
fixes an episode; ``start`` and ``goal`` must differ and lie on the grid.

## Info
``is_success``, ``image``, ``start``, ``goal`` and ``position`` (row, col), ``distance`` (to the
goal), ``start_distance``, ``steps`` and ``off_grid`` (the last action was replaced).

## Randomness
Only ``self.np_random``: the same ``reset(seed=...)`` and actions give the same rollout.

## Vector env
:class:`GridNavVecEnv` steps N agents at once with numpy (the same :class:`GridCore`), and behaves
exactly as N copies of this env in SB3's ``DummyVecEnv`` seeded alike (``tests/test_grid.py`` checks
it step by step): agent i draws from ``np.random.default_rng(seed + i)``, as env i's ``np_random``
after ``reset(seed=seed + i)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from stable_baselines3.common.vec_env.base_vec_env import VecEnvObs, VecEnvStepReturn

from maprl.nav.vecenv import _OneObjectVecEnv

MOVES = np.array([(-1, 0), (1, 0), (0, -1), (0, 1)], np.int64)
"""(d_row, d_col) of the actions up, down, left, right."""
NAV_DIM = 13


def cell_rc(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, col) of every cell of an ``n`` x ``n`` grid, row-major."""
    return np.divmod(np.arange(n * n, dtype=np.int64), n)


def neighbour_table(n: int) -> np.ndarray:
    """(n*n, 4) cell reached by each move (up, down, left, right), -1 where the move leaves the grid."""
    r, c = cell_rc(n)
    rr, cc = r[:, None] + MOVES[:, 0], c[:, None] + MOVES[:, 1]
    inside = (rr >= 0) & (rr < n) & (cc >= 0) & (cc < n)
    return np.where(inside, rr * n + cc, -1)


def distances(n: int) -> np.ndarray:
    """(n*n, n*n) Manhattan distances between cells."""
    r, c = cell_rc(n)
    return np.abs(r[:, None] - r[None]) + np.abs(c[:, None] - c[None])


def pairs_at(n: int, c: int) -> np.ndarray:
    """(K, 2) every ordered (start, goal) pair of cells at Manhattan distance ``c``, sorted."""
    s, g = np.nonzero(distances(n) == c)
    return np.stack([s, g], 1).astype(np.int64)


def check_grid(size: int, budget: int, c_min: int, c_max: int) -> None:
    """Raise ``ValueError`` unless the grid, budget and distance range make episodes."""
    if size < 2:
        raise ValueError(f"size must be >= 2, got {size}")
    if budget < 1:
        raise ValueError(f"budget must be >= 1, got {budget}")
    if not 1 <= c_min <= c_max <= 2 * (size - 1):
        raise ValueError(f"need 1 <= c_min <= c_max <= 2 * (size - 1) = {2 * (size - 1)}; got {c_min}..{c_max}")


def default_embeddings(size: int, n_images: int = 4, dim: int = 32, seed: int = 0) -> np.ndarray:
    """(n_images, size, size, dim) seeded random unit vectors: an env for API checks only."""
    x = np.random.default_rng(seed).normal(size=(n_images, size, size, dim))
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def obs_space(dim: int) -> spaces.Dict:
    """``target`` and ``current`` patch embeddings and the ``nav`` vector."""
    box = spaces.Box(-1.0, 1.0, (dim,), np.float32)
    return spaces.Dict({"target": box, "current": box, "nav": spaces.Box(-1.0, 1.0, (NAV_DIM,), np.float32)})


def check_embeddings(embeddings: np.ndarray | None, size: int) -> np.ndarray:
    """``embeddings`` as float32 (images, size, size, D), checked (None: :func:`default_embeddings`)."""
    emb = default_embeddings(size) if embeddings is None else np.asarray(embeddings, np.float32)
    if emb.ndim != 4 or emb.shape[1:3] != (size, size) or len(emb) == 0 or emb.shape[3] == 0:
        raise ValueError(f"embeddings must be (images, {size}, {size}, D) with images, D >= 1; got {emb.shape}")
    if not np.isfinite(emb).all() or np.abs(emb).max() > 1:
        raise ValueError("embeddings must be finite and within [-1, 1] (unit vectors)")
    return emb


class GridCore:
    """The dynamics, reward and observation of ``n_agents`` grid episodes as numpy arrays."""

    def __init__(
        self,
        embeddings: np.ndarray,
        n_agents: int,
        *,
        size: int,
        budget: int,
        c_min: int,
        c_max: int,
        step_cost: float,
        shaping: float,
        gamma: float,
        success_reward: float,
    ) -> None:
        check_grid(size, budget, c_min, c_max)
        emb = check_embeddings(embeddings, size)
        self.n, self.budget, self.c_min, self.c_max = size, budget, c_min, c_max
        self.step_cost, self.shaping, self.gamma, self.success_reward = step_cost, shaping, gamma, success_reward
        self.embeddings = emb.reshape(len(emb), size * size, emb.shape[3])
        self.n_images, self.dim, self.n_agents = len(emb), int(emb.shape[3]), n_agents
        self.nb = neighbour_table(size)
        self.dist = distances(size)
        self.pairs = {c: pairs_at(size, c) for c in range(c_min, c_max + 1)}
        self.dmax = float(2 * (size - 1))
        zeros = np.zeros(n_agents, np.int64)
        self.image, self.start, self.goal, self.pos = zeros.copy(), zeros.copy(), zeros + 1, zeros.copy()
        self.steps, self.last, self.off_grid = zeros.copy(), zeros - 1, np.zeros(n_agents, bool)
        self.visited = np.zeros((n_agents, size * size), bool)

    def draw(self, rng: np.random.Generator) -> tuple[int, int, int]:
        """An episode of the evaluation's distribution: image, then distance, then a pair at it."""
        image = int(rng.integers(self.n_images))
        pairs = self.pairs[int(rng.integers(self.c_min, self.c_max + 1))]
        s, g = pairs[rng.integers(len(pairs))]
        return image, int(s), int(g)

    def reset_agents(self, idx: np.ndarray, image: np.ndarray, start: np.ndarray, goal: np.ndarray) -> None:
        self.image[idx], self.start[idx], self.goal[idx], self.pos[idx] = image, start, goal, start
        self.steps[idx], self.last[idx], self.off_grid[idx] = 0, -1, False
        self.visited[idx] = False
        self.visited[idx, start] = True

    def step(
        self, actions: np.ndarray, rngs: Sequence[np.random.Generator]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Move every agent; agent i's off-grid move is replaced from ``rngs[i]``. Reward, terminated, truncated."""
        a = np.asarray(actions).reshape(-1)
        if a.shape != (self.n_agents,) or not np.issubdtype(a.dtype, np.integer) or ((a < 0) | (a > 3)).any():
            raise ValueError(
                f"actions must be {self.n_agents} integers in 0..3 (up, down, left, right); got {actions!r}"
            )
        a = a.astype(np.int64)
        nb = self.nb[self.pos]
        rows = np.arange(self.n_agents)
        self.off_grid = nb[rows, a] < 0
        for i in np.flatnonzero(self.off_grid):  # a move off the grid: a uniformly random move that stays on it
            inside = np.flatnonzero(nb[i] >= 0)
            a[i] = inside[rngs[int(i)].integers(len(inside))]
        nxt = nb[rows, a]
        before, after = self.dist[self.pos, self.goal], self.dist[nxt, self.goal]
        self.pos, self.last, self.steps = nxt, a, self.steps + 1
        self.visited[rows, nxt] = True
        terminated = nxt == self.goal
        truncated = ~terminated & (self.steps >= self.budget)
        reward = -self.step_cost + self.shaping * (self.gamma * -after / self.dmax + before / self.dmax)
        return reward + np.where(terminated, self.success_reward, 0.0), terminated, truncated

    def observe(self, idx: np.ndarray | None = None) -> dict[str, np.ndarray]:
        idx = np.arange(self.n_agents) if idx is None else np.asarray(idx)
        pos, image = self.pos[idx], self.image[idx]
        nav = np.zeros((len(idx), NAV_DIM), np.float32)
        nav[:, 0:2] = np.stack(np.divmod(pos, self.n), 1)
        nav[:, 2:4] = np.stack(np.divmod(self.start[idx], self.n), 1)
        nav[:, 0:4] /= float(self.n - 1)
        nav[:, 4] = (self.budget - self.steps[idx]) / self.budget
        nb = self.nb[pos]
        seen = np.take_along_axis(self.visited[idx], np.maximum(nb, 0), 1)
        nav[:, 5:9] = np.where(nb < 0, -1.0, seen.astype(np.float32))
        moved = np.flatnonzero(self.last[idx] >= 0)
        nav[moved, 9 + self.last[idx][moved]] = 1.0
        return {"target": self.embeddings[image, self.goal[idx]], "current": self.embeddings[image, pos], "nav": nav}

    def info(self, i: int) -> dict[str, Any]:
        rc = lambda cell: (int(cell) // self.n, int(cell) % self.n)  # noqa: E731
        return {
            "is_success": bool(self.pos[i] == self.goal[i]),
            "image": int(self.image[i]),
            "start": rc(self.start[i]),
            "goal": rc(self.goal[i]),
            "position": rc(self.pos[i]),
            "distance": int(self.dist[self.pos[i], self.goal[i]]),
            "start_distance": int(self.dist[self.start[i], self.goal[i]]),
            "steps": int(self.steps[i]),
            "off_grid": bool(self.off_grid[i]),
        }


class GridNavEnv(gym.Env[dict[str, np.ndarray], np.int64]):
    metadata = {"render_modes": ["rgb_array"], "render_fps": 4}

    def __init__(
        self,
        embeddings: np.ndarray | None = None,
        *,
        size: int = 5,
        budget: int = 10,
        c_min: int = 4,
        c_max: int = 8,
        step_cost: float = 0.01,
        shaping: float = 1.0,
        gamma: float = 0.98,
        success_reward: float = 1.0,
        render_mode: str | None = None,
    ) -> None:
        if render_mode not in (None, *self.metadata["render_modes"]):
            raise ValueError(f"render_mode must be None or rgb_array, got {render_mode!r}")
        self.core = GridCore(
            check_embeddings(embeddings, size), 1, size=size, budget=budget, c_min=c_min, c_max=c_max,
            step_cost=step_cost, shaping=shaping, gamma=gamma, success_reward=success_reward,
        )  # fmt: skip
        self.render_mode = render_mode
        self.observation_space = obs_space(self.core.dim)  # type: ignore[assignment]
        self.action_space = spaces.Discrete(4)
        self.core.reset_agents(np.array([0]), np.array([0]), np.array([0]), np.array([1]))

    def _cell(self, key: str, value: Any) -> int:
        n = self.core.n
        try:
            rc = np.asarray(value)
        except (TypeError, ValueError):
            rc = np.array([])
        ok = rc.shape == (2,) and np.issubdtype(rc.dtype, np.integer) and bool(((rc >= 0) & (rc < n)).all())
        if not ok:
            raise ValueError(f"options[{key!r}] must be (row, col), integers in 0..{n - 1}; got {value!r}")
        return int(rc[0]) * n + int(rc[1])

    def _episode(self, options: dict[str, Any]) -> tuple[int, int, int]:
        unknown = sorted(set(options) - {"image", "start", "goal"})
        if unknown:
            raise ValueError(f"unknown reset option(s) {', '.join(unknown)}; allowed: image, start, goal")
        if ("start" in options) != ("goal" in options):
            raise ValueError("give both options['start'] and options['goal'], or neither")
        image, start, goal = self.core.draw(self.np_random) if "start" not in options else (0, 0, 0)
        if "image" in options:
            image = options["image"]
            if (
                isinstance(image, bool)
                or not isinstance(image, int | np.integer)
                or not 0 <= image < self.core.n_images
            ):
                raise ValueError(f"options['image'] must be an integer in 0..{self.core.n_images - 1}; got {image!r}")
        elif "start" in options:
            image = int(self.np_random.integers(self.core.n_images))
        if "start" in options:
            start, goal = self._cell("start", options["start"]), self._cell("goal", options["goal"])
            if start == goal:
                raise ValueError("options['start'] and options['goal'] must be different cells")
        return int(image), start, goal

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        super().reset(seed=seed)
        image, start, goal = self._episode(options or {})
        self.core.reset_agents(np.array([0]), np.array([image]), np.array([start]), np.array([goal]))
        return self._obs(), self.core.info(0)

    def _obs(self) -> dict[str, np.ndarray]:
        return {k: v[0] for k, v in self.core.observe().items()}

    def step(self, action: Any) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        a = np.asarray(action)
        if a.size != 1 or not np.issubdtype(a.dtype, np.integer) or not 0 <= int(a.reshape(())) < 4:
            raise ValueError(f"action must be an integer in 0..3 (up, down, left, right); got {action!r}")
        reward, terminated, truncated = self.core.step(a.reshape(1), [self.np_random])
        return self._obs(), float(reward[0]), bool(terminated[0]), bool(truncated[0]), self.core.info(0)

    def render(self) -> np.ndarray | None:
        """``rgb_array``: the grid, 16 px a cell: visited cells grey, the agent blue, the goal green,
        the start outlined in black."""
        if self.render_mode != "rgb_array":
            return None
        k, n, c = 16, self.core.n, self.core
        img = np.full((n * k, n * k, 3), 235, np.uint8)
        paint = [(int(cell), (170, 170, 170)) for cell in np.flatnonzero(c.visited[0])]
        paint += [(int(c.goal[0]), (40, 170, 60)), (int(c.pos[0]), (40, 90, 220))]
        for cell, colour in paint:
            r, col = divmod(cell, n)
            img[r * k + 1 : (r + 1) * k - 1, col * k + 1 : (col + 1) * k - 1] = colour
        r, col = divmod(int(c.start[0]), n)
        box = img[r * k : (r + 1) * k, col * k : (col + 1) * k]
        box[[0, -1], :] = 0
        box[:, [0, -1]] = 0
        return img


class GridNavVecEnv(_OneObjectVecEnv):
    """N grid agents stepped at once with numpy; SB3 ``VecEnv`` semantics (auto-reset,
    ``terminal_observation``, ``TimeLimit.truncated``), equal to N :class:`GridNavEnv` in a ``DummyVecEnv``."""

    def __init__(self, embeddings: np.ndarray, n_envs: int, *, seed: int | None = None, **kw: Any) -> None:
        self.core = GridCore(embeddings, n_envs, **{**GRID_DEFAULTS, **kw})
        self.render_mode = None
        super().__init__(n_envs, obs_space(self.core.dim), spaces.Discrete(4))
        self._rngs = self._make_rngs(seed)
        self._actions = np.zeros(n_envs, np.int64)

    def _make_rngs(self, seed: int | None) -> list[np.random.Generator]:
        if seed is None:
            return [np.random.default_rng() for _ in range(self.num_envs)]
        return [np.random.default_rng(seed + i) for i in range(self.num_envs)]

    def _reset_idx(self, idx: np.ndarray) -> None:
        drawn = np.array([self.core.draw(self._rngs[i]) for i in idx], np.int64).reshape(-1, 3)
        self.core.reset_agents(idx, drawn[:, 0], drawn[:, 1], drawn[:, 2])

    def reset(self) -> VecEnvObs:
        if self._seeds[0] is not None:
            self._rngs = self._make_rngs(self._seeds[0])
        self._reset_seeds()
        self._reset_idx(np.arange(self.num_envs))
        return self.core.observe()

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = np.asarray(actions)

    def step_wait(self) -> VecEnvStepReturn:
        return self._step_result(self.core, *self.core.step(self._actions, self._rngs))


GRID_DEFAULTS: dict[str, Any] = {
    "size": 5, "budget": 10, "c_min": 4, "c_max": 8, "step_cost": 0.01, "shaping": 1.0, "gamma": 0.98,
    "success_reward": 1.0,
}  # fmt: skip
"""The keywords of :class:`GridNavEnv` and their defaults."""
