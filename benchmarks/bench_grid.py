"""The published grid protocol: does the learned agent beat the image-blind baselines on this map?

Usage (after `dvc repro encode`, from the repository root):
    python benchmarks/bench_grid.py [--seeds 3] [--timesteps 40000] [--settings published,hard] [--hide-images]

Runs the ``grid`` stage's logic (:func:`maprl.learn.grid.run_setting`) on the pipeline's map and
encoder (data/map, data/features) with ``grid.*`` from params.yaml, except the training seeds and
timesteps given here: per setting, the same grid images, test images and fixed test episodes as
the stage. Prints per setting one row per method: the success rate per start-goal distance C and
the average over C (the agent: the mean over its seeds with a 95 % bootstrap interval over seeds
and episodes; the walks: their exact expectation on the test episodes), and the wall time.
``--hide-images`` is the ablation: the agent sees zero vectors instead of the patch embeddings.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from maprl.config import load_params
from maprl.data.geo import read_map
from maprl.features.cache import load_space
from maprl.features.nets import configure_torch
from maprl.learn.grid import BASELINES, run_setting

MAP, FEATURES = "data/map/map.tif", "data/features"


def table(name: str, r: dict[str, Any], seconds: float, hide: bool) -> str:
    cs = [str(c) for c in range(r["c_min"], r["c_max"] + 1)]
    a = r["agent"]
    head = (
        f"## {name}: {r['size']}x{r['size']}, patch {r['patch']} px, budget {r['budget']}, C {r['c_min']}..{r['c_max']}"
        f" ({r['images']['train']} train / {r['images']['test']} test images, {r['test_episodes']} episodes, "
        f"{seconds:.0f} s{', images hidden from the agent' if hide else ''})"
    )
    lines = [head, "", "| method | " + " | ".join(f"C={c}" for c in cs) + " | average |", "|" + "---|" * (len(cs) + 2)]
    cell = lambda k: f"{a['success'][k]:.3f} [{a['ci95'][k][0]:.2f}, {a['ci95'][k][1]:.2f}]"  # noqa: E731
    warm = f", after cloning the blind route for {a['imitate']} steps" if a.get("warm_start", "none") != "none" else ""
    label = f"agent ({a['seeds']} seeds x {a['timesteps']} steps{warm})"
    lines.append(f"| {label} | " + " | ".join(cell(k) for k in [*cs, "average"]) + " |")
    per_seed = ", ".join(f"{s['average']:.3f}" for s in a["per_seed"])
    for b in BASELINES:
        for part in ("test", "all_pairs"):
            lines.append(f"| {b} ({part}) | " + " | ".join(f"{r[b][part][k]:.3f}" for k in [*cs, "average"]) + " |")
    lines += ["", f"agent average per seed: {per_seed}; directional signal of the test patches "
              f"{r['directional_signal_test']:.3f} (0.5: none)"]  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--seeds", type=int, default=None, help="training seeds (default: grid.seeds)")
    ap.add_argument("--timesteps", type=int, default=None, help="PPO timesteps per seed (default: grid.timesteps)")
    ap.add_argument("--settings", default=None, help="comma-separated setting names (default: all)")
    ap.add_argument("--hide-images", action="store_true", help="the agent sees zero vectors instead of patches")
    ap.add_argument("--warm-start", choices=["none", "blind_route"], default=None, help="grid.warm_start override")
    ap.add_argument("--imitate", type=int, default=None, help="grid.imitate override (cloned agent-steps)")
    args = ap.parse_args()
    params = load_params(args.params, stage="grid")
    given = (("seeds", args.seeds), ("timesteps", args.timesteps), ("warm_start", args.warm_start),
             ("imitate", args.imitate))  # fmt: skip
    update = {k: v for k, v in given if v is not None}
    params = params.model_copy(update={"grid": params.grid.model_copy(update=update)})
    names = args.settings.split(",") if args.settings else [s.name for s in params.grid.settings]
    t0 = time.perf_counter()
    configure_torch(params.grid.torch_threads)
    m = read_map(MAP)
    space = load_space(FEATURES, m)
    for s in params.grid.settings:
        if s.name in names:
            run = run_setting(params, s, m, space, hide_images=args.hide_images)
            print(table(s.name, run.metrics, run.seconds, args.hide_images) + "\n", flush=True)
    print(f"# bench_grid: {time.perf_counter() - t0:.0f} s wall, params {args.params}")


if __name__ == "__main__":
    main()
