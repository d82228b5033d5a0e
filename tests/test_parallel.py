"""maprl.parallel.ordered_map: job order, per-worker state, failures."""

from __future__ import annotations

import os

import numpy as np
import pytest

from maprl.parallel import ordered_map


def _draw(state: int | None, job: int) -> tuple[int, float, int | None]:
    """A job with its own seeded generator (as every stage job must), and the state it saw."""
    return job, float(np.random.default_rng([7, job]).random()), state


def _pid(state: int | None, job: int) -> int:
    return os.getpid()


def _setup(base: int) -> int:
    return base + 1


def _fail_on_three(state: None, job: int) -> int:
    if job == 3:
        raise ValueError("job 3 is bad")
    return job


@pytest.mark.parametrize("workers", [1, 2])
def test_results_come_in_job_order_and_do_not_depend_on_workers(workers: int) -> None:
    jobs = [5, 1, 4, 2, 3]
    got = ordered_map(_draw, jobs, workers, local=41, setup=_setup, setup_args=(41,))
    assert [j for j, _, _ in got] == jobs
    assert [x for _, x, _ in got] == [float(np.random.default_rng([7, j]).random()) for j in jobs]
    assert {s for _, _, s in got} == {41 if workers == 1 else 42}  # here: the caller's state; there: the setup's


def test_one_worker_runs_here_and_two_run_elsewhere() -> None:
    assert set(ordered_map(_pid, [1, 2, 3], 1)) == {os.getpid()}
    assert os.getpid() not in set(ordered_map(_pid, [1, 2, 3, 4], 2))


@pytest.mark.parametrize("workers", [1, 2])
def test_a_failing_job_raises_its_own_error(workers: int) -> None:
    with pytest.raises(ValueError, match="job 3 is bad"):
        ordered_map(_fail_on_three, [1, 2, 3, 4], workers)


def test_workers_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        ordered_map(_draw, [1], 0)
