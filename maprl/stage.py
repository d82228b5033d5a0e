"""What every pipeline stage script shares: its arguments, its validated params and a clean exit.

``pipeline/<stage>.py`` parses the paths ``dvc.yaml`` gives it with :func:`stage_parser`, then,
under :func:`guard`, loads the params sections the stage reads and runs one library function;
:func:`guard` turns user errors into one message and exit code 2 (no traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

from maprl.errors import InputError, MapRLError

STAGE_HELP = {
    "fetch": "Fetch imagery (synthetic world, local file or Earth Engine) into map.tif + map.json.",
    "tile": "Sample target crops over valid map areas and split them train/test.",
    "encode": "Build the encoder (self-supervised on the map) and the dense feature cache; calibrate the stop.",
    "tune": "Optuna study over PPO hyperparameters on the validation part of the train split (resumable).",
    "train": "Train the agents on the batched feature env (memory, randomized, nomemory, original, search), "
    "train.workers at a time.",
    "evaluate": "Evaluate the agents and the baselines on fixed episodes; write metrics, tables, plots and a GIF.",
    "robustness": "The agents and no-learning methods under perturbed photos, query domains and perturbed dynamics.",
    "grid": "The published grid protocol (5x5 patches, 4 moves): PPO over seeds against exact no-learning baselines.",
}


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def follow_parent() -> None:
    """Stop (as on Ctrl-C) when the process that started this one dies or sends SIGTERM.

    ``kill -9`` of ``dvc repro`` used to leave its stage running as an orphan, still writing
    outputs while a rerun started the same stage. On Linux the kernel now sends SIGTERM to the
    stage when its parent dies (``PR_SET_PDEATHSIG``), and SIGTERM unwinds like Ctrl-C, so
    temporary files are removed and finished outputs stay whole."""
    try:
        signal.signal(signal.SIGTERM, _interrupt)
    except ValueError:  # not the main thread (an embedding application): leave its signals alone
        return
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):  # no prctl: an orphan finishes on its own, as before
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


PR_SET_PDEATHSIG = 1


def guard(fn: Callable[[], Any]) -> int:
    """Run ``fn``; turn user errors and Ctrl-C into a message and a non-zero exit code; print a result as JSON."""
    try:
        follow_parent()
        result = fn()
        if result is not None:
            print(json.dumps(result, indent=2, sort_keys=True, default=str))
            sys.stdout.flush()
    except MapRLError as err:
        print(f"maprl: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "maprl: interrupted. Outputs this stage had finished were written whole; under `dvc repro`, "
            "DVC removed the stage's outputs before it ran, and `dvc checkout` restores the last ones",
            file=sys.stderr,
        )
        return 130
    except BrokenPipeError:  # e.g. `maprl check-params | head -1`: the reader left, which is fine
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    return 0


def stage_parser(name: str, flags: Sequence[tuple[str, str]], timing: bool = False) -> argparse.ArgumentParser:
    """The argument parser of ``pipeline/<name>.py``: ``--params``, the stage's paths (all required)
    and, with ``timing``, an optional ``--timing`` file for its wall-clock figures."""
    parser = argparse.ArgumentParser(prog=f"pipeline/{name}.py", description=STAGE_HELP[name])
    parser.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
    for flag, text in flags:
        parser.add_argument(flag, required=True, help=text)
    if timing:
        parser.add_argument(
            "--timing", default=None, help="write wall-clock timings here, apart from the metrics (optional)"
        )
    return parser


def parse_policies(text: str) -> dict[str, str]:
    """``memory=models/memory/policy.zip,original=...`` -> {agent: path}."""
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        agent, sep, path = item.partition("=")
        if not sep or not path:
            raise InputError(f"--policies: {item!r} is not agent=path (e.g. memory=models/memory/policy.zip)")
        out[agent] = path
    return out
