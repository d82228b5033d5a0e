"""Map memory: where on the known map does a target embedding fit best?

Retrieval is a nearest-neighbour search of the target's embedding over the dense grid of
cached view embeddings. Candidates are de-duplicated so that each lies more than
``min_separation`` pixels from the better ones: several candidates that look alike are
what lets a policy search when the best match is wrong.
"""

from __future__ import annotations

import numpy as np


class MapMemory:
    def __init__(self, positions: np.ndarray, embeddings: np.ndarray, min_separation: float) -> None:
        if len(positions) != len(embeddings) or len(positions) == 0:
            raise ValueError("map memory needs one embedding per grid position, and at least one")
        self.positions = np.asarray(positions, np.float64)
        self.embeddings = np.asarray(embeddings, np.float32)
        self.min_separation = float(min_separation)

    def _top_separated(self, sims: np.ndarray, k: int, pool: int) -> np.ndarray:
        order = np.argpartition(-sims, min(pool, len(sims) - 1))[:pool]
        order = order[np.argsort(-sims[order], kind="stable")]
        chosen: list[int] = []
        for i in order:
            p = self.positions[i]
            if all(np.hypot(*(p - self.positions[j])) > self.min_separation for j in chosen):
                chosen.append(int(i))
                if len(chosen) == k:
                    break
        while len(chosen) < k:  # too few distinct places: repeat the last
            chosen.append(chosen[-1])
        return np.array(chosen)

    def best_similarity(self, emb: np.ndarray, batch: int = 256) -> np.ndarray:
        """(N,) similarity of each query's best match anywhere in the memory."""
        emb = np.atleast_2d(emb).astype(np.float32)
        return np.concatenate([(emb[i : i + batch] @ self.embeddings.T).max(axis=1) for i in range(0, len(emb), batch)])

    def query(self, emb: np.ndarray, k: int = 3, pool: int = 64) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` separated candidates for each query: positions (N, k, 2) and similarities (N, k)."""
        emb = np.atleast_2d(emb).astype(np.float32)
        sims = emb @ self.embeddings.T
        idx = np.stack([self._top_separated(s, k, max(pool, 4 * k)) for s in sims])
        return self.positions[idx], np.take_along_axis(sims, idx, axis=1)
