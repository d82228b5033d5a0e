"""Tiny-budget training: save/load/predict, and resume after an interrupted run."""

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from sb3_contrib import RecurrentPPO
from stable_baselines3 import PPO

from maprl.errors import ParamsError
from maprl.evaluation import load_model
from maprl.geo import MapData
from maprl.policies import MapRLNetwork
from maprl.runtime import Runtime, pooled_memory
from maprl.scene import Scene
from maprl.training import run_train

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


def _params(total: int, **train: object) -> object:
    return tiny_params(train={**TRAIN, "total_timesteps": total, **train}, evaluate={"max_steps": 8})


@pytest.mark.parametrize("algo", ["ppo", "recurrent_ppo"])
def test_train_save_load_predict(tmp_path: Path, rt: Runtime, algo: str) -> None:
    params = _params(128, algo=algo)
    metrics = run_train(params, rt, tmp_path / "m", tmp_path / "train.json", tmp_path / "live")  # type: ignore[arg-type]
    assert metrics["timesteps"] == 128 and set(metrics["test"]) == {"success_rate", "spl"}
    model = load_model(tmp_path / "m" / "policy.zip", algo)
    assert isinstance(model, RecurrentPPO if algo == "recurrent_ppo" else PPO)
    assert isinstance(model.policy.features_extractor, MapRLNetwork)
    obs = {k: v[None] for k, v in _obs(rt).items()}
    action, state = model.predict(obs, deterministic=True)
    assert action.shape == (1, 2) and np.all(np.abs(action) <= 1)
    assert (state is None) == (algo == "ppo")  # the LSTM carries its state between steps
    assert (tmp_path / "live" / "plots" / "metrics").is_dir()
    assert json.loads((tmp_path / "train.json").read_text())["timesteps"] == 128


def _obs(rt: Runtime) -> dict:
    from maprl.navcore import NavConfig
    from maprl.vecenv import NavVecEnv

    venv = NavVecEnv(rt.scene, 1, NavConfig(max_steps=8, memory="retrieval"), memory=rt.memory)
    return {k: v[0] for k, v in venv.reset().items()}


def test_resume_continues_the_timestep_count(tmp_path: Path, rt: Runtime) -> None:
    run_train(_params(128), rt, tmp_path / "m", tmp_path / "a.json", tmp_path / "live")  # type: ignore[arg-type]
    ckpt = tmp_path / "m" / "checkpoints"
    ckpt.mkdir(exist_ok=True)
    shutil.copy(tmp_path / "m" / "policy.zip", ckpt / "checkpoint.zip")  # as if killed after 128 steps
    metrics = run_train(_params(256), rt, tmp_path / "m", tmp_path / "b.json", tmp_path / "live")  # type: ignore[arg-type]
    assert metrics["resumed_from"] == 128 and metrics["timesteps"] == 256


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None, reason="TensorBoard is installed here")
def test_tensorboard_without_the_package_names_the_fix(tmp_path: Path, rt: Runtime) -> None:
    with pytest.raises(ParamsError, match=r"train.tensorboard.*pip install"):
        run_train(_params(64, tensorboard=True), rt, tmp_path / "m", tmp_path / "t.json", tmp_path / "live")  # type: ignore[arg-type]
