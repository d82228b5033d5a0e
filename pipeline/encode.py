"""DVC stage ``encode``: train (self-supervised) and cache the encoder over the map; calibrate the stop threshold."""

from maprl.config import load_params
from maprl.features.encode import run_encode
from maprl.stage import guard, stage_parser

if __name__ == "__main__":
    args = stage_parser(
        "encode",
        [
            ("--map", "map GeoTIFF"),
            ("--targets", "targets table"),
            ("--out", "output folder (cache.npz, encoder.pt, calibration.json, ssl_loss.csv)"),
            ("--metrics", "metrics JSON"),
        ],
        timing=True,
    ).parse_args()
    raise SystemExit(
        guard(
            lambda: run_encode(
                load_params(args.params, stage="encode"), args.map, args.targets, args.out, args.metrics, args.timing
            )
        )
    )
