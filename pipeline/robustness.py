"""DVC stage ``robustness``: the agents and the no-learning methods under perturbed photos, query
domains and perturbed dynamics, on one fixed set of test episodes."""

from maprl.config import load_params
from maprl.eval.robustness import run_robustness
from maprl.stage import guard, parse_policies, stage_parser

if __name__ == "__main__":
    args = stage_parser(
        "robustness",
        [
            ("--map", "map GeoTIFF"),
            ("--targets", "targets table"),
            ("--features", "encode stage output"),
            ("--policies", "agent=policy.zip pairs, comma-separated (memory, randomized)"),
            ("--out", "output folder (robustness.csv, dynamics.csv, curves/, pictures)"),
            ("--metrics", "metrics JSON"),
        ],
    ).parse_args()
    raise SystemExit(
        guard(
            lambda: run_robustness(
                load_params(args.params, stage="robustness"),
                args.map,
                args.targets,
                args.features,
                parse_policies(args.policies),
                args.out,
                args.metrics,
            )
        )
    )
