"""Batched navigation dynamics shared by the Gymnasium env and the SB3 vector env.

``NavCore`` holds N agents on one :class:`~maprl.scene.Scene` as numpy arrays. Moving,
similarity, reward, termination and the feature observation are computed here once, so
the single env and the vector env cannot drift apart.

Feature observation (``obs_features``):

| key     | shape | content                                                              |
|---------|-------|----------------------------------------------------------------------|
| target  | (D,)  | embedding of the target view                                         |
| current | (D,)  | embedding of the current view (a cache lookup)                       |
| nav     | (M,)  | position in [-1, 1], previous action, current similarity, and with   |
|         |       | ``memory=retrieval`` for each of k candidates: its position, its     |
|         |       | offset from the agent (map units and steps), its similarity, whether |
|         |       | the agent has visited it this episode; then the margin between the   |
|         |       | best two candidates                                                  |

Decoys (``decoy_rate``): a stress test of the map memory. In that share of episodes the top
retrieval candidate is replaced by a *decoy*, a place at least ``DECOY_DISTANCE_RADII``
success radii from the target that is shown with the top candidate's similarity; the true
candidates move down one rank. Flying to the top candidate then finds a view that does not
match, and only a policy that searches the other candidates recovers. The visited flags
(within half a success radius of a candidate, once in the episode) are the short memory of
where the agent has been that such a search needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from maprl.memory import MapMemory
from maprl.scene import Scene


@dataclass(frozen=True)
class NavConfig:
    """Dynamics, reward and observation options (see the env docstring for the reward)."""

    action_step: float = 0.05
    max_steps: int | None = 1000  # None: no truncation here (a TimeLimit wrapper does it)
    stop_threshold: float = 0.98  # own-similarity stop rule (the seed's success_threshold)
    bonus_threshold: float = 0.90
    bonus_scale: float = 10.0
    success_bonus: float = 100.0
    step_penalty: float = 0.01
    shaping: float = 0.0  # weight of potential-based shaping: (d_before - d_after) / step_px
    success_radius: float = 56.0  # ground-truth success radius, pixels
    memory: str = "none"  # none | retrieval
    n_candidates: int = 3
    include_position: bool = True
    include_prev_action: bool = True
    decoy_rate: float = 0.0  # share of episodes whose top retrieval candidate is a decoy

    def nav_dim(self) -> int:
        base = 2 * self.include_position + 2 * self.include_prev_action + 1
        return base + (8 * self.n_candidates + 1 if self.memory == "retrieval" else 0)

    @property
    def decoys(self) -> bool:
        """Whether episodes draw decoys (only the map memory has candidates to corrupt)."""
        return self.memory == "retrieval" and self.decoy_rate > 0


DECOY_DISTANCE_RADII = 4.0  # a decoy lies at least this many success radii from the target


def draw_decoy(scene: Scene, cfg: NavConfig, target_xy: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One episode's decoy position, or NaNs for none (draws nothing unless ``cfg.decoys``)."""
    if not cfg.decoys or rng.random() >= cfg.decoy_rate:
        return np.full(2, np.nan)
    return np.array(scene.sample_far(rng, target_xy, DECOY_DISTANCE_RADII * cfg.success_radius), float)


def seed_reward(sim: np.ndarray, cfg: NavConfig) -> tuple[np.ndarray, np.ndarray]:
    """The original design's reward and its success flag, for an array of similarities."""
    success = sim >= cfg.stop_threshold
    bonus = cfg.bonus_scale * np.maximum(0.0, sim - cfg.bonus_threshold) / (1.0 - cfg.bonus_threshold)
    return sim + bonus + np.where(success, cfg.success_bonus, 0.0) - cfg.step_penalty, success


class NavCore:
    def __init__(self, scene: Scene, n: int, cfg: NavConfig, memory: MapMemory | None = None) -> None:
        if cfg.memory == "retrieval" and memory is None:
            raise ValueError("memory: retrieval needs a MapMemory")
        self.scene, self.n, self.cfg = scene, n, cfg
        self.step_px = cfg.action_step * scene.step_scale
        self.target_embs = scene.target_embeddings()
        self.targets_xy = scene.targets[["x", "y"]].to_numpy(float)
        if cfg.memory == "retrieval" and memory is not None:
            self.cands, self.cand_sims = memory.query(self.target_embs, cfg.n_candidates)
        k = cfg.n_candidates
        self.ep_cands = np.zeros((n, k, 2))  # this episode's candidates (decoy first, if any)
        self.visited = np.zeros((n, k), bool)
        self.centre = np.array([scene.map.width, scene.map.height], float) / 2
        self.pos = np.zeros((n, 2))
        self.rows = np.zeros(n, np.int64)
        self.steps = np.zeros(n, np.int64)
        self.prev_action = np.zeros((n, 2), np.float32)
        self.path_len = np.zeros(n)
        self.start_dist = np.zeros(n)
        self.sim = np.zeros(n, np.float32)
        self.cur_emb = np.zeros((n, scene.space.dim), np.float32)

    # -- state ----------------------------------------------------------------------------
    def distance(self, idx: np.ndarray | slice = slice(None)) -> np.ndarray:
        return np.hypot(*(self.pos[idx] - self.targets_xy[self.rows[idx]]).T)

    def _embed(self, idx: np.ndarray) -> None:
        emb = self.scene.space.embed_at(self.pos[idx, 0], self.pos[idx, 1])
        self.cur_emb[idx] = emb
        self.sim[idx] = np.sum(emb * self.target_embs[self.rows[idx]], axis=1)

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
        if self.cfg.memory == "retrieval":
            self._set_candidates(idx, rows, decoys)
        self._embed(idx)

    def _set_candidates(self, idx: np.ndarray, rows: np.ndarray, decoys: np.ndarray | None) -> None:
        cands = self.cands[rows].copy()
        if decoys is not None:
            has = ~np.isnan(np.asarray(decoys, float)).any(axis=1)
            cands[has] = np.concatenate([np.asarray(decoys, float)[has, None], cands[has, :-1]], axis=1)
        self.ep_cands[idx] = cands
        self.visited[idx] = False
        self._mark_visited(idx)

    def at_candidates(self, idx: np.ndarray | slice = slice(None)) -> np.ndarray:
        """(len(idx), k): whether each agent is now within half a success radius of each candidate."""
        d = np.hypot(*np.moveaxis(self.ep_cands[idx] - self.pos[idx][:, None, :], 2, 0))
        return d <= 0.5 * self.cfg.success_radius

    def _mark_visited(self, idx: np.ndarray | slice) -> None:
        self.visited[idx] |= self.at_candidates(idx)

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Move every agent: returns reward, terminated (own stop rule), truncated."""
        a = np.clip(np.asarray(actions, np.float64).reshape(self.n, 2), -1.0, 1.0)
        before = self.distance()
        old = self.pos.copy()
        nx, ny = self.scene.move(old[:, 0], old[:, 1], a[:, 0] * self.step_px, a[:, 1] * self.step_px)
        self.pos = np.stack([nx, ny], 1)
        self.path_len += np.hypot(*(self.pos - old).T)
        self.steps += 1
        self.prev_action = a.astype(np.float32)
        if self.cfg.memory == "retrieval":
            self._mark_visited(slice(None))
        self._embed(np.arange(self.n))
        reward, terminated = seed_reward(self.sim.astype(np.float64), self.cfg)
        if self.cfg.shaping:
            reward = reward + self.cfg.shaping * (before - self.distance()) / self.step_px
        limit = self.cfg.max_steps
        truncated = (self.steps >= limit) & ~terminated if limit is not None else np.zeros(self.n, bool)
        return reward, terminated, truncated

    # -- observation ----------------------------------------------------------------------
    def _nav(self) -> np.ndarray:
        half = self.centre
        parts: list[np.ndarray] = []
        if self.cfg.include_position:
            parts.append((self.pos - half) / half)
        if self.cfg.include_prev_action:
            parts.append(self.prev_action)
        parts.append(self.sim[:, None])
        if self.cfg.memory == "retrieval":
            cands = self.ep_cands  # (n, k, 2)
            offset = cands - self.pos[:, None, :]
            per = np.concatenate(
                [
                    (cands - half) / half,
                    offset / half,
                    np.clip(offset / self.step_px, -2, 2),
                    self.cand_sims[self.rows][..., None],
                    self.visited[..., None],
                ],
                axis=2,
            )
            parts.append(per.reshape(self.n, -1))
            top = self.cand_sims[self.rows]
            parts.append((top[:, :1] - top[:, 1:2]) if top.shape[1] > 1 else np.zeros((self.n, 1)))
        return np.concatenate(parts, axis=1).astype(np.float32)

    def observe(self) -> dict[str, np.ndarray]:
        return {"target": self.target_embs[self.rows].copy(), "current": self.cur_emb.copy(), "nav": self._nav()}

    def info(self, i: int) -> dict[str, object]:
        d = float(self.distance(np.array([i]))[0])
        mpp = self.scene.map.metres_per_pixel if self.scene.map.crs is not None else float("nan")
        return {
            "position": (float(self.pos[i, 0]), float(self.pos[i, 1])),
            "target": (float(self.targets_xy[self.rows[i], 0]), float(self.targets_xy[self.rows[i], 1])),
            "target_id": int(self.scene.targets["id"].iat[self.rows[i]]),
            "similarity": float(self.sim[i]),
            "distance_px": d,
            "distance_m": d * mpp,
            "stopped": bool(self.sim[i] >= self.cfg.stop_threshold),
            "is_success": bool(d <= self.cfg.success_radius),
            "steps": int(self.steps[i]),
            "path_length_px": float(self.path_len[i]),
            "start_distance_px": float(self.start_dist[i]),
        }
