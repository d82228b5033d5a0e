"""Is the calibrated stop rule usable on real maps? Near recall and false stops on real rasters (issue 12).

For each real map (NAIP 2020 over North Dakota, Landsat 2020 over Pucallpa; ``../shared/data``,
read in place, never copied) the library's own stages run in a temporary workspace under /tmp:
``fetch`` (source ``file``, the other dates as query domains ``source: file``), ``tile``, the
``encode`` stage's encoder (``encode_map``: SSL on the map with cross-date pairs from the train
area only) and its stop calibration (``measure``: the ``encoder.stop_quantile`` quantile of
far-view similarity of the *train* targets plus ``encoder.stop_margin``). The targets' photos are
embedded as the pipeline embeds them (``photo_embeddings``: best of ``encoder.heading_search``
headings). Then, on the held-out *test* targets, for the photos cut from the map itself
(``same``) and from each other date, two rules are measured on the same similarities:

* ``far-quantile``: the calibrated threshold of the encode stage (one number per map);
* ``relative``: per target, pass when the similarity is at least the similarity of the
  second-best place in the map memory (``MapMemory.query``, candidates more than two success
  radii apart) plus a margin (``--rel-margin``, default ``encoder.stop_margin``). It needs no
  ground truth and no calibration.

Columns: ``near recall`` is the share of grid views within the success radius of the target
that pass; ``at target`` the share of targets whose view at the true position passes;
``false stops`` the share of grid views more than two success radii away that pass (the far
pass rate); ``targets w/ far pass`` the share of targets for which at least one such far view
passes; ``top-1`` the share whose best map-memory match lies within the success radius::

    python benchmarks/bench_stop.py                    # full settings, both maps (14 min on 2 busy cores)
    python benchmarks/bench_stop.py --quick            # tiny settings, a smoke test
    python benchmarks/bench_stop.py --maps naip --out /tmp/bench_stop.csv
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from maprl.config import Params, parse_params
from maprl.data.fetch import run_fetch
from maprl.data.geo import read_map
from maprl.data.splits import test_area
from maprl.data.tile import read_domains, read_targets, run_tile
from maprl.features.cache import MapSpace
from maprl.features.encode import encode_map, measure, photo_embeddings
from maprl.features.memory import MapMemory
from maprl.io import write_csv

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"

# map name -> (map raster, {query domain: raster}), relative to the data folder
MAPS: dict[str, tuple[str, dict[str, str]]] = {
    "naip": (
        "naip-nd/naip_20200831.tif",
        {
            "d2018": "naip-nd/naip_20180716.tif",
            "d2016": "naip-nd/naip_20160816.tif",
            "d2014": "naip-nd/naip_20140720.tif",
        },
    ),
    "landsat": ("landsat-pucallpa/landsat_2020.tif", {"y2000": "landsat-pucallpa/landsat_2000.tif"}),
}

# The settings of experiments/naip.sh (view 128 px, success radius 32 px, blocks 192 px, cache stride 8).
FULL: dict[str, dict[str, Any]] = {
    "tile": {"view_size": 128, "block_size": 192, "write_crops": False},
    "evaluate": {"success_radius": 32.0},
    "encoder": {"cache_stride": 8},
}
QUICK: dict[str, dict[str, Any]] = {
    "tile": {"view_size": 32, "block_size": 64, "n_targets": 40, "write_crops": False},
    "evaluate": {"success_radius": 8.0},
    "encoder": {"cache_stride": 8, "input_size": 64, "ssl_steps": 2, "ssl_batch_size": 8, "heading_search": 2},
}

COLUMNS = [
    "map", "query", "rule", "threshold", "near_recall", "at_target", "false_stops", "targets_far_pass", "top1",
    "n_targets", "n_near", "n_far",
]  # fmt: skip


@dataclass
class MapResult:
    name: str
    rows: list[dict[str, Any]]
    seconds: dict[str, float]
    calibration: dict[str, Any]
    settings: dict[str, Any] = field(default_factory=dict)


def make_params(
    base: dict[str, Any], map_path: Path, queries: dict[str, Path], overrides: dict[str, dict[str, Any]]
) -> Params:
    """``base`` (a raw params mapping) with the map and its query domains read from files, and ``overrides``."""
    raw = copy.deepcopy(base)
    raw["fetch"].update(
        source="file",
        path=str(map_path),
        queries=[{"name": n, "source": "file", "path": str(p)} for n, p in queries.items()],
    )
    for section, values in overrides.items():
        raw.setdefault(section, {}).update(values)
    return parse_params(raw, "bench_stop params")


def map_params(base: dict[str, Any], name: str, data: Path, overrides: dict[str, dict[str, Any]]) -> Params:
    """The params of map ``name`` of :data:`MAPS` read from ``data``; exits naming any missing raster."""
    map_rel, query_rel = MAPS[name]
    paths = [data / map_rel, *(data / q for q in query_rel.values())]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        sys.exit(f"missing {', '.join(missing)}: pass --data, the shared data folder")
    return make_params(base, paths[0], dict(zip(query_rel, paths[1:], strict=True)), overrides)


def rule_rates(
    sims: np.ndarray, dist: np.ndarray, at_target: np.ndarray, threshold: np.ndarray, radius: float
) -> dict[str, Any]:
    """Rates of one rule: ``sims`` and ``dist`` (T, G) against grid nodes, ``at_target`` (T,), ``threshold`` (T,)."""
    passes = sims >= threshold[:, None]
    near, far = dist <= radius, dist > 2 * radius
    return {
        "near_recall": float((passes & near).sum() / max(near.sum(), 1)),
        "at_target": float(np.mean(at_target >= threshold)),
        "false_stops": float((passes & far).sum() / max(far.sum(), 1)),
        "targets_far_pass": float(np.mean((passes & far).any(axis=1))),
        "n_near": int(near.sum()),
        "n_far": int(far.sum()),
    }


def domain_rows(
    space: MapSpace, memory: MapMemory, emb: np.ndarray, xy: np.ndarray, threshold: float, radius: float,
    rel_margin: float,
) -> list[dict[str, Any]]:  # fmt: skip
    """The far-quantile and relative rules on the test photos ``emb`` (T, D) of targets at ``xy`` (T, 2)."""
    pos = space.grid_positions()
    sims = emb @ space.grid_embeddings().T
    dist = np.linalg.norm(pos[None, :, :] - xy[:, None, :], axis=2)
    at_target = np.sum(space.embed_at(xy[:, 0], xy[:, 1]) * emb, axis=1)
    cand_pos, cand_sims = memory.query(emb, k=2)
    top1 = float(np.mean(np.linalg.norm(cand_pos[:, 0] - xy, axis=1) <= radius))
    relative = cand_sims[:, 1] + rel_margin  # the second-best place, more than 2 radii from the best
    rows = []
    for rule, thr, shown in (
        ("far-quantile", np.full(len(emb), threshold), f"{threshold:.3f}"),
        ("relative", relative, f"2nd+{rel_margin:g} (median {np.median(relative):.3f})"),
    ):
        rows.append({"rule": rule, "threshold": shown, "top1": top1, "n_targets": len(emb)} | rule_rates(
            sims, dist, at_target, thr, radius
        ))  # fmt: skip
    return rows


def bench_map(name: str, params: Params, rel_margin: float | None, work: Path) -> MapResult:
    """Fetch, tile, encode and calibrate one map in ``work``; the rules' rates per query domain on test targets."""
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    run_fetch(params, work / "map", work / "fetch.json")
    run_tile(params, work / "map" / "map.tif", work / "targets", work / "tile.json")
    seconds["fetch+tile"] = time.perf_counter() - t0
    p, view, seed = params.encoder, params.tile.view_size, params.base.seed
    radius = params.evaluate.success_radius
    m = read_map(work / "map" / "map.tif")
    targets = read_targets(work / "targets" / "targets.csv", m, view)
    domains = read_domains(work / "map" / "map.tif")
    forbidden = test_area(targets, (m.height, m.width), view, params.tile.block_size)
    space, info = encode_map(p, m, view, seed, domains, forbidden)
    seconds["ssl"], seconds["cache"] = info["seconds_ssl"], info["seconds_cache"]
    t1 = time.perf_counter()
    calibration = measure(space, m, targets, p, seed, radius)[1]  # as the encode stage does: train targets only
    threshold = float(calibration["stop_threshold"])
    photos = photo_embeddings(space, m, targets, domains, p.heading_search, radius, threshold)
    memory = MapMemory(space.grid_positions(), space.grid_embeddings(), 2 * radius)
    test = (targets["split"] == "test").to_numpy()
    xy = targets.loc[test, ["x", "y"]].to_numpy(float)
    margin = p.stop_margin if rel_margin is None else rel_margin
    rows = []
    for domain, e in photos.items():
        for row in domain_rows(space, memory, e.embeddings[test], xy, threshold, radius, margin):
            rows.append({"map": name, "query": domain} | row)
    seconds["measure"] = time.perf_counter() - t1
    seconds["total"] = time.perf_counter() - t0
    settings = {
        "size": f"{m.width}x{m.height}",
        "targets": f"{int((~test).sum())} train / {int(test.sum())} test",
        "grid_nodes": len(space.grid_positions()),
    }
    return MapResult(name, rows, seconds, calibration, settings)


def markdown(frame: pd.DataFrame) -> str:
    """The rows as a markdown table, rates as percentages."""
    head = "| map | query | rule | threshold | near recall | at target | false stops | targets w/ far pass | top-1 "
    head += "| n |"
    lines = [head, "|" + "---|" * 10]
    for r in frame.itertuples(index=False):
        lines.append(
            f"| {r.map} | {r.query} | {r.rule} | {r.threshold} | {r.near_recall:.3f} | {r.at_target:.3f} | "
            f"{100 * r.false_stops:.4f} % | {r.targets_far_pass:.3f} | {r.top1:.3f} | {r.n_targets} |"
        )
    return "\n".join(lines)


def header(args: argparse.Namespace, params: Params, results: list[MapResult]) -> str:
    p, t = params.encoder, params.tile
    lines = [
        f"# bench_stop ({'quick' if args.quick else 'full'} settings; data {args.data})",
        f"tile: view_size {t.view_size}, block_size {t.block_size}, n_targets {t.n_targets}, "
        f"test_fraction {t.test_fraction}, min_texture {t.min_texture}; success radius "
        f"{params.evaluate.success_radius} px; seed {params.base.seed}",
        f"encoder: {p.kind}, weights {p.weights}, input_size {p.input_size}, cache_stride {p.cache_stride}, "
        f"ssl_steps {p.ssl_steps}, ssl_batch_size {p.ssl_batch_size}, augment {p.augment}, cross_domain "
        f"{p.cross_domain}, heading_search {p.heading_search}, stop_quantile {p.stop_quantile}, stop_margin "
        f"{p.stop_margin}, torch_threads {p.torch_threads}",
    ]
    for r in results:
        c = r.calibration
        secs = ", ".join(f"{k} {v:.0f} s" for k, v in r.seconds.items())
        lines.append(
            f"- {r.name} ({r.settings['size']}, {r.settings['targets']}, {r.settings['grid_nodes']} grid nodes): "
            f"wall {secs}. encode's calibration: threshold {c['stop_threshold']:.3f}, near recall train "
            f"{c['near_recall']:.3f} / test {c['near_recall_test']:.3f}, far pass rate train "
            f"{100 * c['far_pass_rate']:.4f} % / test {100 * c['far_pass_rate_test']:.4f} % "
            f"(photos at heading 0; the table's photos are the pipeline's, heading-searched)"
        )
    return "\n".join(lines)


def add_map_args(ap: argparse.ArgumentParser) -> None:
    """The real-map benchmarks' shared options: --data, --maps, --params and --out."""
    ap.add_argument("--data", type=Path, default=DATA, help="the shared data folder (default: %(default)s)")
    ap.add_argument("--maps", nargs="+", choices=sorted(MAPS), default=list(MAPS), help="maps to run")
    ap.add_argument("--params", type=Path, default=REPO / "params.yaml", help="base params (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=None, help="also write the table as CSV (atomically)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="see the module docstring for columns")
    add_map_args(ap)
    ap.add_argument("--quick", action="store_true", help="tiny settings (view 32 px, 2 SSL steps, 40 targets)")
    ap.add_argument("--ssl-steps", type=int, default=None, help="override encoder.ssl_steps")
    ap.add_argument("--rel-margin", type=float, default=None, help="margin of the relative rule (encoder.stop_margin)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    args = parse_args(argv)
    overrides = copy.deepcopy(QUICK if args.quick else FULL)
    overrides["encoder"]["torch_threads"] = args.threads
    if args.ssl_steps is not None:
        overrides["encoder"]["ssl_steps"] = args.ssl_steps
    base = yaml.safe_load(args.params.read_text())
    results, params = [], None
    for name in args.maps:
        params = map_params(base, name, args.data, overrides)
        with tempfile.TemporaryDirectory(prefix=f"bench_stop_{name}_") as work:
            results.append(bench_map(name, params, args.rel_margin, Path(work)))
    assert params is not None
    frame = pd.DataFrame([row for r in results for row in r.rows], columns=COLUMNS)
    print(header(args, params, results))
    print()
    print(markdown(frame))
    if args.out is not None:
        write_csv(args.out, frame)
    return frame


if __name__ == "__main__":
    main()
