"""The generalist: one searcher trained across procedural worlds, tested zero-shot on worlds and a real
map it has never seen, against map-specific searchers and the no-learning baselines.

Usage (after `dvc repro`, from the repository root):
    python benchmarks/bench_generalist.py --worlds 4 --held-out 2 [--naip ../shared/data/naip-nd] [--work DIR]

What it does, all with the pipeline's params and the stage functions (:mod:`maprl.learn.worlds`):
1. the generalist: the ``search`` agent with ``train.worlds`` = N (the pipeline's map plus N-1 procedural
   worlds), the same code path as ``dvc exp run -S train.worlds=N``;
2. ``--held-out`` new procedural worlds (seeds apart from every training world); on each, a
   map-specific searcher is trained on its own train split;
3. with ``--naip``: the NAIP map of 2020 (``fetch.source: file``), photos from 2018, 2016 and 2014,
   the settings of ``experiments/naip.sh`` (view 128 px, radius 32 px, cache stride 8); the generalist
   is also fine-tuned there (``train.init_from``, ``--finetune`` timesteps).
On every test map it evaluates, on the same fixed episodes (the evaluate stage's: test, test_decoy
and every query domain): the generalist zero-shot, the pipeline's map-specific searcher
(models/search/policy.zip, trained on the default world only) zero-shot, the map's own searcher (or
the fine-tuned generalist on NAIP), retrieve-then-fly and the scripted search. Worlds are built once
under ``--work`` and reused. Prints one markdown table; writes rows.csv there.

With ``--seeds N`` every learned policy (generalist, own searchers, fine-tuned) is trained with the
training seeds ``base.seed + i``; the maps, targets, features and episodes stay those of
``base.seed``. The table then gives per method the IQM over the seeds with a 95 % stratified-bootstrap
interval (rliable, as ``maprl report`` and ``bench_search.py``); the baselines do not learn and give one
value. ``--specific none`` leaves out the pipeline's searcher (with ``--worlds 1`` the generalist *is*
that searcher, retrained). ``--retriever orientation`` gives every map (training and test) the pixel
retriever (``agent.retriever: orientation``), baselines and agents alike::

    python benchmarks/bench_generalist.py --worlds 1 --held-out 0 --naip ../shared/data/naip-nd \\
        --seeds 3 --specific none [--retriever orientation]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from maprl.config import FetchParams, Params, QueryParams, agent_variant, load_params
from maprl.eval.agents import AgentController, load_policy
from maprl.eval.baselines import RetrieveThenFly
from maprl.eval.episodes import evaluate_methods, make_decoy_episodes, make_split_episodes
from maprl.io import write_csv
from maprl.learn.training import RunPaths, load_best_hparams, train
from maprl.learn.worlds import build_world, training_worlds, world_seeds
from maprl.nav.runtime import Runtime, load_runtime, nav_config
from maprl.report import aggregate

MAP, TARGETS, FEATURES, BEST = (
    "data/map/map.tif",
    "data/targets/targets.csv",
    "data/features",
    "models/best_hparams.yaml",
)
NAIP_DATES = {"d2018": "naip_20180716", "d2016": "naip_20160816", "d2014": "naip_20140720"}


def episode_sets(params: Params, rt: Runtime) -> list[tuple[str, Any, pd.DataFrame]]:
    """(split, scene, episodes) as the evaluate stage draws them: test, test_decoy, test_<domain>."""
    p = params.evaluate
    test = make_split_episodes(rt.scene, ["train", "test"], p.episodes, params.base.seed)
    test = test[test["split"] == "test"]
    decoy = make_decoy_episodes(rt.scene, p.episodes, params.base.seed, 1.0, p.success_radius)
    sets = [("test", rt.scene, test), ("test_decoy", rt.scene, decoy)]
    return sets + [(f"test_{d}", rt.domain_scene(d), test.assign(split=f"test_{d}")) for d in rt.domains if d != "same"]


def evaluate(
    params: Params, rt: Runtime, policies: dict[str, Path], where: str, seed: int = 0, baselines_too: bool = True
) -> list[dict[str, Any]]:
    """Every policy (as the search agent) and, with ``baselines_too``, the two retrieval baselines on ``rt``'s
    fixed episodes; rows tagged with the training ``seed`` index."""
    sp = agent_variant(params, "search")
    cfg = nav_config(sp, rt, max_steps=params.evaluate.max_steps, shaping=0.0)
    base = nav_config(params, rt, max_steps=params.evaluate.max_steps, shaping=0.0)
    base = dataclasses.replace(base, agent=base.agent.model_copy(update={"memory": "retrieval"}))
    baselines: dict[str, Callable[[], Any]] = {
        "retrieve_then_fly": RetrieveThenFly,
        "retrieve_then_search": lambda: RetrieveThenFly(search=True),
    }
    rows = []
    for split, scene, eps in episode_sets(params, rt):
        groups: list[tuple[Any, dict[str, Callable[[], Any]]]] = [(base, baselines)] if baselines_too else []
        groups += [
            (cfg, {name: functools.partial(AgentController, load_policy(path, "ppo"))})
            for name, path in policies.items()
        ]
        for c, methods in groups:
            df, _ = evaluate_methods(scene, rt.memory, c, methods, eps, record_paths=False)
            for method, g in df.groupby("method", sort=False):
                rows.append({"map": where, "split": split, "method": method, "seed": seed, "episodes": len(g),
                             "success_rate": g["success"].mean(), "spl": g["spl"].mean()})  # fmt: skip
    return rows


def train_search(
    params: Params, rt: Runtime, out: Path, hparams: Any, worlds: list[Runtime] | None = None, seed: int | None = None
) -> Path:
    """The ``search`` agent trained on ``rt`` (and ``worlds``), with training seed ``seed`` (default ``base.seed``)."""
    sp = agent_variant(params, "search")
    sp = sp.model_copy(update={"train": sp.train.model_copy(update={"progress_bar": False, "resume": False})})
    if seed is not None:
        sp = sp.model_copy(update={"base": sp.base.model_copy(update={"seed": seed})})
    paths = RunPaths(out / "policy.zip", out / "ck", out / "history.json", out / "train.json", out / "live")
    t0 = time.perf_counter()
    train(sp, rt, paths, hparams, worlds)
    print(f"trained {out.name} in {time.perf_counter() - t0:.0f} s", flush=True)
    return paths.policy


def naip_params(params: Params, naip: Path) -> Params:
    queries = [QueryParams(name=n, source="file", path=str(naip / f"{f}.tif")) for n, f in NAIP_DATES.items()]
    fetch = FetchParams(source="file", path=str(naip / "naip_20200831.tif"), queries=queries)
    return params.model_copy(
        update={
            "fetch": fetch,
            "tile": params.tile.model_copy(update={"view_size": 128, "block_size": 192}),
            "evaluate": params.evaluate.model_copy(update={"success_radius": 32.0}),
            "encoder": params.encoder.model_copy(update={"cache_stride": 8}),
        }
    )


def naip_runtime(params: Params, work: Path) -> Runtime:
    from maprl.data.fetch import run_fetch
    from maprl.data.tile import run_tile
    from maprl.features.encode import run_encode

    root = work / "naip"
    if not (root / "features").exists():
        run_fetch(params, root / "map", root / "fetch.json")
        run_tile(params, root / "map" / "map.tif", root / "targets", root / "tile.json")
        run_encode(
            params, root / "map" / "map.tif", root / "targets" / "targets.csv", root / "features", root / "encode.json"
        )
    return load_runtime(params, root / "map" / "map.tif", root / "targets" / "targets.csv", root / "features")


def run(args: argparse.Namespace) -> pd.DataFrame:
    params = load_params(args.params, stage="train")
    params = params.model_copy(update={"train": params.train.model_copy(update={"worlds": args.worlds})})
    if args.retriever is not None:
        params = params.model_copy(update={"agent": params.agent.model_copy(update={"retriever": args.retriever})})
    hparams = load_best_hparams(BEST) if params.train.hparams == "tuned" else None
    rt = load_runtime(params, MAP, TARGETS, FEATURES)
    work: Path = args.work
    t0 = time.perf_counter()
    worlds = training_worlds(agent_variant(params, "search"), work / "worlds")
    print(f"{len(worlds)} extra training worlds ready in {time.perf_counter() - t0:.0f} s", flush=True)
    specific = None if args.specific == "none" else Path(args.specific)
    seeds = [params.base.seed + i for i in range(args.seeds)]
    generalists = {
        i: train_search(params, rt, work / ("generalist" if i == 0 else f"generalist-s{s}"), hparams, worlds, s)
        for i, s in enumerate(seeds)
    }
    rows: list[dict[str, Any]] = []

    def policies_of(i: int, third: tuple[str, Path]) -> dict[str, Path]:
        out = {"generalist (zero-shot)": generalists[i]}
        if specific is not None and i == 0:
            out["default-world searcher (zero-shot)"] = specific
        return out | dict([third])

    for seed in world_seeds(params.base.seed, args.held_out, held_out=True):
        held, _ = build_world(params, seed, work / "worlds")
        for i, s in enumerate(seeds):
            own = train_search(params, held, work / (f"own-{seed}" if i == 0 else f"own-{seed}-s{s}"), hparams, None, s)
            rows += evaluate(params, held, policies_of(i, ("this world's searcher", own)), f"held-out world {seed}",
                             i, baselines_too=i == 0)  # fmt: skip
    if args.naip is not None:
        npar = naip_params(params, args.naip)
        nrt = naip_runtime(npar, work)
        for i, s in enumerate(seeds):
            update = {"init_from": str(generalists[i]), "total_timesteps": args.finetune}
            tuned = npar.model_copy(update={"train": npar.train.model_copy(update=update)})
            folder = work / ("naip-finetuned" if i == 0 else f"naip-finetuned-s{s}")
            finetuned = train_search(tuned, nrt, folder, hparams, None, s)
            third = (f"generalist fine-tuned ({args.finetune} steps)", finetuned)
            rows += evaluate(npar, nrt, policies_of(i, third), "NAIP 2020", i, baselines_too=i == 0)
    return pd.DataFrame(rows)


def table(rows: pd.DataFrame) -> str:
    """One training seed: success and SPL per row. Several: IQM [95 % CI] over the seeds per method."""
    if rows["seed"].nunique() <= 1:
        lines = ["| map | split | method | success | SPL |", "|---|---|---|---|---|"]
        for r in rows.itertuples():
            lines.append(f"| {r.map} | {r.split} | {r.method} | {r.success_rate:.3f} | {r.spl:.3f} |")
        return "\n".join(lines)
    lines = [
        "| map | split | method | success IQM [95 % CI] | SPL IQM [95 % CI] | success per seed |",
        "|---|---|---|---|---|---|",
    ]
    for (where, split), g in rows.groupby(["map", "split"], sort=False):
        s, p = aggregate(g, "success_rate", reps=5000), aggregate(g, "spl", reps=5000)
        for (_, a), (_, b) in zip(s.iterrows(), p.iterrows(), strict=True):
            cell = f"{a['iqm']:.3f} [{a['ci_low']:.3f}, {a['ci_high']:.3f}]"
            spl = f"{b['iqm']:.3f} [{b['ci_low']:.3f}, {b['ci_high']:.3f}]"
            values = ", ".join(f"{v:.3f}" for v in a["values"])
            lines.append(f"| {where} | {split} | {a['method']} | {cell} | {spl} | {values} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--worlds", type=int, default=4, help="train.worlds of the generalist (the pipeline's map + N-1)")
    ap.add_argument("--held-out", type=int, default=2, help="new procedural worlds to test on")
    ap.add_argument("--naip", type=Path, default=None, help="the naip-nd folder of ../shared/data (optional)")
    ap.add_argument(
        "--specific", default="models/search/policy.zip", help="the default world's own searcher ('none': leave out)"
    )
    ap.add_argument("--seeds", type=int, default=1, help="training seeds base.seed + 0..N-1 of every learned policy")
    ap.add_argument("--finetune", type=int, default=100_000, help="timesteps of fine-tuning on NAIP (init_from)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/generalist"), help="worlds, policies and rows.csv")
    ap.add_argument(
        "--retriever",
        choices=("encoder", "orientation"),
        default=None,
        help="agent.retriever of every map, for training and testing alike (default: the params')",
    )
    args = ap.parse_args()
    if args.seeds < 1:
        ap.error(f"--seeds {args.seeds}: must be at least 1")
    t0 = time.perf_counter()
    rows = run(args)
    write_csv(args.work / "rows.csv", rows)
    print(f"\n# bench_generalist: train.worlds {args.worlds}, {args.held_out} held-out worlds, "
          f"NAIP {'yes' if args.naip else 'no'}; {args.seeds} training seed(s); "
          f"retriever {args.retriever or 'params'}; "
          f"{time.perf_counter() - t0:.0f} s wall\n")  # fmt: skip
    print(table(rows))


if __name__ == "__main__":
    main()
