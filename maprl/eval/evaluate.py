"""The ``evaluate`` stage: every trained agent and every baseline on the same fixed episodes.

Writes ``episodes.csv``, ``methods.csv``, ``success_by_distance.csv``,
``success_by_texture.csv``, ``trajectories.png``, ``episode.gif``, ``saliency.gif`` and
``saliency.png`` (perturbation saliency of one episode, :mod:`maprl.eval.saliency`) and the metrics
JSON (see :mod:`maprl.eval.metrics` for the columns).

Splits: ``train`` and ``test`` (photos cut from the map itself), ``test_decoy`` (the decoy
stress test) and, for each query domain ``d`` (``fetch.queries``), ``test_<d>``: the test
split's episodes exactly, but with each target's photo cut from domain ``d``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from maprl.config import AGENTS, EvaluateParams, Params, agent_variant
from maprl.errors import InputError
from maprl.eval.agents import AgentController, load_policy
from maprl.eval.baselines import default_baselines
from maprl.eval.calibration import (
    CALIBRATION_FILE,
    Calibrator,
    fit_calibrators,
    fit_split,
    reliability_table,
    save_calibration,
    split_answers,
    summarise_confidence,
)
from maprl.eval.episodes import (
    evaluate_methods,
    make_decoy_episodes,
    make_episodes,
    make_eval_env,
    make_split_episodes,
    run_episodes,
)
from maprl.eval.metrics import HEADLINE, distance_table, methods_table, metrics_dict, summarise, texture_table
from maprl.features.nets import configure_torch
from maprl.io import atomic_path, staged_dir, write_csv, write_json
from maprl.nav.core import NavConfig
from maprl.nav.runtime import Runtime, load_runtime, nav_config
from maprl.nav.scene import Scene
from maprl.parallel import ordered_map

AGENT_ROWS = {
    "memory": HEADLINE,
    "randomized": "agent_randomized",
    "nomemory": "agent_nomemory",
    "original": "agent_original",
    "search": "agent_search",
}
"""The method name of each trained agent in the results."""


def evaluate_model(model: Any, rt: Any, config: NavConfig, split: str, n: int, seed: int) -> dict[str, Any]:
    """Periodic evaluation during training: the model on ``n`` fixed episodes of ``split``.

    ``rt`` needs ``scene`` and ``memory`` attributes. Returns :func:`summarise` for the split.
    """
    episodes = make_episodes(rt.scene, split, n, seed)
    venv = make_eval_env(rt.scene, config, n, rt.memory)
    df, _ = run_episodes(venv, AgentController(model), episodes, record_paths=False)
    return summarise(df, [])[split]


def _show_indices(d: pd.DataFrame, k: int) -> list[int]:
    """Positions (within one method's rows) of the first ``k`` test episodes (any split if none)."""
    test = np.flatnonzero(d["split"].to_numpy() == "test")
    pick = test if len(test) else np.arange(len(d))
    return [int(i) for i in pick[:k]]


def _write_trajectories(
    df: pd.DataFrame, paths: Mapping[str, list[np.ndarray]], scene: Scene, out: Path, k: int
) -> None:
    from maprl.viz.plots import plot_trajectories

    methods = [m for m in paths if len(paths[m])]
    if not methods:
        return
    first = df[df["method"] == methods[0]].reset_index(drop=True)
    show = _show_indices(first, k)
    targets = [(float(first.at[i, "target_x"]), float(first.at[i, "target_y"])) for i in show]
    ok, rows = [], []
    for m in methods:
        d = df[df["method"] == m].reset_index(drop=True)
        ok.append([bool(d.at[i, "success"]) for i in show])
        rows.append([paths[m][i] for i in show])
    titles = [f"{first.at[i, 'split']} episode {first.at[i, 'episode']}" for i in show]
    with atomic_path(out) as tmp:
        plot_trajectories(scene.map.rgb, methods, rows, targets, ok, scene.view_size, str(tmp), titles)


def _write_gif(df: pd.DataFrame, paths: Mapping[str, list[np.ndarray]], scene: Scene, out: Path, frames: int) -> None:
    from maprl.viz.plots import episode_frames, save_gif

    candidates = [m for m in (HEADLINE, *paths) if m in paths and len(paths[m])]
    if not candidates:
        return
    method = candidates[0]
    d = df[df["method"] == method].reset_index(drop=True)
    i = _show_indices(d, 1)[0]
    target = (float(d.at[i, "target_x"]), float(d.at[i, "target_y"]))
    with atomic_path(out) as tmp:
        save_gif(episode_frames(scene.map.rgb, paths[method][i], target, scene.view_size, frames), str(tmp))


def _write_saliency(
    out: Path, params: Params, rt: Runtime, policies: Mapping[str, str | Path], df: pd.DataFrame
) -> None:
    """``saliency.gif`` and ``saliency.png``: the memory agent (else the first) on the episode of ``episode.gif``."""
    from maprl.eval.saliency import episode_from_row, evaluate_video

    agent = "memory" if "memory" in policies else next(iter(policies), None)
    if agent is None or params.evaluate.saliency_steps == 0:
        return
    d = df[df["method"] == AGENT_ROWS[agent]].reset_index(drop=True)
    i = _show_indices(d, 1)[0]
    label = f"{d.at[i, 'split']} episode {d.at[i, 'episode']}"
    evaluate_video(out, params, rt, agent, policies[agent], episode_from_row(d.iloc[i], label))


def write_outputs(
    df: pd.DataFrame,
    paths: Mapping[str, list[np.ndarray]],
    scene: Scene,
    out_dir: str | Path,
    metrics_path: str | Path,
    params: EvaluateParams,
    seed: int,
    *,
    stop_threshold: float | None = None,
    n_trajectories: int = 4,
    extra: Callable[[Path], None] | None = None,
) -> dict[str, Any]:
    """Write episodes.csv, methods.csv, success_by_distance.csv, trajectories.png, episode.gif and the metrics JSON.

    Returns the metrics dict. ``df`` and ``paths`` come from :func:`evaluate_methods`; ``extra``
    writes more files into the output folder before it replaces the old one.
    """
    bins = params.distance_bins
    metrics = metrics_dict(df, bins, stop_threshold, texture_bins=params.texture_bins)
    with staged_dir(out_dir) as out:
        write_csv(out / "episodes.csv", df)
        write_csv(out / "methods.csv", methods_table(df, bins))
        write_csv(out / "success_by_distance.csv", distance_table(df, bins))
        write_csv(out / "success_by_texture.csv", texture_table(df, params.texture_bins))
        _write_trajectories(df, paths, scene, out / "trajectories.png", n_trajectories)
        _write_gif(df, paths, scene, out / "episode.gif", params.gif_steps)
        if extra is not None:
            extra(out)
    metrics.update(
        seed=seed,
        episodes_per_split=params.episodes,
        max_steps=params.max_steps,
        success_radius=params.success_radius,
        decoy_rate=params.decoy_rate,
        methods=[str(m) for m in pd.unique(df["method"])],
    )
    write_json(metrics_path, metrics)
    return metrics


def evaluate_all(
    params: Params, rt: Runtime, policies: Mapping[str, str | Path]
) -> tuple[pd.DataFrame, dict[str, list[np.ndarray]]]:
    """Every agent in ``policies`` (agent name -> policy.zip) and every baseline on the same episodes.

    Returns the per-episode rows (a ``method`` column) and the flown paths by method.
    """
    p = params.evaluate
    episodes = make_split_episodes(rt.scene, ["train", "test"], p.episodes, params.base.seed)
    if p.decoy_rate > 0:
        decoys = make_decoy_episodes(rt.scene, p.episodes, params.base.seed, p.decoy_rate, p.success_radius)
        episodes = pd.concat([episodes, decoys], ignore_index=True)
    test = episodes[episodes["split"] == "test"]
    runs = [("same", episodes)] + [(d, test.assign(split=f"test_{d}")) for d in rt.domains if d != "same"]
    frames, paths = [], {}
    models = load_agents(params, policies)
    for domain, eps in runs:
        scene = rt.scene if domain == "same" else rt.domain_scene(domain)
        df, pth = evaluate_on(params, rt, scene, models, eps)
        heading = rt.photos[domain].heading_deg if domain in rt.photos else np.zeros(len(scene.targets))
        df["photo_heading_deg"] = heading[df["target_row"].to_numpy(np.int64)]
        if "texture" in scene.targets:
            df["texture"] = scene.targets["texture"].to_numpy(float)[df["target_row"].to_numpy(np.int64)]
        frames.append(df)
        if domain == "same":
            paths.update(pth)
    return pd.concat(frames, ignore_index=True), paths


def load_agents(params: Params, policies: Mapping[str, str | Path]) -> dict[str, Any]:
    """Each agent's trained model (agent name -> policy.zip in, agent name -> model out), loaded once."""
    return {agent: load_policy(path, agent_variant(params, agent).train.algo) for agent, path in policies.items()}


def method_factories(
    params: Params, rt: Runtime, scene: Scene, models: Mapping[str, Any], oracle: bool = True
) -> list[tuple[NavConfig, dict[str, Any]]]:
    """(config, {method name: controller factory}) groups: each agent (``models`` from :func:`load_agents`)
    with its own config, then the baselines (without the template-matching oracle if not ``oracle``)."""
    p = params.evaluate
    groups: list[tuple[NavConfig, dict[str, Any]]] = []
    for agent, model in models.items():
        ap = agent_variant(params, agent)
        cfg = nav_config(ap, rt, max_steps=p.max_steps, shaping=0.0)
        groups.append((cfg, {AGENT_ROWS[agent]: functools.partial(AgentController, model)}))
    base = nav_config(params, rt, max_steps=p.max_steps, shaping=0.0)
    cfg = dataclasses.replace(base, agent=base.agent.model_copy(update={"memory": "retrieval", "nav": True}))
    baselines = dict(default_baselines(scene, rt.memory, params.base.seed))
    if not oracle:
        baselines.pop("template_oracle")
    groups.append((cfg, baselines))
    return groups


def evaluate_on(
    params: Params, rt: Runtime, scene: Scene, models: Mapping[str, Any], episodes: pd.DataFrame
) -> tuple[pd.DataFrame, dict[str, list[np.ndarray]]]:
    """Every agent and baseline on ``episodes`` of ``scene`` (whose target photos may come from a query domain)."""
    frames, paths = [], {}
    for cfg, methods in method_factories(params, rt, scene, models):
        df, pth = evaluate_methods(scene, rt.memory, cfg, methods, episodes)
        frames.append(df)
        paths.update(pth)
    return pd.concat(frames, ignore_index=True), paths


def _wide_reliability(tables: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per confidence bin: its middle, then per method the share right, mean confidence and count."""
    first = next(iter(tables.values()))
    out = pd.DataFrame({"bin": (first["bin_low"] + first["bin_high"]) / 2})
    for m, t in tables.items():
        out[m], out[f"{m}_confidence"], out[f"{m}_count"] = t["accuracy"], t["confidence"], t["count"]
    return out


def write_calibration(
    out: Path, params: Params, rt: Runtime, calibrators: Mapping[str, Calibrator], answers: pd.DataFrame
) -> dict[str, Any]:
    """Write ``calibration.json``, ``locate_answers.csv``, ``reliability.csv`` and ``reliability.png``
    into ``out``; returns the locate metrics (per method: the fitting split and the test split)."""
    from maprl.viz.plots import plot_reliability

    lp = params.locate
    save_calibration(out / CALIBRATION_FILE, dict(calibrators), rt, params)
    write_csv(out / "locate_answers.csv", answers)
    test = answers[answers["split"] == "test"]
    tables = {
        m: reliability_table(g["confidence"].to_numpy(), g["success"].to_numpy(), lp.reliability_bins)
        for m, g in test.groupby("method", sort=False)
    }
    write_csv(out / "reliability.csv", _wide_reliability(tables))
    with atomic_path(out / "reliability.png") as tmp:
        plot_reliability(tables, str(tmp), f"test targets: {len(test) // max(1, len(tables))} queries per method")
    return {
        "fit_split": fit_split(rt),
        "abstain_below": lp.abstain_below,
        "restarts": lp.restarts,
        "methods": {
            m: {s: summarise_confidence(g[g["split"] == s], lp.abstain_below, lp.reliability_bins)
                for s in dict.fromkeys(g["split"])}
            for m, g in answers.groupby("method", sort=False)
        },
    }  # fmt: skip


@dataclasses.dataclass(frozen=True)
class _PartState:
    """What each independent part of the stage reads: the params, the runtime and the agents' policy paths."""

    params: Params
    rt: Runtime
    policies: Mapping[str, str | Path]


def _load_part_state(
    params: Params, map_path: str | Path, targets_path: str | Path, features_dir: str | Path,
    policies: Mapping[str, str | Path], threads: int,
) -> _PartState:  # fmt: skip
    """A worker's state (its own runtime, ``threads`` torch threads)."""
    rt = load_runtime(params, map_path, targets_path, features_dir)
    configure_torch(threads)
    return _PartState(params, rt, dict(policies))


def _run_part(state: _PartState, part: str) -> Any:
    """``episodes``: :func:`evaluate_all`; ``answers:<split>``: the locate methods' answers to that split's
    calibration queries (:func:`~maprl.eval.calibration.split_answers`)."""
    if part == "episodes":
        return evaluate_all(state.params, state.rt, state.policies)
    return split_answers(state.params, state.rt, part.removeprefix("answers:"), state.policies.get("memory"))


def run_evaluate(
    params: Params,
    map_path: str | Path,
    targets_path: str | Path,
    features_dir: str | Path,
    policies: Mapping[str, str | Path],
    out_dir: str | Path,
    metrics_path: str | Path,
    locate_metrics_path: str | Path | None = None,
) -> dict[str, Any]:
    """The evaluate stage. ``policies`` maps agent names (:data:`~maprl.config.AGENTS`) to their policy.zip.

    With ``locate_metrics_path``, it also calibrates the confidence of ``maprl locate``
    (:mod:`maprl.eval.calibration`, with the ``memory`` policy) and writes its figures there.
    The episodes and the two calibration answer sets run in ``evaluate.workers`` processes; each
    draws from its own seeded generators, so the outputs do not depend on the number of workers.
    """
    unknown = sorted(set(policies) - set(AGENTS))
    if unknown:
        raise InputError(f"unknown agent(s) {', '.join(unknown)}; agents are {', '.join(AGENTS)}")
    rt = load_runtime(params, map_path, targets_path, features_dir)
    parts = ["episodes"]
    if locate_metrics_path is not None:
        fit_on = fit_split(rt, say=True)
        parts += [f"answers:{fit_on}", "answers:test"]
    state = _PartState(params, rt, dict(policies))
    load_args = (params, map_path, targets_path, features_dir, dict(policies), 1)
    # a part runs with one torch thread, in a worker or (evaluate.workers 1) here: embeddings of small
    # inputs are not the same bytes with 1 and 2 threads (the e2e test's tiny params showed it)
    configure_torch(1)
    results = ordered_map(
        _run_part, parts, params.evaluate.workers, local=state, setup=_load_part_state, setup_args=load_args,
        desc="evaluate", unit="part",
    )  # fmt: skip
    df, paths = results[0]
    locate: dict[str, Any] = {}

    def extra(out: Path) -> None:
        _write_saliency(out, params, rt, policies, df)
        if locate_metrics_path is not None:
            calibrators, answers = fit_calibrators(results[1], results[2])
            locate.update(write_calibration(out, params, rt, calibrators, answers))

    metrics = write_outputs(
        df, paths, rt.scene, out_dir, metrics_path, params.evaluate, params.base.seed,
        stop_threshold=rt.stop_threshold, extra=extra,
    )  # fmt: skip
    if locate_metrics_path is not None:
        write_json(locate_metrics_path, locate)
    return metrics
