"""The ``maprl`` command line.

``maprl <stage>`` runs one pipeline stage exactly as ``dvc repro`` would (the command and paths
of ``dvc.yaml``, so paths live in one place), without DVC's caching. ``maprl tune-worker``
joins a tuning study from another machine, ``maprl check-params`` validates params.yaml.
Errors a user can fix print one clear message, no traceback, and exit 2.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from maprl.config import AGENT_SLOT, AGENTS, LOCATE_INPUTS, LOCATE_METHODS, STAGE_SECTIONS, agent_variant, load_params
from maprl.errors import InputError
from maprl.stage import STAGE_HELP, guard

EPILOG = """\
examples:
  maprl locate photo.jpg           # where was this photo taken? (after dvc repro; see maprl locate --help)
  maprl saliency                   # what the agent looks at: saliency PNGs and an episode video
  maprl fetch                      # build data/map/map.tif from params.yaml (default: synthetic world)
  maprl tile                       # sample target crops and the train/test split
  maprl encode / tune / evaluate   # the other stages, one by one
  maprl train --agent original     # one agent alone: memory, randomized, nomemory, original, search
  maprl tune-worker --storage postgresql://user:pw@db-host/maprl   # extra tuning worker
  maprl check-params               # validate params.yaml and print the resolved values
  maprl report                     # IQM and 95 % intervals over seeds (dvc exp run -S base.seed=N)
  dvc repro                        # run the whole pipeline with caching
"""


def stage_command(name: str, dvc_yaml: Path = Path("dvc.yaml"), agent: str | None = None) -> list[str]:
    """The command ``dvc repro`` runs for stage ``name``, from ``dvc.yaml`` (the one place paths live);
    with ``agent``, the train stage's command for that agent alone, its paths filled in."""
    if not dvc_yaml.exists():
        raise InputError(f"{dvc_yaml} not found; run `maprl {name}` from the root of a maprl repository")
    spec = (yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages", {}).get(name)
    if not isinstance(spec, dict) or "cmd" not in spec:
        raise InputError(f"{dvc_yaml} has no stage {name!r}")
    cmd = shlex.split(str(spec["cmd"]))
    if agent is None or "--agents" not in cmd:
        return cmd
    cmd[cmd.index("--agents") + 1] = agent
    return [arg.replace(AGENT_SLOT, agent) for arg in cmd]


def run_pipeline_stage(name: str, params: str, agent: str | None = None) -> int:
    """Run stage ``name`` as dvc.yaml declares it, with another params file if given."""
    cmd = stage_command(name, agent=agent)
    if cmd and cmd[0] == "python":
        cmd[0] = sys.executable
    return subprocess.call([*cmd, "--params", params])


def _add_stage(sub: Any, name: str) -> None:
    p = sub.add_parser(name, help=STAGE_HELP[name], description=STAGE_HELP[name] + " Paths come from dvc.yaml.")
    p.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
    if name == "train":
        p.add_argument("--agent", default=None, choices=AGENTS, help="train this agent alone (default: all five)")
    p.set_defaults(func=lambda a: run_pipeline_stage(name, a.params, getattr(a, "agent", None)), raw=True)


def cmd_check_params(args: argparse.Namespace) -> Any:
    return load_params(args.params).model_dump(mode="json")


def cmd_params_table(args: argparse.Namespace) -> None:
    from maprl.config import params_table

    print(params_table())


def cmd_tune_worker(args: argparse.Namespace) -> Any:
    from maprl.learn.tuning import run_worker
    from maprl.nav.runtime import load_runtime

    params = agent_variant(load_params(args.params, stage="tune"), "memory")  # as the tune stage
    rt = load_runtime(params, args.map, args.targets, args.features)
    return {"trials_run": run_worker(args.storage, args.study, params, rt, args.n_trials)}


def _add_tune_worker(sub: Any) -> None:
    text = (
        "Join an Optuna study as an extra worker (another machine sharing a PostgreSQL storage). "
        "Run `dvc repro encode` (or `dvc pull`) there first so the map, targets and features exist; "
        "the study name gets the same data-and-settings hash as the tune stage's, so workers with "
        "other data never mix into it."
    )
    p = sub.add_parser("tune-worker", help=text, description=text)
    p.add_argument("--storage", required=True, help="study storage, e.g. postgresql://user:pw@host:5432/maprl")
    p.add_argument("--study", default="maprl", help="study base name (tune.study_name; default: maprl)")
    p.add_argument(
        "--n-trials", type=int, default=None, help="stop at this many finished trials (default: tune.n_trials)"
    )
    p.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
    p.add_argument("--map", default="data/map/map.tif", help="map GeoTIFF (default: data/map/map.tif)")
    p.add_argument(
        "--targets", default="data/targets/targets.csv", help="targets table (default: data/targets/targets.csv)"
    )
    p.add_argument("--features", default="data/features", help="encode stage output (default: data/features)")
    p.set_defaults(func=cmd_tune_worker)


def cmd_report(args: argparse.Namespace) -> None:
    from maprl import report
    from maprl.io import write_json

    if args.runs:
        runs = [(str(path), report.read_eval(path)) for path in args.runs]
    else:
        runs = [("workspace", report.read_eval("metrics/eval.json"))] if Path("metrics/eval.json").exists() else []
        runs += report.experiment_runs(args.rev)
    table = report.runs_table(runs, args.split)
    seeds = sorted(set(table["seed"]))
    if len(seeds) < args.min_seeds:
        raise InputError(
            f"{len(seeds)} seed(s) found ({', '.join(map(str, seeds))}), --min-seeds is {args.min_seeds}: "
            "queue more with `dvc exp run --queue -S base.seed=N` and `dvc queue start`"
        )
    tables = {m: report.aggregate(table, m, args.reps) for m in report.METRICS}
    text = report.markdown(tables, args.split, seeds)
    if args.out:
        sources = list(dict.fromkeys(table["source"]))
        write_json(
            args.out,
            {"split": args.split, "seeds": seeds, "runs": sources, "reps": args.reps}
            | {m: t.to_dict(orient="records") for m, t in tables.items()},
        )
    if args.plot:
        report.plot_intervals(tables, args.plot, f"{args.split} split, {len(seeds)} seeds")
    print(text)


def _add_report(sub: Any) -> None:
    text = (
        "Aggregate results over pipeline seeds: per method, the interquartile mean and a 95 %% "
        "stratified-bootstrap interval (rliable) of the test success rate and SPL. Reads the workspace's "
        "metrics/eval.json and every DVC experiment of --rev, or the eval.json files given."
    )
    epilog = (
        "run the seeds first:\n"
        "  for s in 1 2 3 4; do dvc exp run --queue -S base.seed=$s; done\n"
        "  dvc queue start -j 1 && dvc queue status\n"
        "  maprl report --out metrics/seeds.json --plot data/seeds.png"
    )
    p = sub.add_parser(
        "report", help=text, description=text, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("runs", nargs="*", help="eval.json files (default: the workspace and the DVC experiments)")
    p.add_argument("--rev", default="HEAD", help="the commit whose experiments to read (default: HEAD)")
    p.add_argument("--split", default="test", choices=("train", "test", "test_decoy"), help="default: test")
    p.add_argument("--reps", type=int, default=50_000, help="bootstrap resamples (default: 50000)")
    p.add_argument("--min-seeds", type=int, default=1, help="fail with fewer seeds than this (default: 1)")
    p.add_argument("--out", default=None, help="write the aggregate as JSON here (e.g. metrics/seeds.json)")
    p.add_argument("--plot", default=None, help="write an interval plot here (PNG)")
    p.set_defaults(func=cmd_report)


def _gsd(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of metres or 'auto'") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: a ground sample distance is a positive, finite number of metres")
    return value


def _heading(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of degrees") from None
    if not abs(value) < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: a heading is a finite number of degrees")
    return value % 360.0


def cmd_locate(args: argparse.Namespace) -> Any:
    from maprl.io import write_csv, write_json
    from maprl.locator import Locator

    loc = Locator.load(args.params, args.map, args.features, args.policy, args.calibration, args.method)
    photos, shown = args.photos, []
    if args.plot and len(photos) == 1:  # the plot shows the photo as given: decode it once, for both
        from maprl.data.photo import read_photo

        photos = [read_photo(photos[0])]
        shown = [photos[0].rgb]
    results = loc.locate_many(photos, gsd=args.gsd, heading=args.heading, progress=len(photos) > 1)
    collection = loc.geojson(results) if args.geojson else None  # built (and checked) before anything is written
    if args.out:
        import pandas as pd

        write_csv(args.out, pd.DataFrame([r.csv_row() for r in results]))
    if collection is not None:
        write_json(args.geojson, collection)
    if args.plot:
        loc.plot(results, args.plot, shown)
    out = [r.to_dict() for r in results]
    if not args.path:
        for d in out:
            d.pop("path_px")
    return out[0] if len(out) == 1 else out


LOCATE_TEXT = (
    "Where was this photo taken? Reads the photo(s), resamples each to the map's ground sample distance, "
    "searches its heading, flies the trained agent from several starts and prints JSON: WGS84 and map "
    "coordinates of the view centre, pixel position, heading, scale, a calibrated confidence, alternative "
    "places, steps flown and wall time. Below locate.abstain_below confidence the answer is 'located': false "
    "(the best guess is still given; exit code 0). Needs `dvc repro` to have run (map, features, policy and "
    "the evaluate stage's calibration)."
)
LOCATE_EPILOG = """examples:
  maprl locate photo.jpg
  maprl locate photo.jpg --gsd 0.6 --geojson where.geojson --plot where.png
  maprl locate photo.tif --heading 90          # the top of the photo faces east
  maprl locate photos/*.jpg --out results.csv --geojson all.geojson
  maprl locate photo.png --gsd auto --method retrieve_then_fly

heading: the direction the top of the photo faces, degrees clockwise from north (the map's up).
exit codes: 0 answered (located or not), 2 bad input (nothing written).
"""


def _add_locate(sub: Any) -> None:
    p = sub.add_parser(
        "locate", help="Where was this photo taken? (JSON, GeoJSON, CSV, plot)", description=LOCATE_TEXT,
        epilog=LOCATE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("photos", nargs="+", help="JPEG, PNG or GeoTIFF files (several: batch mode, with a progress bar)")
    p.add_argument("--gsd", type=_gsd, default=None,
                   help="the photo's ground sample distance in metres, or 'auto' to try locate.gsd_scales "
                        "(default: a GeoTIFF's own, else the map's, which the output notes)")  # fmt: skip
    p.add_argument("--heading", type=_heading, default=None,
                   help="known heading in degrees clockwise from north (default: searched)")  # fmt: skip
    p.add_argument("--geojson", default=None, help="write a FeatureCollection (RFC 7946, WGS84) here")
    p.add_argument("--plot", default=None, help="write a PNG of the map with path, footprint and alternatives here")
    p.add_argument("--out", default=None, help="write one CSV row per photo here")
    p.add_argument("--path", action="store_true", help="include the flown path (map pixels) in the JSON")
    p.add_argument("--method", default=None, choices=LOCATE_METHODS,
                   help="what flies the view (default: locate.method in the params file)")  # fmt: skip
    for flag, key, text in (
        ("--params", "params", "parameters file"),
        ("--map", "map", "map GeoTIFF"),
        ("--features", "features", "encode stage output"),
        ("--policy", "policy", "trained memory agent"),
        ("--calibration", "calibration", "the evaluate stage's confidence calibration"),
    ):
        p.add_argument(flag, default=LOCATE_INPUTS[key], help=f"{text} (default: {LOCATE_INPUTS[key]})")
    p.set_defaults(func=cmd_locate)


def cmd_saliency(args: argparse.Namespace) -> Any:
    from maprl.eval.saliency import SaliencySettings, run_saliency

    return run_saliency(
        args.params, args.map, args.targets, args.features, args.agent,
        args.policy or f"models/{args.agent}/policy.zip", args.out, split=args.split, episode=args.episode,
        target_id=args.target_id, photo=args.photo, gsd=args.gsd, domain=args.domain, steps=args.steps,
        frames=args.frames, video=args.video, settings=SaliencySettings(args.stride, args.sigma, args.blur),
    )  # fmt: skip


SALIENCY_TEXT = (
    "Which pixels does the agent look at? Perturbation saliency (Greydanus et al. 2018): fly one evaluation "
    "episode, then at chosen steps blur a small Gaussian patch at each location of the target photo and of the "
    "current view, re-embed the view with the map's encoder, rebuild the observation as the env does, and measure "
    "how much the policy's action distribution changes (actor saliency, blue: 0.5 |pi - pi'|^2 of the action "
    "probabilities, or of the mean action for continuous moves) and how much its value changes (critic saliency, "
    "red: 0.5 (V - V')^2). Writes a PNG per step (both views with both overlays), an episode video (GIF; MP4 "
    "too where imageio's ffmpeg plugin is installed: the map with the path, both views and their saliency, "
    "frame by frame) and saliency.npz (the coarse maps), and prints a JSON summary. Needs `dvc repro` to have "
    "run (map, targets, features and the policy)."
)
SALIENCY_EPILOG = """examples:
  maprl saliency                                   # memory agent, test episode 0, 4 steps + a 16-frame video
  maprl saliency --agent search --episode 3 --steps 0,5,-1
  maprl saliency --split test_decoy --steps all --no-video --out data/saliency/decoy
  maprl saliency --photo photo.jpg --frames all    # a photo of your own as the target
  maprl saliency --stride 8 --sigma 5              # finer maps (4x the time of the default stride 16)

steps are observation indices of the episode: 0 is the start, -1 the last (after the final move).
time: about 2 * (224 / stride)^2 encoder calls per step (a few seconds at stride 16 on 2 CPU cores).
exit codes: 0 written, 2 bad input (a missing policy, a step outside the episode, an unreadable photo...).
"""


def _add_saliency(sub: Any) -> None:
    p = sub.add_parser(
        "saliency", help="Saliency maps and an episode video of a trained agent (PNG, GIF, MP4)",
        description=SALIENCY_TEXT, epilog=SALIENCY_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("--agent", default="memory", choices=AGENTS,
                   help="which trained agent: its params variant and, by default, models/AGENT/policy.zip "
                        "(default: memory)")  # fmt: skip
    p.add_argument("--policy", default=None, help="policy.zip to load instead of models/AGENT/policy.zip")
    p.add_argument("--split", default="test", choices=("train", "test", "test_decoy"),
                   help="the evaluate stage's episodes of this split (default: test)")  # fmt: skip
    p.add_argument("--episode", type=int, default=0, help="episode index within the split (default: 0)")
    p.add_argument("--target-id", type=int, default=None,
                   help="fly to this target (id in targets.csv) instead, from the episode's start")  # fmt: skip
    p.add_argument("--photo", default=None,
                   help="a photo (JPEG, PNG, GeoTIFF) as the target instead, its place unknown; taken at the "
                        "map's pixel size unless --gsd")  # fmt: skip
    p.add_argument("--gsd", type=float, default=None, help="--photo's ground sample distance, metres per pixel")
    p.add_argument("--domain", default="same",
                   help="target photos from this query domain (fetch.queries; default: same, the map)")  # fmt: skip
    p.add_argument("--steps", default="auto",
                   help="steps to write PNGs of: comma-separated (0,5,-1), 'auto' (4 evenly spaced, first and "
                        "last included) or 'all' (default: auto)")  # fmt: skip
    p.add_argument("--frames", default="16", help="video frames: a number, evenly spaced, or 'all' (default: 16)")
    p.add_argument("--video", action=argparse.BooleanOptionalAction, default=True,
                   help="write the episode video (default: yes)")  # fmt: skip
    p.add_argument("--stride", type=int, default=16, help="pixels between mask centres (default: 16)")
    p.add_argument("--sigma", type=float, default=8.0, help="Gaussian mask sigma, pixels (default: 8)")
    p.add_argument("--blur", type=float, default=5.0,
                   help="sigma of the blur the mask blends in, pixels (default: 5)")  # fmt: skip
    p.add_argument("--out", default="data/saliency", help="output folder (default: data/saliency)")
    for flag, key, text in (
        ("--params", "params", "parameters file"),
        ("--map", "map", "map GeoTIFF"),
        ("--features", "features", "encode stage output"),
    ):
        p.add_argument(flag, default=LOCATE_INPUTS[key], help=f"{text} (default: {LOCATE_INPUTS[key]})")
    p.add_argument("--targets", default="data/targets/targets.csv",
                   help="targets table (default: data/targets/targets.csv)")  # fmt: skip
    p.set_defaults(func=cmd_saliency)


def build_parser() -> argparse.ArgumentParser:
    from maprl import __version__

    parser = argparse.ArgumentParser(
        prog="maprl",
        description="Locate a photo on a map: an RL agent flies a view over imagery until it matches.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"maprl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in STAGE_SECTIONS:
        _add_stage(sub, name)
    text = "Validate params.yaml and print every resolved value (defaults filled in)."
    p = sub.add_parser("check-params", help=text, description=text)
    p.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
    p.set_defaults(func=cmd_check_params)
    _add_locate(sub)
    _add_saliency(sub)
    _add_tune_worker(sub)
    _add_report(sub)
    text = "Print the README's params table (markdown), generated from the validated models."
    sub.add_parser("params-table", help=text, description=text).set_defaults(func=cmd_params_table)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "raw", False):  # a pipeline stage: its own process prints its errors
        code: list[int] = []
        status = guard(lambda: code.append(args.func(args)))
        return status or code[0]
    return guard(lambda: args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
