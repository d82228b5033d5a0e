"""Many maps: the procedural worlds of ``train.worlds`` and the held-out worlds a generalist is tested on.

A world is the embedded procedural world from its own seed (other terrain, towns, fields, water,
seasons and sun), made exactly as the pipeline makes its map: the ``fetch``, ``tile`` and
``encode`` stages' own functions, with the pipeline's params but ``base.seed`` set to the world's
seed (so each world also gets its own SSL encoder, stop threshold and split; its query domains are
the pipeline's synthetic seasons, or ``autumn`` beside a real map). A world is built
once into ``<folder>/world-<seed>/`` and reused while its params are the same.

Seeds: world 0 of ``train.worlds`` is the pipeline's own map; the others, and the held-out
worlds, come from ``SeedSequence([base.seed, ...])`` with different keys, so a held-out world is
never a training world (checked).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from maprl.config import FetchParams, Params
from maprl.data.fetch import run_fetch
from maprl.data.tile import run_tile
from maprl.errors import ParamsError
from maprl.features.encode import run_encode
from maprl.nav.runtime import Runtime, load_runtime

TRAIN_KEY, HELD_OUT_KEY = 7001, 9001


def world_seeds(base_seed: int, n: int, held_out: bool = False) -> list[int]:
    """Seeds of ``n`` extra training worlds, or of ``n`` held-out worlds (never the same)."""
    key = HELD_OUT_KEY if held_out else TRAIN_KEY
    seeds = [int(s) for s in np.random.SeedSequence([base_seed, key]).generate_state(n)] if n else []
    return [s for s in seeds if s != base_seed]


def world_params(params: Params, seed: int) -> Params:
    """The pipeline's params for the procedural world of ``seed`` (its own map, split and encoder)."""
    f = params.fetch
    size = f.size if f.source == "synthetic" else FetchParams().size
    seasons = [q for q in f.queries if q.source == "synthetic"] if f.source == "synthetic" else FetchParams().queries
    fetch = FetchParams(
        size=size,
        metres_per_pixel=f.metres_per_pixel,
        center_lat=f.center_lat,
        center_lon=f.center_lon,
        queries=seasons,
    )
    return params.model_copy(update={"base": params.base.model_copy(update={"seed": seed}), "fetch": fetch})


def _signature(p: Params) -> dict[str, object]:
    return json.loads(p.model_dump_json(include={"base", "fetch", "tile", "encoder", "evaluate"}))


def build_world(params: Params, seed: int, folder: str | Path) -> tuple[Runtime, Path]:
    """The runtime of world ``seed`` (built with the stage functions into ``folder``, or reused)."""
    wp = world_params(params, seed)
    root = Path(folder) / f"world-{seed}"
    sig = root / "params.json"
    paths = {k: root / k for k in ("map", "targets", "features")}
    if not (sig.exists() and json.loads(sig.read_text()) == _signature(wp)):
        root.mkdir(parents=True, exist_ok=True)
        sig.unlink(missing_ok=True)
        print(f"world {seed}: fetch, tile and encode into {root}", flush=True)
        run_fetch(wp, paths["map"], root / "fetch.json")
        run_tile(wp, paths["map"] / "map.tif", paths["targets"], root / "tile.json")
        run_encode(
            wp, paths["map"] / "map.tif", paths["targets"] / "targets.csv", paths["features"], root / "encode.json"
        )
        sig.write_text(json.dumps(_signature(wp)))
    rt = load_runtime(wp, paths["map"] / "map.tif", paths["targets"] / "targets.csv", paths["features"])
    return rt, root


def training_worlds(params: Params, folder: str | Path) -> list[Runtime]:
    """The extra worlds of ``train.worlds`` (the pipeline's map is world 0 and not among them)."""
    n = params.train.worlds
    if n > 1 and not params.agent.portable:
        raise ParamsError(
            "train.worlds > 1 needs agent.portable: true (each world has its own encoder, so only the "
            "portable nav vector means the same on all of them); the search agent is portable"
        )
    return [build_world(params, s, folder)[0] for s in world_seeds(params.base.seed, n - 1)]
