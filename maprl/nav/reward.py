"""The reward: the one place to change it.

With ``sim`` the cosine similarity of the current and target views, ``stop`` the calibrated
stop threshold and ``lo = stop - bonus_band``:

    bonus   = bonus_scale * max(0, sim - lo) / (1 - lo)
    reward  = sim + bonus + success_bonus * [sim >= stop] - step_penalty      (the original design)
            + shaping * (gamma * phi(s') - phi(s))                            (optional)

With an explicit STOP action (``env.stop_action``) the similarity terms are dropped, because
they would pay the agent to hover near a match instead of stopping on it:

    reward  = -step_penalty + shaping * (gamma * phi(s') - phi(s))                  (moving)
    reward  = -step_penalty + success_bonus   if within the success radius          (STOP)
              -step_penalty - stop_penalty    otherwise

and a STOP does not zero the potential, so that stopping far away earns no shaping.

``phi(s) = -distance(s) / step_px`` is the potential, with ``phi = 0`` at a terminal state, so
the shaping term is potential-based (Ng et al. 1999) and leaves the optimal policy unchanged.
It uses the simulator's ground truth and is for training only. With stop 0.98 and band 0.08
the bonus is the original design's (which started at a fixed similarity of 0.90); tying the
band to the calibrated threshold keeps the bonus reachable when the threshold is, say, 0.75.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from maprl.nav.core import NavConfig


def seed_reward(sim: np.ndarray, cfg: NavConfig) -> tuple[np.ndarray, np.ndarray]:
    """The original design's reward and its success flag (own stop rule), for an array of similarities."""
    e = cfg.env
    success = sim >= cfg.stop_threshold
    lo = cfg.stop_threshold - e.bonus_band
    bonus = e.bonus_scale * np.maximum(0.0, sim - lo) / max(1.0 - lo, 1e-9)
    return sim + bonus + np.where(success, e.success_bonus, 0.0) - e.step_penalty, success


def shaping_term(
    before: np.ndarray, after: np.ndarray, terminated: np.ndarray, cfg: NavConfig, step_px: float
) -> np.ndarray:
    """``gamma * phi(s') - phi(s)`` with ``phi = -distance / step_px`` and ``phi(terminal) = 0``."""
    phi_before = -np.asarray(before, float) / step_px
    phi_after = np.where(terminated, 0.0, -np.asarray(after, float) / step_px)
    return cfg.gamma * phi_after - phi_before


def reward(
    sim: np.ndarray, before: np.ndarray, after: np.ndarray, cfg: NavConfig, step_px: float
) -> tuple[np.ndarray, np.ndarray]:
    """The step reward and whether the own stop rule fired (``terminated``)."""
    r, terminated = seed_reward(sim, cfg)
    if cfg.shaping:
        r = r + cfg.shaping * shaping_term(before, after, terminated, cfg, step_px)
    return r, terminated


def stop_reward(
    stop: np.ndarray, after: np.ndarray, before: np.ndarray, cfg: NavConfig, step_px: float
) -> tuple[np.ndarray, np.ndarray]:
    """The step reward with an explicit STOP action, and ``terminated`` (the agents that stopped)."""
    e = cfg.env
    inside = np.asarray(after, float) <= cfg.success_radius
    r = np.full(len(stop), -e.step_penalty)
    r += np.where(stop, np.where(inside, e.success_bonus, -e.stop_penalty), 0.0)
    if cfg.shaping:
        r += cfg.shaping * shaping_term(before, after, np.zeros(len(stop), bool), cfg, step_px)
    return r, np.asarray(stop, bool)
