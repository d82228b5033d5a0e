"""Can a map be searched across dates without learning? Dense orientation correlation on real rasters.

The pipeline's retrieval (the SSL encoder's embeddings over a grid of map views) finds the true
place for only about a third of the NAIP test photos from another date (``bench_stop.py``:
top-1 0.38 / 0.14 / 0.21 on 2018 / 2016 / 2014). Every method that flies to retrieved candidates,
learned or not, is capped there. This benchmark measures, on the **same held-out test targets**
(``bench_stop``'s maps and settings, hence the same tiling and seed), two classical template
matchers that slide the photo over every pixel offset of the map, with no training (the library's
FFT correlation, :class:`maprl.features.matching.NCC`, at full resolution):

* ``gray-ncc``: zero-mean normalised cross-correlation of the grey level, as the evaluate stage's
  template-matching oracle (which searches coarse to fine);
* ``orientation``: the same correlation of the gradient's *double-angle* orientation field
  (:func:`maprl.features.matching.orientation_field`, Gaussian sigma ``--sigma``). Doubling the
  angle makes it blind to contrast sign and to any monotone change of brightness and colour, the
  changes between two dates of the same fields, while roads, field edges and shorelines keep
  their orientation.

``top-1``: share of test photos whose best offset lies within the success radius of the truth;
``top-3``: within the radius of one of the best three offsets, each more than two radii from the
better ones (how the map memory separates candidates). Intervals: 95 % Wilson intervals over the
test targets. With ``--ssl`` the pipeline's own encoder (``encode_map`` and ``photo_embeddings``
with the params' heading search and the encode stage's stop threshold, as the pipeline and
``bench_stop`` embed photos) is measured on the same photos too::

    python benchmarks/bench_orientation.py                 # NAIP and Landsat, the two matchers (~3 min)
    python benchmarks/bench_orientation.py --ssl           # and the pipeline's encoder (~6 min in all)
    python benchmarks/bench_orientation.py --quick         # tiny settings, a smoke test
    python benchmarks/bench_orientation.py --headings 1    # the pipeline's matcher at one heading (north-up)

The two dense matchers above keep the map's heading (north up) and search at full resolution. The
pipeline's own pixel retriever (``agent.retriever: orientation``, :func:`maprl.nav.runtime.pixel_matcher`)
is measured on the same photos too: the same correlation, coarse to fine, at the params'
``encoder.heading_search`` headings (it does not know the photo is north up).

A second table measures **stop rules on the matcher's evidence**, on the same test photos: does
the rule fire at the true place (``near recall``: the best NCC within the success radius, at the
photo's matched heading, passes it) and does it fire at a wrong one (``false stops``: one of the
matcher's 3 places beyond the radius passes it)? ``relative`` is the pipeline's own stop rule with
pixel candidates (:data:`maprl.nav.core.PIXEL_STOP_MARGIN`: within 0.02 of the photo's best NCC
anywhere on the map); ``absolute`` is one NCC threshold for every photo, the 0.99 quantile of the
best wrong place's NCC over the train photos of every date (the encoder's recipe, far-view
quantile, with the other dates' training photos in its favour).
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from bench_stop import FULL, QUICK, add_map_args, map_params
from scipy import stats

from maprl.data.fetch import run_fetch
from maprl.data.geo import read_map
from maprl.data.splits import test_area
from maprl.data.tile import read_domains, read_targets, run_tile
from maprl.features.encode import encode_map, measure, photo_embeddings
from maprl.features.matching import NCC, OrientationMatcher, orientation_field
from maprl.features.memory import MapMemory
from maprl.features.photos import target_photos
from maprl.io import write_csv
from maprl.nav.core import PIXEL_STOP_MARGIN
from maprl.nav.runtime import pixel_matcher
from maprl.views import view_origin

METHODS = ("gray-ncc", "orientation")
COLUMNS = ["map", "query", "method", "top1", "top1_lo", "top1_hi", "top3", "n_targets", "ms_per_photo"]
STOP_COLUMNS = ["map", "query", "rule", "near_recall", "false_stops", "n_targets"]
ABSOLUTE_QUANTILE = 0.99  # the absolute rule's quantile of the train photos' best wrong NCC


def field(rgb: np.ndarray, method: str, sigma: float) -> np.ndarray:
    """The (H, W) grey level or (2, H, W) orientation field that ``method`` correlates, from (H, W, 3) ``rgb``."""
    grey = rgb.astype(np.float64).mean(axis=2)
    return grey if method == "gray-ncc" else orientation_field(grey, sigma)


def best_offsets(scores: np.ndarray, k: int, separation: float) -> np.ndarray:
    """The ``k`` best (x, y) top-left offsets, each more than ``separation`` px from the better ones."""
    s = scores.copy()
    yy, xx = np.mgrid[0 : s.shape[0], 0 : s.shape[1]]
    out = []
    for _ in range(k):
        y, x = np.unravel_index(int(np.argmax(s)), s.shape)
        out.append((x, y))
        s[np.hypot(xx - x, yy - y) <= separation] = -np.inf
    return np.array(out, float)


def wilson(successes: int, n: int) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion (scipy's ``binomtest``); NaN for no trials."""
    if n == 0:
        return float("nan"), float("nan")
    ci = stats.binomtest(successes, n).proportion_ci(confidence_level=0.95, method="wilson")
    return float(ci.low), float(ci.high)


def row(name: str, query: str, method: str, hits1: np.ndarray, hits3: np.ndarray, ms: float) -> dict[str, Any]:
    lo, hi = wilson(int(hits1.sum()), len(hits1))
    return {
        "map": name, "query": query, "method": method, "top1": float(hits1.mean()), "top1_lo": lo, "top1_hi": hi,
        "top3": float(hits3.mean()), "n_targets": len(hits1), "ms_per_photo": ms,
    }  # fmt: skip


def match_evidence(
    matcher: OrientationMatcher, photos: np.ndarray, xy: np.ndarray, radius: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per photo: the best NCC within ``radius`` of its truth ``xy`` (its matched heading's score at the truth,
    or a candidate's there), the best NCC of its 3 candidates beyond ``radius``, and its best NCC."""
    cand, scores = matcher.query(photos, 3)
    near = np.linalg.norm(cand - xy[:, None, :], axis=2) <= radius
    at = np.array([matcher.score(matcher.reference(p, 3), x, y) for p, (x, y) in zip(photos, xy, strict=True)])
    truth = np.maximum(at, np.where(near, scores, -1.0).max(axis=1))
    return truth, np.where(near, -1.0, scores).max(axis=1), scores[:, 0]


def stop_rules(
    name: str, matcher: OrientationMatcher, targets: pd.DataFrame, sources: dict[str, np.ndarray], view: int,
    radius: float,
) -> list[dict[str, Any]]:  # fmt: skip
    """Near recall and false stops of the relative (pipeline) and an absolute NCC stop rule (module docstring)."""

    def evidence(split: str, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        xy = targets.loc[targets["split"] == split, ["x", "y"]].to_numpy(float)
        return match_evidence(matcher, target_photos(rgb, xy, view), xy, radius)

    wrong = np.concatenate([evidence("train", rgb)[1] for rgb in sources.values()])
    tau = float(np.quantile(wrong, ABSOLUTE_QUANTILE))
    rows = []
    for query, rgb in sources.items():
        truth, wrong_test, best = evidence("test", rgb)
        rules = {
            f"relative (pipeline): NCC >= best - {PIXEL_STOP_MARGIN}": best - PIXEL_STOP_MARGIN,
            f"absolute: NCC >= {tau:.3f}": np.full(len(best), tau),
        }
        for rule, threshold in rules.items():
            rows.append({
                "map": name, "query": query, "rule": rule, "near_recall": float(np.mean(truth >= threshold)),
                "false_stops": float(np.mean(wrong_test >= threshold)), "n_targets": len(best),
            })  # fmt: skip
    return rows


def bench_map(
    name: str, params: Any, sigma: float, ssl: bool, work: Path
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Fetch and tile one map in ``work``; each matcher's top-1 and top-3 on every query domain's test photos,
    and the stop rules' rows (:func:`stop_rules`)."""
    run_fetch(params, work / "map", work / "fetch.json")
    run_tile(params, work / "map" / "map.tif", work / "targets", work / "tile.json")
    view, radius = params.tile.view_size, params.evaluate.success_radius
    m = read_map(work / "map" / "map.tif")
    targets = read_targets(work / "targets" / "targets.csv", m, view)
    domains = read_domains(work / "map" / "map.tif")
    test = (targets["split"] == "test").to_numpy()
    xy = targets.loc[test, ["x", "y"]].to_numpy(float)
    x0, y0 = view_origin(xy[:, 0], xy[:, 1], view)
    truth = np.stack([x0, y0], axis=1).astype(float)
    sources = {"same": m.rgb, **{d: rgb for d, (rgb, _) in domains.items()}}
    rows = []
    for method in METHODS:
        corr = NCC(field(m.rgb, method, sigma), view)
        for query, rgb in sources.items():
            t0 = time.perf_counter()
            found = [
                best_offsets(corr.scores(field(p, method, sigma)), 3, 2 * radius) for p in target_photos(rgb, xy, view)
            ]
            ms = 1000 * (time.perf_counter() - t0) / max(len(found), 1)
            dist = np.linalg.norm(np.stack(found) - truth[:, None, :], axis=2)  # (T, 3)
            rows.append(row(name, query, method, dist[:, 0] <= radius, (dist <= radius).any(axis=1), ms))
    matcher = pixel_matcher(params, m)
    method = f"orientation matcher (agent.retriever; {len(matcher.angles)} headings, coarse 1/{matcher.factor})"
    for query, rgb in sources.items():
        t0 = time.perf_counter()
        cand, _ = matcher.query(target_photos(rgb, xy, view), 3)
        ms = 1000 * (time.perf_counter() - t0) / max(len(cand), 1)
        dist = np.linalg.norm(cand - xy[:, None, :], axis=2)
        rows.append(row(name, query, method, dist[:, 0] <= radius, (dist <= radius).any(axis=1), ms))
    stops = stop_rules(name, matcher, targets, sources, view, radius)
    if ssl:
        forbidden = test_area(targets, (m.height, m.width), view, params.tile.block_size)
        space, _ = encode_map(params.encoder, m, view, params.base.seed, domains, forbidden)
        threshold = measure(space, m, targets, params.encoder, params.base.seed, radius)[1]["stop_threshold"]
        photos = photo_embeddings(space, m, targets, domains, params.encoder.heading_search, radius, threshold)
        memory = MapMemory(space.grid_positions(), space.grid_embeddings(), 2 * radius)
        for query, e in photos.items():
            t0 = time.perf_counter()
            cand, _ = memory.query(e.embeddings[test], k=3)
            ms = 1000 * (time.perf_counter() - t0) / max(int(test.sum()), 1)
            dist = np.linalg.norm(cand - xy[:, None, :], axis=2)
            rows.append(
                row(name, query, "ssl encoder (pipeline)", dist[:, 0] <= radius, (dist <= radius).any(axis=1), ms)
            )
    return rows, stops


def markdown(frame: pd.DataFrame) -> str:
    lines = ["| map | photos | method | top-1 [95 % CI] | top-3 | n | ms / photo |", "|" + "---|" * 7]
    for r in frame.itertuples(index=False):
        lines.append(
            f"| {r.map} | {r.query} | {r.method} | {r.top1:.3f} [{r.top1_lo:.3f}, {r.top1_hi:.3f}] | {r.top3:.3f} | "
            f"{r.n_targets} | {r.ms_per_photo:.0f} |"
        )
    return "\n".join(lines)


def stop_markdown(frame: pd.DataFrame) -> str:
    lines = ["| map | photos | stop rule | near recall | false stops | n |", "|" + "---|" * 6]
    for r in frame.itertuples(index=False):
        lines.append(f"| {r.map} | {r.query} | {r.rule} | {r.near_recall:.3f} | {r.false_stops:.3f} | {r.n_targets} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="see the module docstring for columns")
    add_map_args(ap)
    ap.add_argument("--quick", action="store_true", help="tiny settings (view 32 px, 40 targets)")
    ap.add_argument(
        "--sigma", type=float, default=1.5, help="Gaussian sigma before the gradient (default: %(default)s)"
    )
    ap.add_argument("--ssl", action="store_true", help="also measure the pipeline's SSL encoder on the same photos")
    ap.add_argument(
        "--headings", type=int, default=None, help="encoder.heading_search for the pipeline's matcher (default: params)"
    )
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    args = parse_args(argv)
    if not np.isfinite(args.sigma) or args.sigma <= 0:
        sys.exit(f"--sigma {args.sigma}: must be a positive finite number")
    if args.headings is not None and not 1 <= args.headings <= 36:
        sys.exit(f"--headings {args.headings}: must be 1 to 36 (encoder.heading_search)")
    overrides = copy.deepcopy(QUICK if args.quick else FULL)
    if args.headings is not None:  # the SSL encoder (--ssl) searches as many headings as the matcher
        overrides.setdefault("encoder", {})["heading_search"] = args.headings
    base = yaml.safe_load(args.params.read_text())
    rows: list[dict[str, Any]] = []
    stops: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for name in args.maps:
        params = map_params(base, name, args.data, overrides)
        with tempfile.TemporaryDirectory(prefix=f"bench_orientation_{name}_") as work:
            found, rules = bench_map(name, params, args.sigma, args.ssl, Path(work))
            rows.extend(found)
            stops.extend(rules)
    frame = pd.DataFrame(rows, columns=COLUMNS)
    t = params.tile
    print(
        f"# bench_orientation ({'quick' if args.quick else 'full'} settings; data {args.data}; view {t.view_size} px, "
        f"blocks {t.block_size} px, success radius {params.evaluate.success_radius} px, seed {params.base.seed}, "
        f"sigma {args.sigma}; {time.perf_counter() - t0:.0f} s wall)"
    )
    print()
    print(markdown(frame))
    print()
    print(stop_markdown(pd.DataFrame(stops, columns=STOP_COLUMNS)))
    if args.out is not None:
        write_csv(args.out, frame)
    return frame


if __name__ == "__main__":
    main()
