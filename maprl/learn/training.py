"""The ``train`` stage: PPO (or recurrent PPO) on the batched feature env.

Readable on purpose: :func:`build_model` makes the algorithm from ``params.train``,
:func:`train` wires the vector env, callbacks (periodic evaluation on the validation part of
the train split and on the test split, checkpoints, dvclive) and resume; :func:`run_train` is
the stage, with every path given by ``dvc.yaml``.

Callbacks fire on SB3's own timestep trigger (:class:`~stable_baselines3.common.callbacks.EveryNTimesteps`),
aligned to multiples of their period, so a resumed run evaluates and saves at the same
timesteps as an uninterrupted one, and its evaluation history continues where it stopped.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback, CallbackList, EveryNTimesteps
from stable_baselines3.common.logger import KVWriter, Logger, make_output_format
from stable_baselines3.common.vec_env import VecMonitor

from maprl.config import HPARAM_KEYS, INT_HPARAMS, Params, TrainParams, agent_variant
from maprl.errors import InputError, ParamsError
from maprl.eval.agents import algo_class, load_policy
from maprl.eval.evaluate import evaluate_model
from maprl.io import atomic_path, write_json
from maprl.learn.policies import MapRLNetwork, MapRLPolicy
from maprl.nav.runtime import Runtime, load_runtime, nav_config
from maprl.nav.vecenv import NavVecEnv


class DVCLiveWriter(KVWriter):
    """SB3 logger output that forwards scalars to a dvclive ``Live`` (one step per dump)."""

    def __init__(self, live: Any) -> None:
        self.live = live

    def write(self, key_values: dict[str, Any], key_excluded: dict[str, Any], step: int = 0) -> None:
        for key, value in key_values.items():
            if isinstance(value, int | float | np.floating | np.integer) and not isinstance(value, bool):
                self.live.log_metric(key, float(value))
        self.live.next_step()

    def close(self) -> None:
        self.live.end()


def lr_schedule(learning_rate: float, kind: str) -> Any:
    """A linear decay to zero (SB3 passes progress_remaining from 1 to 0, and a little below 0
    on the last update, hence the clamp), or a constant."""
    lr = learning_rate
    return (lambda progress: lr * max(0.0, progress)) if kind == "linear" else lr


def load_best_hparams(path: str | Path) -> dict[str, Any]:
    """The tuned hyperparameters for ``train.hparams: tuned``; keys missing keep their ``train`` value."""
    path = Path(path)
    if not path.exists():
        raise InputError(
            f"{path} does not exist, and train.hparams is tuned: run `dvc repro tune` first, "
            "or set train.hparams: params to train with the train.* values"
        )
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise InputError(f"{path} is not valid YAML: {err}") from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise InputError(f"{path} must be a mapping of hyperparameters, got {type(raw).__name__}")
    unknown = sorted(str(k) for k in set(raw) - set(HPARAM_KEYS))
    if unknown:
        raise InputError(f"{path}: unknown hyperparameter(s) {', '.join(unknown)}; allowed: {', '.join(HPARAM_KEYS)}")
    return {k: _hparam_value(path, k, raw[k]) for k in HPARAM_KEYS if k in raw}


def _hparam_value(path: Path, key: str, value: Any) -> int | float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InputError(f"{path}: {key} must be a finite number, got {value!r}")
    if key in INT_HPARAMS:
        if value != int(value) or value < 1:
            raise InputError(f"{path}: {key} must be a positive integer, got {value!r}")
        return int(value)
    return float(value)


def resolve_hparams(p: TrainParams, hparams: dict[str, Any] | None) -> dict[str, Any]:
    """The hyperparameters a run uses: ``train.*`` overridden by the tuned ones."""
    kw: dict[str, Any] = {k: getattr(p, k) for k in HPARAM_KEYS}
    kw.update(hparams or {})
    return kw


def build_model(p: TrainParams, venv: Any, seed: int, hparams: dict[str, Any] | None = None) -> BaseAlgorithm:
    """PPO or RecurrentPPO with MapRLNetwork features, hyperparameters from params (or tuned)."""
    kw = resolve_hparams(p, hparams)
    kw["learning_rate"] = lr_schedule(kw["learning_rate"], p.lr_schedule)
    kw["batch_size"] = min(kw["batch_size"], kw["n_steps"] * venv.num_envs)
    cls: Any = algo_class(p.algo)
    common = {"seed": seed, "tensorboard_log": _tensorboard_dir(p), "verbose": 0, "device": "cpu"}
    if p.algo == "recurrent_ppo":
        policy_kwargs = {"features_extractor_class": MapRLNetwork, "lstm_hidden_size": 64}
        return cls("MultiInputLstmPolicy", venv, policy_kwargs=policy_kwargs, **common, **kw)
    return cls(MapRLPolicy, venv, **common, **kw)


def _tensorboard_dir(p: TrainParams) -> str | None:
    if not p.tensorboard:
        return None
    try:
        import tensorboard  # noqa: F401
    except ImportError as err:
        raise ParamsError("train.tensorboard: true needs TensorBoard: pip install -e '.[tensorboard]'") from err
    return "dvclive/tensorboard"


class Every(EveryNTimesteps):
    """SB3's ``EveryNTimesteps``, aligned to multiples of ``n_steps`` when training starts or resumes."""

    def _on_training_start(self) -> None:
        super()._on_training_start()
        self.last_time_trigger = self.num_timesteps - self.num_timesteps % self.n_steps


class PeriodicEval(BaseCallback):
    """Evaluate on fixed episodes and log success / SPL per split (fired by :class:`Every`)."""

    def __init__(self, evaluators: dict[str, Any], history: list[dict[str, float]] | None = None) -> None:
        super().__init__()
        self.evaluators = evaluators
        self.history: list[dict[str, float]] = list(history or [])

    def _on_step(self) -> bool:
        row: dict[str, float] = {"timesteps": float(self.num_timesteps)}
        for split, evaluate in self.evaluators.items():
            summary = evaluate(self.model)
            for key in ("success_rate", "spl"):
                row[f"{split}/{key}"] = summary[key]
                self.logger.record(f"eval/{split}_{key}", summary[key])
        self.history.append(row)
        return True


class Checkpoint(BaseCallback):
    """Save the model and the evaluation history so far (atomically), for ``train.resume``."""

    def __init__(self, paths: RunPaths, periodic: PeriodicEval) -> None:
        super().__init__()
        self.paths, self.periodic = paths, periodic

    def _on_step(self) -> bool:
        save_model(self.model, self.paths.checkpoint)
        write_json(self.paths.checkpoint_history, self.periodic.history)
        return True


def save_model(model: BaseAlgorithm, path: Path) -> None:
    with atomic_path(path) as tmp:  # the temp name keeps the .zip suffix, so SB3 saves to it as is
        model.save(tmp)


@dataclass(frozen=True)
class RunPaths:
    """Where one training run writes (all given by ``dvc.yaml``)."""

    policy: Path
    checkpoints: Path
    history: Path
    metrics: Path
    live: Path

    @property
    def checkpoint(self) -> Path:
        return self.checkpoints / "checkpoint.zip"

    @property
    def checkpoint_history(self) -> Path:
        return self.checkpoints / "eval_history.json"


def make_train_env(
    params: Params, rt: Runtime, split: str, n_envs: int, seed: int, hparams: dict[str, Any] | None = None
) -> NavVecEnv:
    """The batched training env; the potential-based shaping uses the run's discount (tuned or ``train.gamma``)."""
    p = params.train
    gamma = float(resolve_hparams(p, hparams)["gamma"])
    cfg = nav_config(params, rt, max_steps=p.max_steps, shaping=p.shaping, gamma=gamma, decoy_rate=p.decoy_rate)
    return NavVecEnv(rt.scene, n_envs, cfg, split=split, memory=rt.memory, seed=seed)


def evaluators(params: Params, rt: Runtime) -> dict[str, Any]:
    """Periodic evaluation on fixed episodes of the ``val`` and ``test`` splits (no shaping)."""
    p = params.train
    cfg = nav_config(params, rt, max_steps=params.evaluate.max_steps, shaping=0.0)
    return {
        split: (lambda model, s=split: evaluate_model(model, rt, cfg, s, p.eval_episodes, params.base.seed))
        for split in ("val", "test")
    }


def _resume(p: TrainParams, paths: RunPaths, venv: Any) -> tuple[BaseAlgorithm | None, list[dict[str, float]]]:
    if not (p.resume and paths.checkpoint.exists()):
        return None, []
    model = load_policy(paths.checkpoint, p.algo, env=venv)
    history = json.loads(paths.checkpoint_history.read_text()) if paths.checkpoint_history.exists() else []
    return model, history


def train(params: Params, rt: Runtime, paths: RunPaths, hparams: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train the policy; write the policy, its evaluation history, metrics and dvclive curves."""
    from dvclive import Live

    p = params.train
    torch.set_num_threads(p.torch_threads)
    venv = VecMonitor(make_train_env(params, rt, "train", p.n_envs, params.base.seed, hparams))
    resumed, history = _resume(p, paths, venv)
    model = resumed or build_model(p, venv, params.base.seed, hparams)
    done = int(model.num_timesteps)
    live = Live(str(paths.live), dvcyaml=None, save_dvc_exp=False, resume=done > 0, report=None)
    model.set_logger(Logger(None, [DVCLiveWriter(live), make_output_format("csv", str(paths.live))]))
    periodic = PeriodicEval(evaluators(params, rt), history)
    callbacks: list[BaseCallback] = [
        Every(p.eval_freq, periodic),
        Every(p.checkpoint_freq, Checkpoint(paths, periodic)),
    ]
    t0 = time.perf_counter()
    model.learn(
        max(0, p.total_timesteps - done),
        callback=CallbackList(callbacks),
        reset_num_timesteps=done == 0,
        progress_bar=p.progress_bar,
    )
    seconds = time.perf_counter() - t0
    live.end()
    final = {split: fn(model) for split, fn in periodic.evaluators.items()}
    metrics = {
        "timesteps": int(model.num_timesteps),
        "resumed_from": done,
        "seconds": round(seconds, 1),
        "timesteps_per_second": round((model.num_timesteps - done) / max(seconds, 1e-9), 1),
        "algo": p.algo,
        "memory": params.agent.memory,
        "nav": params.agent.nav,
        "val": {k: final["val"][k] for k in ("success_rate", "spl")},
        "test": {k: final["test"][k] for k in ("success_rate", "spl")},
    }
    save_model(model, paths.policy)
    write_json(paths.history, periodic.history)
    write_json(paths.metrics, metrics)
    for stale in (paths.checkpoint, paths.checkpoint_history):
        stale.unlink(missing_ok=True)
    return metrics


def run_train(
    params: Params,
    agent: str,
    map_path: str | Path,
    targets_path: str | Path,
    features_dir: str | Path,
    best_path: str | Path | None,
    paths: RunPaths,
) -> dict[str, Any]:
    """The train stage for one agent (:data:`~maprl.config.AGENTS`); ``best_path`` holds the tuned
    hyperparameters used when ``train.hparams`` is ``tuned``."""
    params = agent_variant(params, agent)
    rt = load_runtime(params, map_path, targets_path, features_dir)
    hparams = None
    if params.train.hparams == "tuned":
        if best_path is None:
            raise ParamsError("train.hparams: tuned needs the tune stage's best hyperparameters (--best)")
        hparams = load_best_hparams(best_path)
    return train(params, rt, paths, hparams)
