"""The ``robustness`` stage: how methods hold up when the photo or the dynamics change.

On one fixed set of test episodes (``robustness.episodes``), every method in
:data:`METHODS` (both trained agents with map memory, retrieve-then-fly, the scripted
candidate search and the template-matching oracle) is run:

* for each query domain (``same`` is the map itself) with its photos as they are (strength 0);
* for each perturbation kind in ``robustness.kinds`` at each strength in
  ``robustness.strengths``, applied to that domain's photos (:mod:`maprl.data.perturb`;
  geometric kinds act on a context crop, :mod:`maprl.features.photos`), each perturbed photo
  embedded at its best heading, exactly as at evaluation;
* for perturbed dynamics on the map's own photos: the world moves ``action_scale`` times the
  commanded step, or adds Gaussian noise of ``action_noise`` (in action units) to each move.

Perturbations are drawn from a generator seeded by (seed, domain, kind, strength), so every
method sees the same perturbed photos. Writes ``robustness.csv`` (tidy), one curve CSV per
kind (``curves/<domain>_<kind>.csv``: strength against each method's success, for ``dvc plots``),
``dynamics.csv``, three pictures (success against strength, a bar chart of the agents by
domain, perturbed photos beside the originals) and the metrics JSON, whose ``break_strength``
says, per method and kind, the weakest strength at which success falls below 0.5.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from maprl.config import Params
from maprl.errors import InputError
from maprl.eval.episodes import evaluate_methods, make_episodes
from maprl.eval.evaluate import load_agents, method_factories
from maprl.features.nets import configure_torch
from maprl.features.photos import embed_photos, perturbed_photos
from maprl.io import atomic_path, staged_dir, write_csv, write_json
from maprl.nav.runtime import Runtime, load_runtime
from maprl.nav.scene import Scene
from maprl.parallel import ordered_map

METHODS = ("agent", "agent_randomized", "retrieve_then_fly", "retrieve_then_search", "template_oracle")
"""The methods of the robustness matrix (those of them that exist in a run)."""
BREAK = 0.5  # success below this counts as broken


def robustness_episodes(rt: Runtime, n: int, seed: int) -> pd.DataFrame:
    """The fixed test episodes every cell uses (seeded apart from the evaluate stage's)."""
    sub = int(np.random.SeedSequence([seed, 77]).generate_state(1)[0])
    return make_episodes(rt.scene, "test", n, sub)


def cell_rng(seed: int, domain: str, kind: str, strength: float) -> np.random.Generator:
    """The generator of one cell's perturbations: the same for every method."""
    return np.random.default_rng([seed, zlib.crc32(f"{domain}/{kind}/{strength:g}".encode())])


def perturbed_scene(
    rt: Runtime, domain: str, rows: np.ndarray, kind: str, strength: float, rng: np.random.Generator
) -> tuple[Scene, np.ndarray]:
    """``domain``'s scene with the photos of target ``rows`` perturbed; and each row's heading error (degrees)."""
    base = rt.domain_scene(domain)
    photos = np.stack([base.target_photo(i) for i in range(len(base.targets))])
    emb = base.target_embeddings().copy()
    xy = base.targets_xy[rows]
    changed, angles = perturbed_photos(rt.imagery[domain], xy, base.view_size, kind, strength, rng)
    e = embed_photos(base.space, rt.memory, changed, rt.n_headings, accept=rt.stop_threshold)
    photos[rows], emb[rows] = changed, e.embeddings
    # the heading search rotates the photo by h to realign it: ideally h = -angle (mod 360)
    err = np.abs((e.heading_deg + angles + 180.0) % 360.0 - 180.0)
    return base.with_photos(photos, emb, domain), err


def run_methods(
    params: Params, rt: Runtime, scene: Scene, models: Mapping[str, Any], episodes: pd.DataFrame,
    config_update: dict[str, Any] | None = None,
) -> pd.DataFrame:  # fmt: skip
    """The :data:`METHODS` on ``episodes`` of ``scene`` (optionally with perturbed dynamics); ``models`` as
    :func:`~maprl.eval.evaluate.load_agents` returns them."""
    frames = []
    for cfg, methods in method_factories(params, rt, scene, models, oracle=params.robustness.oracle):
        keep = {k: v for k, v in methods.items() if k in METHODS}
        if keep:
            cfg = dataclasses.replace(cfg, **(config_update or {}))
            frames.append(evaluate_methods(scene, rt.memory, cfg, keep, episodes, record_paths=False)[0])
    return pd.concat(frames, ignore_index=True)


def _summary(df: pd.DataFrame, **labels: Any) -> list[dict[str, Any]]:
    return [
        {**labels, "method": m, "success_rate": float(d["success"].mean()), "spl": float(d["spl"].mean())}
        for m, d in df.groupby("method", sort=False)
    ]


@dataclasses.dataclass(frozen=True)
class CellState:
    """What every cell reads: the params, the runtime, the loaded agents and the fixed episodes."""

    params: Params
    rt: Runtime
    models: Mapping[str, Any]
    episodes: pd.DataFrame


def load_cell_state(
    params: Params, map_path: str | Path, targets_path: str | Path, features_dir: str | Path,
    policies: Mapping[str, str | Path], threads: int | None = None,
) -> CellState:  # fmt: skip
    """Load the stage's inputs (once per worker process; ``threads``: torch threads in a worker)."""
    rt = load_runtime(params, map_path, targets_path, features_dir)
    if threads is not None:
        configure_torch(threads)
    episodes = robustness_episodes(rt, params.robustness.episodes, params.base.seed)
    return CellState(params, rt, load_agents(params, policies), episodes)


@dataclasses.dataclass(frozen=True)
class Cell:
    """One cell of the matrix: ``domain``'s photos under ``kind`` at ``strength`` (``none``: as they are)."""

    domain: str
    kind: str
    strength: float


@dataclasses.dataclass(frozen=True)
class Dynamics:
    """One point of the dynamics sweep on the map's own photos: ``action_scale`` or ``action_noise``."""

    sweep: str
    value: float


def run_job(state: CellState, job: Cell | Dynamics) -> tuple[list[dict[str, Any]], np.ndarray | None]:
    """One job's summary rows; for a perturbed cell also the perturbed photo of the first episode."""
    params, rt, episodes = state.params, state.rt, state.episodes
    if isinstance(job, Dynamics):
        df = run_methods(params, rt, rt.scene, state.models, episodes, {job.sweep: job.value})
        return _summary(df, sweep=job.sweep, value=job.value), None
    rows = np.unique(episodes["target_row"].to_numpy(np.int64))
    labels = {"domain": job.domain, "kind": job.kind, "strength": job.strength}
    if job.kind == "none":
        df = run_methods(params, rt, rt.domain_scene(job.domain), state.models, episodes)
        kept = rt.photos[job.domain].heading_deg[rows]  # the true heading of an unperturbed photo is 0
        kept_error = float(np.median(np.abs((kept + 180.0) % 360.0 - 180.0)))
        return _summary(df, **labels, heading_error_median=kept_error), None
    rng = cell_rng(params.base.seed, job.domain, job.kind, job.strength)
    scene, err = perturbed_scene(rt, job.domain, rows, job.kind, job.strength, rng)
    df = run_methods(params, rt, scene, state.models, episodes)
    return _summary(df, **labels, heading_error_median=float(np.median(err))), scene.target_photo(int(rows[0]))


def robustness_tables(
    state: CellState, load_args: tuple[Any, ...] = ()
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, dict[str, np.ndarray]]]:
    """The perturbation matrix (domain, kind, strength, method, success_rate, spl, heading_error_median),
    the dynamics sweep (sweep, value, method, ...: action scale 1 and ``robustness.action_scales``,
    then ``robustness.action_noise``) and, per domain and kind, the photo at the largest strength.

    The jobs run in ``robustness.workers`` processes, each loading its own state by
    :func:`load_cell_state` ``(*load_args, threads=1)``; every cell draws its perturbations from
    :func:`cell_rng`, so the tables do not depend on the number of workers."""
    p, domains = state.params.robustness, state.rt.domains
    cells = [Cell(d, "none", 0.0) for d in domains]
    cells += [Cell(d, k, s) for d in domains for k in p.kinds for s in p.strengths]
    sweep = [Dynamics("action_scale", v) for v in [1.0, *p.action_scales]]
    sweep += [Dynamics("action_noise", v) for v in p.action_noise]
    jobs: list[Cell | Dynamics] = [*cells, *sweep]
    results = ordered_map(
        run_job, jobs, p.workers, local=state, setup=load_cell_state, setup_args=(*load_args, 1),
        desc="robustness", unit="cell",
    )  # fmt: skip
    examples: dict[str, dict[str, np.ndarray]] = {}
    for cell, (_, photo) in zip(cells, results, strict=False):
        if photo is not None and cell.strength == max(p.strengths):
            examples.setdefault(cell.domain, {})[cell.kind] = photo
    table = pd.DataFrame([row for rows, _ in results[: len(cells)] for row in rows])
    dyn = pd.DataFrame([row for rows, _ in results[len(cells) :] for row in rows])
    return table, dyn, examples


def break_strengths(table: pd.DataFrame) -> dict[str, dict[str, dict[str, float | None]]]:
    """Per domain, method and kind: the weakest strength whose success falls below :data:`BREAK` (None: never)."""
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for (domain, method, kind), d in table[table["kind"] != "none"].groupby(["domain", "method", "kind"], sort=False):
        broken = d.sort_values("strength")
        below = broken[broken["success_rate"] < BREAK]
        out.setdefault(str(domain), {}).setdefault(str(method), {})[str(kind)] = (
            float(below["strength"].iat[0]) if len(below) else None
        )
    return out


def curves(table: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per domain and kind: strength (0 first) against each method's success rate, one column per method."""
    out = {}
    for domain, d in table.groupby("domain", sort=False):
        base = d[d["kind"] == "none"]
        for kind in d.loc[d["kind"] != "none", "kind"].unique():
            rows = pd.concat([base, d[d["kind"] == kind]])
            wide = rows.pivot_table(index="strength", columns="method", values="success_rate", sort=True)
            out[f"{domain}_{kind}"] = wide.reset_index()[["strength", *[m for m in METHODS if m in wide]]]
    return out


def metrics(table: pd.DataFrame, dyn: pd.DataFrame, params: Params) -> dict[str, Any]:
    """``metrics/robustness.json``: every cell's success and SPL, the dynamics sweep and the break strengths."""
    cells: dict[str, Any] = {}
    for r in table.itertuples():
        key = "none" if r.kind == "none" else f"{r.kind}@{r.strength:g}"
        cells.setdefault(r.domain, {}).setdefault(key, {})[r.method] = {
            "success_rate": round(r.success_rate, 4), "spl": round(r.spl, 4),
        }  # fmt: skip
    dynamics: dict[str, Any] = {}
    for r in dyn.itertuples():
        dynamics.setdefault(f"{r.sweep}@{r.value:g}", {})[r.method] = round(r.success_rate, 4)
    return {
        "episodes": params.robustness.episodes,
        "strengths": params.robustness.strengths,
        "break_below": BREAK,
        "cells": cells,
        "dynamics": dynamics,
        "break_strength": break_strengths(table),
    }


def run_robustness(
    params: Params,
    map_path: str | Path,
    targets_path: str | Path,
    features_dir: str | Path,
    policies: Mapping[str, str | Path],
    out_dir: str | Path,
    metrics_path: str | Path,
) -> dict[str, Any]:
    """The robustness stage (see the module docstring); ``policies`` maps agent names to their policy.zip."""
    unknown = sorted(set(policies) - {"memory", "randomized"})
    if unknown:
        raise InputError(f"robustness runs the agents memory and randomized, not {', '.join(unknown)}")
    load_args = (params, map_path, targets_path, features_dir, dict(policies))
    state = load_cell_state(*load_args)
    rt, episodes = state.rt, state.episodes
    table, dyn, examples = robustness_tables(state, load_args)
    result = metrics(table, dyn, params)
    with staged_dir(out_dir) as out:
        write_csv(out / "robustness.csv", table)
        write_csv(out / "dynamics.csv", dyn)
        (out / "curves").mkdir()
        for name, wide in curves(table).items():
            write_csv(out / "curves" / f"{name}.csv", wide)
        _pictures(rt, table, examples, episodes, out)
    write_json(metrics_path, result)
    return result


def _pictures(
    rt: Runtime, table: pd.DataFrame, examples: dict[str, dict[str, np.ndarray]], episodes: pd.DataFrame, out: Path
) -> None:
    from maprl.viz.plots import plot_domain_bars, plot_perturbation_grid, plot_robustness_curves

    first = int(np.unique(episodes["target_row"].to_numpy(np.int64))[0])
    originals = {d: rt.domain_scene(d).target_photo(first) for d in examples}
    with atomic_path(out / "success_vs_strength.png") as tmp:
        plot_robustness_curves(table, str(tmp))
    with atomic_path(out / "domains.png") as tmp:
        plot_domain_bars(table, str(tmp))
    with atomic_path(out / "perturbed_photos.png") as tmp:
        plot_perturbation_grid(originals, examples, str(tmp))
