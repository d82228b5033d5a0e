"""Environment steps per second on the default synthetic world.

Usage: python benchmarks/bench_env.py [--size 2048] [--steps 2000]
Prints a small table: env variant, steps, seconds, steps/s.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
from rasterio.transform import from_origin

from maprl.config import TileParams
from maprl.data.geo import MapData
from maprl.data.tile import build_targets
from maprl.data.world import synthesize_world
from maprl.nav.env import SatelliteNavEnv
from maprl.nav.scene import Scene


def time_env(env: SatelliteNavEnv, steps: int) -> float:
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    actions = rng.uniform(-1, 1, (steps, 2)).astype(np.float32)
    t0 = time.perf_counter()
    for a in actions:
        _, _, term, trunc, _ = env.step(a)
        if term or trunc:
            env.reset()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=2000)
    args = ap.parse_args()
    w = synthesize_world(args.size, 42)
    m = MapData(w.rgb, w.elevation, np.ones(w.elevation.shape, bool), from_origin(0, args.size, 1, 1), None)
    targets = build_targets(m, TileParams(n_targets=50, mode="random"), 0, None)
    rows = []
    for sim in ("pooled", "pixels"):
        env = SatelliteNavEnv(scene=Scene.build(m, targets, 224, sim))
        n = args.steps if sim == "pooled" else args.steps // 4
        sec = time_env(env, n)
        rows.append(
            {"env": f"gymnasium, similarity={sim}", "steps": n, "seconds": round(sec, 2), "steps/s": round(n / sec)}
        )
    print(pd.DataFrame(rows).to_string(index=False))


if __name__ == "__main__":
    main()
