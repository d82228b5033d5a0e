"""Tiny-budget training: save/load/predict, and resume after an interrupted run."""

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from sb3_contrib import RecurrentPPO
from stable_baselines3 import PPO

from maprl.config import Params
from maprl.data.geo import MapData
from maprl.errors import InputError, ParamsError
from maprl.eval.agents import load_policy
from maprl.learn.policies import MapRLNetwork
from maprl.learn.training import RunPaths, lr_schedule, train
from maprl.nav.runtime import Runtime, pooled_memory
from maprl.nav.scene import Scene

from conftest import grid_targets, tiny_params

TRAIN = {
    "n_envs": 2, "n_steps": 64, "batch_size": 64, "n_epochs": 1, "max_steps": 8, "eval_freq": 64,
    "eval_episodes": 2, "checkpoint_freq": 64, "progress_bar": False,
}  # fmt: skip


@pytest.fixture
def rt(tiny_map: MapData) -> Runtime:
    t = grid_targets([70.0, 90.0, 100.0, 60.0], [70.0, 60.0, 100.0, 100.0], ["train", "val", "test", "train"])
    scene = Scene.build(tiny_map, t, 32)
    return Runtime(scene, pooled_memory(scene, 4, 16.0), 0.97)


def _params(total: int, **train: object) -> Params:
    return tiny_params(
        train={**TRAIN, "hparams": "params", "total_timesteps": total, **train}, evaluate={"max_steps": 8}
    )


def _paths(tmp: Path) -> RunPaths:
    return RunPaths(
        tmp / "m" / "policy.zip",
        tmp / "m" / "checkpoints",
        tmp / "m" / "history.json",
        tmp / "train.json",
        tmp / "live",
    )


@pytest.mark.parametrize("algo", ["ppo", "recurrent_ppo"])
def test_train_save_load_predict(tmp_path: Path, rt: Runtime, algo: str) -> None:
    params = _params(128, algo=algo)
    metrics = train(params, rt, _paths(tmp_path))
    assert metrics["timesteps"] == 128 and set(metrics["test"]) == {"success_rate", "spl"}
    model = load_policy(tmp_path / "m" / "policy.zip", algo)
    assert isinstance(model, RecurrentPPO if algo == "recurrent_ppo" else PPO)
    assert isinstance(model.policy.features_extractor, MapRLNetwork)
    obs = {k: v[None] for k, v in _obs(rt).items()}
    action, state = model.predict(obs, deterministic=True)
    assert action.shape == (1, 2) and np.all(np.abs(action) <= 1)
    assert (state is None) == (algo == "ppo")  # the LSTM carries its state between steps
    assert (tmp_path / "live" / "plots" / "metrics").is_dir()
    assert json.loads((tmp_path / "train.json").read_text())["timesteps"] == 128


def _obs(rt: Runtime) -> dict:
    from maprl.nav.core import NavConfig
    from maprl.nav.vecenv import NavVecEnv

    venv = NavVecEnv(rt.scene, 1, NavConfig.of(max_steps=8, memory="retrieval"), memory=rt.memory)
    return {k: v[0] for k, v in venv.reset().items()}


def test_resume_evaluates_on_the_same_timesteps_and_keeps_the_history(tmp_path: Path, rt: Runtime) -> None:
    """Defect: resuming at 128 with eval_freq 64 evaluated at 130, 132, 134... and lost the earlier history."""
    full = train(_params(256), rt, _paths(tmp_path / "full"))
    whole = json.loads((tmp_path / "full" / "m" / "history.json").read_text())
    assert [r["timesteps"] for r in whole] == [64, 128, 192, 256] and full["resumed_from"] == 0
    part = _paths(tmp_path / "part")
    train(_params(128), rt, part)  # as if killed right after the checkpoint at 128
    part.checkpoints.mkdir(parents=True, exist_ok=True)
    shutil.copy(part.policy, part.checkpoint)
    shutil.copy(part.history, part.checkpoint_history)
    metrics = train(_params(256), rt, part)
    resumed = json.loads(part.history.read_text())
    assert metrics["resumed_from"] == 128 and metrics["timesteps"] == 256
    assert [r["timesteps"] for r in resumed] == [64, 128, 192, 256]
    assert not part.checkpoint.exists()  # a finished run leaves no checkpoint behind


def test_linear_learning_rate_never_goes_negative() -> None:
    """Defect: SB3's last update passes progress_remaining slightly below 0, giving a negative lr."""
    schedule = lr_schedule(3e-4, "linear")
    assert schedule(1.0) == pytest.approx(3e-4) and schedule(-0.004) == 0.0 and lr_schedule(3e-4, "constant") == 3e-4


def test_loading_a_truncated_policy_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "policy.zip"
    bad.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(InputError, match="truncated, corrupt"):
        load_policy(bad, "ppo")
    with pytest.raises(InputError, match="does not exist"):
        load_policy(tmp_path / "none.zip", "ppo")


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None, reason="TensorBoard is installed here")
def test_tensorboard_without_the_package_names_the_fix(tmp_path: Path, rt: Runtime) -> None:
    with pytest.raises(ParamsError, match=r"train.tensorboard.*pip install"):
        train(_params(64, tensorboard=True), rt, _paths(tmp_path))
