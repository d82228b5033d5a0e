"""DVC stage ``tune``: an Optuna study over PPO hyperparameters, scored on the validation split (resumable)."""

from maprl.config import load_params
from maprl.learn.tuning import run_tune_stage
from maprl.stage import guard, stage_parser

if __name__ == "__main__":
    args = stage_parser(
        "tune",
        [
            ("--map", "map GeoTIFF"),
            ("--targets", "targets table"),
            ("--features", "encode stage output"),
            ("--out", "study folder (journal, trials.csv, tune.png)"),
            ("--best", "best hyperparameters YAML"),
            ("--metrics", "metrics JSON"),
        ],
    ).parse_args()
    raise SystemExit(
        guard(
            lambda: run_tune_stage(
                load_params(args.params, stage="tune"),
                args.map,
                args.targets,
                args.features,
                args.out,
                args.best,
                args.metrics,
            )
        )
    )
