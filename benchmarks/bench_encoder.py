"""Encoder choices compared on the default world: time, cache fidelity, retrieval and the stop rule.

Usage: python benchmarks/bench_encoder.py [--map MAP.tif --targets targets.csv] [--only NAME ...]
Without --map, it synthesises the default 2048 px world (seed 42) and its 500 targets (spatial
split). Prints one row per encoder: seconds (ssl + cache), dim, cache agreement (mean / 5th
percentile cosine of cached vs exact embeddings), retrieval accuracy (train / test), far-pair
99th percentile similarity, the calibrated stop threshold, its near recall, and the median
similarity at 0 px and at half the success radius.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import pandas as pd
from rasterio.transform import from_origin

from maprl.config import EncoderParams, TileParams
from maprl.data.geo import MapData, read_map
from maprl.data.tile import build_targets, read_targets
from maprl.data.world import synthesize_world
from maprl.features.encode import encode_map, measure

CONFIGS: dict[str, dict[str, Any]] = {  # EncoderParams defaults unless overridden
    "pooled": {"kind": "pooled"},
    "mobilenet_v2 random": {"kind": "mobilenet_v2", "weights": "random"},
    "mobilenet_v2 ssl, 20 steps": {"kind": "mobilenet_v2", "weights": "ssl", "ssl_steps": 20},
    "nature_cnn random": {"kind": "nature_cnn", "weights": "random"},
    "nature_cnn ssl, 100 steps": {"kind": "nature_cnn", "weights": "ssl", "ssl_steps": 100},
    "impala_cnn random": {"kind": "impala_cnn", "weights": "random"},
    "impala_cnn ssl (default, 40 steps)": {"kind": "impala_cnn", "weights": "ssl"},
    "impala_cnn ssl, 20 steps": {"kind": "impala_cnn", "weights": "ssl", "ssl_steps": 20},
    "impala_cnn ssl, 80 steps": {"kind": "impala_cnn", "weights": "ssl", "ssl_steps": 80},
    "impala_cnn random, global pool": {"kind": "impala_cnn", "weights": "random", "pool_grid": 1},
    "impala_cnn random, no whitening": {"kind": "impala_cnn", "weights": "random", "whiten": False},
    "impala_cnn random, border 0": {"kind": "impala_cnn", "weights": "random", "border": 0},
}


def default_world(size: int, seed: int) -> tuple[MapData, pd.DataFrame]:
    w = synthesize_world(size, seed)
    m = MapData(w.rgb, w.elevation, np.ones(w.elevation.shape, bool), from_origin(0, size, 1, 1), None)
    return m, build_targets(m, TileParams(), seed, None)


def bench_row(name: str, overrides: dict[str, Any], m: MapData, targets: pd.DataFrame, seed: int) -> dict[str, Any]:
    p = EncoderParams(**overrides)
    t0 = time.perf_counter()
    space, info = encode_map(p, m, 224, seed)
    seconds = time.perf_counter() - t0
    metrics, cal = measure(space, m, targets, p, seed)
    agree, ret, far = metrics["cache_agreement"], metrics["retrieval_accuracy"], metrics["far_pair_similarity"]
    loss = info["ssl_loss"]
    return {
        "encoder": name,
        "seconds": round(seconds, 1),
        "ssl s": round(info["seconds_ssl"], 1),
        "dim": metrics["dim"],
        "agree mean/p05": f"{agree['mean']:.3f}/{agree['p05']:.3f}",
        "retrieval train/test": f"{ret['train']:.3f}/{ret['test']:.3f}",
        "far p99": round(far["encoder_p99"], 3),
        "pixels far mean": round(far["pixels_mean"], 3),
        "stop thr": round(cal["stop_threshold"], 3),
        "near recall": round(cal["near_recall"], 3),
        "far pass test": f"{cal['far_pass_rate_test']:.1e}",
        "sim 0px/r/2": f"{cal['median_similarity_0px']:.2f}/{cal['median_similarity_half_radius']:.2f}",
        "ssl loss": f"{np.mean(loss[:5]):.2f}->{np.mean(loss[-5:]):.2f}" if loss else "",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--map", help="map.tif from `maprl fetch` (default: synthesise the default world)")
    ap.add_argument("--targets", help="targets.csv from `maprl tile` (with --map)")
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--only", nargs="*", help="encoder names to run (default: all)")
    args = ap.parse_args()
    if args.map:
        m, targets = read_map(args.map), read_targets(args.targets)
    else:
        m, targets = default_world(args.size, args.seed)
    rows = []
    for name, overrides in CONFIGS.items():
        if args.only and name not in args.only:
            continue
        rows.append(bench_row(name, overrides, m, targets, args.seed))
        print(pd.DataFrame(rows[-1:]).to_string(index=False), flush=True)
    print()
    print(pd.DataFrame(rows).to_markdown(index=False) if _has_tabulate() else pd.DataFrame(rows).to_string(index=False))


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    main()
