"""Does the learned searcher earn its place? the ``search`` agent over several training seeds against the
no-learning baselines, on the evaluate stage's own fixed episodes.

Usage (after `dvc repro`, from the repository root):
    python benchmarks/bench_search.py --seeds 3 [--timesteps 300000] [--params params.yaml] [--out /tmp/bench_search]
    python benchmarks/bench_search.py --agent memory --algo recurrent_ppo --decoy-rate 0.3 --seeds 1   # other agents
    python benchmarks/bench_search.py --agent randomized --decoy-rate 0.5 --curriculum 4   # with a curriculum
    python benchmarks/bench_search.py --recall-only        # how often the truth is among the top-k candidates

The map, targets, features, tuned hyperparameters and episodes are the pipeline's (data/, models/,
``base.seed``); only the searcher's training seed changes (``base.seed + i``). Every method runs on
the same episodes: the test split, the decoy split (``test_decoy``) and each query domain's test
split (``test_<domain>``). The baselines do not learn, so they give one value per split. Prints per
method and split the IQM of success and SPL over the seeds with a 95 % stratified-bootstrap
interval (rliable, as ``maprl report``), and the mean; writes the per-seed rows as CSV (``--out``).

Protocols: the searcher must STOP inside the success radius (``env.stop_action``); the baselines end
through the calibrated stop rule or the step budget, and succeed if their final view is inside the
radius. That is the stricter protocol for the searcher.
"""

from __future__ import annotations

import argparse
import functools
import time
from pathlib import Path

import numpy as np
import pandas as pd

from maprl.config import agent_variant, load_params
from maprl.eval.agents import AgentController, load_policy
from maprl.eval.baselines import RetrieveThenFly
from maprl.eval.episodes import evaluate_methods, make_decoy_episodes, make_split_episodes
from maprl.io import write_csv
from maprl.learn.training import RunPaths, load_best_hparams, train
from maprl.nav.runtime import Runtime, load_runtime, nav_config
from maprl.report import aggregate

MAP, TARGETS, FEATURES, BEST = (
    "data/map/map.tif",
    "data/targets/targets.csv",
    "data/features",
    "models/best_hparams.yaml",
)


def episode_sets(params, rt: Runtime) -> list[tuple[str, pd.DataFrame]]:  # type: ignore[no-untyped-def]
    """(split name, episodes) exactly as the evaluate stage draws them."""
    p = params.evaluate
    test = make_split_episodes(rt.scene, ["train", "test"], p.episodes, params.base.seed)
    test = test[test["split"] == "test"]
    sets = [("test", test)]
    if p.decoy_rate > 0:
        sets.append(
            ("test_decoy", make_decoy_episodes(rt.scene, p.episodes, params.base.seed, p.decoy_rate, p.success_radius))
        )
    sets += [(f"test_{d}", test.assign(split=f"test_{d}")) for d in rt.domains if d != "same"]
    return sets


def variant(params, agent: str, overrides: dict[str, object], seed: int):  # type: ignore[no-untyped-def]
    """``agent``'s params (``--agent``), with train-section ``overrides`` (``--algo``, ``--decoy-rate``,
    ``--curriculum``) and training seed ``seed``."""
    sp = agent_variant(params, agent)
    train_update: dict[str, object] = {"progress_bar": False, "resume": False, **overrides}
    base = sp.base.model_copy(update={"seed": seed})
    return sp.model_copy(update={"base": base, "train": sp.train.model_copy(update=train_update)})


def run(
    params_path: str,
    seeds: int,
    timesteps: int | None,
    out: Path,
    agent: str = "search",
    overrides: dict[str, object] | None = None,
) -> pd.DataFrame:
    params = load_params(params_path, stage="train")
    if timesteps is not None:
        params = params.model_copy(update={"train": params.train.model_copy(update={"total_timesteps": timesteps})})
    rt = load_runtime(params, MAP, TARGETS, FEATURES)
    hparams = load_best_hparams(BEST) if params.train.hparams == "tuned" else None
    sets = episode_sets(params, rt)
    rows = []
    base_cfg = nav_config(params, rt, max_steps=params.evaluate.max_steps, shaping=0.0)
    baselines = {"retrieve_then_fly": RetrieveThenFly, "retrieve_then_search": lambda: RetrieveThenFly(search=True)}
    for split, eps in sets:
        scene = rt.scene if split in ("test", "test_decoy") else rt.domain_scene(split.removeprefix("test_"))
        df, _ = evaluate_methods(scene, rt.memory, base_cfg, baselines, eps, record_paths=False)
        for method, g in df.groupby("method", sort=False):
            for i in range(seeds):
                rows.append(
                    {
                        "method": method,
                        "seed": i,
                        "split": split,
                        "success_rate": g["success"].mean(),
                        "spl": g["spl"].mean(),
                    }
                )
    overrides = overrides or {}
    name = f"agent_{agent}" + "".join(f"_{k}{v}" for k, v in overrides.items())
    for i in range(seeds):
        sp = variant(params, agent, overrides, params.base.seed + i)
        folder = out / f"seed{i}"
        paths = RunPaths(
            folder / "policy.zip", folder / "ck", folder / "history.json", folder / "train.json", folder / "live"
        )
        t0 = time.perf_counter()
        train(sp, rt, paths, hparams)
        print(f"seed {i}: trained in {time.perf_counter() - t0:.0f} s", flush=True)
        model = load_policy(paths.policy, sp.train.algo)
        cfg = nav_config(sp, rt, max_steps=params.evaluate.max_steps, shaping=0.0)
        for split, eps in sets:
            scene = rt.scene if split in ("test", "test_decoy") else rt.domain_scene(split.removeprefix("test_"))
            methods = {name: functools.partial(AgentController, model)}
            df, _ = evaluate_methods(scene, rt.memory, cfg, methods, eps, record_paths=False)
            rows.append({"method": name, "seed": i, "split": split,
                         "success_rate": df["success"].mean(), "spl": df["spl"].mean()})  # fmt: skip
    return pd.DataFrame(rows)


def recall_table(params_path: str, k_max: int = 5) -> str:
    """Per split: the share of test photos whose target is among the top k map-memory candidates."""
    params = load_params(params_path, stage="train")
    rt = load_runtime(params, MAP, TARGETS, FEATURES)
    radius = params.evaluate.success_radius
    assert rt.memory is not None  # load_runtime always builds the map memory
    lines = ["| split | " + " | ".join(f"truth in top {k}" for k in range(1, k_max + 1)) + " |"]
    lines.append("|---|" + "---|" * k_max)
    for split, eps in episode_sets(params, rt):
        if split == "test_decoy":
            continue  # the same photos as test; its decoy is put in front of the list by the env
        scene = rt.scene if split == "test" else rt.domain_scene(split.removeprefix("test_"))
        rows = eps["target_row"].to_numpy(int)
        cands, _ = rt.memory.query(scene.target_embeddings()[rows], k_max)
        near = np.hypot(*np.moveaxis(cands - scene.targets_xy[rows][:, None, :], 2, 0)) <= radius
        lines.append(
            f"| {split} | " + " | ".join(f"{near[:, :k].any(axis=1).mean():.3f}" for k in range(1, k_max + 1)) + " |"
        )
    return "\n".join(lines)


def table(rows: pd.DataFrame) -> str:
    lines = [
        "| split | method | success IQM [95 % CI] | SPL IQM [95 % CI] | success per seed |",
        "|---|---|---|---|---|",
    ]
    for split, g in rows.groupby("split", sort=False):
        s, p = aggregate(g, "success_rate", reps=5000), aggregate(g, "spl", reps=5000)
        for (_, a), (_, b) in zip(s.iterrows(), p.iterrows(), strict=True):
            cell = lambda r: f"{r['iqm']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]"  # noqa: E731
            lines.append(
                f"| {split} | {a['method']} | {cell(a)} | {cell(b)} | {', '.join(f'{v:.3f}' for v in a['values'])} |"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--seeds", type=int, default=3, help="training seeds of the searcher (base.seed + 0..n-1)")
    ap.add_argument("--timesteps", type=int, default=None, help="train.total_timesteps (default: params)")
    ap.add_argument("--agent", default="search", help="the agent variant to train (default: search)")
    ap.add_argument("--algo", default=None, help="train.algo override (ppo | recurrent_ppo)")
    ap.add_argument("--decoy-rate", type=float, default=None, help="train.decoy_rate override")
    ap.add_argument("--curriculum", type=int, default=None, help="train.curriculum override (levels; 0: off)")
    ap.add_argument("--recall-only", action="store_true", help="print only how often the truth is among the candidates")
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench_search"), help="policies and rows.csv go here")
    args = ap.parse_args()
    if args.recall_only:
        print(recall_table(args.params))
        return
    t0 = time.perf_counter()
    given = {"algo": args.algo, "decoy_rate": args.decoy_rate, "curriculum": args.curriculum}
    overrides = {k: v for k, v in given.items() if v is not None}
    rows = run(args.params, args.seeds, args.timesteps, args.out, args.agent, overrides)
    write_csv(args.out / "rows.csv", rows)
    changed = ", ".join(f"train.{k} {v}" for k, v in overrides.items()) or "no train overrides"
    print(
        f"\n# bench_search: agent {args.agent}, {changed}; {args.seeds} training seeds, "
        f"{time.perf_counter() - t0:.0f} s wall, params {args.params}\n"
    )
    print(table(rows))


if __name__ == "__main__":
    main()
