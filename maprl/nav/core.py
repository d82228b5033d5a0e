"""Batched navigation dynamics shared by the Gymnasium env and the SB3 vector env.

``NavCore`` holds N agents on one :class:`~maprl.scene.Scene` as numpy arrays. Moving,
similarity, reward, termination and the feature observation are computed here once, so
the single env and the vector env cannot drift apart.

Feature observation (``obs_features``):

| key     | shape | content                                                              |
|---------|-------|----------------------------------------------------------------------|
| target  | (D,)  | embedding of the target view                                         |
| current | (D,)  | embedding of the current view (a cache lookup)                       |
| nav     | (M,)  | position in [-1, 1], previous move, current similarity, and with     |
|         |       | ``memory=retrieval`` for each of k candidates: its position, its     |
|         |       | offset from the agent (map units and steps), its similarity, whether |
|         |       | the agent has visited it this episode; then the margin between the   |
|         |       | best two candidates. Then, if asked: the own similarity of the last  |
|         |       | ``agent.sim_history`` steps (newest first), and per candidate the    |
|         |       | similarity of the current view to the map's view at the candidate    |
|         |       | (``agent.candidate_view_sim``: "am I there, and does it match?"),    |
|         |       | and per candidate the best own similarity seen there this episode,   |
|         |       | -1 before a visit (``agent.candidate_seen_sim``: "where was best?"); |
|         |       | with ``env.stop_action``, last, the share of the step budget left    |

With ``agent.portable`` the observation is ``nav`` alone and every similarity in it is given
relative to the map's calibrated stop threshold (``sim - stop_threshold``), so that a policy
trained on one map reads another map's evidence on the same scale.

Pixel candidates (``agent.retriever: orientation``, a map memory with a matcher): the candidates'
similarities are the matcher's NCC, and the **own similarity is verified in pixels too**: the
orientation NCC of the current view with the photo (at the heading of the photo's best match)
minus the best NCC the matcher found for that photo anywhere on the map. It is 0 at the best
match and negative elsewhere, and the own stop rule fires within ``PIXEL_STOP_MARGIN`` of 0:
"this view matches the photo as well as any place on the map". The encoder's cosine cannot
confirm a photo of another date; this can, on any map, with no calibration (README "Candidates
from the photo's pixels"). ``candidate_view_sim`` (map view against map view) stays the
encoder's, relative to the encoder's threshold.

Actions and STOP: see :mod:`maprl.nav.actions`. With ``env.stop_action`` the episode ends when
the agent stops, and ``is_success`` needs the stop to be inside the success radius. With candidate
actions and ``env.stop_at_best``, STOP is refused where a candidate visited this episode matched
the photo better than the current view does (and the agent is not at it): the step flies back
to that candidate instead, where a STOP is then taken; and "move on" with every candidate
visited, at the best-matching one, has nowhere left to go: it ends the search there, as STOP.
A policy cannot end an episode at a place it has itself seen beaten, nor circle at the best one
until its budget runs out (README "An agent that searches and stops").

Decoys (``decoy_rate``): a stress test of the map memory. In that share of episodes the top
retrieval candidate is replaced by a *decoy*, a place at least ``DECOY_DISTANCE_RADII``
success radii from the target that is shown with the top candidate's similarity; the true
candidates move down one rank. Flying to the top candidate then finds a view that does not
match, and only a policy that searches the other candidates recovers. The visited flags
(within half a success radius of a candidate, once in the episode) are the short memory of
where the agent has been that such a search needs.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from maprl.config import AgentParams, EnvParams
from maprl.features.matching import Reference
from maprl.features.memory import MapMemory
from maprl.nav.actions import COMPASS, REFINE_STEP, action_space, as_actions, fly_action
from maprl.nav.reward import reward as step_reward
from maprl.nav.reward import stop_reward
from maprl.nav.scene import ProbeSims, Scene


@dataclass(frozen=True)
class NavConfig:
    """Dynamics, reward and observation: ``env`` and ``agent`` as in params.yaml, plus what a stage sets.

    ``stop_threshold`` is the own-similarity stop rule (calibrated by the encode stage; the
    Gymnasium env's default 0.98 is the original design's ``success_threshold``). ``max_steps``
    None leaves truncation to a ``TimeLimit`` wrapper. ``gamma`` is the learner's discount, used
    by the potential-based ``shaping`` (see :mod:`maprl.nav.reward`).
    """

    env: EnvParams = field(default_factory=EnvParams)
    agent: AgentParams = field(default_factory=lambda: AgentParams(memory="none"))
    stop_threshold: float = 0.98
    success_radius: float = 56.0  # ground-truth success radius, pixels
    max_steps: int | None = 1000
    shaping: float = 0.0
    gamma: float = 0.99
    decoy_rate: float = 0.0  # share of episodes whose top retrieval candidate is a decoy
    action_scale: float = 1.0  # dynamics perturbation: the world moves action_scale x the commanded step
    action_noise: float = 0.0  # dynamics perturbation: Gaussian noise (sigma, in action units) on each move

    def __post_init__(self) -> None:
        checks = {
            "stop_threshold": -1.0 <= self.stop_threshold <= 1.0,
            "success_radius": 0.0 < self.success_radius < math.inf,
            "max_steps": self.max_steps is None or self.max_steps >= 1,
            "shaping": 0.0 <= self.shaping < math.inf,
            "gamma": 0.0 < self.gamma <= 1.0,
            "decoy_rate": 0.0 <= self.decoy_rate <= 1.0,
            "action_scale": 0.0 < self.action_scale <= 10.0,
            "action_noise": 0.0 <= self.action_noise <= 10.0,
        }  # written so that NaN fails each of them
        if self.env.actions == "candidates" and not self.retrieval:
            raise ValueError(
                "NavConfig: env.actions candidates needs agent.memory retrieval (the candidates come from it)"
            )
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            shown = ", ".join(f"{k}={getattr(self, k)!r}" for k in bad)
            raise ValueError(
                f"NavConfig: {shown} out of range (stop_threshold in [-1, 1], success_radius > 0, max_steps >= 1 "
                "or None, shaping >= 0, gamma in (0, 1], decoy_rate in [0, 1], action_scale in (0, 10], "
                "action_noise in [0, 10])"
            )

    @classmethod
    def of(cls, **kw: Any) -> NavConfig:
        """Build from flat keywords: ``env`` and ``agent`` fields by name, the rest as they are.

        ``NavConfig.of(action_step=0.1, memory="retrieval", max_steps=40)``; an unknown key is an error.
        """
        env = {k: kw.pop(k) for k in list(kw) if k in EnvParams.model_fields}
        agent = {k: kw.pop(k) for k in list(kw) if k in AgentParams.model_fields}
        return cls(env=EnvParams(**env), agent=AgentParams(**{"memory": "none", **agent}), **kw)

    @property
    def retrieval(self) -> bool:
        return self.agent.memory == "retrieval"

    def nav_dim(self) -> int:
        """Length of the ``nav`` observation (0 when the policy sees the two views only)."""
        a = self.agent
        if not a.nav:
            return 0
        base = 2 * a.include_position + 2 * a.include_prev_action + 1 + a.sim_history + self.env.stop_action
        if not self.retrieval:
            return base
        return base + 8 * a.n_candidates + 1 + a.n_candidates * (a.candidate_view_sim + a.candidate_seen_sim)

    def action_space(self) -> Any:
        """The Gymnasium action space of ``env.actions`` / ``env.stop_action``."""
        return action_space(self.env.actions, self.env.stop_action, self.agent.n_candidates)

    @property
    def decoys(self) -> bool:
        """Whether episodes draw decoys (only the map memory has candidates to corrupt)."""
        return self.retrieval and self.decoy_rate > 0


PIXEL_STOP_MARGIN = 0.02
"""With pixel candidates, the own stop rule fires at an NCC within this of the photo's best NCC on the map."""
DECOY_DISTANCE_RADII = 4.0  # a decoy lies at least this many success radii from the target
VISIT_RADII = 0.5  # an agent within this many success radii of a candidate is at it (the visited flags)


def draw_decoy(
    scene: Scene, cfg: NavConfig, target_xy: np.ndarray, rng: np.random.Generator, share: float = 1.0
) -> np.ndarray:
    """One episode's decoy position, or NaNs for none (draws nothing unless ``cfg.decoys``); a curriculum
    lowers the decoy rate to ``share`` of ``cfg.decoy_rate``."""
    if not cfg.decoys or rng.random() >= share * cfg.decoy_rate:
        return np.full(2, np.nan)
    return np.array(scene.sample_far(rng, target_xy, DECOY_DISTANCE_RADII * cfg.success_radius), float)


class NavCore:
    STATE = (
        "ep_cands", "cand_embs", "cand_seen", "visited", "pos", "rows", "steps", "prev_action", "path_len",
        "start_dist", "sim", "sim_hist", "cur_emb", "stopped",
    )  # fmt: skip
    """The per-agent arrays that make up the agents' state (what a checkpoint saves)."""

    def __init__(self, scene: Scene, n: int, cfg: NavConfig, memory: MapMemory | None = None) -> None:
        if cfg.retrieval and memory is None:
            raise ValueError("memory: retrieval needs a MapMemory")
        self.scene, self.n, self.cfg = scene, n, cfg
        self.step_px = cfg.env.action_step * scene.step_scale
        self.action_space = cfg.action_space()
        self.target_embs = scene.target_embeddings()
        self.targets_xy = scene.targets_xy
        k = cfg.agent.n_candidates
        self.memory = memory if cfg.retrieval else None
        self.matcher = self.memory.matcher if self.memory is not None else None
        self.pixels = self.matcher is not None
        self.view_threshold = cfg.stop_threshold  # the encoder's: candidate_view_sim compares map views
        if self.pixels:  # candidates from photo pixels: searched for a row when it first starts
            self.cands = np.zeros((len(self.targets_xy), k, 2))
            self.cand_sims = np.zeros((len(self.targets_xy), k), np.float32)
            self.matched = np.zeros(len(self.targets_xy), bool)
            self.refs: list[Reference] = [Reference(np.zeros((2, 1, 1)), 0.0)] * n  # each agent's photo, verified
            self.ref_rows = np.full(n, -1)  # the target row each agent's reference is of
            cfg = dataclasses.replace(cfg, stop_threshold=-PIXEL_STOP_MARGIN)
            self.cfg = cfg
        elif cfg.retrieval and memory is not None:
            self.cands, self.cand_sims = memory.query(self.target_embs, k)
        self.ep_cands = np.zeros((n, k, 2))  # this episode's candidates (decoy first, if any)
        self.cand_embs = np.zeros((n, k, scene.space.dim), np.float32)  # the map's view at each candidate
        self.cand_seen = np.full((n, k), -np.inf)  # best own similarity seen at each candidate
        self.visited = np.zeros((n, k), bool)
        self.centre = np.array([scene.map.width, scene.map.height], float) / 2
        self.pos = np.zeros((n, 2))
        self.rows = np.zeros(n, np.int64)
        self.steps = np.zeros(n, np.int64)
        self.prev_action = np.zeros((n, 2), np.float32)
        self.path_len = np.zeros(n)
        self.start_dist = np.zeros(n)
        self.sim = np.zeros(n, np.float32)
        self.sim_hist = np.zeros((n, cfg.agent.sim_history), np.float32)  # previous similarities, newest first
        self.cur_emb = np.zeros((n, scene.space.dim), np.float32)
        self.stopped = np.zeros(n, bool)
        self._noise = np.random.default_rng(0)  # dynamics noise (action_noise > 0 only; evaluation)

    # -- state ----------------------------------------------------------------------------
    def distance(self, idx: np.ndarray | slice = slice(None)) -> np.ndarray:
        return np.hypot(*(self.pos[idx] - self.targets_xy[self.rows[idx]]).T)

    def _embed(self, idx: np.ndarray) -> None:
        emb = self.scene.space.embed_at(self.pos[idx, 0], self.pos[idx, 1])
        self.cur_emb[idx] = emb
        if self.pixels:
            self.sim[idx] = self._verify(idx, self.pos[idx])
        else:
            self.sim[idx] = np.sum(emb * self.target_embs[self.rows[idx]], axis=1)

    def _verify(self, idx: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """The pixel own similarity of agents ``idx`` at ``pos`` (len(idx), 2): the view's NCC with the photo
        minus the photo's best NCC on the map (module docstring)."""
        assert self.matcher is not None
        idx = np.asarray(idx)
        rows = self.rows[idx]
        self._match(rows)
        ncc = []
        for i, r, (x, y) in zip(idx.tolist(), rows.tolist(), pos.tolist(), strict=True):
            if self.ref_rows[i] != r:
                self.refs[i] = self.matcher.reference(self.scene.target_photo(r), self.cands.shape[1])
                self.ref_rows[i] = r
            ncc.append(self.matcher.score(self.refs[i], x, y))
        return np.asarray(ncc, np.float32) - self.cand_sims[rows, 0]

    def reset_agents(
        self, idx: np.ndarray, rows: np.ndarray, starts: np.ndarray, decoys: np.ndarray | None = None
    ) -> None:
        """Start agents ``idx`` on target rows ``rows`` from positions ``starts`` (K, 2).

        ``decoys`` (K, 2) replaces the top retrieval candidate of each agent whose row is not NaN.
        """
        x, y = self.scene.clip(starts[:, 0], starts[:, 1])
        self.pos[idx] = np.stack([x, y], 1)
        self.rows[idx] = rows
        self.steps[idx] = 0
        self.prev_action[idx] = 0
        self.path_len[idx] = 0
        self.start_dist[idx] = self.distance(idx)
        self.stopped[idx] = False
        self._embed(idx)
        self.sim_hist[idx] = self.sim[idx, None]
        if self.cfg.retrieval:
            self._set_candidates(idx, rows, decoys)

    def _match(self, rows: np.ndarray) -> None:
        """Pixel candidates of the target rows not yet searched, with the matcher's scores as their
        similarities (NCC in [-1, 1], shown as they are: not relative to the encoder's stop threshold)."""
        todo = np.unique(rows[~self.matched[rows]]) if self.matcher is not None else rows[:0]
        if self.matcher is None or len(todo) == 0:
            return
        photos = np.stack([self.scene.target_photo(int(r)) for r in todo])
        self.cands[todo], self.cand_sims[todo] = self.matcher.query(photos, self.cands.shape[1])
        self.matched[todo] = True

    def _set_candidates(self, idx: np.ndarray, rows: np.ndarray, decoys: np.ndarray | None) -> None:
        self._match(np.asarray(rows))
        cands = self.cands[rows].copy()
        if decoys is not None:
            has = ~np.isnan(np.asarray(decoys, float)).any(axis=1)
            cands[has] = np.concatenate([np.asarray(decoys, float)[has, None], cands[has, :-1]], axis=1)
        self.ep_cands[idx] = cands
        k = cands.shape[1]
        self.cand_embs[idx] = self.scene.space.embed_at(cands[..., 0].ravel(), cands[..., 1].ravel()).reshape(
            len(idx), k, -1
        )
        self.visited[idx] = False
        self.cand_seen[idx] = -np.inf
        self._mark_visited(idx)

    def at_candidates(self, idx: np.ndarray | slice = slice(None)) -> np.ndarray:
        """(len(idx), k): whether each agent is now within half a success radius of each candidate."""
        d = np.hypot(*np.moveaxis(self.ep_cands[idx] - self.pos[idx][:, None, :], 2, 0))
        return d <= VISIT_RADII * self.cfg.success_radius

    def _mark_visited(self, idx: np.ndarray | slice) -> None:
        at = self.at_candidates(idx)
        self.visited[idx] |= at
        self.cand_seen[idx] = np.where(at, np.maximum(self.cand_seen[idx], self.sim[idx, None]), self.cand_seen[idx])

    def next_candidate(self) -> np.ndarray:
        """(n,) the candidate "move on" flies to: the first not yet visited, else the best-matching one seen."""
        unvisited = ~self.visited
        return np.where(unvisited.any(axis=1), unvisited.argmax(axis=1), self.cand_seen.argmax(axis=1))

    def _at_best_seen(self, best: np.ndarray) -> np.ndarray:
        """(n,) whether each agent is at its candidate ``best`` (the one that has matched its photo best so far)."""
        return self.at_candidates()[np.arange(self.n), best]

    def _refine(self, idx: np.ndarray) -> np.ndarray:
        """Moves (len(idx), 2) to the best of 8 probes a quarter step away, or none if no probe is better."""
        moves = COMPASS * (REFINE_STEP * self.step_px)
        targets = self.target_embs[self.rows[idx]]
        sims_at = self._pixel_sims(idx) if self.pixels else self.scene.embedding_sims(targets)
        best, sim = self.scene.best_probe(self.pos[idx], moves, sims_at)
        better = sim > self.sim[idx] + 1e-6
        return np.where(better[:, None], COMPASS[best] * REFINE_STEP, 0.0)

    def _pixel_sims(self, idx: np.ndarray) -> ProbeSims:
        """:meth:`Scene.best_probe`'s similarity with pixel candidates: the own similarity of agents ``idx``."""

        def sims(xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
            return np.stack([self._verify(idx, np.stack([xs[:, j], ys[:, j]], 1)) for j in range(xs.shape[1])], 1)

        return sims

    def decode(self, actions: Any) -> tuple[np.ndarray, np.ndarray]:
        """Actions of :attr:`action_space` as moves (n, 2) in action units and STOP flags (n,)."""
        a = as_actions(actions, self.action_space, self.n)
        kind, stop_action = self.cfg.env.actions, self.cfg.env.stop_action
        if kind == "continuous":
            stop = a[:, 2] > 0 if stop_action else np.zeros(self.n, bool)
            return np.where(stop[:, None], 0.0, a[:, :2]), stop
        stop = a == self.action_space.n - 1 if stop_action else np.zeros(self.n, bool)
        if kind == "discrete":
            return np.where(stop[:, None], 0.0, COMPASS[np.minimum(a, len(COMPASS) - 1)]), stop
        k, rows = self.cfg.agent.n_candidates, np.arange(self.n)
        goal = self.pos.copy()
        pick, on = a < k, a == k + 1
        goal[pick] = self.ep_cands[rows[pick], a[pick]]
        goal[on] = self.ep_cands[rows[on], self.next_candidate()[on]]
        if stop_action and self.cfg.env.stop_at_best:
            best = self.cand_seen.argmax(axis=1)
            at_best = self._at_best_seen(best)
            back = stop & (self.cand_seen.max(axis=1) > self.sim) & ~at_best  # a better place was seen elsewhere
            ends = on & self.visited.all(axis=1) & at_best  # "move on" with nowhere left to go: the search ends
            stop = (stop & ~back) | ends
            goal[back] = self.ep_cands[rows[back], best[back]]
            on = (on | back) & ~ends  # a refused STOP flies back to the best-matching candidate seen
        move = fly_action(self.pos, goal, self.step_px).astype(np.float64)
        # a flight that would end within the visit radius short of its candidate lands on it: else the
        # candidate counts as visited with a view up to half a success radius off, whose similarity can be
        # far below the candidate's own (README "An agent that searches and stops")
        rest = np.hypot(*(goal - self.pos - move * self.step_px).T)
        land = (pick | on) & (rest > 0) & (rest <= VISIT_RADII * self.cfg.success_radius)
        move[land] = (goal[land] - self.pos[land]) / self.step_px
        refine = np.flatnonzero(a == k)
        if len(refine):
            move[refine] = self._refine(refine)
        return np.where(stop[:, None], 0.0, move), stop

    def step(self, actions: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Act for every agent: returns reward, terminated (STOP, or else the own stop rule), truncated."""
        a, stop = self.decode(actions)
        before = self.distance()
        old = self.pos.copy()
        move = a * (self.step_px * self.cfg.action_scale)
        if self.cfg.action_noise > 0:
            move += self._noise.normal(0.0, self.cfg.action_noise * self.step_px, move.shape)
            move[stop] = 0.0
        nx, ny = self.scene.move(old[:, 0], old[:, 1], move[:, 0], move[:, 1])
        self.pos = np.stack([nx, ny], 1)
        self.path_len += np.hypot(*(self.pos - old).T)
        self.steps += 1
        self.prev_action = a.astype(np.float32)
        if self.sim_hist.shape[1]:
            self.sim_hist = np.concatenate([self.sim[:, None], self.sim_hist[:, :-1]], axis=1)
        self._embed(np.arange(self.n))
        if self.cfg.retrieval:
            self._mark_visited(slice(None))
        after = self.distance()
        if self.cfg.env.stop_action:
            self.stopped = stop
            reward, terminated = stop_reward(stop, after, before, self.cfg, self.step_px)
        else:
            reward, terminated = step_reward(self.sim.astype(np.float64), before, after, self.cfg, self.step_px)
            self.stopped = terminated
        limit = self.cfg.max_steps
        truncated = (self.steps >= limit) & ~terminated if limit is not None else np.zeros(self.n, bool)
        return reward, terminated, truncated

    # -- observation ----------------------------------------------------------------------
    def _nav(self, idx: np.ndarray | slice) -> np.ndarray:
        half, a = self.centre, self.cfg.agent
        pos, rows = self.pos[idx], self.rows[idx]
        n = len(pos)
        off = self.cfg.stop_threshold if a.portable else 0.0  # portable: similarities relative to the threshold
        parts: list[np.ndarray] = []
        if a.include_position:
            parts.append((pos - half) / half)
        if a.include_prev_action:
            parts.append(self.prev_action[idx])
        parts.append(self.sim[idx, None] - off)
        if self.cfg.retrieval:
            cands = self.ep_cands[idx]  # (n, k, 2)
            offset = cands - pos[:, None, :]
            top = self.cand_sims[rows]
            per = np.concatenate(
                [
                    (cands - half) / half,
                    offset / half,
                    np.clip(offset / self.step_px, -2, 2),
                    top[..., None] - (0.0 if self.pixels else off),  # pixel scores are no encoder cosines
                    self.visited[idx, :, None],
                ],
                axis=2,
            )
            parts.append(per.reshape(n, -1))
            parts.append((top[:, :1] - top[:, 1:2]) if top.shape[1] > 1 else np.zeros((n, 1)))
        if a.sim_history:
            parts.append(self.sim_hist[idx] - off)
        if self.cfg.retrieval and a.candidate_view_sim:
            view_off = self.view_threshold if a.portable else 0.0
            parts.append(np.einsum("nkd,nd->nk", self.cand_embs[idx], self.cur_emb[idx]) - view_off)
        if self.cfg.retrieval and a.candidate_seen_sim:  # where to go back to once every candidate disappointed
            parts.append(np.where(self.visited[idx], self.cand_seen[idx] - off, -1.0))
        if self.cfg.env.stop_action:  # the budget left: an agent that must stop has to know when time runs out
            limit = self.cfg.max_steps
            parts.append((1.0 - self.steps[idx, None] / limit) if limit else np.zeros((n, 1)))
        return np.concatenate(parts, axis=1).astype(np.float32)

    def observe(self, idx: np.ndarray | slice = slice(None)) -> dict[str, np.ndarray]:
        """The feature observation of agents ``idx`` (new arrays, safe to keep)."""
        if self.cfg.agent.portable:
            return {"nav": self._nav(idx)}
        obs = {"target": self.target_embs[self.rows[idx]], "current": self.cur_emb[idx].copy()}
        if self.cfg.agent.nav:
            obs["nav"] = self._nav(idx)
        return obs

    def info(self, i: int) -> dict[str, object]:
        d = float(self.distance(np.array([i]))[0])
        t = self.targets_xy[self.rows[i]]
        return {
            "position": (float(self.pos[i, 0]), float(self.pos[i, 1])),
            "target": (float(self.targets_xy[self.rows[i], 0]), float(self.targets_xy[self.rows[i], 1])),
            "target_id": int(self.scene.targets["id"].iat[self.rows[i]]),
            "similarity": float(self.sim[i]),
            "distance_px": d,
            "distance_m": float(self.scene.map.distance_m(self.pos[i], t)),
            "stopped": bool(self.stopped[i]),
            "is_success": bool(d <= self.cfg.success_radius and (self.stopped[i] or not self.cfg.env.stop_action)),
            "steps": int(self.steps[i]),
            "path_length_px": float(self.path_len[i]),
            "start_distance_px": float(self.start_dist[i]),
        }
