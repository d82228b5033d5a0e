"""Which CPU settings change the encoder's numbers? (why two machines can disagree)

Usage: python benchmarks/bench_determinism.py [--steps 8] [--size 512]

Pretrains the default SSL encoder (``params.yaml``'s ``encoder`` section, ``--steps`` steps) on
the synthetic world in a fresh process per setting, and prints the last loss and a checksum of
the weights. A setting whose row differs from the first changes the float results: a machine
whose CPU makes that choice differently computes other numbers from the same seed. The
``pinned`` rows are what maprl sets itself on x86-64 CPUs with AVX2 (see ``maprl/__init__.py``);
the others override one knob each, as another CPU or library build would.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

SETTINGS: list[tuple[str, dict[str, str]]] = [
    ("pinned (maprl's default)", {}),
    ("pinned, again", {}),
    ("1 torch thread instead of 2", {"BENCH_THREADS": "1"}),
    ("ATen scalar kernels (ATEN_CPU_CAPABILITY=default)", {"ATEN_CPU_CAPABILITY": "default"}),
    ("MKL compatible mode (MKL_CBWR=COMPATIBLE)", {"MKL_CBWR": "COMPATIBLE"}),
    ("oneDNN (MKL-DNN) off", {"BENCH_NO_MKLDNN": "1"}),
]

CHILD = """
import hashlib, json, os, sys, time
from maprl.config import EncoderParams
from maprl.data.world import synthesize_world
from maprl.features.cache import train_encoder
from maprl.data.geo import MapData
import numpy as np, torch
from rasterio.transform import from_origin
if os.environ.get("BENCH_NO_MKLDNN"):
    torch.backends.mkldnn.enabled = False
steps, size = int(sys.argv[1]), int(sys.argv[2])
p = EncoderParams(ssl_steps=steps, torch_threads=int(os.environ.get("BENCH_THREADS", "2")))
w = synthesize_world(size, 42, 1.0)
m = MapData(rgb=w.rgb, elevation=w.elevation, valid=np.ones(w.elevation.shape, bool),
            transform=from_origin(0, size, 1, 1), crs=None)
t = time.perf_counter()
enc, losses = train_encoder(p, m, 224, 42)
h = hashlib.sha256(b"".join(v.numpy().tobytes() for v in enc.state_dict().values())).hexdigest()[:12]
print(json.dumps({"loss": f"{losses[-1]:.10f}", "weights": h, "s": round(time.perf_counter() - t, 1),
                  "aten": torch.backends.cpu.get_cpu_capability()}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8, help="SSL steps (default 8)")
    ap.add_argument("--size", type=int, default=512, help="synthetic world side (default 512)")
    args = ap.parse_args()
    rows = []
    for name, extra in SETTINGS:
        env = {**os.environ, **extra}
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, str(args.steps), str(args.size)], env=env, capture_output=True, text=True
        )
        if proc.returncode != 0:
            raise SystemExit(f"{name}: {proc.stderr[-2000:]}")
        rows.append({"setting": name, **json.loads(proc.stdout.strip().splitlines()[-1])})
        rows[-1]["wall s"] = round(time.perf_counter() - t0, 1)
    ref = rows[0]
    print(f"SSL encoder, {args.steps} steps, {args.size}² synthetic world, seed 42")
    print("| setting | ATen kernels | last loss | weights sha256 | same as pinned | SSL s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        same = "yes" if (r["loss"], r["weights"]) == (ref["loss"], ref["weights"]) else "no"
        print(f"| {r['setting']} | {r['aten']} | {r['loss']} | {r['weights']} | {same} | {r['s']} |")


if __name__ == "__main__":
    main()
