"""DVC stage ``tile``: sample target crops over the valid map and split them train/test."""

from maprl.config import load_params
from maprl.data.tile import run_tile
from maprl.stage import guard, stage_parser

if __name__ == "__main__":
    args = stage_parser(
        "tile",
        [
            ("--map", "map GeoTIFF"),
            ("--out", "output folder (targets.csv, crops/, preview.png)"),
            ("--metrics", "metrics JSON"),
        ],
        timing=True,
    ).parse_args()
    raise SystemExit(
        guard(lambda: run_tile(load_params(args.params, stage="tile"), args.map, args.out, args.metrics, args.timing))
    )
