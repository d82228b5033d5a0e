"""DVC stage ``fetch``: imagery (synthetic world, local file or Earth Engine) into ``map.tif`` + ``map.json``."""

from maprl.config import load_params
from maprl.data.fetch import run_fetch
from maprl.stage import guard, stage_parser

if __name__ == "__main__":
    args = stage_parser(
        "fetch",
        [
            ("--out", "output folder (map.tif, map.json)"),
            ("--metrics", "metrics JSON"),
        ],
        timing=True,
    ).parse_args()
    raise SystemExit(
        guard(lambda: run_fetch(load_params(args.params, stage="fetch"), args.out, args.metrics, args.timing))
    )
