"""The ``maprl`` command line.

Every pipeline stage is also a sub-command (``maprl fetch`` does what ``dvc repro fetch``
runs). Errors a user can fix print one clear message, no traceback, and exit 2.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from maprl.stages import STAGES, _params, add_stage_parser, guard

EPILOG = """\
examples:
  maprl fetch                      # build data/map/map.tif from params.yaml (default: synthetic world)
  maprl tile                       # sample target crops and the train/test split
  maprl check-params               # validate params.yaml and print the resolved values
  dvc repro                        # run the whole pipeline with caching
"""


def cmd_check_params(args: argparse.Namespace) -> Any:
    return _params(args).model_dump(mode="json")


def cmd_params_table(args: argparse.Namespace) -> None:
    from maprl.config import params_table

    print(params_table())


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
    text = "Print the README's params table (markdown), generated from the validated models."
    sub.add_parser("params-table", help=text, description=text).set_defaults(func=cmd_params_table)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return guard(lambda: args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
