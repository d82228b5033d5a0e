"""The ``maprl`` command line.

Every pipeline stage is also a sub-command (``maprl fetch`` does what ``dvc repro fetch``
runs). Errors a user can fix print one clear message, no traceback, and exit 2.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from maprl.stages import LEARNING_INPUTS, STAGES, _params, add_stage_parser, guard

EPILOG = """\
examples:
  maprl fetch                      # build data/map/map.tif from params.yaml (default: synthetic world)
  maprl tile                       # sample target crops and the train/test split
  maprl encode / tune / train / evaluate   # the other stages, one by one
  maprl tune-worker --storage postgresql://user:pw@db-host/maprl --study maprl   # extra tuning worker
  maprl check-params               # validate params.yaml and print the resolved values
  dvc repro                        # run the whole pipeline with caching
"""


def cmd_check_params(args: argparse.Namespace) -> Any:
    return _params(args).model_dump(mode="json")


def cmd_params_table(args: argparse.Namespace) -> None:
    from maprl.config import params_table

    print(params_table())


def cmd_tune_worker(args: argparse.Namespace) -> Any:
    from maprl.runtime import load_runtime
    from maprl.tuning import run_worker

    params = _params(args)
    rt = load_runtime(params, args.map, args.targets, args.features)
    return {"trials_run": run_worker(args.storage, args.study, params, rt, args.n_trials)}


def _add_tune_worker(sub: Any) -> None:
    text = (
        "Join an Optuna study as an extra worker (another machine sharing a PostgreSQL storage). "
        "Run `dvc repro encode` (or `dvc pull`) there first so the map, targets and features exist."
    )
    p = sub.add_parser("tune-worker", help=text, description=text)
    p.add_argument("--storage", required=True, help="study storage, e.g. postgresql://user:pw@host:5432/maprl")
    p.add_argument("--study", default="maprl", help="study name (tune.study_name; default: maprl)")
    p.add_argument(
        "--n-trials", type=int, default=None, help="stop when the study has this many (default: tune.n_trials)"
    )
    p.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
    for flag, default, text in LEARNING_INPUTS:
        p.add_argument(flag, default=default, help=f"{text} (default: {default})")
    p.set_defaults(func=cmd_tune_worker)


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
    for name in STAGES:
        add_stage_parser(sub, name)
    text = "Validate params.yaml and print every resolved value (defaults filled in)."
    p = sub.add_parser("check-params", help=text, description=text)
    p.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
    p.set_defaults(func=cmd_check_params)
    _add_tune_worker(sub)
    text = "Print the README's params table (markdown), generated from the validated models."
    sub.add_parser("params-table", help=text, description=text).set_defaults(func=cmd_params_table)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return guard(lambda: args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
