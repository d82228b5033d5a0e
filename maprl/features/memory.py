"""Map memory: where on the known map does a target embedding fit best?

Retrieval is a nearest-neighbour search of the target's embedding over the dense grid of
cached view embeddings. Candidates are de-duplicated so that each lies more than
``min_separation`` pixels from the better ones: several candidates that look alike are
what lets a policy search when the best match is wrong.

The search is exact (``index="exact"``, the default: a matrix product over the whole grid) or
approximate through a FAISS inverted-file index (``index="ivf"``: k-means cells, ``nprobe`` of
them scanned per query), whose cost grows far slower with the map's area; on large maps it
answers a query in milliseconds (see ``benchmarks/bench_scale.py`` for its recall).

A memory may carry a ``matcher`` (:class:`~maprl.features.matching.OrientationMatcher`,
``agent.retriever: orientation``): then an episode's candidates and their scores (NCC of the
orientation fields) come from the photo's pixels instead of its embedding (the navigation core
asks it), while the embeddings still choose the photo's heading for everything else.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import numpy as np

from maprl.features.matching import OrientationMatcher

INDEXES = ("exact", "ivf")
QUERY_MEMO = 8  # answers of MapMemory.query remembered
IVF_TRAIN = 65536  # k-means of the inverted file is trained on at most this many embeddings


def ivf_index(embeddings: np.ndarray, nprobe: int = 32, seed: int = 0) -> Any:
    """A FAISS IVF-Flat inner-product index over (G, D) float32 unit ``embeddings`` (about 4 sqrt(G) cells)."""
    import faiss

    n, d = embeddings.shape
    nlist = max(1, min(n // 39, int(4 * math.sqrt(n))))  # FAISS wants >= 39 training points per cell
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(seed)
    train = embeddings if n <= IVF_TRAIN else embeddings[np.sort(rng.choice(n, IVF_TRAIN, replace=False))]
    index.cp.seed = seed
    index.train(np.ascontiguousarray(train))
    index.add(embeddings)
    index.nprobe = min(nprobe, nlist)
    return index


class MapMemory:
    def __init__(
        self,
        positions: np.ndarray,
        embeddings: np.ndarray,
        min_separation: float,
        index: str = "exact",
        nprobe: int = 32,
    ) -> None:
        if len(positions) != len(embeddings) or len(positions) == 0:
            raise ValueError("map memory needs one embedding per grid position, and at least one")
        if index not in INDEXES:
            raise ValueError(f"map memory index {index!r}: choose one of {', '.join(INDEXES)}")
        self.positions = np.asarray(positions, np.float64)
        self.embeddings = np.ascontiguousarray(embeddings, np.float32)
        self.min_separation = float(min_separation)
        self.index = ivf_index(self.embeddings, nprobe) if index == "ivf" else None
        self._answers: dict[tuple[Any, ...], tuple[np.ndarray, np.ndarray]] = {}
        self.matcher: OrientationMatcher | None = None  # candidates from photo pixels (agent.retriever)

    def _separated(self, order: np.ndarray, k: int) -> np.ndarray:
        """The first ``k`` of ``order`` (best first) lying more than ``min_separation`` from the ones before."""
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

    def _top_separated(self, sims: np.ndarray, k: int, pool: int) -> np.ndarray:
        order = np.argpartition(-sims, min(pool, len(sims) - 1))[:pool]
        return self._separated(order[np.argsort(-sims[order], kind="stable")], k)

    def search(self, emb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` most similar grid nodes of each query, best first: similarities and indices (N, k)
        (exact, or through the index; an index may return fewer, padded with index -1 and -inf)."""
        emb = np.ascontiguousarray(np.atleast_2d(emb), np.float32)
        if self.index is not None:
            sims, idx = self.index.search(emb, k)
            return np.where(idx >= 0, sims, -np.inf), idx
        out_s, out_i = np.zeros((len(emb), k), np.float32), np.zeros((len(emb), k), np.int64)
        for n, s in enumerate(emb @ self.embeddings.T):
            top = np.argpartition(-s, min(k, len(s) - 1))[:k]
            out_i[n] = top[np.argsort(-s[top], kind="stable")]
            out_s[n] = s[out_i[n]]
        return out_s, out_i

    def best_similarity(self, emb: np.ndarray, batch: int = 256) -> np.ndarray:
        """(N,) similarity of each query's best match anywhere in the memory."""
        emb = np.atleast_2d(emb).astype(np.float32)
        if self.index is not None:
            return self.search(emb, 1)[0][:, 0]
        return np.concatenate([(emb[i : i + batch] @ self.embeddings.T).max(axis=1) for i in range(0, len(emb), batch)])

    def query(self, emb: np.ndarray, k: int = 3, pool: int = 64) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` separated candidates for each query: positions (N, k, 2) and similarities (N, k).

        The last few answers are remembered: every env built on one scene asks the same question.
        """
        emb = np.atleast_2d(emb).astype(np.float32)
        pool = max(pool, 4 * k)
        key = (hashlib.blake2b(emb.tobytes(), digest_size=16).digest(), emb.shape, k, pool)
        if key not in self._answers:
            if len(self._answers) >= QUERY_MEMO:
                self._answers.pop(next(iter(self._answers)))
            self._answers[key] = self._query(emb, k, pool)
        pos, sims = self._answers[key]
        return pos.copy(), sims.copy()

    def _query(self, emb: np.ndarray, k: int, pool: int) -> tuple[np.ndarray, np.ndarray]:
        if self.index is not None:
            sims, found = self.search(emb, pool)
            idx = np.stack([self._separated(f[f >= 0], k) for f in found])
            return self.positions[idx], np.sum(emb[:, None, :] * self.embeddings[idx], axis=-1)
        full = emb @ self.embeddings.T
        idx = np.stack([self._top_separated(s, k, pool) for s in full])
        return self.positions[idx], np.take_along_axis(full, idx, axis=1)
