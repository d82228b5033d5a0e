"""Several worker processes on one study in PostgreSQL; a killed worker's trial is failed and retried.

Needs a server: ``eval "$(bash scripts/postgres.sh)"`` sets ``MAPRL_TEST_POSTGRES_URL``; without it
(or when the server does not answer) these tests skip.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from maprl.learn.tuning import driver_url, make_storage, open_study

pytestmark = pytest.mark.postgres

ROOT = Path(__file__).resolve().parents[1]
HEARTBEAT, GRACE = 1, 2

WORKER = r"""
import sys, time, optuna
from maprl.learn.tuning import AnnealSampler, make_storage, optimize_study
url, name, n_trials, sleep = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
optuna.logging.set_verbosity(optuna.logging.WARNING)
storage = make_storage(url, heartbeat_interval=int(sys.argv[5]), grace_period=int(sys.argv[6]), max_retry=1)
study = optuna.load_study(study_name=name, storage=storage, sampler=AnnealSampler(seed=None))
def f(trial):
    x = trial.suggest_float("x", -1, 1)
    time.sleep(sleep)
    return -x * x
optimize_study(study, f, n_trials, progress=False)
"""


@pytest.fixture(scope="module")
def pg_url() -> str:
    url = os.environ.get("MAPRL_TEST_POSTGRES_URL")
    if not url:
        pytest.skip('MAPRL_TEST_POSTGRES_URL is not set (run: eval "$(bash scripts/postgres.sh)")')
    try:
        import sqlalchemy

        with sqlalchemy.create_engine(driver_url(url)).connect():
            pass
    except Exception as err:
        pytest.skip(f"cannot connect to MAPRL_TEST_POSTGRES_URL: {err}")
    return url


@pytest.fixture
def study_name(pg_url: str) -> Iterator[str]:
    name = f"maprl-test-{uuid.uuid4().hex[:8]}"
    open_study(make_storage(pg_url), name)
    yield name
    optuna.delete_study(study_name=name, storage=make_storage(pg_url))


def start_worker(url: str, name: str, n_trials: int, sleep: float, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    args = [url, name, str(n_trials), str(sleep), str(HEARTBEAT), str(GRACE)]
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-c", WORKER, *args], stdout=out, stderr=subprocess.STDOUT, env=env)


def trials(url: str, name: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=make_storage(url)).get_trials(deepcopy=False)


def test_two_workers_share_one_study(pg_url: str, study_name: str, tmp_path: Path) -> None:
    n = 8
    workers = [start_worker(pg_url, study_name, n, 0.5, tmp_path / f"w{i}.log") for i in range(2)]
    for i, w in enumerate(workers):
        assert w.wait(timeout=180) == 0, (tmp_path / f"w{i}.log").read_text()
    ts = trials(pg_url, study_name)
    numbers = [t.number for t in ts]
    assert sorted(numbers) == list(range(len(ts)))  # no duplicated or missing trial numbers
    complete = [t for t in ts if t.state == TrialState.COMPLETE]
    assert n <= len(complete) <= n + 1  # a trial running elsewhere when the total is reached may still finish
    assert not [t for t in ts if t.state == TrialState.RUNNING]
    assert len({t.user_attrs["worker"] for t in complete}) == 2  # both workers did trials


def test_killed_worker_trial_is_failed_and_retried(pg_url: str, study_name: str, tmp_path: Path) -> None:
    victim = start_worker(pg_url, study_name, 1, 120.0, tmp_path / "victim.log")
    deadline = time.monotonic() + 90
    while not [t for t in trials(pg_url, study_name) if t.state == TrialState.RUNNING]:
        assert victim.poll() is None and time.monotonic() < deadline, (tmp_path / "victim.log").read_text()
        time.sleep(0.2)
    time.sleep(HEARTBEAT + 0.5)  # at least one heartbeat recorded
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(timeout=30)
    (killed,) = trials(pg_url, study_name)
    assert killed.state == TrialState.RUNNING  # nobody has noticed yet
    time.sleep(GRACE + 1.5)
    rescuer = start_worker(pg_url, study_name, 2, 0.05, tmp_path / "rescuer.log")
    assert rescuer.wait(timeout=120) == 0, (tmp_path / "rescuer.log").read_text()
    ts = trials(pg_url, study_name)
    assert not [t for t in ts if t.state == TrialState.RUNNING]
    assert ts[killed.number].state == TrialState.FAIL
    retried = [t for t in ts if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retried) == 1 and retried[0].state == TrialState.COMPLETE
    assert retried[0].params == killed.params
    assert sum(t.state == TrialState.COMPLETE for t in ts) == 2
