"""Can PPO learn to search past a wrong top retrieval candidate? Train with decoys, then evaluate.

Usage (after `dvc repro`, from the repository root):
    python benchmarks/bench_decoys.py --rate 0.3 --timesteps 300000 [--rate 0.3 --timesteps 1200000 ...]

Each run trains the memory agent with ``train.decoy_rate`` = rate for ``timesteps`` on the
pipeline's own data (data/map, data/targets, data/features, models/best_hparams.yaml), writes
it under ``--out``/<rate>-<timesteps>/ and runs the ``evaluate`` stage logic with
``evaluate.decoy_rate`` from params.yaml (the original agent comes from models/original).
Prints one row per run: success / SPL on the clean test split and on the ``test_decoy`` split,
beside retrieve-then-fly and the scripted search on the same episodes.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd

from maprl.config import load_params
from maprl.eval.evaluate import run_evaluate
from maprl.learn.training import RunPaths, run_train

MAP, TARGETS, FEATURES = "data/map/map.tif", "data/targets/targets.csv", "data/features"


def one_run(rate: float, timesteps: int, out: Path) -> dict[str, object]:
    params = load_params("params.yaml", stage="train")
    train = params.train.model_copy(update={"decoy_rate": rate, "total_timesteps": timesteps, "progress_bar": False})
    params = params.model_copy(update={"train": train})
    policy = out / "models" / "memory" / "policy.zip"
    paths = RunPaths(policy, out / "checkpoints", out / "history.json", out / "train.json", out / "live")
    t0 = time.perf_counter()
    run_train(params, "memory", MAP, TARGETS, FEATURES, "models/best_hparams.yaml", paths)
    seconds = time.perf_counter() - t0
    ev = run_evaluate(params, MAP, TARGETS, FEATURES, {"memory": policy}, out / "eval", out / "eval.json")
    row: dict[str, object] = {"decoy_rate": rate, "timesteps": timesteps, "train_s": round(seconds)}
    methods = {"agent": ev["agent"], **ev["baselines"]}
    for name in ("agent", "retrieve_then_fly", "retrieve_then_search"):
        for split in ("test", "test_decoy"):
            s = methods[name][split]
            row[f"{name} {split}"] = f"{s['success_rate']:.3f} / {s['spl']:.3f}"
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, action="append", required=True, help="train.decoy_rate (repeatable)")
    ap.add_argument("--timesteps", type=int, action="append", required=True, help="total_timesteps, one per --rate")
    ap.add_argument("--out", type=Path, default=Path("data/bench_decoys"))
    args = ap.parse_args()
    if len(args.rate) != len(args.timesteps):
        ap.error("give one --timesteps per --rate")
    rows = [one_run(r, t, args.out / f"{r}-{t}") for r, t in zip(args.rate, args.timesteps, strict=True)]
    print(pd.DataFrame(rows).T.to_string(header=False))


if __name__ == "__main__":
    main()
