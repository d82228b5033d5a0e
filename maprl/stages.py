"""Pipeline stages as small argument specs plus one library call each.

``pipeline/<stage>.py`` and ``maprl <stage>`` both run :func:`run_stage`, so a stage behaves
the same from DVC and from the shell. User errors print one message and exit 2 before any
output is replaced.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from maprl.errors import MapRLError


def guard(fn: Callable[[], Any]) -> int:
    """Run ``fn``; turn user errors and Ctrl-C into a message and a non-zero exit code."""
    try:
        result = fn()
    except MapRLError as err:
        print(f"maprl: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("maprl: interrupted; earlier outputs are left as they were", file=sys.stderr)
        return 130
    if result is not None:
        print(json.dumps(result, indent=2, sort_keys=True, default=str))
    return 0


def _params(args: argparse.Namespace) -> Any:
    from maprl.config import load_params

    return load_params(args.params)


def _fetch(args: argparse.Namespace) -> Any:
    from maprl.fetch import run_fetch

    return run_fetch(_params(args), args.out, args.metrics)


def _tile(args: argparse.Namespace) -> Any:
    from maprl.tiling import run_tile

    return run_tile(_params(args), args.map, args.out, args.metrics)


# name -> (help, run, [(flag, default, help)])
STAGES: dict[str, tuple[str, Callable[[argparse.Namespace], Any], list[tuple[str, str, str]]]] = {
    "fetch": (
        "Fetch imagery (synthetic world, local file or Earth Engine) into map.tif + map.json.",
        _fetch,
        [("--out", "data/map", "output folder"), ("--metrics", "metrics/fetch.json", "metrics JSON")],
    ),
    "tile": (
        "Sample target crops over valid map areas and split them train/test.",
        _tile,
        [
            ("--map", "data/map/map.tif", "map GeoTIFF"),
            ("--out", "data/targets", "output folder"),
            ("--metrics", "metrics/tile.json", "metrics JSON"),
        ],
    ),
}


def add_stage_parser(sub: Any, name: str) -> argparse.ArgumentParser:
    """Add the sub-command for stage ``name`` to an argparse sub-parser collection."""
    help_, fn, flags = STAGES[name]
    p: argparse.ArgumentParser = sub.add_parser(name, help=help_, description=help_)
    p.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
    for flag, default, text in flags:
        p.add_argument(flag, default=default, help=f"{text} (default: {default})")
    p.set_defaults(func=fn)
    return p


def run_stage(name: str, argv: Sequence[str] | None = None) -> int:
    """Entry point of ``pipeline/<name>.py``."""
    parser = argparse.ArgumentParser(prog=f"pipeline/{name}.py", description=STAGES[name][0])
    sub = parser.add_subparsers(dest="command", required=True)
    add_stage_parser(sub, name)
    args = parser.parse_args([name, *(sys.argv[1:] if argv is None else argv)])
    return guard(lambda: args.func(args))
