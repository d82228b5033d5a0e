"""``maprl report``: IQM and bootstrap intervals over seeds, from eval.json files."""

import json
from pathlib import Path

import numpy as np
import pytest

from maprl.cli import main
from maprl.errors import InputError
from maprl.report import aggregate, runs_table


def _eval(seed: int, agent: float, baseline: float) -> dict:
    split = lambda v: {"test": {"success_rate": v, "spl": v / 2}}  # noqa: E731
    return {
        "seed": seed, "episodes_per_split": 10, "max_steps": 5, "success_radius": 4.0, "decoy_rate": 0.0,
        "agent": split(agent), "baselines": {"retrieve_then_fly": split(baseline)},
    }  # fmt: skip


def test_iqm_and_interval_over_seeds() -> None:
    values = [0.1, 0.5, 0.6, 0.7, 1.0]
    runs = [(f"s{s}", _eval(s, v, 0.4)) for s, v in enumerate(values)]
    table = aggregate(runs_table(runs, "test"), "success_rate", reps=2000)
    agent = table.set_index("method").loc["agent"]
    assert agent["n_seeds"] == 5 and agent["iqm"] == pytest.approx(0.6)  # the middle three of five
    assert agent["ci_low"] < 0.6 < agent["ci_high"] and agent["mean"] == pytest.approx(np.mean(values))
    base = table.set_index("method").loc["retrieve_then_fly"]
    assert base["ci_low"] == base["ci_high"] == pytest.approx(0.4)  # no spread, no interval


def test_intervals_do_not_depend_on_numpys_global_generator() -> None:
    """rliable resamples with np.random.choice whatever random_state it is given; the seed must decide."""
    runs = [(f"s{s}", _eval(s, v, 0.4)) for s, v in enumerate([0.1, 0.5, 0.6, 0.7, 1.0])]
    tables = []
    for global_seed in (1, 2):
        np.random.seed(global_seed)
        tables.append(aggregate(runs_table(runs, "test"), "success_rate", reps=500, seed=3))
    assert tables[0].equals(tables[1])
    before = np.random.get_state()[1].copy()
    aggregate(runs_table(runs, "test"), "success_rate", reps=500, seed=4)
    assert np.array_equal(np.random.get_state()[1], before)  # the caller's generator is left as it was
    other = aggregate(runs_table(runs, "test"), "success_rate", reps=500, seed=4)
    assert not tables[0].equals(other)  # and the seed does decide


def test_runs_must_share_their_evaluation_settings() -> None:
    other = _eval(2, 0.5, 0.5) | {"max_steps": 50}
    with pytest.raises(InputError, match="max_steps"):
        runs_table([("a", _eval(1, 0.5, 0.5)), ("b", other)], "test")
    with pytest.raises(InputError, match="no runs"):
        runs_table([], "test")


def test_cli_report_writes_json_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files = []
    for seed, v in enumerate([0.2, 0.4, 0.9]):
        files.append(tmp_path / f"e{seed}.json")
        files[-1].write_text(json.dumps(_eval(seed, v, 0.3)))
    out, plot = tmp_path / "seeds.json", tmp_path / "seeds.png"
    args = ["report", *map(str, files), "--reps", "500", "--out", str(out), "--plot", str(plot)]
    assert main(args) == 0
    assert "| agent | 0.500 [0.200, 0.900]" in capsys.readouterr().out  # IQM of 3 trims none
    data = json.loads(out.read_text())
    assert data["seeds"] == [0, 1, 2] and {r["method"] for r in data["spl"]} == {"agent", "retrieve_then_fly"}
    assert plot.stat().st_size > 0
    assert main([*args, "--min-seeds", "5"]) == 2  # too few seeds is an error that names the fix
    assert "dvc exp run --queue" in capsys.readouterr().err
