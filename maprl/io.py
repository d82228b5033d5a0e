"""Atomic file writes: every output is written to a temporary sibling, then renamed into place.

A stage that fails half-way therefore never leaves a half-written file where a finished one
was expected, and a killed run leaves the previous outputs as they were.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    tmp_path.chmod(0o644)  # mkstemp makes 0600; outputs should be readable like any other file
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON atomically (temp file, then rename)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


TIMING_KEYS = ("seconds", "timesteps_per_second")  # what differs between two identical runs


def write_metrics(metrics_path: str | Path, timing_path: str | Path | None, metrics: dict[str, Any]) -> None:
    """Write a stage's metrics, with its wall-clock fields (:data:`TIMING_KEYS`) split off into ``timing_path``.

    The metrics file then holds only what the seed and params decide, so two runs of the same
    code give byte-identical metrics; the timings go to their own file.
    """
    timing = {k: metrics[k] for k in TIMING_KEYS if k in metrics}
    write_json(metrics_path, {k: v for k, v in metrics.items() if k not in TIMING_KEYS})
    if timing_path is not None:
        write_json(timing_path, timing)


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write bytes atomically (temp file, then rename)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_csv(path: str | Path, frame: pd.DataFrame) -> None:
    """Write a table as CSV atomically, without the index."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


@contextmanager
def staged_dir(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary sibling directory; on success it replaces ``path`` whole.

    A stage writes every file of an output folder into it, so a failure leaves the old folder
    as it was, and a rerun never leaves stale files from an earlier run behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    tmp.chmod(0o755)
    try:
        yield tmp
        old = path.with_name(f".{path.name}.old")
        if old.exists():
            shutil.rmtree(old)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
