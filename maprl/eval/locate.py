"""Locating photos on the map: heading search, retrieval, flights from several starts, and the
evidence a confidence is computed from.

:func:`locate_photos` takes photos already at the map's ground sample distance and a view in
size, and for each:

1. embeds it at its best heading (:func:`~maprl.features.photos.embed_photos`), or at a heading given;
2. retrieves the ``top_k`` best separated places from the map memory;
3. flies the method (the trained agent or retrieve-then-fly) from ``restarts`` spread starts
   (the map centre, then a Halton sequence), all batched in one vector env;
4. answers with the flight that ended on the view most similar to the photo.

The evidence (:data:`EVIDENCE`) is that answer's similarity, the best retrieval similarity,
the margin of the best over the second-best separated place, and the share of flights that
ended within the success radius of the answer. :mod:`maprl.eval.calibration` maps it to a
probability of being right.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import qmc

from maprl.config import Params, agent_variant
from maprl.data.perturb import rotate
from maprl.eval.agents import AgentController, load_policy
from maprl.eval.baselines import ControllerFactory, RetrieveThenFly
from maprl.eval.episodes import make_eval_env, run_episodes
from maprl.features.photos import Embedded, embed_photos
from maprl.nav.core import NavConfig
from maprl.nav.runtime import Runtime, nav_config
from maprl.nav.scene import Scene

EVIDENCE = ("similarity", "top_similarity", "margin", "agreement")
"""The features of an answer that its confidence is computed from."""


@dataclass
class Located:
    """Answers for N photos (positions in map pixels, x = column, y = row)."""

    xy: np.ndarray  # (N, 2) answer: the view centre
    align_deg: np.ndarray  # (N,) counter-clockwise turn that aligned each photo with the map
    evidence: np.ndarray  # (N, len(EVIDENCE))
    candidates: np.ndarray  # (N, k, 2) retrieval candidates, best first
    candidate_similarity: np.ndarray  # (N, k)
    paths: list[np.ndarray]  # the answer's flight, (T + 1, 2) each
    steps: np.ndarray  # (N,) steps of that flight

    @property
    def heading_deg(self) -> np.ndarray:
        """Compass direction the top of each photo faces, degrees clockwise from the map's up (north)."""
        return np.mod(-self.align_deg, 360.0)

    def evidence_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.evidence, columns=list(EVIDENCE))


def restart_starts(scene: Scene, n: int) -> np.ndarray:
    """``n`` fixed, spread start positions (n, 2): the map centre, then an unscrambled Halton sequence,
    each moved to the nearest centre of a whole valid view."""
    frac = np.vstack([[0.5, 0.5], qmc.Halton(d=2, scramble=False).random(n)[1:]])[:n]
    xy = np.stack([scene.lo + frac[:, 0] * (scene.hi_x - scene.lo), scene.lo + frac[:, 1] * (scene.hi_y - scene.lo)], 1)
    ok = scene.is_valid(xy[:, 0], xy[:, 1])
    if not ok.all():
        ys, xs = np.nonzero(scene.ok)
        for i in np.flatnonzero(~ok):
            j = int(np.argmin((xs - xy[i, 0]) ** 2 + (ys - xy[i, 1]) ** 2))
            xy[i] = xs[j], ys[j]
    return xy


def embed_aligned(rt: Runtime, photos: np.ndarray, align_deg: np.ndarray | None) -> Embedded:
    """Photos embedded at their best heading of ``rt.n_headings``, or turned by the given ``align_deg``."""
    space, memory = rt.scene.space, rt.memory
    if align_deg is None:
        return embed_photos(space, memory, photos, rt.n_headings, accept=rt.stop_threshold)
    turned = np.stack([rotate(p, float(a)) if a % 360 else p for p, a in zip(photos, align_deg, strict=True)])
    emb = space.embed_view(turned)
    top = memory.best_similarity(emb) if memory is not None else np.full(len(photos), np.nan)
    return Embedded(emb, np.asarray(align_deg, float), top)


def method_setup(
    params: Params, rt: Runtime, method: str, policy: str | Path | None
) -> tuple[NavConfig, ControllerFactory]:
    """The env config and controller of a locate method: ``agent`` (the memory policy at ``policy``)
    or ``retrieve_then_fly``; both fly with the evaluation step budget and stop rule."""
    p = params.evaluate
    if method == "agent":
        if policy is None:
            raise ValueError("method agent needs a policy")
        ap = agent_variant(params, "memory")
        model = load_policy(policy, ap.train.algo)
        return nav_config(ap, rt, max_steps=p.max_steps, shaping=0.0), functools.partial(AgentController, model)
    if method == "retrieve_then_fly":
        base = nav_config(params, rt, max_steps=p.max_steps, shaping=0.0)
        cfg = dataclasses.replace(base, agent=base.agent.model_copy(update={"memory": "retrieval", "nav": True}))
        return cfg, RetrieveThenFly
    raise ValueError(f"unknown locate method {method!r}")


def locate_photos(
    rt: Runtime,
    photos: np.ndarray,
    config: NavConfig,
    controller: ControllerFactory,
    *,
    restarts: int,
    top_k: int,
    embedded: Embedded | None = None,
    truth_xy: np.ndarray | None = None,
) -> Located:
    """Locate (N, V, V, 3) photos at the map's scale (see the module docstring).

    ``embedded`` are the photos' embeddings from :func:`embed_aligned` when already computed.
    ``truth_xy`` (N, 2), when known (evaluation), only fills the episode table's target columns;
    nothing the methods see depends on it.
    """
    sc, memory = rt.scene, rt.memory
    if memory is None:
        raise ValueError("locating photos needs the map memory")
    n = len(photos)
    emb = embedded if embedded is not None else embed_aligned(rt, photos, None)
    k = max(2, top_k)
    if memory.matcher is not None:  # agent.retriever: orientation, as the agent's episodes get them
        cands, cand_sims = memory.matcher.query(photos, k)
    else:
        cands, cand_sims = memory.query(emb.embeddings, k)
    starts = restart_starts(sc, restarts)
    placeholder = np.repeat(starts[:1], n, axis=0)  # no truth: the table needs some valid position
    xy = placeholder if truth_xy is None else np.asarray(truth_xy, float)
    targets = pd.DataFrame({"id": np.arange(n), "x": xy[:, 0], "y": xy[:, 1], "split": "query"})
    scene = sc.with_targets(targets, photos, emb.embeddings)
    rows = np.repeat(np.arange(n), restarts)
    episodes = pd.DataFrame(
        {
            "episode": np.arange(n * restarts),
            "split": "query",
            "target_row": rows,
            "target_id": rows,
            "start_x": np.tile(starts[:, 0], n),
            "start_y": np.tile(starts[:, 1], n),
        }
    )
    venv = make_eval_env(scene, config, len(episodes), memory)
    df, paths = run_episodes(venv, controller(), episodes)
    final = df[["final_x", "final_y"]].to_numpy(float).reshape(n, restarts, 2)
    sims = df["final_feature_cosine"].to_numpy(float).reshape(n, restarts)
    best = np.argmax(sims, axis=1)  # the first of equals
    answer = final[np.arange(n), best]
    agree = (np.hypot(*np.moveaxis(final - answer[:, None], 2, 0)) <= config.success_radius).mean(axis=1)
    margin = cand_sims[:, 0] - cand_sims[:, 1]
    evidence = np.stack([sims[np.arange(n), best], emb.top_similarity, margin, agree], 1)
    chosen = [int(i * restarts + b) for i, b in enumerate(best)]
    return Located(
        xy=answer,
        align_deg=emb.heading_deg,
        evidence=evidence,
        candidates=cands[:, :top_k],
        candidate_similarity=cand_sims[:, :top_k],
        paths=[paths[i] for i in chosen],
        steps=df["steps"].to_numpy(np.int64)[chosen],
    )
