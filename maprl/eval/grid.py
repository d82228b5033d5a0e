"""The grid protocol's fixed episodes and its no-learning baselines, exact where it can be.

Episodes (:func:`grid_episodes`): per image and distance ``C``, ``per`` (start, goal) pairs drawn
uniformly among the ordered pairs of cells at Manhattan distance ``C`` (:func:`draw_pairs`).

Baselines, none of which looks at an image:

* **random walk** (:func:`random_walk_success`): each move uniform among the in-grid neighbours
  (the env's off-grid convention makes a uniformly random policy exactly this walk). Its success
  probability for every (start, goal) is computed exactly by dynamic programming with the goal
  absorbing; on 5x5 with budget 10 it is 0.145, 0.074, 0.054, 0.022, 0.018 for C = 4..8.
* **self-avoiding random walk** (:func:`self_avoiding_success`): each move uniform among the
  in-grid neighbours not visited yet; when every neighbour has been visited (stuck), uniform
  among all in-grid neighbours, as the plain walk. Exact by enumerating every walk and its
  probability while that stays under ``max_states`` walks alive at once; otherwise Monte Carlo
  with a seeded generator (:func:`self_avoiding_success_mc`); the result says which.
* **best blind route** (:func:`best_blind_routes`): for each start cell, the fixed self-avoiding
  route of at most ``budget`` moves that covers the largest share of the evaluation's goals: a goal
  ``g`` at distance ``C`` from the start weighs ``1 / (n_C * K_C)`` (``n_C`` distances, ``K_C`` pairs at
  distance ``C``), so the weight a route covers is its contribution to the average success over
  ``C``, and the best routes maximise that average. Exhaustive (every self-avoiding route) while
  the number of partial routes stays under ``max_nodes``; beyond, a beam search keeping the
  ``max_nodes`` best partial routes (a lower bound on the best route; the result says which).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from maprl.nav.grid import check_grid, distances, neighbour_table, pairs_at

BITS = 64


# -- episodes ------------------------------------------------------------------------------
def draw_pairs(n: int, c: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """(k, 2) (start, goal) cells at distance ``c``, uniform over the ordered pairs at that distance.

    Without replacement while there are at least ``k`` pairs; with fewer (on 5x5, C = 8 has 4),
    every pair ``k // K`` times and ``k % K`` of them, drawn without replacement, once more: each
    pair's expected count is ``k / K`` either way.
    """
    pairs = pairs_at(n, c)
    if len(pairs) == 0:
        raise ValueError(f"no pair of cells lies {c} apart on a {n}x{n} grid")
    reps, rest = divmod(k, len(pairs))
    idx = np.concatenate([np.tile(np.arange(len(pairs)), reps), rng.permutation(len(pairs))[:rest]])
    return pairs[idx]


def grid_episodes(
    images: Sequence[int], n: int, c_min: int, c_max: int, per: int, rng: np.random.Generator
) -> pd.DataFrame:
    """The fixed episodes: for each image and distance, ``per`` pairs (:func:`draw_pairs`)."""
    rows = []
    for image in images:
        for c in range(c_min, c_max + 1):
            for s, g in draw_pairs(n, c, per, rng):
                rows.append((int(image), c, int(s), int(g)))
    df = pd.DataFrame(rows, columns=["image", "c", "start", "goal"])
    df.insert(0, "episode", np.arange(len(df)))
    return df


def by_distance(values: np.ndarray, c: np.ndarray, c_min: int, c_max: int) -> dict[str, float]:
    """Mean of ``values`` per distance (keys ``"4"``, ...) and ``"average"``, the mean over distances."""
    out = {str(k): float(np.mean(values[c == k])) for k in range(c_min, c_max + 1)}
    out["average"] = float(np.mean(list(out.values())))
    return out


def expected_by_distance(prob: np.ndarray, n: int, c_min: int, c_max: int) -> dict[str, float]:
    """From (cells, cells) success probabilities: the expectation over *all* pairs at each distance
    (uniform over the pairs, as the episodes are drawn) and their average."""
    d = distances(n)
    out = {str(k): float(prob[d == k].mean()) for k in range(c_min, c_max + 1)}
    out["average"] = float(np.mean(list(out.values())))
    return out


def directional_signal(embeddings: np.ndarray, n: int) -> float:
    """How much the patches say about the way to the goal: over every image, cell ``s`` and goal ``g``
    at least 2 apart, and every pair of in-grid neighbours of ``s`` one closer to ``g`` and one
    farther, the share where the closer neighbour's patch is the more similar to the goal patch
    (cosine of the embeddings). 0.5: no signal in the similarities; 1: following them finds the goal."""
    d, nb = distances(n), neighbour_table(n)
    rows = []
    for a in range(4):
        for b in range(4):
            s, g = np.nonzero(d >= 2)
            t, u = nb[s, a], nb[s, b]
            ok = (t >= 0) & (u >= 0)
            s, g, t, u = s[ok], g[ok], t[ok], u[ok]
            ok = (d[t, g] < d[s, g]) & (d[u, g] > d[s, g])
            rows.append(np.stack([t[ok], u[ok], g[ok]], 1))
    t, u, g = np.concatenate(rows).T
    emb = embeddings.reshape(len(embeddings), n * n, -1).astype(np.float64)
    wins = [((e[t] * e[g]).sum(1) > (e[u] * e[g]).sum(1)).mean() for e in emb]
    return float(np.mean(wins))


# -- random walk ---------------------------------------------------------------------------
def transition_matrix(n: int) -> np.ndarray:
    """(cells, cells) one move of the random walk: uniform over the in-grid neighbours."""
    nb = neighbour_table(n)
    p = np.zeros((n * n, n * n))
    for s in range(n * n):
        inside = nb[s][nb[s] >= 0]
        p[s, inside] = 1.0 / len(inside)
    return p


def random_walk_success(n: int, budget: int) -> np.ndarray:
    """(cells, cells) exact probability that the random walk from ``s`` reaches ``g`` within ``budget``
    moves: ``h_0 = 1[s = g]``, ``h_t(s) = 1`` at the goal, else ``sum_s' P(s, s') h_{t-1}(s')``."""
    p = transition_matrix(n)
    h = np.eye(n * n)
    for _ in range(budget):
        h = p @ h
        np.fill_diagonal(h, 1.0)
    return h


# -- bitsets of visited cells --------------------------------------------------------------
def _words(n: int) -> int:
    return -(-(n * n) // BITS)


def _has(vis: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """(M,) whether cell ``cells[i]`` is set in bitset row ``vis[i]`` (M, words) uint64."""
    word = vis[np.arange(len(cells)), cells // BITS]
    return ((word >> (cells % BITS).astype(np.uint64)) & np.uint64(1)).astype(bool)


def _with(vis: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """A copy of ``vis`` with cell ``cells[i]`` set in row ``i``."""
    out = vis.copy()
    out[np.arange(len(cells)), cells // BITS] |= np.uint64(1) << (cells % BITS).astype(np.uint64)
    return out


def _start_bitsets(n: int, start: int, m: int = 1) -> np.ndarray:
    return _with(np.zeros((m, _words(n)), np.uint64), np.full(m, start, np.int64))


# -- self-avoiding random walk -------------------------------------------------------------
def _saw_choices(nb: np.ndarray, vis: np.ndarray) -> np.ndarray:
    """(M, 4) the moves a self-avoiding walk may take: unvisited in-grid neighbours, or if none
    (stuck) every in-grid neighbour."""
    inside = nb >= 0
    seen = np.stack([_has(vis, np.maximum(nb[:, a], 0)) for a in range(4)], 1)
    fresh = inside & ~seen
    return np.where(fresh.any(1, keepdims=True), fresh, inside)


def _saw_exact_from(n: int, budget: int, start: int, table: np.ndarray, max_states: int) -> np.ndarray | None:
    """(cells,) exact P(the walk from ``start`` visits each cell within ``budget``), or None past the cap."""
    hit = np.zeros(n * n)
    hit[start] = 1.0
    pos, vis, prob = np.array([start]), _start_bitsets(n, start), np.ones(1)
    for _ in range(budget):
        nb = table[pos]
        choice = _saw_choices(nb, vis)
        rows, moves = np.nonzero(choice)
        if len(rows) > max_states:
            return None
        new = nb[rows, moves]
        prob = prob[rows] / choice.sum(1)[rows]
        first = ~_has(vis[rows], new)
        hit += np.bincount(new[first], weights=prob[first], minlength=n * n)
        pos, vis = new, _with(vis[rows], new)
    return hit


def self_avoiding_success(n: int, budget: int, max_states: int = 2_000_000) -> np.ndarray | None:
    """(cells, cells) exact P(the self-avoiding random walk from ``s`` reaches ``g`` within ``budget``),
    by enumerating every walk with its probability; None if more than ``max_states`` walks would be
    alive at once (use :func:`self_avoiding_success_mc`)."""
    table = neighbour_table(n)
    out = np.zeros((n * n, n * n))
    for s in range(n * n):
        row = _saw_exact_from(n, budget, s, table, max_states)
        if row is None:
            return None
        out[s] = row
    return out


def self_avoiding_success_mc(n: int, budget: int, rollouts: int, rng: np.random.Generator) -> np.ndarray:
    """(cells, cells) Monte Carlo estimate of :func:`self_avoiding_success`: ``rollouts`` walks per start."""
    table = neighbour_table(n)
    out = np.zeros((n * n, n * n))
    for s in range(n * n):
        pos, vis = np.full(rollouts, s, np.int64), _start_bitsets(n, s, rollouts)
        for _ in range(budget):
            choice = _saw_choices(table[pos], vis)
            u = rng.random(rollouts) * choice.sum(1)
            move = np.argmax(np.cumsum(choice, 1) > u[:, None], axis=1)
            pos = table[pos, move]
            vis = _with(vis, pos)
        out[s] = [_has(vis, np.full(rollouts, g)).mean() for g in range(n * n)]
    return out


# -- best image-blind route ----------------------------------------------------------------
def goal_weights(n: int, c_min: int, c_max: int) -> np.ndarray:
    """(cells, cells) weight of goal ``g`` for start ``s``: ``1 / (n_C * K_C)`` at distance ``C`` in range, else 0.

    The average over ``C`` of the success rate over all pairs at ``C`` is the sum of the weights
    of the (start, goal) pairs that succeed."""
    d = distances(n)
    w = np.zeros(d.shape)
    n_c = c_max - c_min + 1
    for c in range(c_min, c_max + 1):
        w[d == c] = 1.0 / (n_c * int((d == c).sum()))
    return w


@dataclass
class BlindRoutes:
    """The best fixed route from every start cell."""

    routes: list[np.ndarray]  # per start: the cells visited, the start first
    covers: np.ndarray  # (cells, cells) bool: the route from s passes through g
    exhaustive: bool  # False: a beam search of width max_nodes found them (a lower bound)

    @property
    def method(self) -> str:
        return "exhaustive" if self.exhaustive else "beam search (a lower bound on the best route)"


def _best_route_from(
    n: int, budget: int, start: int, w: np.ndarray, table: np.ndarray, max_nodes: int
) -> tuple[np.ndarray, bool]:
    """Every self-avoiding route of at most ``budget`` moves from ``start`` (or the best ``max_nodes``
    partial routes per length); the first route of the highest covered weight, and whether the search
    was exhaustive."""
    w = w[start]
    pos, vis, score = np.array([start]), _start_bitsets(n, start), np.array([w[start]])
    levels: list[tuple[np.ndarray, np.ndarray]] = [(np.array([-1]), np.array([start]))]  # (parent, cell)
    best, best_at, exhaustive = score[0], (0, 0), True
    for t in range(1, budget + 1):
        nb = table[pos]
        ok = nb >= 0
        ok &= ~np.stack([_has(vis, np.maximum(nb[:, a], 0)) for a in range(4)], 1)
        parent, moves = np.nonzero(ok)
        if len(parent) == 0:
            break
        new = nb[parent, moves]
        pos, vis, score = new, _with(vis[parent], new), score[parent] + w[new]
        if len(pos) > max_nodes:  # beam: the best partial routes (stable: ties keep enumeration order)
            keep = np.sort(np.argsort(-score, kind="stable")[:max_nodes])
            parent, pos, vis, score, exhaustive = parent[keep], pos[keep], vis[keep], score[keep], False
        levels.append((parent, pos))
        i = int(np.argmax(score))
        if score[i] > best:
            best, best_at = score[i], (t, i)
    t, i = best_at
    route = []
    while t >= 0:
        parent, cells = levels[t]
        route.append(int(cells[i]))
        i, t = int(parent[i]), t - 1
    return np.array(route[::-1], np.int64), exhaustive


def best_blind_routes(n: int, budget: int, c_min: int, c_max: int, max_nodes: int = 2_000_000) -> BlindRoutes:
    """For each start, the self-avoiding route of at most ``budget`` moves covering the most goal weight
    (:func:`goal_weights`)."""
    check_grid(n, budget, c_min, c_max)
    w, table = goal_weights(n, c_min, c_max), neighbour_table(n)
    routes, exhaustive = [], True
    covers = np.zeros((n * n, n * n), bool)
    for s in range(n * n):
        route, done = _best_route_from(n, budget, s, w, table, max_nodes)
        routes.append(route)
        covers[s, route] = True
        exhaustive &= done
    return BlindRoutes(routes, covers, exhaustive)


def route_moves(route: np.ndarray, n: int) -> np.ndarray:
    """The actions (0 up, 1 down, 2 left, 3 right) that walk ``route``."""
    table = neighbour_table(n)
    return np.array([int(np.flatnonzero(table[a] == b)[0]) for a, b in itertools.pairwise(route)])
