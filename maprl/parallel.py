"""Independent jobs spread over worker processes, results in job order.

The stages run many jobs that share nothing but read-only inputs (a robustness cell, a training
seed of the grid protocol). :func:`ordered_map` runs them in ``workers`` processes started with
``spawn`` (torch's thread pools do not survive ``fork``) and returns the results in the order of
the jobs, so a stage's outputs do not depend on how many workers ran it or which finished first.
Each job must draw its randomness from its own seeded generator, never from a shared one.

Heavy read-only state (a loaded map, its feature cache, the policies) is built once per worker
by ``setup(*setup_args)`` and passed to every job as its first argument; with one worker the
caller's own ``local`` state is used and nothing is started.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any, TypeVar

from tqdm.auto import tqdm

J = TypeVar("J")
R = TypeVar("R")

_STATE: Any = None  # a worker's state, built once by its setup


def _start(setup: Callable[..., Any] | None, args: tuple[Any, ...]) -> None:
    global _STATE
    _STATE = setup(*args) if setup is not None else None


def _run(fn: Callable[[Any, Any], Any], job: Any) -> Any:
    return fn(_STATE, job)


def ordered_map(
    fn: Callable[[Any, J], R],
    jobs: Sequence[J],
    workers: int,
    local: Any = None,
    setup: Callable[..., Any] | None = None,
    setup_args: tuple[Any, ...] = (),
    desc: str = "",
    unit: str = "job",
) -> list[R]:
    """``[fn(state, job) for job in jobs]``, spread over ``workers`` processes, with a progress bar.

    ``fn`` and ``setup`` must be module-level functions (they are pickled by name). In a worker,
    ``state`` is ``setup(*setup_args)`` (``None`` without ``setup``); with ``workers`` 1, or one job,
    the jobs run here with ``state = local``. An exception in a job is raised here, as itself.
    """
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if workers == 1 or len(jobs) <= 1:
        return [fn(local, job) for job in tqdm(jobs, desc=desc, unit=unit, leave=False)]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        max_workers=min(workers, len(jobs)),
        mp_context=context,
        initializer=_start,
        initargs=(setup, setup_args),
    ) as pool:
        futures = [pool.submit(_run, fn, job) for job in jobs]
        try:
            for done in tqdm(as_completed(futures), total=len(futures), desc=desc, unit=unit, leave=False):
                done.result()  # the first failure stops the rest
        except BaseException:
            for f in futures:
                f.cancel()
            raise
        return [f.result() for f in futures]
