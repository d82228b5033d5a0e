"""The action spaces of the navigation env (``env.actions``, ``env.stop_action``).

| ``env.actions`` | space (without / with STOP)        | meaning                                              |
|-----------------|------------------------------------|------------------------------------------------------|
| ``continuous``  | ``Box(-1, 1, (2,))`` / ``(3,)``    | move (ax, ay) x step; with STOP, a third value > 0   |
|                 |                                    | stops instead of moving (the original design: Box(2))|
| ``discrete``    | ``Discrete(8)`` / ``Discrete(9)``  | one full step N, NE, E, SE, S, SW, W, NW (y grows    |
|                 |                                    | southwards); with STOP, action 8 stops               |
| ``candidates``  | ``Discrete(k+2)`` / ``Discrete(k+3)`` | 0..k-1: one full step towards retrieval candidate j, |
|                 |                                    | landing on it when the step would end within half a  |
|                 |                                    | success radius of it; k: refine (the best of 8 probes |
|                 |                                    | a quarter step away, or stay); k+1: move on (towards |
|                 |                                    | the first candidate not yet visited, or, all visited, |
|                 |                                    | back to the one whose view matched best); with STOP, |
|                 |                                    | k+2 stops                                            |

``k`` is ``agent.n_candidates``. With STOP the episode ends when the agent stops, and it is a
success only if the view centre is then within the success radius (the protocol of Anderson et
al. 2018); without it, the calibrated stop rule ends episodes as before.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from gymnasium import spaces

COMPASS = np.array([(0, -1), (1, -1), (1, 0), (1, 1), (0, 1), (-1, 1), (-1, 0), (-1, -1)], float)
"""The discrete moves N, NE, E, SE, S, SW, W, NW in action units (x east, y south)."""
REFINE_STEP = 0.25
"""The refine action probes 8 directions at this share of a full step."""


def fly_action(pos: np.ndarray, goal: np.ndarray, step_px: float) -> np.ndarray:
    """Continuous actions that fly straight from ``pos`` to ``goal`` (both (N, 2)) at full step.

    The offset in steps is scaled down (never clipped per axis) into the unit box, so the
    path is a straight line and the last step lands exactly on the goal.
    """
    a = (np.asarray(goal, float) - np.asarray(pos, float)) / step_px
    scale = np.maximum(1.0, np.abs(a).max(axis=1, keepdims=True))
    return (a / scale).astype(np.float32)


def n_discrete(actions: str, stop: bool, n_candidates: int) -> int:
    """How many choices a discrete action space has."""
    base = len(COMPASS) if actions == "discrete" else n_candidates + 2
    return base + int(stop)


def action_space(actions: str, stop: bool, n_candidates: int) -> spaces.Space[Any]:
    """The Gymnasium action space of ``env.actions`` / ``env.stop_action``."""
    if actions == "continuous":
        return spaces.Box(-1.0, 1.0, (3 if stop else 2,), np.float32)
    if actions in ("discrete", "candidates"):
        return spaces.Discrete(n_discrete(actions, stop, n_candidates))
    raise ValueError(f"env.actions must be continuous, discrete or candidates, got {actions!r}")


def as_actions(actions: Any, space: spaces.Space[Any], n: int, single: bool = False) -> np.ndarray:
    """``n`` actions of ``space`` as an array ((n, d) floats or (n,) ints); anything else is a ValueError.

    ``single``: ``actions`` is one env's action, exactly of the space's shape (returned as a batch of one).
    """
    if isinstance(space, spaces.Box):
        shape = space.shape or ()
        try:
            a = np.asarray(actions, float)
        except (TypeError, ValueError):
            a = np.full((0,), np.nan)
        if single:
            a = a[None] if a.shape == shape else np.full((0,), np.nan)
        if a.shape != (n, *shape) or not np.isfinite(a).all():
            words = {2: "two", 3: "three"}.get(shape[0], str(shape[0]))
            raise ValueError(f"action must be {words} finite numbers in [-1, 1] (shape {shape}), got {actions!r}")
        return np.clip(a, -1.0, 1.0)
    assert isinstance(space, spaces.Discrete)
    a = np.asarray(actions)
    if single:
        a = a[None] if a.shape == () else np.zeros(0)
    ok = a.shape == (n,) and np.issubdtype(a.dtype, np.number) and np.all(np.isfinite(a)) and np.all(a == np.round(a))
    if not ok or np.any((a < 0) | (a >= space.n)):
        raise ValueError(f"action must be an integer in [0, {int(space.n) - 1}], got {actions!r}")
    return a.astype(np.int64)
