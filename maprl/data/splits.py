"""The one split function: hold out whole groups (spatial blocks, or single targets) at random.

The tile stage uses it to choose the test blocks of the map; the learning stages use it again
to hold out a validation part of the train split. Both draw from an explicit generator.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def hold_out(groups: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Sorted ids of the held-out groups: ``round(n * fraction)`` of the ``n`` distinct ``groups``,
    at least one and at most ``n - 1`` (so neither side is empty when ``n >= 2``)."""
    unique = np.unique(groups)
    n = int(np.clip(round(len(unique) * fraction), 1, max(1, len(unique) - 1)))
    return np.sort(rng.permutation(unique)[:n])


def with_validation(targets: pd.DataFrame, fraction: float, seed: int) -> pd.DataFrame:
    """Relabel part of the train split as ``val``: whole spatial blocks if blocks exist, else single targets."""
    out = targets.copy()
    train = (out["split"] == "train").to_numpy()
    blocks = out["block"].to_numpy()[train] if "block" in out else np.array([-1])
    by_block = len(np.unique(blocks)) > 1 and bool((blocks >= 0).all())
    groups = out["block"].to_numpy() if by_block else np.arange(len(out))
    val = hold_out(groups[train], fraction, np.random.default_rng([seed, 1]))
    out.loc[train & np.isin(groups, val), "split"] = "val"
    return out


def test_area(targets: pd.DataFrame, shape: tuple[int, int], view_size: int, block_size: int) -> np.ndarray:
    """(H, W) bool: the pixels a test photo may show. Whole test blocks in spatial mode (``block`` >= 0),
    else each test target's view."""
    area = np.zeros(shape, bool)
    test = targets[targets["split"] == "test"]
    blocks = test["block"].to_numpy() if "block" in test else np.full(len(test), -1)
    nbx = -(-shape[1] // block_size)
    for b in np.unique(blocks[blocks >= 0]):
        r, c = divmod(int(b), nbx)
        area[r * block_size : (r + 1) * block_size, c * block_size : (c + 1) * block_size] = True
    for x, y in test.loc[blocks < 0, ["x", "y"]].to_numpy(float):
        x0, y0 = int(np.floor(x - view_size / 2 + 0.5)), int(np.floor(y - view_size / 2 + 0.5))
        area[max(0, y0) : y0 + view_size, max(0, x0) : x0 + view_size] = True
    return area
