"""DVC stage ``encode``: train (self-supervised) and cache the encoder over the map; calibrate the stop threshold."""

from maprl.features.encode import run_encode
from maprl.stage import guard, stage_params, stage_parser

if __name__ == "__main__":
    args = stage_parser(
        "encode",
        [
            ("--map", "map GeoTIFF"),
            ("--targets", "targets table"),
            ("--out", "output folder (cache.npz, encoder.pt, calibration.json, ssl_loss.csv)"),
            ("--metrics", "metrics JSON"),
        ],
    ).parse_args()
    params = stage_params("encode", args.params)
    raise SystemExit(guard(lambda: run_encode(params, args.map, args.targets, args.out, args.metrics)))
