"""Are two from-scratch pipeline runs on one machine byte-identical?

Usage: python benchmarks/bench_repro.py [--tiny] [--runs 2] [--keep]

Copies the repository (tracked and untracked, not ignored, files; no outputs) into a fresh
temporary folder per run, runs ``dvc repro`` there, and hashes every artifact: the metrics
files, the map, targets, feature cache and encoder, each policy and the evaluation tables.
Prints one row per artifact: its hash in each run and whether they agree. Timing files
(``metrics/timing/``) are listed apart: they are expected to differ. ``--tiny`` runs on the
e2e test's tiny params (about a minute per run) instead of the repository's ``params.yaml``.
Exit code 1 if an artifact other than a timing file differs.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from workspace import TINY, copy_repo, git_commit_all

ARTIFACTS = (
    "metrics/*.json",
    "metrics/timing/*.json",
    "data/map/*",
    "data/targets/targets.csv",
    "data/features/*",
    "models/best_hparams.yaml",
    "models/*/policy.zip",
    "models/*/eval_history.json",
    "data/eval/*.csv",
)


def prepare(dst: Path, tiny: bool) -> None:
    """A copy of the repository in ``dst``, run with its own maprl (``run_pipeline`` puts it first on
    PYTHONPATH): two runs then also differ in where maprl lives, as two checkouts would."""
    copy_repo(dst, TINY if tiny else None)
    git_commit_all(dst)


def run_pipeline(work: Path) -> float:
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    env = {**os.environ, "PATH": path, "PYTHONPATH": str(work)}
    t0 = time.perf_counter()
    proc = subprocess.run(["dvc", "repro"], cwd=work, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"dvc repro failed in {work}:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def hashes(work: Path) -> dict[str, str]:
    out = {}
    for pattern in ARTIFACTS:
        for path in sorted(work.glob(pattern)):
            if path.is_file():
                out[str(path.relative_to(work))] = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="the e2e test's tiny params instead of params.yaml")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--keep", action="store_true", help="keep the run folders (printed)")
    args = ap.parse_args()
    runs, seconds = [], []
    for i in range(args.runs):
        work = Path(tempfile.mkdtemp(prefix=f"maprl-repro-{i}-"))
        prepare(work, args.tiny)
        seconds.append(run_pipeline(work))
        runs.append(hashes(work))
        if args.keep:
            print(f"run {i}: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    names = sorted(set().union(*runs))
    print(f"| artifact | {' | '.join(f'run {i}' for i in range(args.runs))} | identical |")
    print("|---|" + "---|" * (args.runs + 1))
    differ = []
    for name in names:
        values = [r.get(name, "missing") for r in runs]
        same = len(set(values)) == 1
        timing = name.startswith("metrics/timing/")
        print(f"| {name} | {' | '.join(values)} | {'yes' if same else 'no (timing)' if timing else 'NO'} |")
        if not same and not timing:
            differ.append(name)
    wall = ", ".join(f"{s:.0f} s" for s in seconds)
    print(f"\n{len(names)} artifacts, {len(differ)} differ (timing files aside); dvc repro wall: {wall}")
    raise SystemExit(1 if differ else 0)


if __name__ == "__main__":
    main()
