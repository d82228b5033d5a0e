"""DVC stage ``evaluate``: every trained agent and every baseline on the same fixed episodes."""

from maprl.config import load_params
from maprl.eval.evaluate import run_evaluate
from maprl.stage import guard, parse_policies, stage_parser

if __name__ == "__main__":
    args = stage_parser(
        "evaluate",
        [
            ("--map", "map GeoTIFF"),
            ("--targets", "targets table"),
            ("--features", "encode stage output"),
            ("--policies", "agent=policy.zip pairs, comma-separated"),
            ("--out", "output folder (episodes.csv, methods.csv, plots, GIF)"),
            ("--metrics", "metrics JSON"),
            ("--locate-metrics", "metrics JSON of maprl locate's calibrated confidence"),
        ],
    ).parse_args()
    raise SystemExit(
        guard(
            lambda: run_evaluate(
                load_params(args.params, stage="evaluate"),
                args.map,
                args.targets,
                args.features,
                parse_policies(args.policies),
                args.out,
                args.metrics,
                args.locate_metrics,
            )
        )
    )
