"""Fault injection: does every stage refuse bad input with one clear message, and lose nothing?

What it measures: about 180 bad-input and fault cases in six categories -- ``params`` (bad
values, types, keys and files), ``files`` (corrupt, missing or absurd inputs), ``earthengine``
(no credentials, bad keys; never the network), ``kills`` (Ctrl-C and SIGKILL mid-stage, then a
rerun), ``env`` (the Gymnasium API called with bad arguments, in-process) and ``cli``. Each case
gets two checks:

1. clear error: a case that must fail exits non-zero with a ``maprl: error: <message>`` line
   (an argparse ``error:`` for bad flags; a ValueError/TypeError naming the argument for the env
   API) and no traceback; a case that must succeed exits 0 with the right result;
2. nothing lost: every file under the workspace's data/, metrics/ and models/ is byte-identical
   before and after the failed run (hidden temporary files, names starting with '.', are ignored).

How: the repository's files (``git ls-files``) are copied into a temporary workspace whose
params.yaml gets tiny values; every stage runs once there (the commands of dvc.yaml, with the
copied maprl first on PYTHONPATH) to make a good baseline; then each case writes its own params
file (``--params``) or corrupts an input, runs, and the workspace's outputs are restored from
the baseline, so cases are independent. Takes 6 to 8 minutes on 2 CPU cores.

Usage:
  python benchmarks/bench_faults.py                  # every case
  python benchmarks/bench_faults.py --only params    # one category: params files earthengine kills env cli
  python benchmarks/bench_faults.py --list           # list the cases, run nothing
  python benchmarks/bench_faults.py --csv faults.csv # also write the table (and output excerpts) as CSV
  python benchmarks/bench_faults.py --case kills-tune # only the cases whose id contains this text
  python benchmarks/bench_faults.py --keep           # keep the workspace; --workspace DIR reuses it (and its code)
Prints a markdown table (case id, category, what was done, exit code, verdict), the output of
every failed case, and last ``cases: N, passed: P, failed: F``; exits 1 if any case failed.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from tqdm import tqdm

from workspace import TINY as SHARED_TINY
from workspace import copy_repo

REPO = Path(__file__).resolve().parents[1]
NAN, INF = float("nan"), float("inf")
OUTPUT_DIRS = ("data", "metrics", "models")
CATEGORIES = ("params", "files", "earthengine", "kills", "env", "cli")
MAPRL_ERROR = r"^maprl: error: \S"
ARGPARSE_ERROR = r"^[\w./ -]+: error: \S"  # argparse: "<prog>: error:", prog may hold a space
STAGE_TIMEOUT_S = 300.0
EE_TIMEOUT_S = 60.0
TIMING_KEYS = ("seconds", "timesteps_per_second", "resumed_from")

# the e2e test's tiny params; one encoder thread (2 were 5-10x slower while other jobs shared the cores)
TINY: dict[str, dict[str, Any]] = {**SHARED_TINY, "encoder": {**SHARED_TINY["encoder"], "torch_threads": 1}}
BASELINE = [("fetch", "memory"), ("tile", "memory"), ("encode", "memory"), ("tune", "memory")]
BASELINE += [("train", agent) for agent in ("memory", "nomemory", "original")] + [("evaluate", "memory")]


class _Drop:
    """Marks a params key (or section) to delete."""


DROP = _Drop()


# -- results ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Outcome:
    """What a case did: exit code, stdout + stderr, and problems the case found itself."""

    code: int
    output: str
    problems: tuple[str, ...] = ()
    label: str = ""  # shown instead of the exit code (in-process cases: the exception type)


@dataclass(frozen=True)
class Case:
    id: str
    category: str
    description: str
    run: Callable[[Workspace], Outcome]
    expect_ok: bool = False
    outputs_must_not_change: bool = True
    mention: str = ""  # regex the output must match (case-insensitive), e.g. the key an error names
    setup: Callable[[Workspace], None] | None = None  # corrupts an input before the "before" snapshot
    error_re: str = MAPRL_ERROR
    expect_code: int | None = None
    api: bool = False  # in-process: an exception stands for the error exit
    ignore: tuple[str, ...] = ()  # output path prefixes that may change by design (checkpoints)


@dataclass(frozen=True)
class Row:
    case: Case
    outcome: Outcome
    passed: bool
    problems: str
    seconds: float


# -- workspace --------------------------------------------------------------------------------------
@dataclass
class Workspace:
    root: Path
    env: dict[str, str]

    @property
    def bench(self) -> Path:
        return self.root / ".bench"

    def path(self, rel: str) -> Path:
        return self.root / rel

    def stage_cmd(self, name: str, agent: str = "memory") -> list[str]:
        from maprl.cli import stage_command

        cmd = stage_command(name, self.root / "dvc.yaml", agent)
        if cmd and cmd[0] == "python":
            cmd[0] = sys.executable
        return cmd

    def flag(self, stage: str, flag: str, agent: str = "memory") -> Path:
        """The path dvc.yaml gives stage ``stage`` for ``flag`` (e.g. train --metrics)."""
        cmd = self.stage_cmd(stage, agent)
        return self.root / cmd[cmd.index(flag) + 1]

    def run(
        self,
        args: list[str],
        *,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
        timeout: float = STAGE_TIMEOUT_S,
        mem_limit: int | None = None,
    ) -> Outcome:
        def limit() -> None:
            if mem_limit:
                resource.setrlimit(resource.RLIMIT_AS, (mem_limit, mem_limit))

        try:
            proc = subprocess.run(
                args,
                cwd=cwd or self.root,
                env=env or self.env,
                capture_output=True,
                text=True,
                timeout=timeout,
                preexec_fn=limit if mem_limit else None,
            )
        except subprocess.TimeoutExpired as err:
            out = _text(err.stdout) + _text(err.stderr)
            return Outcome(124, out, (f"timed out after {timeout:.0f} s",))
        return Outcome(proc.returncode, proc.stdout + proc.stderr)

    def stage(self, name: str, params: Path | None = None, agent: str = "memory", **kw: Any) -> Outcome:
        extra = ["--params", str(params)] if params is not None else []
        return self.run(self.stage_cmd(name, agent) + extra, **kw)

    def maprl(self, args: list[str], **kw: Any) -> Outcome:
        return self.run([str(Path(sys.executable).parent / "maprl"), *args], **kw)

    def params(self, name: str, updates: dict[str, Any]) -> Path:
        """A copy of the workspace's params.yaml with dotted ``updates``, written to its own file."""
        raw = yaml.safe_load(self.path("params.yaml").read_text())
        for dotted, value in updates.items():
            _set_dotted(raw, dotted, value)
        return self.write(f".bench/params/{name}.yaml", yaml.safe_dump(raw, sort_keys=False))

    def write(self, rel: str, text: str) -> Path:
        path = self.path(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    def save_pristine(self) -> None:
        for top in OUTPUT_DIRS:
            dst = self.bench / "pristine" / top
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(self.path(top), dst)

    def restore(self) -> None:
        for top in OUTPUT_DIRS:
            shutil.rmtree(self.path(top), ignore_errors=True)
            shutil.copytree(self.bench / "pristine" / top, self.path(top))

    def snapshot(self) -> dict[str, str]:
        """sha256 of every file under data/, metrics/ and models/ (hidden temporary files left out)."""
        out: dict[str, str] = {}
        for top in OUTPUT_DIRS:
            for p in sorted(self.path(top).rglob("*")):
                rel = p.relative_to(self.root)
                if p.is_file() and not any(part.startswith(".") for part in rel.parts):
                    out[rel.as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
        return out


def _text(data: str | bytes | None) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else data or ""


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = raw
    for key in parents:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    if isinstance(value, _Drop):
        node.pop(last, None)
    else:
        node[last] = value


def diff_outputs(before: dict[str, str], after: dict[str, str], ignore: tuple[str, ...] = ()) -> list[str]:
    """Output files that changed, appeared or disappeared (``ignore``: path prefixes left out)."""
    out = []
    for key in sorted(set(before) | set(after)):
        if before.get(key) == after.get(key) or key.startswith(ignore):
            continue
        what = "removed" if key not in after else "added" if key not in before else "changed"
        out.append(f"{key} {what}")
    return out


def _changed_text(changes: list[str], limit: int = 4) -> str:
    more = f" (+{len(changes) - limit} more)" if len(changes) > limit else ""
    return "outputs not as before: " + ", ".join(changes[:limit]) + more


def make_workspace(repo: Path, root: Path) -> Workspace:
    """Copy the repository's files (not its outputs) into ``root`` and write tiny params."""
    copy_repo(root, TINY, repo)
    return attach_workspace(root)


def attach_workspace(root: Path) -> Workspace:
    """A workspace object for ``root``; its copy of maprl is the one imported, here and in subprocesses."""
    sys.path.insert(0, str(root))
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(root),
        "OMP_NUM_THREADS": "1",
        "MPLBACKEND": "Agg",
    }
    return Workspace(root, env)


def build_baseline(ws: Workspace) -> None:
    """Run every stage once, in dvc.yaml order; raise SystemExit if one fails."""
    for name, agent in tqdm(BASELINE, desc="baseline", unit="stage", leave=False):
        out = ws.stage(name, agent=agent)
        if out.code != 0:
            raise SystemExit(f"baseline stage {name} ({agent}) failed with exit {out.code}:\n{out.output[-3000:]}")
    (ws.bench / "params").mkdir(parents=True, exist_ok=True)
    ws.save_pristine()


# -- case factories ---------------------------------------------------------------------------------
def check_params_case(cid: str, what: str, updates: dict[str, Any], mention: str) -> Case:
    """``maprl check-params`` on params.yaml with ``updates`` (it validates every section)."""

    def run(ws: Workspace) -> Outcome:
        return ws.maprl(["check-params", "--params", str(ws.params(cid, updates))])

    return Case(f"params-{cid}", "params", f"maprl check-params, {what}", run, mention=mention)


def stage_params_case(cid: str, stage: str, what: str, updates: dict[str, Any], mention: str) -> Case:
    """The stage script itself with params.yaml plus ``updates``: it must refuse and keep its outputs."""

    def run(ws: Workspace) -> Outcome:
        return ws.stage(stage, ws.params(f"params-{cid}", updates))

    return Case(f"params-{cid}", "params", f"{stage} stage, {what}", run, mention=mention)


def raw_params_case(cid: str, what: str, text: str | None, stage: str | None, mention: str) -> Case:
    """A params file with the literal ``text`` (None: no file at all), for ``stage`` or check-params."""

    def run(ws: Workspace) -> Outcome:
        path = ws.bench / "params" / f"{cid}.yaml"
        path.unlink(missing_ok=True)
        if text is not None:
            ws.write(f".bench/params/{cid}.yaml", text)
        if stage is None:
            return ws.maprl(["check-params", "--params", str(path)])
        return ws.stage(stage, path)

    where = f"{stage} stage" if stage else "maprl check-params"
    return Case(f"params-{cid}", "params", f"{where}, {what}", run, mention=mention)


def file_case(cid: str, stage: str, what: str, setup: Callable[[Workspace], None], mention: str) -> Case:
    """Corrupt an input (``setup``), run ``stage``: it must refuse, and its outputs stay as they were."""

    def run(ws: Workspace) -> Outcome:
        return ws.stage(stage)

    return Case(f"files-{cid}", "files", f"{stage} stage, {what}", run, mention=mention, setup=setup)


def fetch_file_case(
    cid: str, what: str, setup: Callable[[Workspace], None], name: str, mention: str, **extra: Any
) -> Case:
    """fetch with source: file on ``.bench/inputs/<name>``; it must refuse and keep data/map and its metrics."""
    mem_limit = extra.pop("mem_limit", None)

    def run(ws: Workspace) -> Outcome:
        updates = {"fetch.source": "file", "fetch.path": str(ws.bench / "inputs" / name), **extra}
        timeout = EE_TIMEOUT_S if mem_limit else STAGE_TIMEOUT_S
        return ws.stage("fetch", ws.params(f"files-{cid}", updates), timeout=timeout, mem_limit=mem_limit)

    return Case(f"files-{cid}", "files", f"fetch stage, source: file, {what}", run, mention=mention, setup=setup)


def cli_case(
    cid: str,
    what: str,
    args: list[str] | str,
    *,
    expect_ok: bool = False,
    mention: str = "",
    error_re: str = ARGPARSE_ERROR,
    outside_repo: bool = False,
) -> Case:
    """``args``: argv with ``maprl`` or a pipeline script first, or a shell line (run with bash -o pipefail)."""

    def run(ws: Workspace) -> Outcome:
        cwd = Path(tempfile.mkdtemp(prefix="norepo-", dir=ws.bench)) if outside_repo else ws.root
        if isinstance(args, str):
            return ws.run(["bash", "-o", "pipefail", "-c", args], cwd=cwd)
        if args[0] == "maprl":
            return ws.maprl(args[1:], cwd=cwd)
        return ws.run([sys.executable, *args], cwd=cwd)

    return Case(f"cli-{cid}", "cli", what, run, expect_ok=expect_ok, mention=mention, error_re=error_re)


# -- file corruptions -------------------------------------------------------------------------------
def truncate(rel: str, keep: float = 0.5) -> Callable[[Workspace], None]:
    def go(ws: Workspace) -> None:
        data = ws.path(rel).read_bytes()
        ws.path(rel).write_bytes(data[: int(len(data) * keep)])

    return go


def put_bytes(rel: str, data: bytes) -> Callable[[Workspace], None]:
    def go(ws: Workspace) -> None:
        ws.path(rel).parent.mkdir(parents=True, exist_ok=True)
        ws.path(rel).write_bytes(data)

    return go


def remove(rel: str) -> Callable[[Workspace], None]:
    def go(ws: Workspace) -> None:
        path = ws.path(rel)
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()

    return go


def edit_targets(col: str, value: Any, row: int | None = 0) -> Callable[[Workspace], None]:
    """Set column ``col`` of targets.csv to ``value`` in one row (``row`` None: every row)."""

    def go(ws: Workspace) -> None:
        import pandas as pd

        path = ws.path(TARGETS)
        df = pd.read_csv(path)
        df[col] = df[col].astype(object)
        if row is None:
            df[col] = value
        else:
            df.loc[row, col] = value
        df.to_csv(path, index=False)

    return go


def _write_tif(path: Path, data: Any, window: Any = None, **profile: Any) -> None:
    import rasterio
    from rasterio.transform import from_origin

    path.parent.mkdir(parents=True, exist_ok=True)
    base = {"driver": "GTiff", "dtype": "uint8", "crs": "EPSG:32632", "transform": from_origin(500000, 5150000, 1, 1)}
    with rasterio.open(path, "w", **{**base, **profile}) as dst:
        dst.write(data, window=window)


def geotiff(name: str, size: int, *, empty: bool = False) -> Callable[[Workspace], None]:
    """A 3-band uint8 GeoTIFF in .bench/inputs (``empty``: every pixel is nodata)."""

    def go(ws: Workspace) -> None:
        import numpy as np

        shape = (3, size, size)
        data = np.zeros(shape, np.uint8) if empty else np.random.default_rng(0).integers(1, 255, shape, np.uint8)
        _write_tif(ws.bench / "inputs" / name, data, width=size, height=size, count=3, nodata=0)

    return go


def huge_geotiff(name: str, side: int = 200_000) -> Callable[[Workspace], None]:
    """A sparse, tiled, compressed GeoTIFF whose header says ``side`` x ``side`` pixels (small on disk)."""

    def go(ws: Workspace) -> None:
        import numpy as np
        from rasterio.windows import Window

        data = np.full((3, 256, 256), 128, np.uint8)
        _write_tif(ws.bench / "inputs" / name, data, Window(0, 0, 256, 256), width=side, height=side, count=3,
                   tiled=True, compress="deflate", sparse_ok=True, BIGTIFF="YES")  # fmt: skip

    return go


# -- the cases: params ------------------------------------------------------------------------------
# fmt: off
CHECK_PARAMS: list[tuple[str, str, dict[str, Any], str]] = [
    ("nan-view-size", "tile.view_size: .nan", {"tile.view_size": NAN}, "view_size"),
    ("inf-fetch-size", "fetch.size: .inf", {"fetch.size": INF}, r"fetch\.size"),
    ("neginf-action-step", "env.action_step: -.inf", {"env.action_step": -INF}, "action_step"),
    ("nan-learning-rate", "train.learning_rate: .nan", {"train.learning_rate": NAN}, "learning_rate"),
    ("negative-learning-rate", "train.learning_rate: -0.001", {"train.learning_rate": -0.001}, "learning_rate"),
    ("zero-n-envs", "train.n_envs: 0", {"train.n_envs": 0}, "n_envs"),
    ("zero-n-targets", "tile.n_targets: 0", {"tile.n_targets": 0}, "n_targets"),
    ("string-n-targets", "tile.n_targets: 'many'", {"tile.n_targets": "many"}, "n_targets"),
    ("list-total-timesteps", "train.total_timesteps: [1, 2]", {"train.total_timesteps": [1, 2]}, "total_timesteps"),
    ("unknown-key", "train.learning_rat (typo)", {"train.learning_rat": 0.001}, "learning_rat"),
    ("unknown-section", "section trian: (typo)", {"trian.n_envs": 4}, "trian"),
    ("test-fraction-1.5", "tile.test_fraction: 1.5", {"tile.test_fraction": 1.5}, "test_fraction"),
    ("test-fraction-0", "tile.test_fraction: 0", {"tile.test_fraction": 0}, "test_fraction"),
    ("inf-success-radius", "evaluate.success_radius: .inf", {"evaluate.success_radius": INF}, "success_radius"),
    ("nan-distance-bins", "evaluate.distance_bins: [.nan]", {"evaluate.distance_bins": [NAN]}, "distance_bins"),
    ("string-distance-bins", "evaluate.distance_bins: 'far'", {"evaluate.distance_bins": "far"}, "distance_bins"),
    ("inf-bonus-scale", "env.bonus_scale: .inf", {"env.bonus_scale": INF}, "bonus_scale"),
    ("inf-shaping", "train.shaping: .inf", {"train.shaping": INF}, "shaping"),
    ("file-without-path", "fetch.source: file, fetch.path: null", {"fetch.source": "file"}, r"fetch\.path"),
    ("negative-seed", "base.seed: -1", {"base.seed": -1}, "seed"),
    ("huge-seed", "base.seed: 2**40", {"base.seed": 2**40}, "seed"),
    ("string-seed", "base.seed: 'abc'", {"base.seed": "abc"}, "seed"),
    ("batch-over-rollout", "train.batch_size 4096 > n_steps * n_envs", {"train.batch_size": 4096}, "batch_size"),
    ("space-unknown", "tune.space.momentum", {"tune.space.momentum": {"low": 0.1, "high": 0.9}}, "momentum"),
    ("space-low-gt-high", "tune.space.learning_rate low > high",
     {"tune.space.learning_rate": {"low": 0.01, "high": 0.001}}, "learning_rate"),
    ("space-nan-low", "tune.space.clip_range.low: .nan", {"tune.space.clip_range": {"low": NAN, "high": 0.3}},
     "clip_range"),
    ("space-not-pow2", "tune.space.n_steps choices [100]", {"tune.space.n_steps": {"choices": [100]}}, "n_steps"),
    ("grace-le-heartbeat", "tune.grace_period 10 <= heartbeat_interval 60", {"tune.grace_period": 10}, "grace_period"),
    ("storage-scheme", "tune.storage: ftp://host/x", {"tune.storage": "ftp://host/x"}, "storage"),
    ("encoder-kind", "encoder.kind: resnet", {"encoder.kind": "resnet"}, "kind"),
    ("imagenet-impala", "encoder.weights: imagenet with kind impala_cnn", {"encoder.weights": "imagenet"}, "imagenet"),
    ("gamma-1", "train.gamma: 1.0", {"train.gamma": 1.0}, "gamma"),
    ("max-nodata-1", "env.max_nodata: 1.0", {"env.max_nodata": 1.0}, "max_nodata"),
    ("zero-episodes", "evaluate.episodes: 0", {"evaluate.episodes": 0}, "episodes"),
    ("negative-eval-freq", "train.eval_freq: -5", {"train.eval_freq": -5}, "eval_freq"),
    ("decoy-rate-2", "evaluate.decoy_rate: 2", {"evaluate.decoy_rate": 2}, "decoy_rate"),
    ("bool-maybe", "train.progress_bar: 'maybe'", {"train.progress_bar": "maybe"}, "progress_bar"),
    ("tile-mode", "tile.mode: grid", {"tile.mode": "grid"}, "mode"),
    ("zero-candidates", "agent.n_candidates: 0", {"agent.n_candidates": 0}, "n_candidates"),
    ("section-scalar", "tile: 5 (a section that is not a mapping)", {"tile": 5}, "tile"),
    ("section-null", "train: null", {"train": None}, "train"),
]

STAGE_PARAMS: list[tuple[str, str, str, dict[str, Any], str]] = [
    ("fetch-nan-size", "fetch", "fetch.size: .nan", {"fetch.size": NAN}, "size"),
    ("fetch-view-larger-than-map", "fetch", "fetch.size 128 (a new map) < tile.view_size 256 (block_size 512)",
     {"fetch.size": 128, "tile.view_size": 256, "tile.block_size": 512}, "view"),
    ("fetch-missing-path", "fetch", "source: file, fetch.path does not exist",
     {"fetch.source": "file", "fetch.path": "/nonexistent/photo.tif"}, "photo.tif|exist"),
    ("tile-view-larger-than-map", "tile", "tile.view_size 256 > map 192 (block_size 512)",
     {"tile.view_size": 256, "tile.block_size": 512}, "view"),
    ("tile-zero-test-fraction", "tile", "tile.test_fraction: 0", {"tile.test_fraction": 0}, "test_fraction"),
    ("tile-missing-section", "tile", "no tile section", {"tile": DROP}, "tile"),
    ("encode-zero-input-size", "encode", "encoder.input_size: 0", {"encoder.input_size": 0}, "input_size"),
    ("encode-missing-section", "encode", "no encoder section", {"encoder": DROP}, "encoder"),
    ("tune-zero-trials", "tune", "tune.n_trials: 0", {"tune.n_trials": 0}, "n_trials"),
    ("tune-missing-section", "tune", "no tune section", {"tune": DROP}, "tune"),
    ("train-nan-lr", "train", "train.learning_rate: .nan", {"train.learning_rate": NAN}, "learning_rate"),
    ("train-missing-section", "train", "no train section", {"train": DROP}, "train"),
    ("train-inf-shaping", "train", "train.shaping: .inf", {"train.shaping": INF}, "shaping"),
    ("evaluate-negative-episodes", "evaluate", "evaluate.episodes: -1", {"evaluate.episodes": -1}, "episodes"),
    ("evaluate-missing-section", "evaluate", "no evaluate section", {"evaluate": DROP}, "evaluate"),
    ("evaluate-nan-bins", "evaluate", "evaluate.distance_bins: [.nan]", {"evaluate.distance_bins": [NAN]}, "bins"),
]

RAW_PARAMS: list[tuple[str, str, str | None, str | None, str]] = [
    ("empty-file-stage", "an empty params file", "", "encode", "section"),
    ("not-yaml", "a params file that is not YAML", "tile: [1, 2\nfetch: {", None, "yaml"),
    ("not-yaml-stage", "a params file that is not YAML", "tile: [1, 2\nfetch: {", "train", "yaml"),
    ("list", "a params file that is a YAML list", "- base\n- tile\n", None, "mapping|list"),
    ("scalar-stage", "a params file that is one number", "42\n", "tile", "mapping|int"),
    ("missing-file", "--params pointing at no file", None, None, "exist"),
    ("missing-file-stage", "--params pointing at no file", None, "fetch", "exist"),
    ("binary", "a params file of binary bytes", "\x00\x01\x02\xff", None, "yaml|mapping|params"),
]
# fmt: on


def params_cases() -> list[Case]:
    cases = [check_params_case(*row) for row in CHECK_PARAMS]
    cases += [stage_params_case(*row) for row in STAGE_PARAMS]
    return cases + [raw_params_case(*row) for row in RAW_PARAMS]


# -- the cases: files -------------------------------------------------------------------------------
MAP = "data/map/map.tif"
TARGETS = "data/targets/targets.csv"
FEATURES = "data/features"
CALIB = f"{FEATURES}/calibration.json"
CACHE_NPZ = f"{FEATURES}/cache.npz"
BEST = "models/best_hparams.yaml"
TEXT = b"this is a text file, not what the stage expects\n"
GARBAGE = bytes(range(256)) * 64


def files_cases() -> list[Case]:
    return [*(file_case(*row) for row in file_rows()), *fetch_input_cases()]


def file_rows() -> list[tuple[str, str, str, Callable[[Workspace], None], str]]:
    # fmt: off
    return [
        ("map-truncated", "tile", "map.tif cut to half its bytes", truncate(MAP), "map"),
        ("map-zero-bytes", "encode", "map.tif of zero bytes", put_bytes(MAP, b""), "map"),
        ("map-garbage", "train", "map.tif of binary garbage", put_bytes(MAP, GARBAGE), "map"),
        ("map-text", "evaluate", "map.tif that is a text file", put_bytes(MAP, TEXT), "map"),
        ("map-missing", "tune", "map.tif removed", remove(MAP), "map"),
        ("targets-empty", "encode", "targets.csv of zero bytes", put_bytes(TARGETS, b""), "targets"),
        ("targets-header-only", "encode", "targets.csv with a header and no rows",
         put_bytes(TARGETS, b"id,x,y,split\n"), "targets"),
        ("targets-no-columns", "train", "targets.csv without x, y, split", put_bytes(TARGETS, b"id,foo\n0,1\n"),
         r"targets.*(\bx\b|column)"),
        ("targets-text-x", "tune", "targets.csv with x = 'abc' in one row", edit_targets("x", "abc"),
         r"targets.*\bx\b"),
        ("targets-nan-x", "evaluate", "targets.csv with x empty (NaN) in one row", edit_targets("x", None),
         r"targets.*\bx\b"),
        ("targets-duplicate-ids", "train", "targets.csv whose ids are all 0", edit_targets("id", 0, row=None),
         r"targets.*(duplicate|\bid)"),
        ("targets-off-map", "train", "targets.csv with x = 1e6 (off the 192 px map)", edit_targets("x", 1e6),
         r"targets.*(map|\bx\b)"),
        ("cache-truncated", "train", "cache.npz cut to half", truncate(CACHE_NPZ), "cache"),
        ("cache-missing", "tune", "cache.npz removed", remove(CACHE_NPZ), "cache"),
        ("cache-not-zip", "evaluate", "cache.npz that is a text file", put_bytes(CACHE_NPZ, TEXT), "cache"),
        ("encoder-truncated", "train", "encoder.pt cut to half", truncate(f"{FEATURES}/encoder.pt"),
         "encoder|data/features"),
        ("features-missing-tune", "tune", "data/features removed", remove(FEATURES), "features|encode"),
        ("features-missing-train", "train", "data/features removed", remove(FEATURES), "features|encode"),
        ("features-missing-evaluate", "evaluate", "data/features removed", remove(FEATURES), "features|encode"),
        ("calibration-missing", "train", "calibration.json removed", remove(CALIB), "calibration"),
        ("calibration-bad-json", "evaluate", "calibration.json that is not JSON", put_bytes(CALIB, b"{oops"),
         "calibration"),
        ("calibration-nan", "train", "calibration.json with stop_threshold NaN",
         put_bytes(CALIB, b'{"stop_threshold": NaN}'), "calibration|stop_threshold"),
        ("best-bad-yaml", "train", "best_hparams.yaml that is not YAML", put_bytes(BEST, b"learning_rate: [0.1,\n"),
         "best_hparams"),
        ("best-unknown-key", "train", "best_hparams.yaml with key learning_rat",
         put_bytes(BEST, b"learning_rat: 0.001\n"), "learning_rat"),
        ("best-nan", "train", "best_hparams.yaml with learning_rate .nan", put_bytes(BEST, b"learning_rate: .nan\n"),
         "learning_rate"),
        ("best-negative-n-steps", "train", "best_hparams.yaml with n_steps -64", put_bytes(BEST, b"n_steps: -64\n"),
         "n_steps"),
        ("best-lr-5", "train", "best_hparams.yaml with learning_rate 5.0 (train.learning_rate allows (0, 1])",
         put_bytes(BEST, b"learning_rate: 5.0\n"), "learning_rate"),
        ("best-gamma-1.5", "train", "best_hparams.yaml with gamma 1.5", put_bytes(BEST, b"gamma: 1.5\n"), "gamma"),
        ("policy-truncated", "evaluate", "models/nomemory/policy.zip cut to half",
         truncate("models/nomemory/policy.zip"), "policy"),
        ("policy-empty", "evaluate", "models/original/policy.zip of zero bytes",
         put_bytes("models/original/policy.zip", b""), "policy"),
        ("policy-missing", "evaluate", "models/memory/policy.zip removed", remove("models/memory/policy.zip"),
         "policy"),
    ]
    # fmt: on


def fetch_input_cases() -> list[Case]:
    view64 = {"tile.view_size": 64, "tile.block_size": 128}
    # fmt: off
    return [
        fetch_file_case("fetch-1x1", "a 1x1 GeoTIFF", geotiff("one.tif", 1), "one.tif", "view|small|size"),
        fetch_file_case("fetch-40x40", "a 40x40 GeoTIFF, tile.view_size 64", geotiff("forty.tif", 40), "forty.tif",
                        "view|small|size", **view64),
        fetch_file_case("fetch-all-nodata", "a 64x64 GeoTIFF that is all nodata", geotiff("empty.tif", 64, empty=True),
                        "empty.tif", "nodata|valid|empty"),
        fetch_file_case("fetch-200000px", "a sparse GeoTIFF whose header says 200000x200000 px (RLIMIT_AS 12 GiB)",
                        huge_geotiff("big.tif"), "big.tif", "pixels|size|memory|large", mem_limit=12 * 2**30),
        fetch_file_case("fetch-text-tif", "a text file named photo.tif", put_bytes(".bench/inputs/photo.tif", TEXT),
                        "photo.tif", "photo.tif"),
        fetch_file_case("fetch-directory", "fetch.path is a directory", put_bytes(".bench/inputs/adir/x", TEXT),
                        "adir", "adir"),
    ]
    # fmt: on


# -- the cases: earthengine -------------------------------------------------------------------------
def ee_env(ws: Workspace) -> dict[str, str]:
    """No credentials anywhere and no route to Google: an empty HOME, no metadata server, a dead proxy."""
    home = ws.bench / "ee-home"
    home.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in ws.env.items() if not k.startswith(("GOOGLE_", "EARTHENGINE_", "CLOUDSDK_", "GCE_"))}
    env.update(
        HOME=str(home),
        XDG_CONFIG_HOME=str(home / ".config"),
        CLOUDSDK_CONFIG=str(home / "gcloud"),
        NO_GCE_CHECK="True",
        GCE_METADATA_HOST="127.0.0.1:9",
        GCE_METADATA_IP="127.0.0.1:9",
        HTTPS_PROXY="http://127.0.0.1:9",
        HTTP_PROXY="http://127.0.0.1:9",
    )
    return env


def earthengine_cases() -> list[Case]:
    ee = "fetch.earthengine"
    src = {"fetch.source": "earthengine"}
    sa = {**src, f"{ee}.credentials": "service_account", f"{ee}.service_account": "bot@p.iam.gserviceaccount.com"}
    proj = {**src, f"{ee}.project": "my-project"}
    # fmt: off
    rows: list[tuple[str, str, dict[str, Any], str, Callable[[Workspace], None] | None]] = [
        ("no-credentials", "persistent credentials, empty HOME, project set", proj, "earthengine authenticate", None),
        ("project-null", "persistent credentials, project null", {**src, f"{ee}.project": None}, "project", None),
        ("key-missing", "service_account, key_file does not exist", {**sa, f"{ee}.key_file": "/nonexistent/k.json"},
         "key", None),
        ("key-not-json", "service_account, key_file is a text file", {**sa, f"{ee}.key_file": "INPUTS/key.txt"},
         "key", put_bytes(".bench/inputs/key.txt", TEXT)),
        ("key-wrong-json", "service_account, key_file is JSON but not a key",
         {**sa, f"{ee}.key_file": "INPUTS/key.json"}, "key", put_bytes(".bench/inputs/key.json", b'{"type": "x"}')),
        ("key-file-null", "service_account without key_file", sa, "key_file", None),
        ("bbox-inverted", "bbox west > east", {**proj, f"{ee}.bbox": [6.66, 46.5, 6.60, 46.54]}, "bbox", None),
        ("collection", "collection: landsat", {**proj, f"{ee}.collection": "landsat"}, "collection", None),
        ("dates-reversed", "start_date after end_date, project set",
         {**proj, f"{ee}.start_date": "2024-01-01", f"{ee}.end_date": "2023-01-01"}, "date", None),
        ("date-invalid", "start_date 2023-13-45, project set", {**proj, f"{ee}.start_date": "2023-13-45"}, "date",
         None),
    ]
    # fmt: on
    return [_ee_case(*row) for row in rows]


def _ee_case(
    cid: str, what: str, updates: dict[str, Any], mention: str, setup: Callable[[Workspace], None] | None
) -> Case:
    def run(ws: Workspace) -> Outcome:
        inputs = str(ws.bench / "inputs")
        resolved = {k: v.replace("INPUTS", inputs) if isinstance(v, str) else v for k, v in updates.items()}
        return ws.stage("fetch", ws.params(f"ee-{cid}", resolved), env=ee_env(ws), timeout=EE_TIMEOUT_S)

    what = f"fetch stage, source: earthengine, {what}"
    return Case(f"earthengine-{cid}", "earthengine", what, run, mention=mention, setup=setup)


# -- the cases: kills -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Trigger:
    what: str
    fired: Callable[[], bool]


def new_hidden(ws: Workspace, dirs: tuple[str, ...]) -> Trigger:
    """Fires when a new hidden entry (a stage's temporary output) appears in one of ``dirs``."""

    def names() -> set[str]:
        out: set[str] = set()
        for d in dirs:
            try:
                out |= {f"{d}/{p.name}" for p in ws.path(d).iterdir() if p.name.startswith(".")}
            except OSError:
                continue
        return out

    start = names()
    return Trigger(f"a temporary output appeared in {', '.join(dirs)}", lambda: bool(names() - start))


def replaced(ws: Workspace, rel_dir: str) -> Trigger:
    """Fires when a file of ``rel_dir`` has been replaced (new inode) or removed: the stage is part-way through."""

    def inodes() -> dict[str, int]:
        try:
            return {p.name: p.stat().st_ino for p in ws.path(rel_dir).iterdir() if not p.name.startswith(".")}
        except OSError:
            return {}

    start = inodes()
    return Trigger(f"a file of {rel_dir} was replaced", lambda: inodes() != start)


def journal_has_complete_trial(path: Path) -> Trigger:
    """Fires once the Optuna journal at ``path`` records a COMPLETE trial."""

    def complete(line: str) -> bool:
        try:
            op = json.loads(line)
        except ValueError:
            return False
        return isinstance(op, dict) and op.get("op_code") == 6 and op.get("state") == 1

    def fired() -> bool:
        try:
            return any(complete(line) for line in path.read_text().splitlines())
        except OSError:
            return False

    return Trigger("the first trial finished", fired)


def exists(path: Path) -> Trigger:
    return Trigger(f"{path.name} appeared", path.exists)


def run_signalled(ws: Workspace, args: list[str], sig: signal.Signals, trigger: Trigger, deadline: float) -> Outcome:
    """Start ``args``; send ``sig`` once ``trigger`` fires (or after ``deadline`` s); wait for it to end.

    The outcome's problems say if the process ended before the signal or the trigger never fired.
    """
    log = ws.bench / "signalled.log"
    with log.open("w") as fh:
        proc = subprocess.Popen(args, cwd=ws.root, env=ws.env, stdout=fh, stderr=subprocess.STDOUT)
        note, problems = _signal_when(proc, sig, trigger, deadline)
    return Outcome(proc.returncode, f"[{note}]\n{log.read_text()}", problems)


def _signal_when(
    proc: subprocess.Popen[bytes], sig: signal.Signals, trigger: Trigger, deadline: float
) -> tuple[str, tuple[str, ...]]:
    t0 = time.monotonic()
    while proc.poll() is None:
        fired, elapsed = trigger.fired(), time.monotonic() - t0
        if fired or elapsed > deadline:
            proc.send_signal(sig)
            try:
                proc.wait(timeout=STAGE_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                return f"{sig.name} at {elapsed:.1f} s, did not exit", (f"did not exit after {sig.name}",)
            why = f"when {trigger.what}" if fired else f"after {deadline:.0f} s; never saw: {trigger.what}"
            return f"{sig.name} sent at {elapsed:.1f} s {why}", () if fired else (f"never saw: {trigger.what}",)
        time.sleep(0.005)
    return f"exited {proc.returncode} before {sig.name}", (f"the run ended before {sig.name} could be sent",)


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _without_timing(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in TIMING_KEYS}


def _best_body(path: Path) -> str:
    try:
        return "".join(line for line in path.read_text().splitlines(True) if not line.lstrip().startswith("#"))
    except OSError:
        return "<missing>\n"


KILL_TRAIN = {"train.hparams": "params", "train.total_timesteps": 4096, "train.checkpoint_freq": 256}
KILL_TRAIN["train.eval_freq"] = 1024
OUTS = {"fetch": "data/map", "tile": "data/targets", "encode": FEATURES, "evaluate": "data/eval"}


def _tune_storage(ws: Workspace, name: str) -> dict[str, Any]:
    """A study of 3 trials in a fresh journal of its own (outside data/)."""
    journal = ws.bench / "journals" / f"{name}.journal"
    journal.parent.mkdir(parents=True, exist_ok=True)
    journal.unlink(missing_ok=True)
    return {"tune.storage": str(journal), "tune.n_trials": 3, "tune.timesteps": 512}


def _stage_trigger(ws: Workspace, stage: str, extra: dict[str, Any]) -> Trigger:
    if stage == "train":
        return exists(ws.flag("train", "--checkpoints") / "checkpoint.zip")
    if stage == "tune":
        return journal_has_complete_trial(Path(extra["tune.storage"]))
    return new_hidden(ws, ("data", OUTS[stage], "metrics"))


def _signal_stage(ws: Workspace, stage: str, params: Path, sig: signal.Signals, trigger: Trigger) -> Outcome:
    return run_signalled(ws, [*ws.stage_cmd(stage), "--params", str(params)], sig, trigger, 120.0)


def interrupt_case(cid: str, stage: str, what: str, updates: dict[str, Any]) -> Case:
    """Ctrl-C ``stage`` part-way: exit 130, the interrupted message, no traceback, outputs as before."""

    def run(ws: Workspace) -> Outcome:
        extra = _tune_storage(ws, cid) if stage == "tune" else {}
        params = ws.params(f"kills-{cid}", {**updates, **extra})
        return _signal_stage(ws, stage, params, signal.SIGINT, _stage_trigger(ws, stage, extra))

    checkpoints = ("models/memory/checkpoints/",)  # persist: true, written on purpose during a run
    return Case(f"kills-{cid}", "kills", f"{stage} stage, {what}", run, error_re=r"^maprl: interrupted",
                expect_code=130, ignore=checkpoints, mention="interrupted")  # fmt: skip


def kill_rerun_case(cid: str, stage: str, what: str, updates: dict[str, Any], partway: bool = False) -> Case:
    """SIGKILL ``stage`` part-way, then rerun it with the same params (exit 0).

    Killed while it writes its first temporary output: every output as before. ``partway``: killed
    right after its output folder changed; the folder must hold one run's files, not a mix of two.
    """

    def run(ws: Workspace) -> Outcome:
        params = ws.params(f"kills-{cid}", updates)
        before = ws.snapshot()
        trigger = replaced(ws, OUTS[stage]) if partway else _stage_trigger(ws, stage, {})
        killed = _signal_stage(ws, stage, params, signal.SIGKILL, trigger)
        after_kill = ws.snapshot()
        rerun = ws.stage(stage, params)
        if partway:
            problems = [*killed.problems, *_mixed_runs(before, after_kill, ws.snapshot(), OUTS[stage] + "/")]
        else:
            changes = diff_outputs(before, after_kill)
            problems = [*killed.problems, *([_changed_text(changes) + " after the kill"] if changes else [])]
        return Outcome(rerun.code, killed.output[:200] + "\n--- rerun ---\n" + rerun.output, tuple(problems))

    return Case(f"kills-{cid}", "kills", f"{stage} stage, {what}", run, expect_ok=True, outputs_must_not_change=False)


def _mixed_runs(before: dict[str, str], killed: dict[str, str], rerun: dict[str, str], prefix: str) -> list[str]:
    """Problems if the files under ``prefix`` after a kill mix the old run's and the new run's (the rerun's)."""
    files = sorted(f for f in set(before) | set(killed) | set(rerun) if f.startswith(prefix))
    old = [f for f in files if killed.get(f) == before.get(f) != rerun.get(f)]
    new = [f for f in files if killed.get(f) == rerun.get(f) != before.get(f)]
    other = [f for f in files if killed.get(f) not in (before.get(f), rerun.get(f))]
    problems = (
        [f"{prefix} after the kill mixes two runs: old {', '.join(old)}; new {', '.join(new)}"] if old and new else []
    )
    return problems + ([f"{prefix} after the kill holds files of neither run: {', '.join(other)}"] if other else [])


def _kill_then_rerun(ws: Workspace, params: Path, rerun_params: Path | None = None) -> tuple[Outcome, list[str]]:
    """SIGKILL train at its first checkpoint (policy and metrics must stay as they were), then rerun it."""
    ckpt = ws.flag("train", "--checkpoints")
    before = ws.snapshot()
    killed = _signal_stage(ws, "train", params, signal.SIGKILL, exists(ckpt / "checkpoint.zip"))
    problems = list(killed.problems)
    changes = diff_outputs(before, ws.snapshot(), ignore=(ckpt.relative_to(ws.root).as_posix() + "/",))
    if changes:
        problems.append(_changed_text(changes) + " after the kill")
    rerun = ws.stage("train", rerun_params or params)
    return Outcome(rerun.code, killed.output[:200] + "\n--- rerun ---\n" + rerun.output), problems


def kill_train_resume_case() -> Case:
    """SIGKILL train after its first checkpoint, rerun: the same val/test metrics as an uninterrupted run."""

    def run(ws: Workspace) -> Outcome:
        params, metrics = ws.params("kills-train-resume", KILL_TRAIN), ws.flag("train", "--metrics")
        ref = ws.stage("train", params)
        if ref.code != 0:
            return Outcome(ref.code, ref.output, ("the uninterrupted reference run failed",))
        expected = _without_timing(_json(metrics))
        ws.restore()
        rerun, problems = _kill_then_rerun(ws, params)
        got = _json(metrics)
        if _without_timing(got) != expected:
            problems.append(f"rerun metrics {_without_timing(got)} != uninterrupted {expected}")
        if not got.get("resumed_from"):
            problems.append("the rerun did not resume from the checkpoint (resumed_from 0)")
        return Outcome(rerun.code, rerun.output, tuple(problems))

    what = "train: SIGKILL after the first checkpoint, rerun; metrics must equal an uninterrupted run's"
    return Case("kills-train-resume", "kills", what, run, expect_ok=True, outputs_must_not_change=False)


def kill_train_new_params_case() -> Case:
    """SIGKILL train at a checkpoint, change train.learning_rate, rerun: it must start fresh and say so."""

    def run(ws: Workspace) -> Outcome:
        params = ws.params("kills-train-lr-a", KILL_TRAIN)
        other = ws.params("kills-train-lr-b", {**KILL_TRAIN, "train.learning_rate": 1e-3})
        rerun, problems = _kill_then_rerun(ws, params, other)
        if _json(ws.flag("train", "--metrics")).get("resumed_from"):
            problems.append("resumed a checkpoint made with another learning_rate")
        return Outcome(rerun.code, rerun.output, tuple(problems))

    what = "train: SIGKILL at a checkpoint, learning_rate changed, rerun; must start fresh and say so"
    return Case("kills-train-changed-lr", "kills", what, run, expect_ok=True, outputs_must_not_change=False,
                mention="fresh|fingerprint")  # fmt: skip


def kill_tune_resume_case() -> Case:
    """SIGKILL tune after its first finished trial, rerun: the same best_hparams as an uninterrupted study."""

    def run(ws: Workspace) -> Outcome:
        best = ws.flag("tune", "--best")
        ref = ws.stage("tune", ws.params("kills-tune-ref", _tune_storage(ws, "tune-ref")))
        if ref.code != 0:
            return Outcome(ref.code, ref.output, ("the uninterrupted reference study failed",))
        expected = _best_body(best)
        ws.restore()
        extra = _tune_storage(ws, "tune-killed")
        params = ws.params("kills-tune-killed", extra)
        before = ws.snapshot()
        killed = _signal_stage(ws, "tune", params, signal.SIGKILL, _stage_trigger(ws, "tune", extra))
        changes = diff_outputs(before, ws.snapshot())
        problems = [*killed.problems, *([_changed_text(changes) + " after the kill"] if changes else [])]
        rerun = ws.stage("tune", params)
        if _best_body(best) != expected:
            problems.append(f"best_hparams after the rerun:\n{_best_body(best)}!= uninterrupted:\n{expected}")
        return Outcome(rerun.code, killed.output[:200] + "\n--- rerun ---\n" + rerun.output, tuple(problems))

    what = "tune (3 trials): SIGKILL after the first finished trial, rerun; best_hparams must equal a fresh study's"
    return Case("kills-tune-resume", "kills", what, run, expect_ok=True, outputs_must_not_change=False)


def kills_cases() -> list[Case]:
    ssl = {"encoder.ssl_steps": 3}  # not the baseline's 2: the killed run's files differ from the old ones
    # fmt: off
    return [
        interrupt_case("train-sigint", "train", "Ctrl-C (SIGINT) after the first checkpoint", KILL_TRAIN),
        interrupt_case("tune-sigint", "tune", "Ctrl-C (SIGINT) after the first finished trial", {}),
        interrupt_case("encode-sigint", "encode", "Ctrl-C (SIGINT) when it starts writing outputs", ssl),
        kill_train_resume_case(),
        kill_tune_resume_case(),
        kill_train_new_params_case(),
        kill_rerun_case("fetch-sigkill", "fetch", "SIGKILL while writing map.tif (size 1024), rerun",
                        {"fetch.size": 1024}),
        kill_rerun_case("tile-sigkill", "tile", "SIGKILL while writing targets (200), rerun", {"tile.n_targets": 200}),
        kill_rerun_case("encode-sigkill", "encode", "SIGKILL while writing features, rerun", ssl),
        kill_rerun_case("encode-sigkill-partway", "encode", "SIGKILL right after data/features changes, rerun; "
                        "data/features must hold one run's files, not a mix", ssl, partway=True),
        kill_rerun_case("evaluate-sigkill", "evaluate", "SIGKILL while writing data/eval, rerun", {}),
    ]
    # fmt: on


# -- the cases: env API (in-process) ----------------------------------------------------------------
@cache
def _scene() -> Any:
    """A 128 px synthetic world with four targets (two train, two test), views of 32 px."""
    import numpy as np
    import pandas as pd
    from rasterio.transform import from_origin

    from maprl.data.geo import MapData
    from maprl.data.world import synthesize_world
    from maprl.nav.scene import Scene

    w = synthesize_world(128, 0)
    m = MapData(w.rgb, w.elevation, np.ones((128, 128), bool), from_origin(0, 128, 1, 1), None)
    xy = {"x": [40.0, 60.0, 80.0, 90.0], "y": [40.0, 80.0, 60.0, 90.0]}
    targets = pd.DataFrame({"id": [0, 1, 2, 3], **xy, "split": ["train", "train", "test", "test"]})
    return Scene.build(m, targets, 32)


def _env(**kw: Any) -> Any:
    from maprl.nav.env import SatelliteNavEnv

    return SatelliteNavEnv(scene=_scene(), **{"action_step": 0.1, **kw})


def _reset(**options: Any) -> Callable[[], Any]:
    return lambda: _env().reset(seed=0, options=options)


def _step(action: Any) -> Callable[[], Any]:
    def go() -> Any:
        env = _env()
        env.reset(seed=0, options={"target_id": 0, "start": (60.0, 60.0)})
        return env.step(action)

    return go


def _accepted_errors() -> tuple[type[BaseException], ...]:
    from gymnasium.error import Error

    return (ValueError, TypeError, Error)


def env_case(cid: str, what: str, fn: Callable[[], Any], mention: str = "", expect_ok: bool = False) -> Case:
    """Call the env API in-process; an accepted error (ValueError/TypeError/gymnasium) counts as a clean refusal."""

    def run(ws: Workspace) -> Outcome:
        try:
            fn()
        except _accepted_errors() as err:
            return Outcome(1, f"{type(err).__name__}: {err}", label=type(err).__name__)
        except Exception as err:
            where = traceback.extract_tb(err.__traceback__)[-1]
            text = f"{type(err).__name__}: {err} (raised at {Path(where.filename).name}:{where.lineno})"
            return Outcome(3, text, (f"{type(err).__name__}, not a ValueError/TypeError",), type(err).__name__)
        return Outcome(0, "returned normally", label="ok")

    return Case(f"env-{cid}", "env", what, run, expect_ok=expect_ok, mention=mention, api=True,
                outputs_must_not_change=False)  # fmt: skip


def env_cases() -> list[Case]:
    import numpy as np

    f32 = np.float32
    # fmt: off
    rows: list[tuple[str, str, Callable[[], Any], str, bool]] = [
        ("start-nan", "reset(options={'start': (nan, 60)})", _reset(start=(NAN, 60.0)), "start", False),
        ("start-inf", "reset(options={'start': (inf, 60)})", _reset(start=(INF, 60.0)), "start", False),
        ("start-neginf", "reset(options={'start': (-inf, -inf)})", _reset(start=(-INF, -INF)), "start", False),
        ("start-ndarray", "reset(options={'start': np.array([60., 60.])}) works",
         _reset(start=np.array([60.0, 60.0])), "", True),
        ("start-3", "reset(options={'start': (60, 60, 60)})", _reset(start=(60.0, 60.0, 60.0)), "start", False),
        ("start-off-map", "reset(options={'start': (1000, 1000)})", _reset(start=(1000.0, 1000.0)), "start", False),
        ("start-negative", "reset(options={'start': (-5, 60)})", _reset(start=(-5.0, 60.0)), "start", False),
        ("start-string", "reset(options={'start': '60,60'})", _reset(start="60,60"), "start", False),
        ("start-dict", "reset(options={'start': {'x': 60}})", _reset(start={"x": 60}), "start", False),
        ("start-nested", "reset(options={'start': [[60, 60]]})", _reset(start=[[60.0, 60.0]]), "start", False),
        ("target-unknown", "reset(options={'target_id': 999})", _reset(target_id=999), "target_id", False),
        ("target-negative", "reset(options={'target_id': -1})", _reset(target_id=-1), "target_id", False),
        ("target-float", "reset(options={'target_id': 0.5})", _reset(target_id=0.5), "target_id", False),
        ("target-string", "reset(options={'target_id': '0'})", _reset(target_id="0"), "target_id", False),
        ("target-list", "reset(options={'target_id': [0]})", _reset(target_id=[0]), "target_id", False),
        ("target-np-int", "reset(options={'target_id': np.int64(1)}) works", _reset(target_id=np.int64(1)), "", True),
        ("decoy-3", "reset(options={'decoy': (1, 2, 3)})", _reset(decoy=(1.0, 2.0, 3.0)), "decoy", False),
        ("decoy-half-nan", "reset(options={'decoy': (nan, 60)})", _reset(decoy=(NAN, 60.0)), "decoy", False),
        ("seed-negative", "reset(seed=-1)", lambda: _env().reset(seed=-1), "seed", False),
        ("action-nan", "step([nan, 0])", _step(np.array([NAN, 0.0], f32)), "action", False),
        ("action-inf", "step([inf, 0])", _step(np.array([INF, 0.0], f32)), "action", False),
        ("action-shape-3", "step([0, 0, 0])", _step(np.zeros(3, f32)), "action", False),
        ("action-scalar", "step(0.5)", _step(0.5), "action", False),
        ("action-string", "step('up')", _step("up"), "action", False),
        ("action-none", "step(None)", _step(None), "action", False),
        ("action-list", "step([0.5, 0.5]) (a list) works", _step([0.5, 0.5]), "", True),
        ("action-out-of-box", "step([5, -5]) works (clipped to the box)", _step(np.array([5.0, -5.0])), "", True),
        ("max-steps-0", "SatelliteNavEnv(max_steps=0)", lambda: _env(max_steps=0), "max_steps", False),
        ("max-steps-negative", "SatelliteNavEnv(max_steps=-3)", lambda: _env(max_steps=-3), "max_steps", False),
        ("action-step-negative", "SatelliteNavEnv(action_step=-0.1)", lambda: _env(action_step=-0.1), "action_step",
         False),
        ("stop-threshold-nan", "SatelliteNavEnv(stop_threshold=nan)", lambda: _env(stop_threshold=NAN),
         "stop_threshold", False),
        ("obs-unknown", "SatelliteNavEnv(obs='rgb')", lambda: _env(obs="rgb"), "obs", False),
        ("split-unknown", "SatelliteNavEnv(split='validation')", lambda: _env(split="validation"), "split", False),
        ("unknown-keyword", "SatelliteNavEnv(speed=2)", lambda: _env(speed=2), "speed", False),
    ]
    # fmt: on
    return [env_case(*row) for row in rows]


# -- the cases: cli ---------------------------------------------------------------------------------
def cli_cases() -> list[Case]:
    helps = [
        cli_case(f"help-{s}", f"maprl {s} --help", ["maprl", s, "--help"], expect_ok=True, mention="dvc.yaml")
        for s in ("fetch", "tile", "encode", "tune", "train", "evaluate")
    ]
    # fmt: off
    return [
        cli_case("no-args", "maprl with no arguments", ["maprl"], mention="command|required"),
        cli_case("unknown-command", "maprl frobnicate", ["maprl", "frobnicate"], mention="frobnicate|invalid choice"),
        cli_case("bad-agent", "maprl train --agent bogus", ["maprl", "train", "--agent", "bogus"], mention="bogus"),
        cli_case("params-missing", "maprl check-params --params missing.yaml",
                 ["maprl", "check-params", "--params", "missing.yaml"], mention="missing.yaml", error_re=MAPRL_ERROR),
        cli_case("params-flag-no-value", "maprl check-params --params (no value)",
                 ["maprl", "check-params", "--params"], mention="params"),
        cli_case("pipe-head", "maprl check-params | head -1 (pipefail): quiet, exit 0", "maprl check-params | head -1",
                 expect_ok=True),
        cli_case("pipe-closed", "maprl check-params | true (the reader is gone before the write): quiet, exit 0",
                 "maprl check-params | true", expect_ok=True),
        cli_case("pipe-params-table", "maprl params-table | head -1: quiet, exit 0", "maprl params-table | head -1",
                 mention=r"\| key", expect_ok=True),
        cli_case("params-table", "maprl params-table", ["maprl", "params-table"], mention="train.n_envs",
                 expect_ok=True),
        cli_case("check-params-ok", "maprl check-params on good params", ["maprl", "check-params"],
                 mention="view_size", expect_ok=True),
        cli_case("help", "maprl --help", ["maprl", "--help"], mention="check-params", expect_ok=True),
        cli_case("version", "maprl --version", ["maprl", "--version"], mention="maprl", expect_ok=True),
        *helps,
        cli_case("outside-repo", "maprl evaluate in a folder without dvc.yaml", ["maprl", "evaluate"],
                 mention="dvc.yaml", error_re=MAPRL_ERROR, outside_repo=True),
        cli_case("stage-no-flags", "python pipeline/train.py without its path flags", ["pipeline/train.py"],
                 mention="required"),
        cli_case("stage-unknown-flag", "python pipeline/tile.py (its flags) --bogus",
                 ["pipeline/tile.py", "--map", "m", "--out", "o", "--metrics", "x", "--bogus"],
                 mention="bogus"),
        cli_case("tune-worker-no-storage", "maprl tune-worker without --storage", ["maprl", "tune-worker"],
                 mention="storage"),
        cli_case("tune-worker-bad-n", "maprl tune-worker --storage x --n-trials many",
                 ["maprl", "tune-worker", "--storage", "x", "--n-trials", "many"], mention="n-trials|many"),
        _wrapper_case(),
    ]
    # fmt: on


def _wrapper_case() -> Case:
    """``maprl fetch --params bad.yaml`` (the wrapper around the stage script) passes on exit 2 and the message."""

    def run(ws: Workspace) -> Outcome:
        return ws.maprl(["fetch", "--params", str(ws.params("cli-wrapper", {"fetch.size": NAN}))])

    what = "maprl fetch --params with fetch.size .nan (exit 2 through the wrapper)"
    return Case("cli-wrapper-bad-params", "cli", what, run, mention="size", expect_code=2)


ALL_CASES: dict[str, Callable[[], list[Case]]] = {
    "params": params_cases,
    "files": files_cases,
    "earthengine": earthengine_cases,
    "kills": kills_cases,
    "env": env_cases,
    "cli": cli_cases,
}


# -- judging and running ----------------------------------------------------------------------------
def judge(case: Case, out: Outcome, changes: list[str]) -> list[str]:
    """Every way ``out`` falls short of the case's expectation (empty: it passed)."""
    problems = list(out.problems)
    if case.expect_ok and out.code != 0:
        problems.append(f"exit {out.code}, expected 0")
    elif not case.expect_ok:
        problems += _error_problems(case, out)
    if case.expect_code is not None and out.code != case.expect_code:
        problems.append(f"exit {out.code}, expected {case.expect_code}")
    if "Traceback" in out.output or "Exception ignored" in out.output:
        problems.append("traceback in the output")
    exit_as_expected = (out.code == 0) == case.expect_ok
    if exit_as_expected and case.mention and not re.search(case.mention, out.output, re.IGNORECASE):
        problems.append(f"output does not mention /{case.mention}/")
    if case.outputs_must_not_change and changes:
        problems.append(_changed_text(changes))
    return problems


def _error_problems(case: Case, out: Outcome) -> list[str]:
    """A must-fail case: an error exit with the expected line (in-process: an accepted exception)."""
    if case.api:  # code 1: an accepted exception; code 3 brought its own problem
        return ["returned normally, expected a ValueError/TypeError"] if out.code == 0 else []
    problems = []
    if out.code == 0:
        problems.append("exit 0, expected an error")
    if not re.search(case.error_re, out.output, re.MULTILINE):
        problems.append(f"no line matching /{case.error_re}/")
    return problems


def run_case(ws: Workspace, case: Case) -> Row:
    t0 = time.perf_counter()
    try:
        if case.setup is not None:
            case.setup(ws)
        before = ws.snapshot()
        out = case.run(ws)
        problems = judge(case, out, diff_outputs(before, ws.snapshot(), case.ignore))
    except Exception as err:  # a bug of the harness or an unbuildable case: report it, keep going
        out = Outcome(-1, traceback.format_exc(), label="harness error")
        problems = [f"could not run the case: {type(err).__name__}: {err}"]
    finally:
        ws.restore()
    return Row(case, out, not problems, "; ".join(problems), time.perf_counter() - t0)


# -- report ---------------------------------------------------------------------------------------
def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


KEY_LINE = re.compile(r"^(maprl: error|maprl: interrupted|[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b)")
PROGRESS = re.compile(r"\d+%\|")  # tqdm bars


def excerpt(output: str, lines: int = 6, width: int = 300) -> str:
    """The kill note, the last maprl frame of a traceback, the error lines and the last ``lines`` lines."""
    text = [ln[:width] for ln in output.strip().splitlines() if ln.strip() and not PROGRESS.search(ln)]
    note = [ln for ln in text[:1] if ln.startswith("[")]
    frame = [ln for ln in text if 'File "' in ln and "/maprl/" in ln][-1:]
    key = [ln for ln in text if KEY_LINE.match(ln)][-2:]
    return "\n".join(dict.fromkeys(note + frame + key + text[-lines:]))


def print_table(rows: list[Row]) -> None:
    print("| id | category | what was done | exit | verdict |")
    print("|---|---|---|---|---|")
    for r in rows:
        verdict = "PASS" if r.passed else f"FAIL: {r.problems}"
        code = r.outcome.label or str(r.outcome.code)
        print(f"| {r.case.id} | {r.case.category} | {_cell(r.case.description)} | {_cell(code)} | {_cell(verdict)} |")


def print_failures(rows: list[Row]) -> None:
    for r in (r for r in rows if not r.passed):
        print(f"\n### {r.case.id} (exit {r.outcome.label or r.outcome.code}): {r.problems}")
        print(f"```\n{excerpt(r.outcome.output)}\n```")


def write_csv(path: Path, rows: list[Row]) -> None:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "category", "description", "exit", "verdict", "problems", "seconds", "output_excerpt"])
        for r in rows:
            code, verdict = r.outcome.label or str(r.outcome.code), "PASS" if r.passed else "FAIL"
            row = [r.case.id, r.case.category, r.case.description, code, verdict, r.problems]
            w.writerow([*row, round(r.seconds, 1), excerpt(r.outcome.output)])


def select_cases(only: str | None, text: str | None = None) -> list[Case]:
    cases = [c for name, make in ALL_CASES.items() if only in (None, name) for c in make() if (text or "") in c.id]
    ids = [c.id for c in cases]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise SystemExit(f"duplicate case ids: {', '.join(dupes)}")
    return cases


def open_workspace(args: argparse.Namespace, needs_baseline: bool) -> Workspace:
    """A fresh workspace with a baseline (or, with --workspace, a kept one restored to its baseline)."""
    if args.workspace is not None:
        ws = attach_workspace(args.workspace.resolve())
        if not (ws.bench / "pristine").exists():
            raise SystemExit(f"{args.workspace} holds no baseline (.bench/pristine); make one with --keep first")
        ws.restore()
        return ws
    ws = make_workspace(args.repo.resolve(), Path(tempfile.mkdtemp(prefix="maprl-faults-")))
    if needs_baseline:
        try:
            build_baseline(ws)
        except SystemExit:
            if not args.keep:
                shutil.rmtree(ws.root, ignore_errors=True)
            raise
    else:
        for top in OUTPUT_DIRS:
            ws.path(top).mkdir(exist_ok=True)
        ws.save_pristine()
    return ws


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=CATEGORIES, help="run one category")
    ap.add_argument("--case", metavar="TEXT", help="run only the cases whose id contains TEXT")
    ap.add_argument("--list", action="store_true", help="list the cases, run nothing")
    ap.add_argument("--csv", type=Path, help="also write the table as CSV here")
    ap.add_argument("--keep", action="store_true", help="keep the workspace (its path is printed)")
    ap.add_argument("--workspace", type=Path, help="reuse a workspace kept by --keep (its code copy, its baseline)")
    ap.add_argument("--repo", type=Path, default=REPO, help="repository to copy (default: this one)")
    return ap.parse_args()


def run_all(ws: Workspace, cases: list[Case]) -> list[Row]:
    rows = []
    progress = tqdm(cases, desc="faults", unit="case")
    for case in progress:
        progress.set_postfix_str(case.id)
        rows.append(run_case(ws, case))
    return rows


def main() -> int:
    args = parse_args()
    cases = select_cases(args.only, args.case)
    if args.list:
        for c in cases:
            print(f"{c.id:40s} {c.category:12s} {'must succeed' if c.expect_ok else 'must fail':13s} {c.description}")
        print(f"{len(cases)} cases")
        return 0
    t0 = time.perf_counter()
    ws = open_workspace(args, needs_baseline=any(c.category != "env" for c in cases))
    try:
        rows = run_all(ws, cases)
    finally:
        if args.keep or args.workspace:
            print(f"workspace kept: {ws.root}", file=sys.stderr)
        else:
            shutil.rmtree(ws.root, ignore_errors=True)
    print_table(rows)
    print_failures(rows)
    if args.csv:
        write_csv(args.csv, rows)
    n_pass = sum(r.passed for r in rows)
    print(f"\nruntime: {time.perf_counter() - t0:.0f} s")
    print(f"cases: {len(rows)}, passed: {n_pass}, failed: {len(rows) - n_pass}")
    return 0 if n_pass == len(rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
