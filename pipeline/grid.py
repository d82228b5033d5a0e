"""DVC stage ``grid``: the published grid protocol (5x5 patches, 4 moves) with PPO and exact no-learning baselines."""

from maprl.config import load_params
from maprl.learn.grid import run_grid
from maprl.stage import guard, stage_parser

if __name__ == "__main__":
    args = stage_parser(
        "grid",
        [
            ("--map", "map GeoTIFF"),
            ("--features", "encode stage output (the encoder embeds every patch)"),
            ("--out", "output folder (episodes.csv, curves/, success_by_c.png)"),
            ("--metrics", "metrics JSON"),
        ],
        timing=True,
    ).parse_args()
    raise SystemExit(
        guard(
            lambda: run_grid(
                load_params(args.params, stage="grid"), args.map, args.features, args.out, args.metrics, args.timing
            )
        )
    )
