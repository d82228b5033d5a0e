"""Every ``train.algo`` at the same timestep budget on the default world, over several training seeds,
beside the no-learning baselines on the same fixed test episodes.

Usage (after `dvc repro`, from the repository root):
    python benchmarks/bench_algos.py --seeds 3 [--timesteps 100000] [--algos ppo,a2c,...] [--out /tmp/bench_algos]
    python benchmarks/bench_algos.py --table /tmp/a/rows.csv /tmp/b/rows.csv   # one table from several runs

Each algorithm trains the ``memory`` agent (PPO's tuned hyperparameters where the algorithm reads them:
:func:`maprl.learn.training.algo_kwargs`) from seeds ``base.seed + 0..n-1``. ``sac`` and ``td3`` fly the
continuous Box(2) actions; ``dqn`` and ``qrdqn`` fly the 8 compass moves (``env.actions: discrete``), so
``ppo`` is also run on those moves (``ppo/discrete``) as their like-for-like reference. Every policy is
evaluated on the evaluate stage's fixed test episodes; retrieve-then-fly and the scripted search give one
value each. Prints per algorithm the IQM of test success and SPL with a 95 % stratified-bootstrap
interval (rliable), the success of each seed, and the mean training wall time (min-max over seeds).
"""

from __future__ import annotations

import argparse
import functools
import time
from pathlib import Path

import pandas as pd
from bench_search import BEST, FEATURES, MAP, TARGETS, episode_sets, variant

from maprl.config import ALGOS, load_params
from maprl.eval.agents import AgentController, load_policy
from maprl.eval.baselines import RetrieveThenFly
from maprl.eval.episodes import evaluate_methods
from maprl.io import write_csv
from maprl.learn.training import RunPaths, load_best_hparams, train
from maprl.nav.runtime import load_runtime, nav_config
from maprl.report import aggregate

DISCRETE = ("dqn", "qrdqn", "ppo/discrete")
RUNS = (*ALGOS, "ppo/discrete")


def overrides(run: str) -> tuple[dict[str, object], dict[str, object]]:
    """(train, env) overrides of one run name: ``ppo/discrete`` is PPO on the 8 compass moves."""
    algo = run.split("/")[0]
    env: dict[str, object] = {"actions": "discrete"} if run in DISCRETE else {}
    return {"algo": algo, "checkpoint_freq": 10**9}, env


def run(params_path: str, runs: list[str], seeds: int, timesteps: int, out: Path) -> pd.DataFrame:
    params = load_params(params_path, stage="train")
    params = params.model_copy(update={"train": params.train.model_copy(update={"total_timesteps": timesteps})})
    rt = load_runtime(params, MAP, TARGETS, FEATURES)
    hparams = load_best_hparams(BEST) if params.train.hparams == "tuned" else None
    test = dict(episode_sets(params, rt))["test"]
    cfg = nav_config(params, rt, max_steps=params.evaluate.max_steps, shaping=0.0)
    baselines = {"retrieve_then_fly": RetrieveThenFly, "retrieve_then_search": lambda: RetrieveThenFly(search=True)}
    df, _ = evaluate_methods(rt.scene, rt.memory, cfg, baselines, test, record_paths=False)
    rows = [
        {"method": m, "seed": i, "success_rate": g["success"].mean(), "spl": g["spl"].mean(), "seconds": 0.0}
        for m, g in df.groupby("method", sort=False)
        for i in range(seeds)
    ]
    for name in runs:
        train_over, env_over = overrides(name)
        for i in range(seeds):
            sp = variant(params, "memory", train_over, params.base.seed + i)
            sp = sp.model_copy(update={"env": sp.env.model_copy(update=env_over)})
            folder = out / name.replace("/", "-") / f"seed{i}"
            paths = RunPaths(
                folder / "policy.zip", folder / "ck", folder / "history.json", folder / "train.json", folder / "live"
            )
            t0 = time.perf_counter()
            train(sp, rt, paths, hparams)
            seconds = time.perf_counter() - t0
            print(f"{name} seed {i}: trained in {seconds:.0f} s", flush=True)
            model = load_policy(paths.policy, sp.train.algo)
            cfg_i = nav_config(sp, rt, max_steps=params.evaluate.max_steps, shaping=0.0)
            methods = {name: functools.partial(AgentController, model)}
            d, _ = evaluate_methods(rt.scene, rt.memory, cfg_i, methods, test, record_paths=False)
            rows.append({"method": name, "seed": i, "success_rate": d["success"].mean(), "spl": d["spl"].mean(),
                         "seconds": seconds})  # fmt: skip
    return pd.DataFrame(rows)


def table(rows: pd.DataFrame) -> str:
    """The benchmark's table; a baseline is listed once, however many files repeat it."""
    rows = rows.drop_duplicates(["method", "seed"])
    lines = [
        "| method | actions | test success IQM [95 % CI] | SPL IQM [95 % CI] | success per seed "
        "| train s, mean (min-max) |",
        "|---|---|---|---|---|---|",
    ]
    s, p = aggregate(rows, "success_rate", reps=5000), aggregate(rows, "spl", reps=5000)
    for (_, a), (_, b) in zip(s.iterrows(), p.iterrows(), strict=True):
        cell = lambda r: f"{r['iqm']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]"  # noqa: E731
        secs = rows.loc[rows["method"] == a["method"], "seconds"]
        wall = "-" if secs.max() == 0 else f"{secs.mean():.0f} ({secs.min():.0f}-{secs.max():.0f})"
        actions = "8 moves" if a["method"] in DISCRETE else "Box(2)" if a["method"] in RUNS else "no learning"
        lines.append(
            f"| {a['method']} | {actions} | {cell(a)} | {cell(b)} | {', '.join(f'{v:.3f}' for v in a['values'])} "
            f"| {wall} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--seeds", type=int, default=3, help="training seeds per algorithm (base.seed + 0..n-1)")
    ap.add_argument("--timesteps", type=int, default=100_000, help="the budget of every algorithm")
    ap.add_argument("--algos", default=",".join(RUNS), help=f"comma-separated, of: {', '.join(RUNS)}")
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench_algos"), help="policies and rows.csv go here")
    ap.add_argument("--table", type=Path, nargs="+", help="print one table from these rows.csv files, train nothing")
    args = ap.parse_args()
    if args.table:
        print(table(pd.concat([pd.read_csv(f) for f in args.table], ignore_index=True)))
        return
    runs = [r for r in args.algos.split(",") if r]
    unknown = sorted(set(runs) - set(RUNS))
    if unknown:
        ap.error(f"--algos: unknown {', '.join(unknown)}; one of {', '.join(RUNS)}")
    t0 = time.perf_counter()
    rows = run(args.params, runs, args.seeds, args.timesteps, args.out)
    write_csv(args.out / "rows.csv", rows)
    print(
        f"\n# bench_algos: memory agent, {args.timesteps} timesteps each, {args.seeds} training seeds, "
        f"{time.perf_counter() - t0:.0f} s wall, params {args.params}\n"
    )
    print(table(rows))


if __name__ == "__main__":
    main()
