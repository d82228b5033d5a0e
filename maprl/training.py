"""The ``train`` stage: PPO (or recurrent PPO) on the batched feature env.

Readable on purpose: :func:`build_model` makes the algorithm from ``params.train``,
:func:`run_train` wires the vector env, callbacks (periodic evaluation on the validation
part of the train split and on the test split, checkpoints, dvclive) and resume.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback, CallbackList
from stable_baselines3.common.logger import KVWriter, Logger, make_output_format
from stable_baselines3.common.vec_env import VecMonitor

from maprl.config import Params, TrainParams
from maprl.geo import atomic_path, write_json
from maprl.policies import MapRLNetwork, MapRLPolicy
from maprl.runtime import Runtime, nav_config
from maprl.vecenv import NavVecEnv

HPARAM_KEYS = (
    "learning_rate", "n_steps", "batch_size", "n_epochs", "gamma", "gae_lambda",
    "clip_range", "ent_coef", "vf_coef", "max_grad_norm",
)  # fmt: skip


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


def lr_schedule(p: TrainParams) -> Any:
    """A linear decay to zero (SB3 passes progress_remaining from 1 to 0), or a constant."""
    lr = p.learning_rate
    return (lambda progress: lr * progress) if p.lr_schedule == "linear" else lr


def build_model(p: TrainParams, venv: Any, seed: int, hparams: dict[str, Any] | None = None) -> BaseAlgorithm:
    """PPO or RecurrentPPO with MapRLNetwork features, hyperparameters from params (or tuned)."""
    kw: dict[str, Any] = {k: getattr(p, k) for k in HPARAM_KEYS}
    kw.update(hparams or {})
    kw["learning_rate"] = lr_schedule(p.model_copy(update={"learning_rate": kw["learning_rate"]}))
    kw["batch_size"] = min(kw["batch_size"], kw["n_steps"] * venv.num_envs)
    tb = _tensorboard_dir(p)
    if p.algo == "recurrent_ppo":
        from sb3_contrib import RecurrentPPO

        policy_kwargs = {"features_extractor_class": MapRLNetwork, "lstm_hidden_size": 64}
        return RecurrentPPO("MultiInputLstmPolicy", venv, seed=seed, policy_kwargs=policy_kwargs,
                            tensorboard_log=tb, verbose=0, **kw)  # fmt: skip
    return PPO(MapRLPolicy, venv, seed=seed, tensorboard_log=tb, verbose=0, **kw)


def _tensorboard_dir(p: TrainParams) -> str | None:
    if not p.tensorboard:
        return None
    try:
        import tensorboard  # noqa: F401
    except ImportError as err:
        from maprl.errors import ParamsError

        raise ParamsError("train.tensorboard: true needs TensorBoard: pip install -e '.[tensorboard]'") from err
    return "dvclive/tensorboard"


class PeriodicEval(BaseCallback):
    """Every ``every`` timesteps, evaluate on fixed episodes and log success / SPL per split."""

    def __init__(self, evaluators: dict[str, Any], every: int) -> None:
        super().__init__()
        self.evaluators, self.every, self._next = evaluators, every, every
        self.history: list[dict[str, float]] = []

    def _on_step(self) -> bool:
        if self.num_timesteps < self._next:
            return True
        self._next += self.every
        row: dict[str, float] = {"timesteps": float(self.num_timesteps)}
        for split, evaluate in self.evaluators.items():
            summary = evaluate(self.model)
            for key in ("success_rate", "spl"):
                row[f"{split}/{key}"] = summary[key]
                self.logger.record(f"eval/{split}_{key}", summary[key])
        self.history.append(row)
        return True


class Checkpoint(BaseCallback):
    """Save the model (atomically) every ``every`` timesteps, for ``train.resume``."""

    def __init__(self, path: Path, every: int) -> None:
        super().__init__()
        self.path, self.every, self._next = path, every, every

    def _on_step(self) -> bool:
        if self.num_timesteps >= self._next:
            self._next += self.every
            save_model(self.model, self.path)
        return True


def save_model(model: BaseAlgorithm, path: Path) -> None:
    with atomic_path(path) as tmp:  # the temp name keeps the .zip suffix, so SB3 saves to it as is
        model.save(tmp)


def _load_checkpoint(p: TrainParams, path: Path, venv: Any) -> BaseAlgorithm | None:
    if not (p.resume and path.exists()):
        return None
    cls: Any = PPO
    if p.algo == "recurrent_ppo":
        from sb3_contrib import RecurrentPPO

        cls = RecurrentPPO
    return cls.load(path, env=venv)


def make_train_env(params: Params, rt: Runtime, split: str, n_envs: int, seed: int) -> NavVecEnv:
    p = params.train
    cfg = nav_config(params, rt, max_steps=p.max_steps, shaping=p.shaping, decoy_rate=p.decoy_rate)
    return NavVecEnv(rt.scene, n_envs, cfg, split=split, memory=rt.memory, seed=seed)


def _evaluators(params: Params, rt: Runtime) -> dict[str, Any]:
    from maprl.evaluation import evaluate_model

    p = params.train
    cfg = nav_config(params, rt, max_steps=params.evaluate.max_steps, shaping=0.0)
    return {
        split: (lambda model, s=split: evaluate_model(model, rt, cfg, s, p.eval_episodes, params.base.seed))
        for split in ("val", "test")
    }


def run_train(
    params: Params,
    rt: Runtime,
    out_dir: str | Path,
    metrics_path: str | Path,
    live_dir: str | Path = "dvclive/train",
    hparams: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train the policy; write ``policy.zip`` in ``out_dir``, metrics and dvclive curves."""
    from dvclive import Live

    p = params.train
    torch.set_num_threads(p.torch_threads)
    out_dir = Path(out_dir)
    ckpt = out_dir / "checkpoints" / "checkpoint.zip"
    venv = VecMonitor(make_train_env(params, rt, "train", p.n_envs, params.base.seed))
    model = _load_checkpoint(p, ckpt, venv) or build_model(p, venv, params.base.seed, hparams)
    done = int(model.num_timesteps)
    live = Live(str(live_dir), dvcyaml=None, save_dvc_exp=False, resume=done > 0, report=None)
    model.set_logger(Logger(None, [DVCLiveWriter(live), make_output_format("csv", str(live_dir))]))
    periodic = PeriodicEval(_evaluators(params, rt), p.eval_freq)
    t0 = time.perf_counter()
    model.learn(
        max(0, p.total_timesteps - done),
        callback=CallbackList([periodic, Checkpoint(ckpt, p.checkpoint_freq)]),
        reset_num_timesteps=done == 0,
        progress_bar=p.progress_bar,
    )
    seconds = time.perf_counter() - t0
    save_model(model, out_dir / "policy.zip")
    live.end()
    final = {split: fn(model) for split, fn in _evaluators(params, rt).items()}
    metrics = {
        "timesteps": int(model.num_timesteps),
        "resumed_from": done,
        "seconds": round(seconds, 1),
        "timesteps_per_second": round((model.num_timesteps - done) / max(seconds, 1e-9), 1),
        "algo": p.algo,
        "memory": params.agent.memory,
        "val": {k: final["val"][k] for k in ("success_rate", "spl")},
        "test": {k: final["test"][k] for k in ("success_rate", "spl")},
    }
    write_json(metrics_path, metrics)
    (out_dir / "eval_history.json").write_text(json.dumps(periodic.history, indent=1))
    if ckpt.exists():
        ckpt.unlink()
    return metrics
