"""How encoding, the cache and retrieval scale with the map's area: synthetic maps of 2k² to 16k² pixels.

Usage: python benchmarks/bench_scale.py [--sizes 2048 4096 8192 16384] [--quick] [--work /tmp/maprl-scale]

For each size (a fresh subprocess each, so peak memory is that size's own):

* world: ``synthesize_world(size, 42)`` written as the map GeoTIFF (cached under ``--work`` with
  its time and peak memory; not part of the encode stage). Above 8192 px the map is a mosaic of
  8192 px worlds: one 16384 px world needs more memory than a 24 GB machine has;
* encode: ``read_map`` plus the dense cache (:func:`~maprl.features.cache.build_space`, tiled)
  with the repository's trained encoder (``data/features/encoder.pt``) and the default params;
  peak RSS is the subprocess's own ``ru_maxrss`` at that point (SSL alone: ``--ssl-size``);
* cache: the grid in memory (float16) and ``cache.npz`` on disk;
* retrieval per query (8 headings, then the k=5 separated candidates; photo embedding excluded),
  exact (:class:`~maprl.features.memory.MapMemory`) and FAISS IVF (``index="ivf"``), with the
  IVF's build time and its recall@1 / @5 of the exact nearest grid nodes;
* locate, retrieval part: :func:`locate_latency` of one 224 px photo cut from the map: 8 rotated
  embeddings (:func:`~maprl.features.photos.embed_photos`) plus the k=5 query, and how often the
  best candidate lies within the success radius;
* full locate: :meth:`~maprl.locator.Locator.locate` with the repository's trained agent and
  calibration (:func:`full_locate`; exact retrieval), seconds per photo and the share found.

Then the whole encode stage (:func:`~maprl.features.encode.run_encode`: SSL, whose cost does not
grow with the map, the cache, photo embeddings and the stop calibration, for the tile stage's
targets) on the ``--full-size`` map (default: the largest), with its peak RSS.

Prints one markdown table, then how each cost grows with the area (least-squares exponent b of
cost ~ area^b, and the cost per megapixel at the largest size). Wall times share two cores with
whatever else runs: the load average is printed with them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SEED = 42
MAX_WORLD = 8192  # largest single synthetic world (see synth_worker)


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def world_path(work: Path, size: int) -> Path:
    return work / "worlds" / f"world_{size}.tif"


def synth_worker(work: Path, size: int) -> dict[str, Any]:
    """Synthesise the world of ``size`` px and write it as the map GeoTIFF; its timings beside it.

    Above ``MAX_WORLD`` px the map is a mosaic of ``MAX_WORLD`` px worlds (seeds 42, 43, ...): one
    16384 px world needs more memory than this machine has (``synthesize_world`` ran out at about
    18 GB after 9 minutes)."""
    from rasterio.transform import from_origin

    from maprl.data.geo import write_map
    from maprl.data.world import synthesize_world

    n = max(1, size // MAX_WORLD)
    piece = size // n
    rgb, elev = np.empty((size, size, 3), np.uint8), np.empty((size, size), np.float32)
    t = time.perf_counter()
    for k in range(n * n):
        w = synthesize_world(piece, SEED + k)
        r, c = divmod(k, n)
        rgb[r * piece : (r + 1) * piece, c * piece : (c + 1) * piece] = w.rgb
        elev[r * piece : (r + 1) * piece, c * piece : (c + 1) * piece] = w.elevation
        del w
    ts = time.perf_counter() - t
    out = world_path(work, size)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_map(out, rgb, elev, from_origin(0, size, 1, 1), None)
    rec = {"size": size, "worlds": n * n, "seconds_synth": ts, "seconds_write": time.perf_counter() - t - ts}
    rec["peak_rss_gb"] = _peak_gb()
    out.with_suffix(".json").write_text(json.dumps(rec))
    return rec


def locate_latency(locate: Callable[[np.ndarray], object], photos: np.ndarray) -> float:
    """Mean seconds of ``locate(photo)`` over ``photos`` (N, V, V, 3): any locator, e.g.
    ``Locator(...).locate``, or the retrieval part alone (:func:`retrieval_locate`)."""
    t = time.perf_counter()
    for photo in photos:
        locate(photo)
    return (time.perf_counter() - t) / max(1, len(photos))


def retrieval_locate(space: Any, memory: Any, n_headings: int = 8, k: int = 5) -> Callable[[np.ndarray], np.ndarray]:
    """Locate's retrieval part: embed a photo at ``n_headings`` headings, keep the best, query ``k`` candidates."""
    from maprl.features.photos import embed_photos

    def locate(photo: np.ndarray) -> np.ndarray:
        emb = embed_photos(space, memory, photo[None], n_headings=n_headings).embeddings
        return np.asarray(memory.query(emb, k=k)[0][0])

    return locate


def _search_time(memory: Any, heading_emb: np.ndarray) -> float:
    """Mean seconds of one query's search: best similarity at each of its headings, then k=5 candidates."""
    t = time.perf_counter()
    for e in heading_emb:  # (headings, D) per query
        memory.best_similarity(e)  # one heading at a time, as embed_photos does
        memory.query(e[:1], k=5)
    return (time.perf_counter() - t) / len(heading_emb)


def _recall(exact: Any, approx: Any, q: np.ndarray) -> tuple[float, float]:
    """Recall@1 and @5 of ``approx`` against the exact nearest grid nodes of queries ``q``."""
    ex = np.concatenate([exact.search(q[i : i + 32], 5)[1] for i in range(0, len(q), 32)])
    ap = approx.search(q, 5)[1]
    r5 = np.mean([len(set(a) & set(e)) / 5 for a, e in zip(ap, ex, strict=True)])
    return float(np.mean(ap[:, 0] == ex[:, 0])), float(r5)


def encode_worker(work: Path, size: int, ssl: bool, n_queries: int) -> dict[str, Any]:
    """Encode the ``size`` world's map and measure its cache and retrieval (run in a subprocess)."""
    import torch

    from maprl.config import load_params
    from maprl.data.geo import read_map
    from maprl.data.perturb import rotate
    from maprl.features.cache import EncoderFeatures, build_space, train_encoder
    from maprl.features.memory import MapMemory
    from maprl.features.nets import configure_torch
    from maprl.features.photos import headings, target_photos

    params = load_params(REPO / "params.yaml")
    p, view, radius = params.encoder, params.tile.view_size, params.evaluate.success_radius
    configure_torch(p.torch_threads)
    rec: dict[str, Any] = {"size": size}
    t = time.perf_counter()
    m = read_map(world_path(work, size))
    rec["seconds_read"] = time.perf_counter() - t
    encoder = EncoderFeatures.load(REPO / "data" / "features").encoder
    if ssl:
        t = time.perf_counter()
        train_encoder(p, m, view, SEED)  # the timing only; the cache uses the repository's encoder
        rec["seconds_ssl"] = time.perf_counter() - t
    t = time.perf_counter()
    space = build_space(p, encoder, m, view)
    rec["seconds_cache"] = time.perf_counter() - t
    rec["peak_encode_gb"] = _peak_gb()
    rec["nodes"] = int(space.node_ok.sum())
    rec["cache_mem_mb"] = (space.grid.nbytes + space.node_ok.nbytes) / 2**20
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        space.save(tmp)
        rec["cache_disk_mb"] = sum(f.stat().st_size for f in Path(tmp).iterdir()) / 2**20

    pos, emb = space.grid_positions(), space.grid_embeddings()
    rng = np.random.default_rng(0)
    nq = min(n_queries, len(pos))
    truth = pos[rng.choice(len(pos), nq, replace=False)] + rng.uniform(-8, 8, (nq, 2))
    truth = np.clip(truth, pos.min(axis=0), pos.max(axis=0))  # off the grid, inside the map
    photos = target_photos(m.rgb, truth, view)
    exact = MapMemory(pos, emb, 2 * radius)
    t = time.perf_counter()
    ivf = MapMemory(pos, emb, 2 * radius, index="ivf")
    rec["seconds_ivf_build"] = time.perf_counter() - t
    turned = np.stack([[ph if a == 0 else rotate(ph, float(a)) for a in headings(8)] for ph in photos[:10]])
    heading_emb = np.stack([space.embed_view(tv) for tv in turned])  # (10, 8, D)
    q = space.embed_view(photos)
    rec["recall1"], rec["recall5"] = _recall(exact, ivf, q)
    torch.set_num_threads(1)  # one small photo: a second thread only waits (and badly on a busy machine)
    for name, memory in (("exact", exact), ("ivf", ivf)):
        rec[f"search_s_{name}"] = _search_time(memory, heading_emb)
        locate = retrieval_locate(space, memory)
        found = [locate(ph) for ph in photos[:10]]  # warm-up, and where each photo landed
        rec[f"locate_s_{name}"] = locate_latency(locate, photos[:10])
        best = np.array([c[0] for c in found])
        rec[f"hit_{name}"] = float(np.mean(np.linalg.norm(best - truth[:10], axis=1) <= radius))
    rec["locate_s_full"], rec["hit_full"] = full_locate(params, m, space, exact, photos[:10], truth[:10])
    rec["peak_total_gb"] = _peak_gb()
    return rec


def full_locate(
    params: Any, m: Any, space: Any, memory: Any, photos: np.ndarray, truth: np.ndarray
) -> tuple[float, float]:
    """Seconds per photo of the whole ``maprl locate`` (heading search, retrieval, the trained agent's
    flights from ``locate.restarts`` starts, the confidence) on this map, and the share found.

    The agent and the calibration are the repository's (trained on the default map: what is timed
    is the work, the same on any map; run ``dvc repro`` first); torch threads as the product uses.
    """
    import pandas as pd

    from maprl.eval.calibration import load_calibration
    from maprl.features.nets import configure_torch
    from maprl.locator import Locator
    from maprl.nav.runtime import Runtime, read_stop_threshold
    from maprl.nav.scene import Scene

    configure_torch(params.encoder.torch_threads)
    empty = pd.DataFrame({"id": np.zeros(0, np.int64), "x": np.zeros(0), "y": np.zeros(0), "split": []})
    scene = Scene(m, empty, space, params.tile.view_size, params.env.max_nodata)
    rt = Runtime(
        scene, memory, read_stop_threshold(REPO / "data" / "features"), n_headings=params.encoder.heading_search
    )
    calibrator = load_calibration(REPO / "data" / "eval" / "calibration.json")["methods"]["agent"]
    loc = Locator(params, rt, calibrator, "agent", REPO / "models" / "memory" / "policy.zip")
    results = [loc.locate(ph) for ph in photos]  # warm-up, and where each photo landed
    seconds = locate_latency(loc.locate, photos)
    found = np.array([[r.pixel_x, r.pixel_y] for r in results])
    return seconds, float(np.mean(np.linalg.norm(found - truth, axis=1) <= params.evaluate.success_radius))


def full_encode_worker(work: Path, size: int, ssl_steps: int | None = None) -> dict[str, Any]:
    """The encode stage itself (:func:`~maprl.features.encode.run_encode`, default params: SSL, cache,
    photo embeddings, stop calibration) on the ``size`` map, its targets made first in a subprocess."""
    from maprl.config import load_params
    from maprl.features.encode import run_encode

    params = load_params(REPO / "params.yaml")
    if ssl_steps is not None:
        params = params.model_copy(update={"encoder": params.encoder.model_copy(update={"ssl_steps": ssl_steps})})
    targets = work / f"targets_{size}.csv"
    if not targets.exists():
        _run(["--worker", "targets", "--work", str(work), "--sizes", str(size)])
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        t = time.perf_counter()
        metrics = run_encode(params, world_path(work, size), targets, Path(tmp) / "features", Path(tmp) / "m.json")
        seconds = time.perf_counter() - t
    return {"size": size, "seconds": seconds, "parts": metrics["seconds"], "peak_rss_gb": _peak_gb()}


def targets_worker(work: Path, size: int) -> dict[str, Any]:
    """The tile stage's targets of the ``size`` map (default params), as a CSV for :func:`full_encode_worker`."""
    from maprl.config import load_params
    from maprl.data.geo import read_map
    from maprl.data.tile import build_targets

    params = load_params(REPO / "params.yaml")
    targets = build_targets(read_map(world_path(work, size)), params.tile, params.base.seed, None)
    targets.to_csv(work / f"targets_{size}.csv", index=False, float_format="%.7f")
    return {"size": size, "targets": len(targets)}


def _run(args: list[str]) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, cwd=REPO)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def growth(sizes: list[int], values: list[float]) -> float:
    """Least-squares exponent b of value ~ area^b."""
    if len(sizes) < 2:
        return float("nan")
    return float(np.polyfit(np.log(np.square(sizes, dtype=float)), np.log(values), 1)[0])


def table(rows: list[dict[str, Any]]) -> str:
    head = ("map px | area Mpx | grid nodes | world s (GB) | read s | cache s | SSL s | encode peak GB | "
            "cache MB mem / disk | search s/query exact / IVF | IVF build s | IVF recall@1 / @5 | "
            "locate (retrieval part) s exact / IVF | top-1 hit exact / IVF | full locate s (found) | "
            "load avg")  # fmt: skip
    lines = ["| " + head + " |", "|" + "---|" * (head.count("|") + 1)]
    for r in rows:
        ssl = f"{r['seconds_ssl']:.0f}" if "seconds_ssl" in r else "-"
        n = r["world"].get("worlds", 1)
        mosaic = f"; {n} worlds of {r['size'] // int(np.sqrt(n))}²" if n > 1 else ""
        lines.append(
            f"| {r['size']}² | {r['size'] ** 2 / 1e6:.1f} | {r['nodes']:,} | {r['world']['seconds_synth']:.0f} "
            f"({r['world']['peak_rss_gb']:.1f}{mosaic}) | {r['seconds_read']:.1f} | {r['seconds_cache']:.1f} | {ssl} | "
            f"{r['peak_encode_gb']:.2f} | {r['cache_mem_mb']:.0f} / {r['cache_disk_mb']:.0f} | "
            f"{r['search_s_exact']:.3f} / {r['search_s_ivf']:.4f} | {r['seconds_ivf_build']:.1f} | "
            f"{r['recall1']:.3f} / {r['recall5']:.3f} | {r['locate_s_exact']:.2f} / {r['locate_s_ivf']:.2f} | "
            f"{r['hit_exact']:.1f} / {r['hit_ivf']:.1f} | {r['locate_s_full']:.2f} ({r['hit_full']:.1f}) | "
            f"{r['load']} |"
        )
    return "\n".join(lines)


def summary(rows: list[dict[str, Any]]) -> str:
    sizes = [r["size"] for r in rows]
    big = rows[-1]
    mpx = big["size"] ** 2 / 1e6
    out = ["", "Growth with the map's area (cost ~ area^b, least squares over the sizes above):"]
    for key, name in (("seconds_cache", "cache build s"), ("peak_encode_gb", "encode peak GB"),
                      ("cache_disk_mb", "cache MB on disk"), ("search_s_exact", "exact search s/query"),
                      ("search_s_ivf", "IVF search s/query"), ("locate_s_exact", "locate (retrieval part) exact s"),
                      ("locate_s_ivf", "locate (retrieval part) IVF s"),
                      ("locate_s_full", "full locate s")):  # fmt: skip
        vals = [float(r[key]) for r in rows]
        out.append(f"- {name}: b = {growth(sizes, vals):.2f}; at {big['size']}²: {vals[-1] / mpx:.4g} per Mpx")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    ap.add_argument("--quick", action="store_true", help="sizes 512 and 1024, 5 SSL steps: a few minutes")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "maprl-scale")
    ap.add_argument("--ssl-size", type=int, default=None, help="map size that also times SSL alone (default: none)")
    ap.add_argument("--full-size", type=int, default=None, help="size of the whole encode stage's run (0: none)")
    ap.add_argument("--ssl-steps", type=int, default=None, help="override encoder.ssl_steps of that run")
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--worker", choices=["synth", "encode", "targets", "full"], help=argparse.SUPPRESS)
    ap.add_argument("--ssl", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker == "synth":
        print(json.dumps(synth_worker(args.work, args.sizes[0])))
        return
    if args.worker == "targets":
        print(json.dumps(targets_worker(args.work, args.sizes[0])))
        return
    if args.worker == "full":
        print(json.dumps(full_encode_worker(args.work, args.sizes[0], args.ssl_steps)))
        return
    if args.worker == "encode":
        print(json.dumps(encode_worker(args.work, args.sizes[0], args.ssl, args.queries)))
        return
    sizes = [512, 1024] if args.quick else sorted(args.sizes)
    ssl_size = None if args.quick else args.ssl_size
    full_size = sizes[-1] if args.full_size is None else args.full_size
    ssl_steps = 5 if args.quick else args.ssl_steps
    rows = []
    for size in sizes:
        meta = world_path(args.work, size).with_suffix(".json")
        common = ["--work", str(args.work), "--sizes", str(size)]
        world = json.loads(meta.read_text()) if meta.exists() else _run(["--worker", "synth", *common])
        rec = _run(["--worker", "encode", *common, "--queries", str(args.queries), *(["--ssl"] * (size == ssl_size))])
        rec["world"] = world
        rec["load"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
        rows.append(rec)
        print(f"{size}: {json.dumps(rec)}", file=sys.stderr, flush=True)
    print(table(rows) + "\n" + summary(rows))
    if full_size:
        steps = [] if ssl_steps is None else ["--ssl-steps", str(ssl_steps)]
        full = _run(["--worker", "full", "--work", str(args.work), "--sizes", str(full_size), *steps])
        parts = ", ".join(f"{k} {v:.0f} s" for k, v in full["parts"].items())
        load = " ".join(f"{x:.1f}" for x in os.getloadavg())
        print(
            f"\nThe whole encode stage (run_encode, default params, no query domain) on the {full_size}² map: "
            f"{full['seconds']:.0f} s ({parts}), peak RSS {full['peak_rss_gb']:.2f} GB; load average {load}."
        )


if __name__ == "__main__":
    main()
