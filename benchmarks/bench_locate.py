"""How fast is ``maprl locate``, warm, on this machine? Latency per photo and batch throughput.

Uses the pipeline's outputs (``dvc repro`` first: the map, features, policy and calibration).
The photos are JPEG files of the test targets, each cut from a random domain (the map or a
query domain) as a context crop of ``--side`` pixels and turned by a random angle, so the
heading search does its full work. One :class:`~maprl.locator.Locator` is loaded per method
(timed apart), two photos warm it up, then each photo is located alone (latency: median, 90th
percentile, max) and all of them in one batch (throughput). Also printed, for context: the
share answered within the success radius, the share located (not abstained) and the precision
of those. ::

    python benchmarks/bench_locate.py                     # 40 photos, agent and retrieve_then_fly
    python benchmarks/bench_locate.py --n 100 --methods agent
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from maprl.config import LOCATE_INPUTS, LOCATE_METHODS, load_params
from maprl.data.perturb import rotate
from maprl.data.tile import read_domains, read_targets
from maprl.features.photos import cut_context
from maprl.locator import Locator


def make_photos(root: Path, n: int, side: int, seed: int, out: Path) -> tuple[list[Path], np.ndarray]:
    """``n`` JPEG photos of test targets (random domain, random heading) and their true centres."""
    params = load_params(root / LOCATE_INPUTS["params"])
    from maprl.data.geo import read_map

    m = read_map(root / LOCATE_INPUTS["map"])
    targets = read_targets(root / "data/targets/targets.csv", m, params.tile.view_size)
    test = targets[targets["split"] == "test"]
    imagery = [m.rgb, *(rgb for rgb, _ in read_domains(root / LOCATE_INPUTS["map"]).values())]
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(test), size=min(n, len(test)), replace=False)
    paths, truth = [], []
    for i, r in enumerate(rows):
        x, y = float(test["x"].iat[r]), float(test["y"].iat[r])
        img = cut_context(imagery[rng.integers(len(imagery))], x, y, params.tile.view_size, side)
        path = out / f"photo_{i:03d}.jpg"
        Image.fromarray(rotate(img, float(rng.uniform(0, 360)))).save(path, quality=85)
        paths.append(path)
        truth.append((x, y))
    return paths, np.array(truth)


def bench(method: str, root: Path, paths: list[Path], truth: np.ndarray) -> dict[str, float]:
    t0 = time.perf_counter()
    inputs = {k: root / v for k, v in LOCATE_INPUTS.items()}
    loc = Locator.load(inputs["params"], inputs["map"], inputs["features"], inputs["policy"], inputs["calibration"],
                       method=method)  # fmt: skip
    load_s = time.perf_counter() - t0
    for p in paths[:2]:
        loc.locate(p)
    latency = []
    for p in paths:
        t = time.perf_counter()
        loc.locate(p)
        latency.append(time.perf_counter() - t)
    t = time.perf_counter()
    results = loc.locate_many(paths, progress=False)
    batch_s = time.perf_counter() - t
    xy = np.array([[r.pixel_x, r.pixel_y] for r in results])
    right = np.hypot(*(xy - truth).T) <= loc.params.evaluate.success_radius
    located = np.array([r.located for r in results])
    lat = np.array(latency)
    return {
        "load_s": load_s,
        "median_s": float(np.median(lat)),
        "p90_s": float(np.percentile(lat, 90)),
        "max_s": float(lat.max()),
        "batch_qps": len(paths) / batch_s,
        "within_radius": float(right.mean()),
        "located": float(located.mean()),
        "precision_located": float(right[located].mean()) if located.any() else float("nan"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=".", help="repository root with the pipeline's outputs (default: .)")
    ap.add_argument("--n", type=int, default=40, help="photos (test targets; default 40)")
    ap.add_argument("--side", type=int, default=320, help="photo side in map pixels before turning (default 320)")
    ap.add_argument("--methods", nargs="+", default=list(LOCATE_METHODS), choices=LOCATE_METHODS)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    root = Path(args.root)
    params = load_params(root / LOCATE_INPUTS["params"])
    with tempfile.TemporaryDirectory() as tmp:
        paths, truth = make_photos(root, args.n, args.side, args.seed, Path(tmp))
        rows = {m: bench(m, root, paths, truth) for m in args.methods}
    print(f"maprl locate, warm: {len(paths)} JPEG photos ({args.side} px, random heading and domain) of test targets;"
          f" {os.cpu_count()} CPU cores, torch threads {params.encoder.torch_threads},"
          f" heading search {params.encoder.heading_search}, restarts {params.locate.restarts}\n")  # fmt: skip
    print("| method | load (s) | latency median (s) | p90 (s) | max (s) | batch (photos/s) | within radius | "
          "located | precision of located |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for m, r in rows.items():
        shares = ("within_radius", "located", "precision_located")
        cells = [f"{r['load_s']:.1f}", *(f"{r[k]:.3f}" for k in ("median_s", "p90_s", "max_s")),
                 f"{r['batch_qps']:.1f}", *(f"{r[k]:.2f}" for k in shares)]  # fmt: skip
        print(f"| {m} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
