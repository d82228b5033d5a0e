"""Batched controllers that fly every agent of a :class:`~maprl.vecenv.NavVecEnv` at once.

A controller sees what the agent sees: the observation, its own position and step counter
(``venv.core.pos``, ``venv.core.steps``), the step length and the map (pixels, features or a
:class:`~maprl.memory.MapMemory`). No controller here reads the ground-truth target
position (``venv.core.targets_xy``): each finds the target from pixels or features.

| name                | uses                                   | idea                                   |
|---------------------|----------------------------------------|----------------------------------------|
| ``RandomWalk``      | nothing                                | uniform random actions                 |
| ``Lawnmower``       | own position                           | boustrophedon sweep, image-blind       |
| ``GreedyHillClimb`` | feature cache around the agent         | move to the best of 16 probes          |
| ``RetrieveThenFly`` | map memory (whole-map features)        | nearest neighbour, then fly straight   |
| ``... search=True`` | map memory, visited flags              | visit the candidates in rank order     |
| ``TemplateOracle``  | whole-map pixels                       | NCC template matching, then fly        |

The episode ends through the env's own stop rule, exactly as for the agent.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import numpy as np

from maprl.features.matching import NCC, block_mean, local_ncc
from maprl.features.memory import MapMemory
from maprl.nav.actions import fly_action

if TYPE_CHECKING:
    from maprl.nav.scene import Scene
    from maprl.nav.vecenv import NavVecEnv


class Controller(Protocol):
    """Chooses actions for every agent of a vector env."""

    def reset(self, venv: NavVecEnv) -> None:
        """Called once after ``venv.reset()``."""
        ...

    def act(self, obs: dict[str, np.ndarray], venv: NavVecEnv) -> np.ndarray:
        """(N, 2) actions in [-1, 1] for the observation ``obs``."""
        ...


ControllerFactory = Callable[[], Controller]


# -- image-blind -------------------------------------------------------------------------------
class RandomWalk:
    """Uniform random actions."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng

    def reset(self, venv: NavVecEnv) -> None:
        return None

    def act(self, obs: dict[str, np.ndarray], venv: NavVecEnv) -> np.ndarray:
        return self.rng.uniform(-1.0, 1.0, (venv.num_envs, 2)).astype(np.float32)


def _sweep_rows(y0: float, lo: float, hi: float, gap: float) -> list[float]:
    """Row heights from ``y0`` towards the nearer edge, then the other side; ``gap`` apart."""
    near, far = (hi, lo) if hi - y0 <= y0 - lo else (lo, hi)

    def towards(edge: float, first: float) -> list[float]:
        sign = 1.0 if edge >= y0 else -1.0
        ys = list(np.arange(first, edge + sign * 1e-9, sign * gap)) if sign * (edge - first) >= 0 else []
        if not ys or abs(edge - ys[-1]) > gap / 2:
            ys.append(edge)
        return [float(y) for y in ys]

    sign_far = 1.0 if far >= y0 else -1.0
    rest = towards(far, y0 + sign_far * gap) if abs(far - y0) > gap / 2 else []
    return towards(near, y0) + rest


def lawnmower_plan(scene: Scene, start: np.ndarray, gap: float | None = None) -> np.ndarray:
    """Waypoints (K, 2) of a boustrophedon sweep from ``start``: rows ``gap`` (a view) apart.

    The first row is the start's: the agent flies to its nearer end, then sweeps to the
    other end, steps one row towards the nearer map edge and sweeps back; after that edge
    it covers the rows on the other side of the start.
    """
    gap = float(gap or scene.view_size)
    x0, y0 = float(start[0]), float(start[1])
    ends = (scene.lo, scene.hi_x) if x0 - scene.lo <= scene.hi_x - x0 else (scene.hi_x, scene.lo)
    pts: list[tuple[float, float]] = []
    for k, y in enumerate(_sweep_rows(y0, scene.lo, scene.hi_y, gap)):
        a, b = ends if k % 2 == 0 else ends[::-1]
        pts += [(a, y), (b, y)]
    return np.array(pts, float)


class Lawnmower:
    """Image-blind coverage sweep at full step (the env's stop rule still ends an episode)."""

    def __init__(self, gap: float | None = None) -> None:
        self.gap = gap
        self.plans: list[np.ndarray] = []
        self.idx = np.zeros(0, np.int64)
        self.last = np.zeros((0, 2))

    def reset(self, venv: NavVecEnv) -> None:
        n = venv.num_envs
        self.plans = [np.zeros((0, 2)) for _ in range(n)]
        self.idx = np.zeros(n, np.int64)
        self.last = np.full((n, 2), np.nan)

    def _replan(self, venv: NavVecEnv, i: int) -> None:
        self.plans[i] = lawnmower_plan(venv.scene, venv.core.pos[i], self.gap)
        self.idx[i] = 0

    def _goal(self, venv: NavVecEnv, i: int, stuck: bool) -> np.ndarray:
        pos = venv.core.pos[i]
        if stuck:  # blocked by nodata: give up this waypoint
            self.idx[i] += 1
        for _ in range(2):
            plan = self.plans[i]
            while self.idx[i] < len(plan) and np.hypot(*(plan[self.idx[i]] - pos)) < 1e-6:
                self.idx[i] += 1
            if self.idx[i] < len(plan):
                return plan[self.idx[i]]
            self._replan(venv, i)  # sweep done: start another from here
        return pos

    def act(self, obs: dict[str, np.ndarray], venv: NavVecEnv) -> np.ndarray:
        if len(self.plans) != venv.num_envs:
            self.reset(venv)
        pos = venv.core.pos
        stuck = np.all(np.abs(pos - self.last) < 1e-9, axis=1)
        goals = np.empty_like(pos)
        for i in range(venv.num_envs):
            if venv.core.steps[i] == 0:
                self._replan(venv, i)
                stuck[i] = False
            goals[i] = self._goal(venv, i, bool(stuck[i]))
        self.last = pos.copy()
        return fly_action(pos, goals, venv.core.step_px)


# -- local feature search ------------------------------------------------------------------------
_DIRECTIONS = np.array([(dx, dy) for dx in (-1.0, 0.0, 1.0) for dy in (-1.0, 0.0, 1.0) if dx or dy])


class GreedyHillClimb:
    """Probe 8 directions at full and half step; take the best if it beats the current view.

    With no improving probe (a plateau, or far from the target where similarity says
    nothing) it makes a uniform random move.
    """

    def __init__(self, rng: np.random.Generator, scales: tuple[float, ...] = (1.0, 0.5)) -> None:
        self.rng = rng
        self.moves = np.concatenate([_DIRECTIONS * s for s in scales])

    def reset(self, venv: NavVecEnv) -> None:
        return None

    def act(self, obs: dict[str, np.ndarray], venv: NavVecEnv) -> np.ndarray:
        target = obs["target"]
        current = np.sum(obs["current"] * target, axis=1)
        best, sim = venv.scene.best_probe(
            venv.core.pos, self.moves * venv.core.step_px, venv.scene.embedding_sims(target)
        )
        better = sim > current + 1e-6
        random = self.rng.uniform(-1.0, 1.0, (venv.num_envs, 2))
        return np.where(better[:, None], self.moves[best], random).astype(np.float32)


# -- whole-map lookup, then fly ------------------------------------------------------------------
class RetrieveThenFly:
    """Fly straight to the top nearest neighbour of the target embedding in the map memory.

    It reads the episode's candidate list from the env (``NavCore.ep_cands``), so under the
    decoy stress test it sees exactly what the agent sees. With ``search`` it is the scripted
    search: it visits the candidates in rank order until its own stop rule fires, and after
    the last returns to the candidate whose view was most similar to the target. It visits a
    candidate by flying onto it (within ``ARRIVED_PX``), not by passing within the visited
    flags' half success radius: a pixel-verified similarity (``agent.retriever: orientation``)
    peaks only on the place, and the ``candidates`` actions land there too.
    """

    ARRIVED_PX = 0.5

    def __init__(self, search: bool = False) -> None:
        self.search = search
        self.goal = np.zeros(0, np.int64)  # each agent's candidate now flown to
        self.landed = np.zeros((0, 0), bool)  # (n, k): the candidates each agent has flown onto this episode

    def reset(self, venv: NavVecEnv) -> None:
        if not venv.cfg.retrieval:
            raise ValueError("retrieve-then-fly needs an env with memory: retrieval")
        self.goal = np.zeros(venv.core.n, np.int64)
        self.landed = np.zeros(venv.core.visited.shape, bool)

    def act(self, obs: dict[str, np.ndarray], venv: NavVecEnv) -> np.ndarray:
        core, rows = venv.core, np.arange(venv.core.n)
        if self.search:
            fresh = core.steps == 0
            self.goal[fresh], self.landed[fresh] = 0, False
            on = np.hypot(*(core.ep_cands[rows, self.goal] - core.pos).T) <= self.ARRIVED_PX
            self.landed[rows[on], self.goal[on]] = True
            after = np.where(self.landed.all(axis=1), core.cand_seen.argmax(axis=1), (~self.landed).argmax(axis=1))
            self.goal = np.where(on, after, self.goal)
        return fly_action(core.pos, core.ep_cands[rows, self.goal], core.step_px)


class TemplateMatcher:
    """Full-map template matching by NCC: coarse FFT search, then a full-resolution refine.

    The map (grey) is block-averaged by ``factor`` (default: 4 for views of 64 px and more);
    up to ``n_peaks`` separated coarse peaks among valid centres, scoring within ``margin`` of
    the best, are each refined at full resolution within ``factor + 2`` px, and the best
    refined NCC wins.
    """

    def __init__(self, scene: Scene, factor: int | None = None, n_peaks: int = 3, margin: float = 0.15) -> None:
        v = scene.view_size
        self.scene, self.v, self.n_peaks, self.margin = scene, v, n_peaks, margin
        self.factor = int(factor or max(1, min(4, v // 16)))
        self.grey = scene.map.rgb.astype(np.float64).mean(axis=2)
        self.vc = max(2, v // self.factor)
        self.coarse = NCC(block_mean(self.grey, self.factor), self.vc)
        self.ok = self._coarse_valid(scene)

    def _coarse_valid(self, scene: Scene) -> np.ndarray:
        f, half = self.factor, self.v // 2
        h, w = self.coarse.var.shape
        ys = np.clip(np.arange(h) * f + half, 0, scene.ok.shape[0] - 1)
        xs = np.clip(np.arange(w) * f + half, 0, scene.ok.shape[1] - 1)
        return np.asarray(scene.ok[np.ix_(ys, xs)])

    def _peaks(self, s: np.ndarray) -> list[tuple[int, int]]:
        """Up to ``n_peaks`` separated coarse peaks scoring within ``margin`` of the best."""
        s = np.where(self.ok, s, -np.inf)
        out: list[tuple[int, int]] = []
        r = max(1, self.vc // 2)
        top = -np.inf
        for _ in range(self.n_peaks):
            i, j = np.unravel_index(int(np.argmax(s)), s.shape)
            if not np.isfinite(s[i, j]) or s[i, j] < top - self.margin:
                break
            top = max(top, float(s[i, j]))
            out.append((int(i), int(j)))
            s[max(0, i - r) : i + r + 1, max(0, j - r) : j + r + 1] = -np.inf
        return out

    def locate(self, photo: np.ndarray) -> tuple[float, float, float]:
        """(x, y, ncc) of the view centre that best matches ``photo`` (V, V, 3)."""
        t = photo.astype(np.float64).mean(axis=2)
        tc = block_mean(t, self.factor)[: self.vc, : self.vc]
        best = (-np.inf, 0, 0)
        for i, j in self._peaks(self.coarse.scores(tc)):
            cand = local_ncc(self.grey, t, i * self.factor, j * self.factor, self.factor + 2)
            if cand[0] > best[0]:
                best = cand
        score, top, left = best
        return float(left + self.v // 2), float(top + self.v // 2), float(score)


class TemplateOracle:
    """Ceiling: find the target photo in the whole map's pixels by NCC (once per target), then fly straight."""

    def __init__(self, matcher: TemplateMatcher) -> None:
        self.matcher = matcher
        self.goals: dict[int, np.ndarray] = {}
        self.scores: dict[int, float] = {}

    def reset(self, venv: NavVecEnv) -> None:
        return None

    def act(self, obs: dict[str, np.ndarray], venv: NavVecEnv) -> np.ndarray:
        rows = venv.core.rows
        missing = np.array(sorted({int(r) for r in rows} - self.goals.keys()), np.int64)
        if len(missing):
            self.goals.update(zip(missing.tolist(), self.locate(venv, missing), strict=True))
        goals = np.stack([self.goals[int(r)] for r in rows])
        return fly_action(venv.core.pos, goals, venv.core.step_px)

    def locate(self, venv: NavVecEnv, rows: np.ndarray) -> np.ndarray:
        """(len(rows), 2) NCC estimates of the target positions of ``rows``."""
        out = np.empty((len(rows), 2))
        for k, row in enumerate(rows):
            x, y, score = self.matcher.locate(venv.scene.target_photo(int(row)))
            out[k] = (x, y)
            self.scores[int(row)] = score
        return out


def default_baselines(scene: Scene, memory: MapMemory | None, seed: int) -> dict[str, ControllerFactory]:
    """The standard baselines, each seeded from ``seed`` (a fresh generator per run)."""
    cache: dict[str, TemplateMatcher] = {}

    def oracle() -> Controller:
        if "m" not in cache:
            cache["m"] = TemplateMatcher(scene)
        return TemplateOracle(cache["m"])

    seeds = np.random.SeedSequence(seed).spawn(2)
    methods: dict[str, ControllerFactory] = {
        "random_walk": lambda: RandomWalk(np.random.default_rng(seeds[0])),
        "lawnmower": Lawnmower,
        "greedy": lambda: GreedyHillClimb(np.random.default_rng(seeds[1])),
    }
    if memory is not None:
        methods["retrieve_then_fly"] = RetrieveThenFly
        methods["retrieve_then_search"] = lambda: RetrieveThenFly(search=True)
    methods["template_oracle"] = oracle
    return methods
