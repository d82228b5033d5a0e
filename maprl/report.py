"""``maprl report``: results over several pipeline seeds, with rliable's IQM and bootstrap intervals.

One seed is not a result: a different ``base.seed`` changes the world, the split, the encoder,
the tuned hyperparameters and the agent. Run the pipeline once per seed as DVC experiments::

    for s in 1 2 3 4; do dvc exp run --queue -S base.seed=$s; done
    dvc queue start -j 1          # one at a time on a small machine; `dvc queue status` to follow
    maprl report                  # the workspace run plus every experiment of HEAD

Each run's ``metrics/eval.json`` gives one score per method (the test split's success rate or
SPL, on episodes every method shares). Per method, :func:`aggregate` reports the interquartile
mean over seeds and a 95 % stratified-bootstrap confidence interval (rliable; Agarwal et al.,
"Deep RL at the edge of the statistical precipice", 2021), plus the plain mean and every value.
"""

from __future__ import annotations

import json
import subprocess
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from maprl.errors import InputError
from maprl.eval.metrics import interval_estimates

METRICS = ("success_rate", "spl")
SETTINGS = ("episodes_per_split", "max_steps", "success_radius", "decoy_rate")  # must agree across runs


def method_scores(ev: dict[str, Any], split: str) -> dict[str, dict[str, float]]:
    """``{method: {metric: value}}`` on ``split`` from one ``eval.json`` (the agent and every baseline)."""
    rows = {"agent": ev["agent"], **ev["baselines"]}
    return {name: {m: float(r[split][m]) for m in METRICS} for name, r in rows.items() if split in r}


def runs_table(runs: Sequence[tuple[str, dict[str, Any]]], split: str) -> pd.DataFrame:
    """One row per (run, method): source, seed, method, success_rate, spl. One run per seed is kept."""
    if not runs:
        raise InputError("no runs to report: run the pipeline (dvc repro / dvc exp run), or pass eval.json files")
    first = runs[0][1]
    rows, seeds = [], set()
    for source, ev in runs:
        differ = [k for k in SETTINGS if ev.get(k) != first.get(k)]
        if differ:
            raise InputError(f"{source} was evaluated with other settings ({', '.join(differ)}) than {runs[0][0]}")
        if ev["seed"] in seeds:
            warnings.warn(f"{source}: seed {ev['seed']} already reported; skipped", stacklevel=2)
            continue
        seeds.add(ev["seed"])
        for method, scores in method_scores(ev, split).items():
            rows.append({"source": source, "seed": int(ev["seed"]), "method": method, **scores})
    return pd.DataFrame(rows)


def aggregate(table: pd.DataFrame, metric: str, reps: int = 50_000, seed: int = 0) -> pd.DataFrame:
    """Per method: n_seeds, IQM and its 95 % stratified-bootstrap interval (rliable), mean, values."""
    from rliable import metrics as rm

    methods = list(dict.fromkeys(table["method"]))
    scores = {m: table.loc[table["method"] == m].sort_values("seed")[metric].to_numpy(float)[:, None] for m in methods}
    point, interval = interval_estimates(scores, lambda x: np.array([rm.aggregate_iqm(x)]), reps, seed)
    out = []
    for m in methods:
        out.append(
            {
                "method": m,
                "n_seeds": len(scores[m]),
                "iqm": float(point[m][0]),
                "ci_low": float(interval[m][0, 0]),
                "ci_high": float(interval[m][1, 0]),
                "mean": float(scores[m].mean()),
                "values": [round(float(v), 4) for v in scores[m][:, 0]],
            }
        )
    return pd.DataFrame(out)


def markdown(tables: dict[str, pd.DataFrame], split: str, seeds: Iterable[int]) -> str:
    """The README table: per method, IQM [95 % CI] of each metric over the seeds."""
    seeds = sorted(seeds)
    metrics = list(tables)
    head = " | ".join(f"{m} IQM [95 % CI]" for m in metrics)
    lines = [
        f"{split} split, {len(seeds)} seeds ({', '.join(map(str, seeds))}); IQM and 95 % stratified-bootstrap "
        "intervals over seeds (rliable)",
        "",
        f"| method | {head} |",
        "|---|" + "---|" * len(metrics),
    ]
    first = tables[metrics[0]]
    for i, method in enumerate(first["method"]):
        cells = []
        for m in metrics:
            r = tables[m].iloc[i]
            cells.append(f"{r['iqm']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- where the runs come from ---------------------------------------------------------------
def read_eval(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError) as err:
        raise InputError(f"cannot read {path} as an eval.json ({err})") from None


def _git_show(rev: str, path: str) -> dict[str, Any] | None:
    proc = subprocess.run(["git", "show", f"{rev}:{path}"], capture_output=True, text=True)
    return dict(json.loads(proc.stdout)) if proc.returncode == 0 else None


def experiment_runs(rev: str = "HEAD", metrics_path: str = "metrics/eval.json") -> list[tuple[str, dict[str, Any]]]:
    """``eval.json`` of every finished DVC experiment based on ``rev`` (from git, via ``dvc exp show``)."""
    import dvc.api

    try:
        rows = dvc.api.exp_show(revs=rev)
    except Exception as err:  # dvc raises many kinds: not a repo, unknown rev, ...
        raise InputError(f"cannot list the DVC experiments of {rev}: {err}") from None
    runs = []
    for row in rows:
        name, sha = row.get("Experiment"), row.get("rev")
        if not name or not sha or row.get("State") not in (None, "Success"):
            continue
        ev = _git_show(str(sha), metrics_path)
        if ev is not None:
            runs.append((f"exp {name}", ev))
    return runs


def plot_intervals(tables: dict[str, pd.DataFrame], path: str | Path, title: str) -> None:
    """One panel per metric: IQM (dot) and 95 % interval (bar) per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from maprl.io import atomic_path

    fig, axes = plt.subplots(1, len(tables), figsize=(5 * len(tables), 0.45 * len(next(iter(tables.values()))) + 1.2))
    for ax, (metric, t) in zip(np.atleast_1d(axes), tables.items(), strict=True):
        y = np.arange(len(t))[::-1]
        ax.hlines(y, t["ci_low"], t["ci_high"], color="tab:blue", lw=6, alpha=0.4)
        ax.plot(t["iqm"], y, "o", color="tab:blue")
        ax.set_yticks(y, t["method"])
        ax.set_xlim(-0.02, 1.02)
        ax.set_xlabel(f"{metric} (IQM, 95 % CI)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
