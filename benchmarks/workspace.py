"""A throwaway copy of the repository for the benchmarks and the e2e test: its files, none of
its outputs, and optionally tiny params (:data:`TINY`) so that the whole pipeline runs in a minute."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
OUTPUTS = ("metrics/", "data/", "models/", "dvclive/", "dvc.lock")  # what a copy must rebuild itself

TINY: dict[str, dict[str, Any]] = {
    "fetch": {"size": 192},
    "tile": {"n_targets": 24, "view_size": 32, "block_size": 64},
    "encoder": {"input_size": 64, "ssl_steps": 2, "ssl_batch_size": 8, "heading_search": 4},
    "tune": {"n_trials": 2, "timesteps": 256, "eval_episodes": 4, "n_evaluations": 2},
    "train": {"total_timesteps": 512, "n_envs": 4, "n_steps": 32, "batch_size": 64, "max_steps": 10,
              "eval_freq": 256, "eval_episodes": 4, "checkpoint_freq": 256, "progress_bar": False,
              "randomize_views": 1},
    "evaluate": {"episodes": 4, "max_steps": 10, "gif_steps": 5},
    "robustness": {"kinds": ["brightness", "rotation"], "strengths": [0.5, 1.0], "episodes": 4,
                   "action_scales": [0.5], "action_noise": [0.1]},
    "grid": {"settings": [{"name": "tiny", "size": 4, "patch": 16, "budget": 6, "c_min": 2, "c_max": 4}],
             "seeds": 1, "timesteps": 256, "n_envs": 4, "n_steps": 32, "batch_size": 64, "bootstrap_reps": 200},
}  # fmt: skip


def copy_repo(dst: Path, params: dict[str, dict[str, Any]] | None = None, repo: Path = REPO) -> None:
    """Copy ``repo``'s tracked and untracked (not ignored) files into ``dst``, outputs left out, and
    update the copy's params.yaml section by section with ``params``."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=repo,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    for rel in listed:
        if (repo / rel).is_file() and not rel.startswith(OUTPUTS):
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(repo / rel, dst / rel)
    if params:
        raw = yaml.safe_load((dst / "params.yaml").read_text())
        for section, values in params.items():
            raw[section].update(values)
        (dst / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


def git_commit_all(dst: Path) -> None:
    """Make ``dst`` a git repository with everything committed (DVC needs one)."""
    git = ["git", "-c", "user.name=maprl", "-c", "user.email=maprl@localhost"]
    for cmd in (["git", "init", "-q"], [*git, "add", "-A"], [*git, "commit", "-qm", "copy"]):
        subprocess.run(cmd, cwd=dst, check=True, capture_output=True)
