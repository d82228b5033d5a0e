"""The ``maprl`` command line.

``maprl <stage>`` runs one pipeline stage exactly as ``dvc repro`` would (the command and paths
of ``dvc.yaml``, so paths live in one place), without DVC's caching. ``maprl tune-worker``
joins a tuning study from another machine, ``maprl check-params`` validates params.yaml.
Errors a user can fix print one clear message, no traceback, and exit 2.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from maprl.config import AGENTS, STAGE_SECTIONS, agent_variant, load_params
from maprl.errors import InputError
from maprl.stage import STAGE_HELP, guard

EPILOG = """\
examples:
  maprl fetch                      # build data/map/map.tif from params.yaml (default: synthetic world)
  maprl tile                       # sample target crops and the train/test split
  maprl encode / tune / evaluate   # the other stages, one by one
  maprl train --agent original     # one of the trained agents: memory, nomemory, original
  maprl tune-worker --storage postgresql://user:pw@db-host/maprl   # extra tuning worker
  maprl check-params               # validate params.yaml and print the resolved values
  maprl report                     # IQM and 95 % intervals over seeds (dvc exp run -S base.seed=N)
  dvc repro                        # run the whole pipeline with caching
"""


def stage_command(name: str, dvc_yaml: Path = Path("dvc.yaml"), agent: str = "memory") -> list[str]:
    """The command ``dvc repro`` runs for stage ``name``, from ``dvc.yaml`` (the one place paths live)."""
    if not dvc_yaml.exists():
        raise InputError(f"{dvc_yaml} not found; run `maprl {name}` from the root of a maprl repository")
    spec = (yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages", {}).get(name)
    if not isinstance(spec, dict) or "cmd" not in spec:
        raise InputError(f"{dvc_yaml} has no stage {name!r}")
    return shlex.split(str(spec["cmd"]).replace("${item.agent}", agent))


def run_pipeline_stage(name: str, params: str, agent: str = "memory") -> int:
    """Run stage ``name`` as dvc.yaml declares it, with another params file if given."""
    cmd = stage_command(name, agent=agent)
    if cmd and cmd[0] == "python":
        cmd[0] = sys.executable
    return subprocess.call([*cmd, "--params", params])


def _add_stage(sub: Any, name: str) -> None:
    p = sub.add_parser(name, help=STAGE_HELP[name], description=STAGE_HELP[name] + " Paths come from dvc.yaml.")
    p.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
    if name == "train":
        p.add_argument("--agent", default="memory", choices=AGENTS, help="which agent (default: memory)")
    p.set_defaults(func=lambda a: run_pipeline_stage(name, a.params, getattr(a, "agent", "memory")), raw=True)


def cmd_check_params(args: argparse.Namespace) -> Any:
    return load_params(args.params).model_dump(mode="json")


def cmd_params_table(args: argparse.Namespace) -> None:
    from maprl.config import params_table

    print(params_table())


def cmd_tune_worker(args: argparse.Namespace) -> Any:
    from maprl.learn.tuning import run_worker
    from maprl.nav.runtime import load_runtime

    params = agent_variant(load_params(args.params, stage="tune"), "memory")  # as the tune stage
    rt = load_runtime(params, args.map, args.targets, args.features)
    return {"trials_run": run_worker(args.storage, args.study, params, rt, args.n_trials)}


def _add_tune_worker(sub: Any) -> None:
    text = (
        "Join an Optuna study as an extra worker (another machine sharing a PostgreSQL storage). "
        "Run `dvc repro encode` (or `dvc pull`) there first so the map, targets and features exist; "
        "the study name gets the same data-and-settings hash as the tune stage's, so workers with "
        "other data never mix into it."
    )
    p = sub.add_parser("tune-worker", help=text, description=text)
    p.add_argument("--storage", required=True, help="study storage, e.g. postgresql://user:pw@host:5432/maprl")
    p.add_argument("--study", default="maprl", help="study base name (tune.study_name; default: maprl)")
    p.add_argument(
        "--n-trials", type=int, default=None, help="stop at this many finished trials (default: tune.n_trials)"
    )
    p.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
    p.add_argument("--map", default="data/map/map.tif", help="map GeoTIFF (default: data/map/map.tif)")
    p.add_argument(
        "--targets", default="data/targets/targets.csv", help="targets table (default: data/targets/targets.csv)"
    )
    p.add_argument("--features", default="data/features", help="encode stage output (default: data/features)")
    p.set_defaults(func=cmd_tune_worker)


def cmd_report(args: argparse.Namespace) -> None:
    from maprl import report
    from maprl.io import write_json

    if args.runs:
        runs = [(str(path), report.read_eval(path)) for path in args.runs]
    else:
        runs = [("workspace", report.read_eval("metrics/eval.json"))] if Path("metrics/eval.json").exists() else []
        runs += report.experiment_runs(args.rev)
    table = report.runs_table(runs, args.split)
    seeds = sorted(set(table["seed"]))
    if len(seeds) < args.min_seeds:
        raise InputError(
            f"{len(seeds)} seed(s) found ({', '.join(map(str, seeds))}), --min-seeds is {args.min_seeds}: "
            "queue more with `dvc exp run --queue -S base.seed=N` and `dvc queue start`"
        )
    tables = {m: report.aggregate(table, m, args.reps) for m in report.METRICS}
    text = report.markdown(tables, args.split, seeds)
    if args.out:
        sources = list(dict.fromkeys(table["source"]))
        write_json(
            args.out,
            {"split": args.split, "seeds": seeds, "runs": sources, "reps": args.reps}
            | {m: t.to_dict(orient="records") for m, t in tables.items()},
        )
    if args.plot:
        report.plot_intervals(tables, args.plot, f"{args.split} split, {len(seeds)} seeds")
    print(text)


def _add_report(sub: Any) -> None:
    text = (
        "Aggregate results over pipeline seeds: per method, the interquartile mean and a 95 %% "
        "stratified-bootstrap interval (rliable) of the test success rate and SPL. Reads the workspace's "
        "metrics/eval.json and every DVC experiment of --rev, or the eval.json files given."
    )
    epilog = (
        "run the seeds first:\n"
        "  for s in 1 2 3 4; do dvc exp run --queue -S base.seed=$s; done\n"
        "  dvc queue start -j 1 && dvc queue status\n"
        "  maprl report --out metrics/seeds.json --plot data/seeds.png"
    )
    p = sub.add_parser(
        "report", help=text, description=text, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("runs", nargs="*", help="eval.json files (default: the workspace and the DVC experiments)")
    p.add_argument("--rev", default="HEAD", help="the commit whose experiments to read (default: HEAD)")
    p.add_argument("--split", default="test", choices=("train", "test", "test_decoy"), help="default: test")
    p.add_argument("--reps", type=int, default=50_000, help="bootstrap resamples (default: 50000)")
    p.add_argument("--min-seeds", type=int, default=1, help="fail with fewer seeds than this (default: 1)")
    p.add_argument("--out", default=None, help="write the aggregate as JSON here (e.g. metrics/seeds.json)")
    p.add_argument("--plot", default=None, help="write an interval plot here (PNG)")
    p.set_defaults(func=cmd_report)


def build_parser() -> argparse.ArgumentParser:
    from maprl import __version__

    parser = argparse.ArgumentParser(
        prog="maprl",
        description="Locate a photo on a map: an RL agent flies a view over imagery until it matches.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"maprl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in STAGE_SECTIONS:
        _add_stage(sub, name)
    text = "Validate params.yaml and print every resolved value (defaults filled in)."
    p = sub.add_parser("check-params", help=text, description=text)
    p.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
    p.set_defaults(func=cmd_check_params)
    _add_tune_worker(sub)
    _add_report(sub)
    text = "Print the README's params table (markdown), generated from the validated models."
    sub.add_parser("params-table", help=text, description=text).set_defaults(func=cmd_params_table)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "raw", False):  # a pipeline stage: its own process prints its errors
        code: list[int] = []
        status = guard(lambda: code.append(args.func(args)))
        return status or code[0]
    return guard(lambda: args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
