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


def _encode(args: argparse.Namespace) -> Any:
    from maprl.encode import run_encode

    return run_encode(_params(args), args.map, args.targets, args.out, args.metrics)


def agent_params(params: Any, agent: str) -> Any:
    """``memory`` trains the agent as configured; ``original`` is the original design (no map memory)."""
    if agent not in ("memory", "original"):
        from maprl.errors import ParamsError

        raise ParamsError(f"--agent must be memory or original, got {agent!r}")
    if agent == "original":
        return params.model_copy(update={"agent": params.agent.model_copy(update={"memory": "none"})})
    return params


def _train(args: argparse.Namespace) -> Any:
    from maprl.runtime import load_runtime
    from maprl.training import run_train

    params = agent_params(_params(args), args.agent)
    rt = load_runtime(params, args.map, args.targets, args.features)
    hparams = None
    if params.train.hparams == "tuned":
        from maprl.tuning import load_best_hparams

        hparams = load_best_hparams(args.best)
    out = f"models/{args.agent}"
    return run_train(params, rt, out, f"metrics/train-{args.agent}.json", f"dvclive/train-{args.agent}", hparams)


def _tune(args: argparse.Namespace) -> Any:
    from maprl.runtime import load_runtime
    from maprl.tuning import run_tune

    params = _params(args)
    rt = load_runtime(params, args.map, args.targets, args.features)
    return run_tune(params, rt, args.out, args.best, args.metrics)


def _evaluate(args: argparse.Namespace) -> Any:
    from maprl.evaluation import run_evaluate

    return run_evaluate(_params(args), args.map, args.targets, args.features, args.models, args.out, args.metrics)


_INPUTS = [
    ("--map", "data/map/map.tif", "map GeoTIFF"),
    ("--targets", "data/targets/targets.csv", "targets table"),
]
# what every learning stage reads: the map, the targets and the encode stage's output
LEARNING_INPUTS = [*_INPUTS, ("--features", "data/features", "encode stage output")]

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
    "encode": (
        "Build the encoder (optionally self-supervised on the map) and the dense feature cache; calibrate the stop.",
        _encode,
        [*_INPUTS, ("--out", "data/features", "output folder"), ("--metrics", "metrics/encode.json", "metrics JSON")],
    ),
    "tune": (
        "Optuna study over PPO hyperparameters on the validation part of the train split (resumable).",
        _tune,
        [
            *LEARNING_INPUTS,
            ("--out", "data/tune", "study folder (journal, trials.csv, tune.png)"),
            ("--best", "models/best_hparams.yaml", "best hyperparameters"),
            ("--metrics", "metrics/tune.json", "metrics JSON"),
        ],
    ),
    "train": (
        "Train the PPO agent on the batched feature env (--agent memory: with map memory; original: without).",
        _train,
        [
            *LEARNING_INPUTS,
            ("--agent", "memory", "memory | original"),
            ("--best", "models/best_hparams.yaml", "tuned hyperparameters (train.hparams: tuned)"),
        ],
    ),
    "evaluate": (
        "Evaluate the agents and the baselines on fixed episodes; write metrics, episodes.csv, plots and a GIF.",
        _evaluate,
        [
            *LEARNING_INPUTS,
            ("--models", "models", "folder with <agent>/policy.zip"),
            ("--out", "data/eval", "output folder"),
            ("--metrics", "metrics/eval.json", "metrics JSON"),
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
