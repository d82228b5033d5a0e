"""The ``train`` stage: PPO (or recurrent PPO) on the batched feature env.

Readable on purpose: :func:`build_model` makes the algorithm from ``params.train``,
:func:`train` wires the vector env, callbacks (periodic evaluation on the validation part of
the train split and on the test split, checkpoints, dvclive, and with ``train.curriculum`` a
:class:`Curriculum` that widens the training distribution as the agent succeeds) and resume;
:func:`run_train` trains one agent, and :func:`run_train_agents`, the stage, trains
several in worker processes, with every path given by ``dvc.yaml``.

Callbacks fire on SB3's own timestep trigger (:class:`~stable_baselines3.common.callbacks.EveryNTimesteps`),
aligned to multiples of their period, so a resumed run evaluates and saves at the same
timesteps as an uninterrupted one, and its evaluation history continues where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import math
import pickle
import random
import shutil
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import yaml
from gymnasium import spaces
from pydantic import TypeAdapter, ValidationError
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback, CallbackList, EveryNTimesteps
from stable_baselines3.common.logger import KVWriter, Logger, make_output_format
from stable_baselines3.common.off_policy_algorithm import OffPolicyAlgorithm
from stable_baselines3.common.vec_env import VecMonitor

from maprl.config import AGENT_SLOT, HPARAM_KEYS, INT_HPARAMS, Params, TrainParams, agent_variant
from maprl.errors import InputError, ParamsError
from maprl.eval.agents import POLICY_INFO, algo_class, load_policy
from maprl.eval.evaluate import evaluate_model
from maprl.features.nets import configure_torch
from maprl.io import atomic_path, staged_dir, write_json, write_metrics
from maprl.learn.imitation import clone_expert
from maprl.learn.policies import MapRLNetwork, MapRLPolicy
from maprl.nav.runtime import Runtime, data_fingerprint, fingerprint_differences, load_runtime, nav_config
from maprl.nav.vecenv import MultiWorldVecEnv, NavVecEnv
from maprl.parallel import ordered_map


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


@dataclass(frozen=True)
class LinearDecay:
    """``learning_rate * progress_remaining``, clamped at 0 (SB3 passes progress from 1 to 0, and a
    little below 0 on the last update). A class, not a lambda: SB3 pickles the schedule into the
    saved model, and a lambda's pickle holds its source file's path, so a policy trained in
    another checkout would differ in its bytes."""

    learning_rate: float

    def __call__(self, progress: float) -> float:
        return self.learning_rate * max(0.0, progress)


def lr_schedule(learning_rate: float, kind: str) -> Any:
    """A linear decay to zero (:class:`LinearDecay`), or a constant."""
    return LinearDecay(learning_rate) if kind == "linear" else learning_rate


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
    """``value`` checked against the bounds of ``train.<key>`` (the same ones params.yaml has)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InputError(f"{path}: {key} must be a finite number, got {value!r}")
    if key in INT_HPARAMS and value != int(value):
        raise InputError(f"{path}: {key} must be an integer, got {value!r}")
    field = TrainParams.model_fields[key]
    try:
        checked: float = TypeAdapter(Annotated[field.annotation, field]).validate_python(value)  # type: ignore[arg-type]
    except ValidationError as err:
        raise InputError(f"{path}: {key} = {value!r}: {err.errors()[0]['msg']} (as train.{key})") from None
    return int(checked) if key in INT_HPARAMS else float(checked)


def resolve_hparams(p: TrainParams, hparams: dict[str, Any] | None) -> dict[str, Any]:
    """The hyperparameters a run uses: ``train.*`` overridden by the tuned ones."""
    kw: dict[str, Any] = {k: getattr(p, k) for k in HPARAM_KEYS}
    kw.update(hparams or {})
    return kw


OFF_POLICY = ("sac", "td3", "dqn", "qrdqn")
CONTINUOUS_ONLY, DISCRETE_ONLY = ("sac", "td3"), ("dqn", "qrdqn")
LOG_INTERVAL = {"a2c": 25, "sac": 4, "td3": 4, "dqn": 4, "qrdqn": 4}
"""Rollouts (on-policy; 1 if not listed) or episodes (off-policy) between logged rows: A2C's 5-step
rollouts are logged about as often as PPO's 128-step ones."""
REPLAY_BUFFER_LIMIT = 4 * 2**30  # bytes: a larger replay buffer is refused before it is allocated


def algo_kwargs(p: TrainParams, kw: dict[str, Any], n_envs: int) -> dict[str, Any]:
    """The constructor arguments of ``train.algo`` from the run's hyperparameters ``kw``.

    - ``ppo``, ``recurrent_ppo``: every tuned key.
    - ``a2c``: SB3's A2C (its own ``n_steps`` 5 and RMSprop) with the run's learning rate, discount,
      GAE lambda and loss weights.
    - ``reinforce``: REINFORCE with a learned baseline, as A2C with ``gae_lambda`` 1 (Monte Carlo
      returns), rollouts of ``train.max_steps`` steps per env (an episode cut by the rollout end is
      bootstrapped by the baseline) and unnormalised advantages, like the simplest image-based
      policy-gradient agents.
    - ``sac``, ``td3``, ``dqn``, ``qrdqn``: SB3's defaults with the run's learning rate, discount and
      ``train.buffer_size``; ``n_steps`` and the other on-policy keys are not used.
    """
    shared = {"learning_rate": kw["learning_rate"], "gamma": kw["gamma"]}
    if p.algo in ("ppo", "recurrent_ppo"):
        return {**kw, "batch_size": min(kw["batch_size"], kw["n_steps"] * n_envs)}
    on_policy = {k: kw[k] for k in ("ent_coef", "vf_coef", "max_grad_norm")}
    if p.algo == "a2c":
        return {**shared, **on_policy, "gae_lambda": kw["gae_lambda"]}
    if p.algo == "reinforce":
        return {**shared, **on_policy, "n_steps": p.max_steps, "gae_lambda": 1.0, "normalize_advantage": False}
    return {**shared, "buffer_size": p.buffer_size}


def check_algo(p: TrainParams, venv: Any) -> None:
    """A clear :class:`~maprl.errors.ParamsError` when ``train.algo`` cannot run on this env."""
    space = venv.action_space
    if p.algo in CONTINUOUS_ONLY and not isinstance(space, spaces.Box):
        raise ParamsError(
            f"train.algo {p.algo} needs continuous actions, but this agent's env has {space}: set "
            "env.actions: continuous, or train this agent with ppo, a2c, reinforce, dqn or qrdqn"
        )
    if p.algo in DISCRETE_ONLY and not isinstance(space, spaces.Discrete):
        raise ParamsError(
            f"train.algo {p.algo} needs discrete actions, but this agent's env has {space}: set "
            "env.actions: discrete (or candidates), or train this agent with ppo, a2c, reinforce, sac or td3"
        )
    if p.algo in OFF_POLICY:
        obs_space = venv.observation_space.spaces.values()
        obs_bytes = sum(int(np.prod(s.shape)) * np.dtype(s.dtype).itemsize for s in obs_space)
        need = 2 * obs_bytes * p.buffer_size  # observations and next observations
        if need > REPLAY_BUFFER_LIMIT:
            raise ParamsError(
                f"train.buffer_size {p.buffer_size}: {p.algo}'s replay buffer would take {need / 2**30:.1f} GiB "
                f"({obs_bytes} bytes per observation); lower train.buffer_size"
            )


def build_model(p: TrainParams, venv: Any, seed: int, hparams: dict[str, Any] | None = None) -> BaseAlgorithm:
    """The ``train.algo`` model with :class:`MapRLNetwork` features and the run's hyperparameters
    (``train.*`` or tuned; :func:`algo_kwargs`)."""
    check_algo(p, venv)
    kw = resolve_hparams(p, hparams)
    kw["learning_rate"] = lr_schedule(kw["learning_rate"], p.lr_schedule)
    kw = algo_kwargs(p, kw, venv.num_envs)
    cls: Any = algo_class(p.algo)
    common = {"seed": seed, "tensorboard_log": _tensorboard_dir(p), "verbose": 0, "device": "cpu"}
    if p.algo == "recurrent_ppo":
        policy_kwargs = {"features_extractor_class": MapRLNetwork, "lstm_hidden_size": 64}
        return cls("MultiInputLstmPolicy", venv, policy_kwargs=policy_kwargs, **common, **kw)
    if p.algo in OFF_POLICY:
        policy_kwargs = {"features_extractor_class": MapRLNetwork, "net_arch": [64, 64]}
        return cls("MultiInputPolicy", venv, policy_kwargs=policy_kwargs, **common, **kw)
    return cls(MapRLPolicy, venv, **common, **kw)


def init_model(p: TrainParams, venv: Any, seed: int, hparams: dict[str, Any] | None = None) -> BaseAlgorithm:
    """A new model (this run's hyperparameters and budget) starting from the weights of ``train.init_from``.

    The saved policy must have been trained on the same observation and action spaces; if not,
    a :class:`~maprl.errors.ParamsError` says which differs and how to fix it.
    """
    assert p.init_from is not None
    path = Path(p.init_from)
    old = load_policy(path, p.algo)
    for name, theirs, mine in (
        ("observation", old.observation_space, venv.observation_space),
        ("action", old.action_space, venv.action_space),
    ):
        if theirs != mine:
            raise ParamsError(
                f"train.init_from: {path} was trained with the {name} space {theirs}, but this run's env has {mine}; "
                "fine-tune with the env.actions, env.stop_action and agent.* settings it was trained with, or "
                "drop train.init_from to train from scratch"
            )
    model = build_model(p, venv, seed, hparams)
    model.policy.load_state_dict(old.policy.state_dict())
    return model


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


class Curriculum(BaseCallback):
    """After each rollout whose finished training episodes succeeded at least ``success`` of the time,
    move the training env a level (of ``levels``) towards its whole distribution (``set_curriculum``)."""

    def __init__(self, levels: int, success: float) -> None:
        super().__init__()
        self.levels, self.success = levels, success
        self.wins = self.episodes = 0
        self.raised_at: list[int] = []

    def _on_step(self) -> bool:
        for info in self.locals["infos"]:
            if "is_success" in info:
                self.episodes += 1
                self.wins += bool(info["is_success"])
        return True

    def _on_rollout_end(self) -> None:
        env = _training_env(self.model)
        level = round(env.level * self.levels)
        if level < self.levels and self.episodes and self.wins >= self.success * self.episodes:
            level += 1
            env.set_curriculum(level / self.levels)
            self.raised_at.append(int(self.num_timesteps))
        self.logger.record("curriculum/level", level)
        self.wins = self.episodes = 0


VOLATILE_MODEL_FIELDS = (
    "start_time", "ep_info_buffer", "ep_success_buffer", "_num_timesteps_at_start", "lr_schedule",
    "exploration_schedule",
)  # fmt: skip
"""SB3 model fields left out of saved models, so that equal runs save equal bytes: wall-clock times
(episode infos carry theirs), where this process started, and the schedules SB3 rebuilds on load
(the learning rate's; DQN's exploration rate's, a closure)."""
CHECKPOINT_FILE, STATE_FILE, REPLAY_FILE = "checkpoint.zip", "state.pkl", "replay.pkl"


class Checkpoint(BaseCallback):
    """Save the whole training state at the first rollout start after each multiple of ``every`` timesteps.

    At a rollout boundary the state is complete: the model and optimizer, the last observation,
    each agent's episode and generator, the global RNGs and the evaluation history. A run resumed
    from it takes exactly the steps an uninterrupted run takes (same machine, same params).
    """

    def __init__(self, every: int, paths: RunPaths, periodic: PeriodicEval, fingerprint: dict[str, Any]) -> None:
        super().__init__()
        self.every, self.paths, self.periodic, self.fingerprint = every, paths, periodic, fingerprint
        self.saved = 0

    def _on_training_start(self) -> None:
        self.saved = self.num_timesteps // self.every

    def _on_rollout_start(self) -> None:
        if self.num_timesteps // self.every > self.saved:
            self.saved = self.num_timesteps // self.every
            save_checkpoint(self.model, self.paths.checkpoints, self.periodic.history, self.fingerprint)

    def _on_step(self) -> bool:
        return True


def _training_env(model: BaseAlgorithm) -> NavVecEnv | MultiWorldVecEnv:
    env = model.get_env()
    inner = env.venv if isinstance(env, VecMonitor) else env
    assert isinstance(inner, NavVecEnv | MultiWorldVecEnv)
    return inner


def save_checkpoint(
    model: BaseAlgorithm, folder: Path, history: list[dict[str, float]], fingerprint: dict[str, Any]
) -> None:
    """``checkpoint.zip`` (the SB3 model) and ``state.pkl`` (env, RNGs, history, fingerprint), swapped in together."""
    state = {
        "fingerprint": fingerprint,
        "history": list(history),
        "env": _training_env(model).get_state(),
        "last_obs": model._last_obs,  # SB3 does not save it: without it, learn() would reset the env
        "last_episode_starts": model._last_episode_starts,
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
        "action_space_rng": model.action_space.np_random.bit_generator.state,  # off-policy exploration samples it
    }
    with staged_dir(folder) as tmp:
        save_model(model, tmp / CHECKPOINT_FILE)
        if isinstance(model, OffPolicyAlgorithm):  # SB3 leaves the replay buffer out of the model file
            model.save_replay_buffer(tmp / REPLAY_FILE)
        with (tmp / STATE_FILE).open("wb") as f:
            pickle.dump(state, f)


def _without_object_reprs(data: bytes) -> bytes:
    """SB3's ``data`` JSON with only what loading reads of each pickled object (``:type:`` and
    ``:serialized:``): the readable reprs beside them print memory addresses, which change every run."""
    fields = json.loads(data)
    for key, value in fields.items():
        if isinstance(value, dict) and ":serialized:" in value:
            fields[key] = {k: value[k] for k in (":type:", ":serialized:") if k in value}
    return json.dumps(fields, indent=4).encode()


def save_model(model: BaseAlgorithm, path: Path, info: dict[str, Any] | None = None) -> None:
    """Save an SB3 model byte-reproducibly: no wall-clock fields, fixed zip entry dates, atomically.

    ``info`` (JSON) is stored inside the zip as :data:`~maprl.eval.agents.POLICY_INFO`, which SB3
    ignores: what the policy was trained with and on, checked by ``maprl locate``.
    """
    with atomic_path(path) as tmp:  # the temp name keeps the .zip suffix, so SB3 saves to it as is
        space_rng = model.action_space._np_random  # its state travels in checkpoints, not policies
        model.action_space._np_random = None  # type: ignore[assignment]
        try:
            model.save(tmp, exclude=list(VOLATILE_MODEL_FIELDS))
        finally:
            model.action_space._np_random = space_rng
        with zipfile.ZipFile(tmp) as src:
            entries = [(info, src.read(info)) for info in src.infolist()]
        with zipfile.ZipFile(tmp, "w") as dst:
            for entry, data in entries:
                if entry.filename == "data":
                    data = _without_object_reprs(data)
                fixed = zipfile.ZipInfo(entry.filename, date_time=(1980, 1, 1, 0, 0, 0))
                fixed.compress_type, fixed.external_attr = entry.compress_type, entry.external_attr
                dst.writestr(fixed, data)
            if info is not None:
                fixed = zipfile.ZipInfo(POLICY_INFO, date_time=(1980, 1, 1, 0, 0, 0))
                fixed.compress_type = zipfile.ZIP_DEFLATED
                dst.writestr(fixed, json.dumps(info, indent=2, sort_keys=True))


@dataclass(frozen=True)
class RunPaths:
    """Where one training run writes (all given by ``dvc.yaml``)."""

    policy: Path
    checkpoints: Path
    history: Path
    metrics: Path
    live: Path

    timing: Path | None = None


def make_train_env(
    params: Params, rt: Runtime, split: str, n_envs: int, seed: int, hparams: dict[str, Any] | None = None
) -> NavVecEnv:
    """The batched training env; the potential-based shaping uses the run's discount (tuned or ``train.gamma``)."""
    p = params.train
    gamma = float(resolve_hparams(p, hparams)["gamma"])
    cfg = nav_config(params, rt, max_steps=p.max_steps, shaping=p.shaping, gamma=gamma, decoy_rate=p.decoy_rate)
    scene = rt.scene
    if p.randomize > 0:  # the randomized agent: photos under random perturbations (evaluation keeps rt.scene)
        scene = rt.randomized_scene(split, p.randomize, p.randomize_views, seed, tiers=p.curriculum > 0)
    return NavVecEnv(scene, n_envs, cfg, split=split, memory=rt.memory, seed=seed)


def evaluators(params: Params, rt: Runtime) -> dict[str, Any]:
    """Periodic evaluation on fixed episodes of the ``val`` and ``test`` splits (no shaping)."""
    p = params.train
    cfg = nav_config(params, rt, max_steps=params.evaluate.max_steps, shaping=0.0)
    return {
        split: (lambda model, s=split: evaluate_model(model, rt, cfg, s, p.eval_episodes, params.base.seed))
        for split in ("val", "test")
    }


def run_fingerprint(params: Params, rt: Runtime, hparams: dict[str, Any] | None) -> dict[str, Any]:
    """What a training run's steps depend on; a checkpoint made with anything else is not resumed."""
    ignore = {"resume", "progress_bar", "tensorboard", "total_timesteps", "checkpoint_freq", "hparams", "workers"}
    fingerprint = {
        "seed": params.base.seed,
        "view_size": params.tile.view_size,
        "env": params.env.model_dump(),
        "agent": params.agent.model_dump(),
        "train": params.train.model_dump(exclude=ignore),
        "hparams": resolve_hparams(params.train, hparams),
        "evaluate": params.evaluate.model_dump(include={"max_steps", "success_radius"}),
        "data": data_fingerprint(rt),
    }
    if params.train.init_from is not None:  # the weights a fine-tuning run starts from
        start = Path(params.train.init_from)
        fingerprint["init_from_sha256"] = hashlib.sha256(start.read_bytes()).hexdigest() if start.exists() else None
    return dict(json.loads(json.dumps(fingerprint)))


def load_checkpoint(folder: Path, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    """The saved state if a usable checkpoint of this very run is in ``folder``; else None, saying why."""
    if not (folder / CHECKPOINT_FILE).exists():
        return None
    try:
        with (folder / STATE_FILE).open("rb") as f:
            state = pickle.load(f)
        old = state["fingerprint"]
    except (OSError, EOFError, KeyError, TypeError, pickle.UnpicklingError) as err:
        print(f"train: the checkpoint in {folder} is incomplete ({type(err).__name__}); starting fresh")
        return None
    differ = fingerprint_differences(old, fingerprint)
    if differ:
        shown = ", ".join(differ[:6]) + (f" and {len(differ) - 6} more" if len(differ) > 6 else "")
        print(f"train: the checkpoint in {folder} was made with other params or data ({shown}); starting fresh")
        return None
    return dict(state)


def _resume(
    p: TrainParams, paths: RunPaths, venv: VecMonitor, fingerprint: dict[str, Any]
) -> tuple[BaseAlgorithm | None, list[dict[str, float]]]:
    """The model and evaluation history to continue from, with the env and RNGs set as they were."""
    state = load_checkpoint(paths.checkpoints, fingerprint) if p.resume else None
    if state is None:
        return None, []
    model = load_policy(paths.checkpoints / CHECKPOINT_FILE, p.algo, env=venv)
    _training_env(model).set_state(state["env"])
    model._last_obs, model._last_episode_starts = state["last_obs"], state["last_episode_starts"]
    if isinstance(model, OffPolicyAlgorithm):
        model.load_replay_buffer(paths.checkpoints / REPLAY_FILE)
        model._last_original_obs = state["last_obs"]
    torch.set_rng_state(state["rng"]["torch"])
    np.random.set_state(state["rng"]["numpy"])
    random.setstate(state["rng"]["python"])
    model.action_space = venv.action_space  # as a fresh run has it (a loaded copy pickles other bytes)
    model.action_space.np_random.bit_generator.state = state["action_space_rng"]
    print(f"train: resuming from the checkpoint at {model.num_timesteps} timesteps")
    return model, list(state["history"])


def world_envs(
    params: Params, runtimes: list[Runtime], n_envs: int, seed: int, hparams: dict[str, Any] | None
) -> NavVecEnv | MultiWorldVecEnv:
    """The training env: one map, or ``n_envs`` agents shared out over several worlds' maps."""
    if len(runtimes) == 1:
        return make_train_env(params, runtimes[0], "train", n_envs, seed, hparams)
    shares = np.diff(np.linspace(0, n_envs, len(runtimes) + 1).round().astype(int))
    if (shares < 1).any():
        raise ParamsError(f"train.n_envs ({n_envs}) must be at least train.worlds ({len(runtimes)})")
    seeds = np.random.SeedSequence([seed, 31]).generate_state(len(runtimes))
    envs = [
        make_train_env(params, r, "train", int(k), int(s), hparams)
        for r, k, s in zip(runtimes, shares, seeds, strict=True)
    ]
    return MultiWorldVecEnv(envs)


def train(
    params: Params,
    rt: Runtime,
    paths: RunPaths,
    hparams: dict[str, Any] | None = None,
    worlds: list[Runtime] | None = None,
) -> dict[str, Any]:
    """Train the policy; write the policy, its evaluation history, metrics and dvclive curves.

    ``worlds``: extra maps to train on beside ``rt`` (``train.worlds``); evaluation stays on ``rt``.
    """
    from dvclive import Live

    p = params.train
    configure_torch(p.torch_threads)
    runtimes = [rt, *(worlds or [])]
    venv = VecMonitor(world_envs(params, runtimes, p.n_envs, params.base.seed, hparams))
    fingerprint = run_fingerprint(params, rt, hparams)
    if len(runtimes) > 1:
        fingerprint["worlds"] = [data_fingerprint(r) for r in runtimes[1:]]
    resumed, history = _resume(p, paths, venv, fingerprint)
    if resumed is None and p.init_from is not None:
        print(f"train: fine-tuning {p.init_from} for {p.total_timesteps} timesteps")
    fresh = init_model if p.init_from is not None else build_model
    model = resumed or fresh(p, venv, params.base.seed, hparams)
    if resumed is None and p.curriculum:
        _training_env(model).set_curriculum(0.0)
    imitation = None
    if resumed is None and p.imitate:
        imitation = clone_expert(model, venv, _training_env(model).cores, p.imitate, rounds=p.imitate_rounds)
        print(f"train: cloned the scripted search for {p.imitate} timesteps (it takes {imitation:.1%} of its actions)")
    done = int(model.num_timesteps)
    live = Live(str(paths.live), dvcyaml=None, save_dvc_exp=False, resume=done > 0, report=None)
    model.set_logger(Logger(None, [DVCLiveWriter(live), make_output_format("csv", str(paths.live))]))
    periodic = PeriodicEval(evaluators(params, rt), history)
    callbacks: list[BaseCallback] = [
        Every(p.eval_freq, periodic),
        Checkpoint(p.checkpoint_freq, paths, periodic, fingerprint),
    ]
    curriculum = Curriculum(p.curriculum, p.curriculum_success) if p.curriculum else None
    if curriculum is not None:
        callbacks.append(curriculum)
    t0 = time.perf_counter()
    model.learn(
        max(0, p.total_timesteps - done),
        callback=CallbackList(callbacks),
        reset_num_timesteps=done == 0,
        progress_bar=p.progress_bar,
        log_interval=LOG_INTERVAL.get(p.algo, 1),
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
        "worlds": len(runtimes),
        "memory": params.agent.memory,
        "nav": params.agent.nav,
        "imitation_agreement": None if imitation is None else round(imitation, 4),
        "curriculum": None
        if curriculum is None
        else {"level": _training_env(model).level, "raised_at": curriculum.raised_at},
        "val": {k: final["val"][k] for k in ("success_rate", "spl")},
        "test": {k: final["test"][k] for k in ("success_rate", "spl")},
    }
    save_model(model, paths.policy, fingerprint)
    write_json(paths.history, periodic.history)
    write_metrics(paths.metrics, paths.timing, metrics)
    shutil.rmtree(paths.checkpoints, ignore_errors=True)  # finished: nothing left to resume
    paths.checkpoints.mkdir(parents=True, exist_ok=True)
    return metrics


def run_train(
    params: Params,
    agent: str,
    map_path: str | Path,
    targets_path: str | Path,
    features_dir: str | Path,
    best_path: str | Path | None,
    paths: RunPaths,
    worlds_dir: str | Path | None = None,
) -> dict[str, Any]:
    """The train stage for one agent (:data:`~maprl.config.AGENTS`); ``best_path`` holds the tuned
    hyperparameters used when ``train.hparams`` is ``tuned``; ``worlds_dir`` keeps the extra worlds of
    ``train.worlds`` (built there once)."""
    params = agent_variant(params, agent)
    rt = load_runtime(params, map_path, targets_path, features_dir)
    hparams = None
    if params.train.hparams == "tuned":
        if best_path is None:
            raise ParamsError("train.hparams: tuned needs the tune stage's best hyperparameters (--best)")
        hparams = load_best_hparams(best_path)
    worlds = None
    if worlds_dir is not None:
        Path(worlds_dir).mkdir(parents=True, exist_ok=True)  # a stage output, also when it stays empty
    if params.train.worlds > 1:
        from maprl.learn.worlds import training_worlds

        if worlds_dir is None:
            raise ParamsError("train.worlds > 1 needs a folder for the extra worlds (--worlds)")
        worlds = training_worlds(params, worlds_dir)
    return train(params, rt, paths, hparams, worlds)


def agent_paths(template: RunPaths, agent: str) -> RunPaths:
    """``template`` with every ``{agent}`` in its paths replaced by ``agent``."""

    def fill(path: Path) -> Path:
        return Path(str(path).replace(AGENT_SLOT, agent))

    t = template
    timing = None if t.timing is None else fill(t.timing)
    return RunPaths(fill(t.policy), fill(t.checkpoints), fill(t.history), fill(t.metrics), fill(t.live), timing)


@dataclass(frozen=True)
class TrainJob:
    """One agent of the train stage, with everything :func:`run_train` reads."""

    params: Params
    agent: str
    map_path: str
    targets_path: str
    features_dir: str
    best_path: str | None
    paths: RunPaths
    worlds_dir: str | None


def _train_job(_state: None, job: TrainJob) -> dict[str, Any]:
    j = job
    return run_train(j.params, j.agent, j.map_path, j.targets_path, j.features_dir, j.best_path, j.paths, j.worlds_dir)


def run_train_agents(
    params: Params,
    agents: list[str],
    map_path: str | Path,
    targets_path: str | Path,
    features_dir: str | Path,
    best_path: str | Path | None,
    template: RunPaths,
    worlds_template: str | Path | None = None,
) -> dict[str, dict[str, Any]]:
    """The train stage: :func:`run_train` for each of ``agents``, in ``train.workers`` processes.

    The paths are ``template``'s (and ``worlds_template``'s) with ``{agent}`` filled in. Every agent's
    params variant is checked before any trains. The agents share nothing and each seeds its own run,
    so what they write does not depend on the number of workers; with several workers, the per-agent
    progress bars (which would interleave) give way to one bar over the agents.
    """
    if not agents or len(set(agents)) != len(agents):
        raise InputError(f"--agents must name each agent once, got {','.join(agents) or 'none'}")
    if len(agents) > 1:
        slots = {"--policy": template.policy, "--checkpoints": template.checkpoints, "--history": template.history,
                 "--metrics": template.metrics, "--live": template.live, "--timing": template.timing,
                 "--worlds": worlds_template}  # fmt: skip
        shared = [flag for flag, path in slots.items() if path is not None and AGENT_SLOT not in str(path)]
        if shared:
            raise InputError(
                f"{', '.join(shared)} must hold {AGENT_SLOT} when several agents train, or they would write "
                f"to the same place (e.g. models/{AGENT_SLOT}/policy.zip)"
            )
    for agent in agents:
        agent_variant(params, agent)  # an unknown agent or a variant that does not validate stops here
    workers = params.train.workers
    if workers > 1 and len(agents) > 1 and params.train.progress_bar:
        params = params.model_copy(update={"train": params.train.model_copy(update={"progress_bar": False})})
    jobs = [
        TrainJob(
            params,
            agent,
            str(map_path),
            str(targets_path),
            str(features_dir),
            None if best_path is None else str(best_path),
            agent_paths(template, agent),
            None if worlds_template is None else str(worlds_template).replace(AGENT_SLOT, agent),
        )
        for agent in agents
    ]
    results = ordered_map(_train_job, jobs, workers, desc="train", unit="agent")
    return dict(zip(agents, results, strict=True))
