"""The ``tune`` stage: an Optuna study over PPO hyperparameters, resumable and shareable by workers.

* :class:`AnnealSampler` is a seeded simulated-annealing sampler (``tune.sampler: anneal``);
  ``tpe``, ``random`` and ``cmaes`` are Optuna's own (:func:`make_sampler`).
* :func:`objective` trains PPO for ``tune.timesteps`` with the trial's hyperparameters, reports the
  validation metric ``tune.n_evaluations`` times (MedianPruner may stop it) and returns the last.
  A diverging run (NaN in the policy, a non-finite metric) is pruned, not a crash.
* :func:`run_tune` creates or resumes the study in ``tune.storage`` and runs only the trials still
  missing to reach ``tune.n_trials`` finished (complete + pruned) ones, then writes
  ``models/best_hparams.yaml``, ``metrics/tune.json``, ``data/tune/trials.csv`` and ``tune.png``.
* :func:`run_worker` joins the same study from another process or machine (``maprl tune-worker``).

Storage: a journal file (the default, ``data/tune/study.journal``) for one machine, a
``postgresql://`` URL for several. Only database storages have heartbeats: a trial whose worker
died is failed after ``tune.grace_period`` seconds and re-queued (at most ``tune.max_retry`` times)
when any worker starts its next trial. Journal files have no heartbeat; instead, when a run starts,
RUNNING trials left by a dead process *of this host* are failed and re-queued the same way.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import socket
import warnings
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import yaml
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.samplers import BaseSampler, RandomSampler
from optuna.storages import BaseStorage
from optuna.storages.journal import JournalFileBackend
from optuna.study import Study, StudyDirection
from optuna.trial import BaseTrial, FrozenTrial, TrialState
from stable_baselines3.common.callbacks import BaseCallback

from maprl.config import HPARAM_KEYS, INT_HPARAMS, Params, agent_variant
from maprl.errors import InputError, ParamsError
from maprl.io import atomic_path, write_json
from maprl.learn.training import build_model, make_train_env
from maprl.nav.runtime import Runtime, data_fingerprint, load_runtime

POW2_KEYS = ("n_steps", "batch_size")  # a low/high range is sampled as the exponent, trial param ``log2_<name>``
ALIASES = {"one_minus_gamma": "gamma"}  # trial param -> hyperparameter (gamma = 1 - x)
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)  # what counts towards tune.n_trials
WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"


# -- the annealing sampler -------------------------------------------------------------------------
def _to_unit(dist: FloatDistribution | IntDistribution, value: float) -> float:
    lo, hi, v = float(dist.low), float(dist.high), float(value)
    if dist.log:
        lo, hi, v = math.log(lo), math.log(hi), math.log(v)
    return 0.5 if hi <= lo else (v - lo) / (hi - lo)


def _from_unit(dist: FloatDistribution | IntDistribution, u: float) -> float | int:
    lo, hi = float(dist.low), float(dist.high)
    x = math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo))) if dist.log else lo + u * (hi - lo)
    step = dist.step
    if step is not None:
        x = lo + round((x - lo) / step) * step
    x = min(max(x, lo), hi)
    return int(round(x)) if isinstance(dist, IntDistribution) else float(x)


def _reflect(u: float) -> float:
    """Fold any real number into [0, 1] by reflecting at the bounds."""
    u = abs(u) % 2.0
    return 2.0 - u if u > 1.0 else u


def _numeric(choices: Sequence[Any]) -> bool:
    return all(isinstance(c, int | float) and not isinstance(c, bool) for c in choices)


class AnnealSampler(BaseSampler):
    """Seeded simulated annealing over the intersection search space of the complete trials.

    The chain is replayed from the study at every trial: the first COMPLETE trial (in trial-number
    order) is the initial state; each later one replaces the state if it is better, or else with the
    Metropolis probability ``exp(-worsening / (scale * T))``, where ``scale`` is the standard
    deviation of the complete values so far and the uniform draw comes from ``(seed, index)``; a
    trial's index (:meth:`chain_index`) is its number minus the failed trials before it, so a trial
    re-run after its process was killed draws what the killed one would have. So
    the state depends only on the history and the seed: the same seed gives the same sequence on a
    sequential study, a resumed study continues the same chain, and parallel workers (which see
    RUNNING trials, ignored here) never crash or collide. PRUNED trials count as rejected proposals:
    their partial values are never compared with final ones. FAIL and WAITING trials are ignored.

    A proposal perturbs every parameter of the state in [0, 1]-normalised space (log space for
    ``log`` distributions) by a Gaussian step reflected at the bounds, rounded onto the ``step`` grid
    for ints and stepped floats; numeric categoricals (powers of two) move along their sorted
    choices the same way; other categoricals are re-drawn with a probability. Temperature, step and
    re-draw probability shrink from their start to their end value over ``n_trials`` trials (100 if
    not given). Until ``n_startup_trials`` trials are complete, and for parameters new to the
    space, values are drawn uniformly by a :class:`~optuna.samplers.RandomSampler` seeded from
    ``(seed, index, name)``.
    """

    def __init__(
        self,
        seed: int | None = None,
        n_trials: int | None = None,
        *,
        temperature: tuple[float, float] = (1.0, 0.02),
        step: tuple[float, float] = (0.3, 0.05),
        redraw: tuple[float, float] = (0.5, 0.1),
        n_startup_trials: int = 1,
    ) -> None:
        self._seed = int(np.random.SeedSequence().entropy % 2**32) if seed is None else int(seed)  # type: ignore[operator]
        self._horizon = max(1, n_trials or 100)
        self._temperature, self._step, self._redraw = temperature, step, redraw
        self._n_startup = max(1, n_startup_trials)

    # schedule and seeded draws
    def _progress(self, number: int) -> float:
        return min(1.0, number / self._horizon)

    def _anneal(self, pair: tuple[float, float], number: int, geometric: bool = False) -> float:
        start, end = pair
        p = self._progress(number)
        return start * (end / start) ** p if geometric else start + (end - start) * p

    def _rng(self, number: int, tag: str) -> np.random.Generator:
        return np.random.default_rng([self._seed, number, zlib.crc32(tag.encode())])

    @staticmethod
    def chain_index(study: Study, number: int) -> int:
        """A trial's place in the chain: the trials before it that did not fail.

        A trial re-run after its process died takes the place of the failed one, so a study killed
        mid-trial and resumed draws exactly what an uninterrupted study draws.
        """
        return sum(t.number < number and t.state != TrialState.FAIL for t in study.get_trials(deepcopy=False))

    def reseed_rng(self) -> None:
        self._seed = int(np.random.SeedSequence().entropy % 2**32)  # type: ignore[operator]

    # the chain
    def current_state(self, study: Study) -> FrozenTrial | None:
        """The chain's state: replay Metropolis acceptance over the COMPLETE trials (None before startup)."""
        trials = [
            t
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.value is not None and math.isfinite(t.value)
        ]
        trials.sort(key=lambda t: t.number)
        if len(trials) < self._n_startup:
            return None
        sign = 1.0 if study.direction == StudyDirection.MAXIMIZE else -1.0
        state, seen = trials[0], [float(trials[0].value)]  # type: ignore[arg-type]
        for t in trials[1:]:
            seen.append(float(t.value))  # type: ignore[arg-type]
            gain = sign * (seen[-1] - float(state.value))  # type: ignore[arg-type]
            scale = float(np.std(seen)) or 1.0
            index = self.chain_index(study, t.number)
            temperature = self._anneal(self._temperature, index, geometric=True)
            if gain >= 0 or self._rng(index, "accept").random() < math.exp(gain / (scale * temperature)):
                state = t
        return state

    # BaseSampler interface
    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        space = optuna.search_space.intersection_search_space(study.get_trials(deepcopy=False))
        return {name: d for name, d in space.items() if not d.single()}

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        if not search_space:
            return {}
        self._raise_error_if_multi_objective(study)
        state = self.current_state(study)
        if state is None:
            return {}
        index = self.chain_index(study, trial.number)
        rng = self._rng(index, "propose")
        return {
            name: self._neighbour(rng, dist, state.params[name], index)
            for name, dist in sorted(search_space.items())
            if name in state.params
        }

    def sample_independent(
        self, study: Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        index = self.chain_index(study, trial.number)
        seed = int(self._rng(index, f"independent:{param_name}").integers(2**32))
        return RandomSampler(seed=seed).sample_independent(study, trial, param_name, param_distribution)

    # proposals
    def _neighbour(self, rng: np.random.Generator, dist: BaseDistribution, value: Any, number: int) -> Any:
        sigma = self._anneal(self._step, number)
        if isinstance(dist, CategoricalDistribution):
            return self._move_categorical(rng, dist, value, sigma, number)
        assert isinstance(dist, FloatDistribution | IntDistribution)
        return _from_unit(dist, _reflect(_to_unit(dist, value) + sigma * rng.normal()))

    def _move_categorical(
        self, rng: np.random.Generator, dist: CategoricalDistribution, value: Any, sigma: float, number: int
    ) -> Any:
        choices: list[Any] = list(dist.choices)
        if len(choices) < 2:
            return value
        if _numeric(choices):  # ordinal: move along the sorted choices
            order = sorted(choices)
            u = _reflect(order.index(value) / (len(order) - 1) + sigma * rng.normal())
            return order[int(round(u * (len(order) - 1)))]
        if rng.random() < self._anneal(self._redraw, number):
            others = [c for c in choices if c != value]
            return others[int(rng.integers(len(others)))]
        return value


def make_sampler(name: str, seed: int | None, n_trials: int | None = None) -> BaseSampler:
    """The sampler for ``tune.sampler``, seeded (``None``: a fresh random seed, as for extra workers)."""
    if name == "anneal":
        return AnnealSampler(seed=seed, n_trials=n_trials)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if name == "random":
        return RandomSampler(seed=seed)
    if name == "cmaes":
        import importlib.util

        if importlib.util.find_spec("cmaes") is None:
            raise ParamsError("tune.sampler: cmaes needs the cmaes package: pip install cmaes (or use anneal or tpe)")
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    raise ParamsError(f"tune.sampler: unknown sampler {name!r}; use anneal, tpe, random or cmaes")


# -- storage ---------------------------------------------------------------------------------------
def is_journal(url_or_path: str) -> bool:
    """A storage given as a plain path is a journal file; anything with ``://`` is a database URL."""
    return "://" not in url_or_path


def redact(url_or_path: str) -> str:
    """The storage with any password hidden, for messages."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url_or_path)


def driver_url(url: str) -> str:
    """``postgresql://`` with the driver that is installed: SQLAlchemy 2.1 defaults to psycopg 3, the
    project ships psycopg2-binary."""
    import importlib.util

    find = importlib.util.find_spec
    if url.startswith("postgresql://") and find("psycopg") is None and find("psycopg2") is not None:
        return "postgresql+psycopg2://" + url.removeprefix("postgresql://")
    return url


def make_storage(
    url_or_path: str, *, heartbeat_interval: int | None = None, grace_period: int | None = None, max_retry: int = 2
) -> BaseStorage:
    """A journal file storage for a path; an RDB storage (heartbeat + retry of dead workers' trials) for a URL.

    Journal storage has no heartbeat (``heartbeat_interval`` is ignored there).
    """
    if is_journal(url_or_path):
        path = Path(url_or_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    if url_or_path.startswith("sqlite:///"):
        Path(url_or_path.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry) if heartbeat_interval else None
        try:
            return optuna.storages.RDBStorage(
                driver_url(url_or_path),
                engine_kwargs={"pool_pre_ping": True} if not url_or_path.startswith("sqlite") else None,
                heartbeat_interval=heartbeat_interval,
                grace_period=grace_period,
                heartbeat_stale_trial_callback=retry,
            )
        except Exception as err:  # sqlalchemy's OperationalError and friends: say which storage, no password
            raise InputError(f"cannot open tune.storage {redact(url_or_path)}: {err}") from None


def storage_for(params: Params, url_or_path: str | None = None) -> BaseStorage:
    """:func:`make_storage` with the heartbeat settings of ``params.tune``."""
    t = params.tune
    return make_storage(
        url_or_path or t.storage,
        heartbeat_interval=t.heartbeat_interval,
        grace_period=t.grace_period,
        max_retry=t.max_retry,
    )


# -- search space ----------------------------------------------------------------------------------
def space_distributions(space: dict[str, dict[str, Any]]) -> dict[str, BaseDistribution]:
    """Optuna distributions, keyed by trial parameter name, for a (validated) ``tune.space``."""
    dists: dict[str, BaseDistribution] = {}
    for name, spec in space.items():
        low: Any = spec.get("low")
        high: Any = spec.get("high")
        step: Any = spec.get("step")
        log = bool(spec.get("log", False))
        if "choices" in spec:
            dists[name] = CategoricalDistribution(tuple(spec["choices"]))
        elif name in POW2_KEYS:
            dists[f"log2_{name}"] = IntDistribution(int(low).bit_length() - 1, int(high).bit_length() - 1)
        elif name in INT_HPARAMS:
            dists[name] = IntDistribution(int(low), int(high), log=log, step=int(step or 1))
        else:
            dists[name] = FloatDistribution(
                float(low), float(high), log=log, step=None if step is None else float(step)
            )
    return dists


def hparams_from_params(trial_params: dict[str, Any]) -> dict[str, Any]:
    """Trial parameters (``log2_n_steps``, ``one_minus_gamma``, ...) -> ``config.HPARAM_KEYS`` values."""
    out: dict[str, Any] = {}
    for name, value in trial_params.items():
        if name.startswith("log2_") and name[5:] in POW2_KEYS:
            out[name[5:]] = 2 ** int(value)
        elif name in ALIASES:
            out[ALIASES[name]] = 1.0 - float(value)
        elif name in INT_HPARAMS:
            out[name] = int(value)
        elif name in HPARAM_KEYS:
            out[name] = float(value)
        else:
            raise ValueError(f"trial parameter {name!r} is not a hyperparameter of config.HPARAM_KEYS")
    return {k: out[k] for k in HPARAM_KEYS if k in out}


def suggest_hparams(trial: BaseTrial, space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Suggest every parameter of ``space``; return them as ``config.HPARAM_KEYS`` values."""
    values: dict[str, Any] = {}
    for name, dist in space_distributions(space).items():
        if isinstance(dist, CategoricalDistribution):
            values[name] = trial.suggest_categorical(name, dist.choices)
        elif isinstance(dist, IntDistribution):
            values[name] = trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
        else:
            assert isinstance(dist, FloatDistribution)
            values[name] = trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)
    return hparams_from_params(values)


# -- the objective ---------------------------------------------------------------------------------
def report(trial: optuna.Trial, value: Any, step: int, prune: bool = True) -> float:
    """Report an intermediate value; a non-finite one or the pruner's verdict raises ``TrialPruned``."""
    if value is None or not math.isfinite(float(value)):
        raise optuna.TrialPruned(f"non-finite validation value {value!r} at report {step}")
    trial.report(float(value), step)
    if prune and trial.should_prune():
        raise optuna.TrialPruned(f"pruned at report {step} (value {float(value):.4g})")
    return float(value)


class TrialEval(BaseCallback):
    """Every ``every`` timesteps (at most ``n_reports`` times) report ``score(model)`` to the trial."""

    def __init__(self, trial: optuna.Trial, score: Callable[[Any], Any], every: int, n_reports: int) -> None:
        super().__init__()
        self.trial, self.score, self.every, self.n_reports = trial, score, every, n_reports
        self.reports = 0

    def _on_step(self) -> bool:
        if self.reports < self.n_reports and self.num_timesteps >= (self.reports + 1) * self.every:
            report(self.trial, self.score(self.model), self.reports)
            self.reports += 1
        return True


_DIVERGED = re.compile(r"\bnan\b|\binf\b|invalid values|non-finite", re.IGNORECASE)


def _train_and_score(trial: optuna.Trial, params: Params, rt: Runtime, hparams: dict[str, Any]) -> float:
    from stable_baselines3.common.vec_env import VecMonitor

    from maprl.eval.evaluate import evaluate_model
    from maprl.features.nets import configure_torch
    from maprl.nav.runtime import nav_config

    t, seed = params.tune, params.base.seed
    configure_torch(params.train.torch_threads)
    cfg = nav_config(params, rt, max_steps=params.evaluate.max_steps, shaping=0.0)

    def score(model: Any) -> Any:
        return evaluate_model(model, rt, cfg, "val", t.eval_episodes, seed)[t.objective]

    venv = VecMonitor(make_train_env(params, rt, "train", t.n_envs or params.train.n_envs, seed, hparams))
    try:
        model = build_model(params.train, venv, seed, hparams)
        every = max(1, t.timesteps // t.n_evaluations)
        model.learn(t.timesteps, callback=TrialEval(trial, score, every, t.n_evaluations - 1))
        trial.set_user_attr("timesteps", int(model.num_timesteps))
        return report(trial, score(model), t.n_evaluations - 1, prune=False)
    finally:
        venv.close()


def objective(trial: optuna.Trial, params: Params, rt: Runtime) -> float:
    """Train PPO with the trial's hyperparameters; return the validation ``tune.objective`` (pruned if it diverges)."""
    hparams = suggest_hparams(trial, params.tune.space)
    trial.set_user_attr("hparams", hparams)
    try:
        return _train_and_score(trial, params, rt, hparams)
    except (ValueError, FloatingPointError) as err:
        if not _DIVERGED.search(str(err)):
            raise
        raise optuna.TrialPruned(f"diverged: {str(err)[:200]}") from err


# -- study -----------------------------------------------------------------------------------------
def study_settings(params: Params, rt: Runtime | None = None) -> dict[str, Any]:
    """What trial values depend on; a resumed or joined study must have been made with the same."""
    t, tr = params.tune, params.train
    tuned = {ALIASES.get(name, name) for name in t.space}
    fixed = {k: getattr(tr, k) for k in HPARAM_KEYS if k not in tuned}
    settings: dict[str, Any] = {
        "tune": t.model_dump(include={"objective", "timesteps", "eval_episodes", "n_evaluations", "space"}),
        "n_envs": t.n_envs or tr.n_envs,
        "seed": params.base.seed,
        "train": {**tr.model_dump(include={"algo", "max_steps", "shaping", "lr_schedule"}), **fixed},
        "env": params.env.model_dump(),
        "agent": params.agent.model_dump(),
        "evaluate": params.evaluate.model_dump(include={"max_steps", "success_radius"}),
        "view_size": params.tile.view_size,
    }
    if rt is not None:
        settings["data"] = data_fingerprint(rt)
    return json.loads(json.dumps(settings))


def study_key(settings: dict[str, Any]) -> str:
    """A short hash of the study settings: studies made with other data or settings get other names."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]


def _check_settings(study: Study, settings: dict[str, Any], where: str) -> None:
    old = study.user_attrs.get("maprl_settings")
    if old is None:
        study.set_user_attr("maprl_settings", settings)
        return
    differ = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
    if differ:
        raise ParamsError(
            f"study {study.study_name!r} in {where} was made with other settings "
            f"(they differ in: {', '.join(differ)}); "
            "its trials are not comparable. Set tune.study_name to a new name, or delete the old study "
            f"(remove the journal file, or `optuna delete-study --storage URL --study-name {study.study_name}`)"
        )


def open_study(
    storage: BaseStorage | str,
    study_name: str,
    sampler: BaseSampler | None = None,
    pruner: optuna.pruners.BasePruner | None = None,
    settings: dict[str, Any] | None = None,
) -> Study:
    """Create the study, or load it if it exists (``load_if_exists``); check its settings match."""
    store = make_storage(storage) if isinstance(storage, str) else storage
    study = optuna.create_study(
        storage=store, study_name=study_name, sampler=sampler, pruner=pruner, direction="maximize", load_if_exists=True
    )
    if settings is not None:
        _check_settings(study, settings, redact(storage) if isinstance(storage, str) else "the storage")
    return study


def study_for(
    params: Params,
    rt: Runtime | None,
    seed: int | None,
    storage: str | None = None,
    study_name: str | None = None,
) -> Study:
    """The study of ``params.tune`` (or the given storage and name) with its sampler and MedianPruner."""
    t = params.tune
    pruner = optuna.pruners.MedianPruner(n_startup_trials=t.pruner_startup_trials, n_warmup_steps=t.pruner_warmup_steps)
    url = storage or t.storage
    sampler = make_sampler(t.sampler, seed, t.n_trials)
    settings = study_settings(params, rt)
    name = f"{study_name or t.study_name}-{study_key(settings)}"
    study = open_study(storage_for(params, url), name, sampler, pruner)
    _check_settings(study, settings, redact(url))
    return study


def count_finished(study: Study) -> int:
    """Trials that count towards ``tune.n_trials``: COMPLETE and PRUNED."""
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid != os.getpid()


def reap_orphans(study: Study, max_retry: int) -> list[int]:
    """Fail RUNNING trials left by a dead process of this host and re-queue them (for journal storage).

    Returns the failed trial numbers. Only for storages without heartbeat: a database storage
    does this itself (``fail_stale_trials``) for every host.
    """
    host = socket.gethostname()
    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = str(t.user_attrs.get("worker", ""))
        name, _, pid = owner.rpartition(":")
        if name != host or not pid.isdigit() or _pid_alive(int(pid)):
            continue
        try:
            study.tell(t.number, state=TrialState.FAIL)
        except (RuntimeError, ValueError):  # finished meanwhile by someone else
            continue
        failed.append(t.number)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry)(study, study.trials[t.number])
    return failed


def _trial_line(t: FrozenTrial) -> str:
    value = "-" if t.value is None else f"{t.value:.4f}"
    if t.state == TrialState.PRUNED and t.intermediate_values:
        value = f"{t.intermediate_values[max(t.intermediate_values)]:.4f} (last report)"
    shown = {k: float(f"{v:.3g}") if isinstance(v, float) else v for k, v in t.params.items()}
    return f"trial {t.number:>3} {t.state.name:<8} value={value} params={shown}"


def optimize_study(
    study: Study,
    func: Callable[[optuna.Trial], float],
    n_trials: int,
    *,
    progress: bool = True,
    reap: bool = False,
    max_retry: int = 2,
    catch: tuple[type[Exception], ...] = (),
) -> int:
    """Run only the trials still missing for ``n_trials`` finished (COMPLETE + PRUNED) ones; return how many ran.

    Other workers may finish trials meanwhile: ``MaxTrialsCallback`` stops this one as soon as the
    study has enough (trials already running elsewhere may still finish, so the total can overshoot
    by at most the number of other workers). ``reap``: first fail and re-queue RUNNING trials of dead
    local processes (journal storage, no heartbeat).
    """
    from tqdm import tqdm

    if reap:
        for number in reap_orphans(study, max_retry):
            tqdm.write(f"trial {number:>3} FAIL     its process died; re-queued")
    missing = n_trials - count_finished(study)
    if missing <= 0:
        return 0
    ran = 0
    with tqdm(total=missing, desc=f"tune {study.study_name}", unit="trial", disable=not progress) as bar:

        def after(study: Study, t: FrozenTrial) -> None:
            nonlocal ran
            ran += 1
            bar.update(1)
            tqdm.write(_trial_line(t))

        def wrapped(trial: optuna.Trial) -> float:
            trial.set_user_attr("worker", WORKER_ID)
            return func(trial)

        stop = optuna.study.MaxTrialsCallback(n_trials, states=FINISHED)
        study.optimize(wrapped, n_trials=missing, callbacks=[after, stop], catch=catch, gc_after_trial=True)
    return ran


# -- stage entry points ----------------------------------------------------------------------------
def run_tune(
    params: Params,
    rt: Runtime,
    out_dir: str | Path,
    best_path: str | Path,
    metrics_path: str | Path,
) -> dict[str, Any]:
    """Run or resume the study up to ``tune.n_trials`` finished trials; write best hparams, metrics, CSV, plot."""
    t = params.tune
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = study_for(params, rt, params.base.seed)
    print(f"study {study.study_name!r} in {redact(t.storage)}: {count_finished(study)}/{t.n_trials} trials finished")
    optimize_study(
        study, lambda trial: objective(trial, params, rt), t.n_trials, reap=is_journal(t.storage), max_retry=t.max_retry
    )
    return write_results(study, params, out_dir, best_path, metrics_path)


def run_tune_stage(
    params: Params,
    map_path: str | Path,
    targets_path: str | Path,
    features_dir: str | Path,
    out_dir: str | Path,
    best_path: str | Path,
    metrics_path: str | Path,
) -> dict[str, Any]:
    """The tune stage: load the map, targets and features, then :func:`run_tune` (for the ``memory``
    agent: unperturbed photos; the tuned hyperparameters serve the randomized agent too)."""
    params = agent_variant(params, "memory")
    rt = load_runtime(params, map_path, targets_path, features_dir)
    return run_tune(params, rt, out_dir, best_path, metrics_path)


def run_worker(
    storage: str,
    study_name: str,
    params: Params,
    rt: Runtime,
    n_trials: int | None = None,
    seed: int | None = None,
) -> int:
    """Join study ``study_name`` in ``storage`` and run trials until it has ``n_trials`` (default
    ``tune.n_trials``) finished ones; return how many this worker ran. Writes no outputs: the
    ``tune`` stage does, once all trials are in. ``seed`` None: a fresh sampler seed per worker."""
    t = params.tune
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = study_for(params, rt, seed, storage=storage, study_name=study_name)
    target = n_trials or t.n_trials
    print(f"worker {WORKER_ID} joins study {study_name!r} in {redact(storage)}: {count_finished(study)}/{target}")
    return optimize_study(
        study, lambda trial: objective(trial, params, rt), target, reap=is_journal(storage), max_retry=t.max_retry
    )


# -- outputs ---------------------------------------------------------------------------------------
def best_hparams(study: Study) -> tuple[FrozenTrial | None, dict[str, Any]]:
    """The best COMPLETE trial and its hyperparameters in ``config.HPARAM_KEYS`` names (None, {} if none)."""
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return None, {}
    best = study.best_trial
    stored = best.user_attrs.get("hparams")
    return best, dict(stored) if isinstance(stored, dict) else hparams_from_params(best.params)


def write_best_hparams(path: str | Path, hparams: dict[str, Any], header: Sequence[str]) -> None:
    """YAML with a comment header, written atomically."""
    body = yaml.safe_dump(hparams, sort_keys=False) if hparams else "{}\n"
    text = "".join(f"# {line}\n" for line in header) + body
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def tune_metrics(study: Study, params: Params) -> dict[str, Any]:
    """Counts by state and the best trial, for ``metrics/tune.json``."""
    trials = study.get_trials(deepcopy=False)
    count = {s: sum(t.state == s for t in trials) for s in TrialState}
    best, hparams = best_hparams(study)
    return {
        "study_name": study.study_name,
        "objective": params.tune.objective,
        "sampler": params.tune.sampler,
        "n_trials": len(trials),
        "n_complete": count[TrialState.COMPLETE],
        "n_pruned": count[TrialState.PRUNED],
        "n_failed": count[TrialState.FAIL],
        "n_running": count[TrialState.RUNNING],
        "best_trial": None if best is None else best.number,
        "best_value": None if best is None else best.value,
        "best_params": hparams,
    }


def write_results(
    study: Study, params: Params, out_dir: str | Path, best_path: str | Path, metrics_path: str | Path
) -> dict[str, Any]:
    """Write ``best_hparams.yaml``, ``tune.json``, ``trials.csv`` and ``tune.png``; return the metrics."""
    metrics = tune_metrics(study, params)
    if metrics["best_trial"] is None:
        header = [f"maprl tune: no trial of study {study.study_name!r} completed; train keeps its train.* values"]
        print(header[0])
    else:
        header = [
            f"maprl tune: best trial {metrics['best_trial']} of study {study.study_name!r}, "
            f"val {metrics['objective']} = {metrics['best_value']:.4f} "
            f"({metrics['n_complete']} complete, {metrics['n_pruned']} pruned, {metrics['n_failed']} failed)",
            "read by train when train.hparams is tuned; a key missing here keeps its train.* value",
        ]
    write_best_hparams(best_path, metrics["best_params"], header)
    write_json(metrics_path, metrics)
    out = Path(out_dir)
    with atomic_path(out / "trials.csv") as tmp:
        study.trials_dataframe().to_csv(tmp, index=False)
    plot_study(study, out / "tune.png", params.tune.objective)
    return metrics


def _importances(study: Study) -> tuple[dict[str, float], str]:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 2:
        return {}, f"parameter importances need >= 2 complete trials ({len(complete)} so far)"
    try:
        return dict(optuna.importance.get_param_importances(study)), ""
    except Exception as err:  # importance is a nicety: never fail the stage over it
        return {}, f"parameter importances unavailable: {err}"


def plot_study(study: Study, path: str | Path, objective_name: str) -> None:
    """Objective per trial (pruned ones marked at their last report) and parameter importances."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    _plot_values(ax, study, objective_name)
    imp, note = _importances(study)
    if imp:
        names = list(imp)[::-1]
        bx.barh(names, [imp[n] for n in names], color="tab:blue")
        bx.set_xlabel("importance (PED-ANOVA)")
    else:
        bx.text(0.5, 0.5, note, ha="center", va="center", wrap=True, fontsize=9)
        bx.set_axis_off()
    bx.set_title("parameter importances")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def _plot_values(ax: Any, study: Study, objective_name: str) -> None:
    trials = study.get_trials(deepcopy=False)
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    pruned = [t for t in trials if t.state == TrialState.PRUNED and t.intermediate_values]
    ax.plot([t.number for t in done], [t.value for t in done], "o", color="tab:blue", label="complete")
    ax.plot(
        [t.number for t in pruned],
        [t.intermediate_values[max(t.intermediate_values)] for t in pruned],
        "x",
        color="tab:red",
        label="pruned (last report)",
    )
    if done:
        best = np.maximum.accumulate([float(t.value) for t in done])  # type: ignore[arg-type]
        ax.step([t.number for t in done], best, where="post", color="tab:green", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(f"val {objective_name}")
    ax.set_title(f"study {study.study_name}")
    ax.legend(loc="best", fontsize=8)
