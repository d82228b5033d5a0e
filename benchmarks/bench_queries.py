"""Which encoder finds photos that are not copies of the map? Retrieval top-1 by query domain and perturbation.

Trains the encoder of ``params.yaml`` with a few SSL variants on the pipeline's current map
(``data/map``, ``data/targets``: run ``dvc repro tile`` first) and reports, for the test
targets, the share whose best map-memory match lies within the success radius: for photos
from each query domain as they are, and for the map's photos under each perturbation at
strength 0.5 ("moderate"), each photo embedded at its best of ``encoder.heading_search``
headings (a photo whose unturned match reaches the calibrated stop threshold is kept as it is,
as in the pipeline). Prints one row per variant::

    python benchmarks/bench_queries.py                         # the default variants
    python benchmarks/bench_queries.py --variants strong:150:0.5 mild:40:0 --kinds rotation cloud
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd

from maprl.config import load_params
from maprl.data.geo import read_map
from maprl.data.splits import test_area
from maprl.data.tile import read_domains, read_targets
from maprl.features.encode import encode_map, measure
from maprl.features.memory import MapMemory
from maprl.features.photos import embed_photos, perturbed_photos, target_photos

DEFAULT_VARIANTS = ["mild:40:0:0:1", "strong:40:0.5:0:1,8", "strong:150:0.5:0.125:1,8"]
DEFAULT_KINDS = ["brightness", "contrast", "colour_cast", "grayscale", "blur", "cloud", "rotation", "scale", "tilt"]


def top1(memory: MapMemory, emb: np.ndarray, xy: np.ndarray, radius: float) -> float:
    pos, _ = memory.query(emb, k=1)
    return float(np.mean(np.hypot(*(pos[:, 0] - xy).T) <= radius))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--variants", nargs="+", default=DEFAULT_VARIANTS,
        help="augment:ssl_steps:cross_domain:local_norm:headings (headings: comma-separated counts, one row each)",
    )  # fmt: skip
    ap.add_argument("--kinds", nargs="+", default=DEFAULT_KINDS)
    ap.add_argument("--strength", type=float, default=0.5)
    ap.add_argument("--map", default="data/map/map.tif")
    ap.add_argument("--targets", default="data/targets/targets.csv")
    args = ap.parse_args()
    params = load_params()
    m = read_map(args.map)
    view, seed, radius = params.tile.view_size, params.base.seed, params.evaluate.success_radius
    targets = read_targets(args.targets, m, view)
    test = targets[targets["split"] == "test"]
    xy = test[["x", "y"]].to_numpy(float)
    domains = read_domains(args.map)
    forbidden = test_area(targets, (m.height, m.width), view, params.tile.block_size)
    rows = []
    for variant in args.variants:
        augment, steps, cross, norm, headings = variant.split(":")
        p = params.encoder.model_copy(
            update={
                "augment": augment,
                "ssl_steps": int(steps),
                "cross_domain": float(cross),
                "local_norm": float(norm),
            }
        )
        t0 = time.perf_counter()
        space, _ = encode_map(p, m, view, seed, domains, forbidden)
        seconds = time.perf_counter() - t0
        memory = MapMemory(space.grid_positions(), space.grid_embeddings(), 2 * radius)
        accept = measure(space, m, targets, p, seed, radius)[1]["stop_threshold"]  # as the encode stage does
        sources = {"same": m.rgb, **{d: rgb for d, (rgb, _) in domains.items()}}
        changed = {
            kind: perturbed_photos(m.rgb, xy, view, kind, args.strength, np.random.default_rng([seed, 3]))[0]
            for kind in args.kinds
        }
        for n_headings in (int(h) for h in headings.split(",")):
            row: dict[str, object] = {"augment:steps:cross": variant.rsplit(":", 1)[0], "headings": n_headings}
            row["ssl_s"] = round(seconds)
            photos = {name: target_photos(rgb, xy, view) for name, rgb in sources.items()} | changed
            for name, batch in photos.items():
                e = embed_photos(space, memory, batch, n_headings, accept=accept)
                row[name] = top1(memory, e.embeddings, xy, radius)
            rows.append(row)
            print(pd.DataFrame([row]).to_string(index=False), flush=True)
    print(f"\nretrieval top-1 on {len(xy)} test targets (radius {radius:g} px), perturbations at {args.strength}:")
    print(pd.DataFrame(rows).to_markdown(index=False, floatfmt=".2f"))


if __name__ == "__main__":
    main()
