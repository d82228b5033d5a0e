"""DVC stage ``train``: train the agents (memory, randomized, nomemory, original, search) on the feature env,
``train.workers`` at a time; ``{agent}`` in a path is the agent's name."""

from pathlib import Path

from maprl.config import load_params
from maprl.learn.training import RunPaths, run_train_agents
from maprl.stage import guard, stage_parser

if __name__ == "__main__":
    args = stage_parser(
        "train",
        [
            ("--agents", "comma-separated: memory, randomized, nomemory, original, search"),
            ("--map", "map GeoTIFF"),
            ("--targets", "targets table"),
            ("--features", "encode stage output"),
            ("--best", "tuned hyperparameters (used when train.hparams is tuned)"),
            ("--policy", "trained policy (.zip), e.g. models/{agent}/policy.zip"),
            ("--checkpoints", "checkpoint folder (for train.resume)"),
            ("--history", "periodic evaluation history (JSON)"),
            ("--live", "dvclive folder"),
            ("--worlds", "where the extra procedural worlds of train.worlds are built (and kept)"),
            ("--metrics", "metrics JSON"),
        ],
        timing=True,
    ).parse_args()
    template = RunPaths(
        Path(args.policy),
        Path(args.checkpoints),
        Path(args.history),
        Path(args.metrics),
        Path(args.live),
        Path(args.timing) if args.timing else None,
    )
    raise SystemExit(
        guard(
            lambda: run_train_agents(
                load_params(args.params, stage="train"),
                [a.strip() for a in args.agents.split(",") if a.strip()],
                args.map,
                args.targets,
                args.features,
                args.best,
                template,
                args.worlds,
            )
        )
    )
