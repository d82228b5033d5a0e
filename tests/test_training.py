"""Tiny-budget training: save/load/predict, and resume after an interrupted run."""

import base64
import importlib.util
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from stable_baselines3 import A2C
from stable_baselines3.common.logger import Logger
from stable_baselines3.common.vec_env import VecMonitor

from maprl.config import ALGOS, Params
from maprl.data.geo import MapData
from maprl.errors import InputError, ParamsError
from maprl.eval.agents import algo_class, load_policy
from maprl.learn import training
from maprl.learn.policies import MapRLNetwork
from maprl.learn.training import RunPaths, load_best_hparams, lr_schedule, train
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


def _params_for(algo: str, total: int, **train: object) -> Params:
    """Tiny params for ``algo``: dqn and qrdqn fly the 8 compass moves; off-policy algos start learning at once."""
    env = {"actions": "discrete"} if algo in ("dqn", "qrdqn") else {}
    extra: dict[str, object] = {"buffer_size": 256} if algo in training.OFF_POLICY else {}
    return tiny_params(
        train={**TRAIN, "hparams": "params", "total_timesteps": total, "algo": algo, **extra, **train},
        evaluate={"max_steps": 8},
        env=env,
    )


@pytest.mark.parametrize("algo", ALGOS)
def test_every_algo_trains_saves_loads_and_predicts(tmp_path: Path, rt: Runtime, algo: str) -> None:
    params = _params_for(algo, 256)
    metrics = train(params, rt, _paths(tmp_path))
    assert metrics["algo"] == algo and set(metrics["test"]) == {"success_rate", "spl"}
    assert 256 <= metrics["timesteps"] < 256 + 2 * 64  # whole rollouts (an off-policy step is n_envs steps)
    model = load_policy(tmp_path / "m" / "policy.zip", algo)
    assert type(model) is algo_class(algo)
    net = {"sac": "actor", "td3": "actor", "dqn": "q_net", "qrdqn": "quantile_net"}.get(algo)
    extractor = (getattr(model.policy, net) if net else model.policy).features_extractor
    assert isinstance(extractor, MapRLNetwork)
    action, state = model.predict(_venv(rt, 1, params).reset(), deterministic=True)
    if algo in ("dqn", "qrdqn"):
        assert action.shape == (1,) and 0 <= int(action[0]) < 8
    else:
        assert action.shape == (1, 2) and np.all(np.abs(action) <= 1)
    assert (state is not None) == (algo == "recurrent_ppo")  # the LSTM carries its state between steps
    assert (tmp_path / "live" / "plots" / "metrics").is_dir()
    assert json.loads((tmp_path / "train.json").read_text())["timesteps"] == metrics["timesteps"]


def test_reinforce_is_a2c_with_monte_carlo_returns(rt: Runtime) -> None:
    model: Any = training.build_model(_params_for("reinforce", 64).train, VecMonitor(_venv(rt, 2)), 0)
    assert type(model) is A2C and model.gae_lambda == 1.0 and model.n_steps == TRAIN["max_steps"]
    assert not model.normalize_advantage
    a2c: Any = training.build_model(_params_for("a2c", 64).train, VecMonitor(_venv(rt, 2)), 0)
    assert a2c.n_steps == 5 and a2c.gae_lambda == 0.95  # SB3's own A2C rollout, the run's GAE lambda


@pytest.mark.parametrize(
    ("algo", "actions", "fix"),
    [("sac", "discrete", "env.actions: continuous"), ("td3", "candidates", "env.actions: continuous"),
     ("dqn", "continuous", "env.actions: discrete"), ("qrdqn", "continuous", "env.actions: discrete")],
)  # fmt: skip
def test_an_algo_on_the_wrong_action_space_names_the_fix(rt: Runtime, algo: str, actions: str, fix: str) -> None:
    params = tiny_params(train={**TRAIN, "hparams": "params", "algo": algo}, env={"actions": actions})
    with pytest.raises(ParamsError, match=fix):
        training.build_model(params.train, VecMonitor(_venv(rt, 2, params)), 0)


def test_a_replay_buffer_too_large_for_memory_is_refused_naming_the_key(rt: Runtime) -> None:
    params = tiny_params(train={**TRAIN, "hparams": "params", "algo": "sac", "buffer_size": 100_000_000})
    with pytest.raises(ParamsError, match="train.buffer_size"):
        training.build_model(params.train, VecMonitor(_venv(rt, 2, params)), 0)


@pytest.mark.parametrize("algo", ["sac", "dqn"])
def test_a_killed_off_policy_run_resumes_with_its_replay_buffer(
    tmp_path: Path, rt: Runtime, monkeypatch: pytest.MonkeyPatch, algo: str
) -> None:
    full = train(_params_for(algo, 256), rt, _paths(tmp_path / "full"))
    part = _paths(tmp_path / "part")
    with monkeypatch.context() as m:
        _kill_after_checkpoint(m, 128)
        with pytest.raises(KeyboardInterrupt):
            train(_params_for(algo, 256), rt, part)
    assert (part.checkpoints / training.REPLAY_FILE).exists()
    resumed = train(_params_for(algo, 256), rt, part)
    assert resumed["resumed_from"] == 128
    assert _without_timing(resumed) == _without_timing(full)
    assert part.policy.read_bytes() == (tmp_path / "full" / "m" / "policy.zip").read_bytes()


def _venv(rt: Runtime, n: int, params: Params | None = None) -> Any:
    from maprl.nav.runtime import nav_config
    from maprl.nav.vecenv import NavVecEnv

    params = params or tiny_params()
    return NavVecEnv(rt.scene, n, nav_config(params, rt, max_steps=8, shaping=0.0), memory=rt.memory, seed=0)


def _kill_after_checkpoint(monkeypatch: pytest.MonkeyPatch, at: int) -> None:
    """Make training die (as under kill -9) right after it saved the checkpoint at ``at`` timesteps."""
    real = training.save_checkpoint

    def save_then_die(model: Any, *args: Any) -> None:
        real(model, *args)
        if model.num_timesteps >= at:
            raise KeyboardInterrupt

    monkeypatch.setattr(training, "save_checkpoint", save_then_die)


def _without_timing(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if k not in ("seconds", "timesteps_per_second", "resumed_from")}


@pytest.mark.parametrize("curriculum", [{}, {"curriculum": 2, "curriculum_success": 0.05, "decoy_rate": 0.5}])
def test_a_killed_run_resumes_to_exactly_the_uninterrupted_result(
    tmp_path: Path, rt: Runtime, monkeypatch: pytest.MonkeyPatch, curriculum: dict[str, Any]
) -> None:
    """Defects: a resumed run evaluated at 130, 132... lost its history, and ended with other
    numbers than an uninterrupted run (val/test SPL 0.8489/0.7398 against 0.8513/0.7401)."""
    full = train(_params(384, **curriculum), rt, _paths(tmp_path / "full"))
    part = _paths(tmp_path / "part")
    with monkeypatch.context() as m:
        _kill_after_checkpoint(m, 128)
        with pytest.raises(KeyboardInterrupt):
            train(_params(384, **curriculum), rt, part)
    assert (part.checkpoints / "checkpoint.zip").exists() and not part.policy.exists()
    resumed = train(_params(384, **curriculum), rt, part)
    assert (full["curriculum"] is None) == (not curriculum)
    assert resumed["resumed_from"] == 128 and full["resumed_from"] == 0
    if curriculum:  # the level travels in the checkpoint; only raises after the resume are listed again
        assert full["curriculum"]["raised_at"][0] <= 128 < full["curriculum"]["raised_at"][-1]
        assert resumed["curriculum"]["level"] == full["curriculum"]["level"]
        resumed["curriculum"] = full["curriculum"]
    assert _without_timing(resumed) == _without_timing(full)
    assert part.history.read_text() == (tmp_path / "full" / "m" / "history.json").read_text()
    assert [r["timesteps"] for r in json.loads(part.history.read_text())] == [64, 128, 192, 256, 320, 384]
    assert part.policy.read_bytes() == (tmp_path / "full" / "m" / "policy.zip").read_bytes()
    assert not any(part.checkpoints.iterdir())  # a finished run leaves no checkpoint behind


def test_a_checkpoint_made_with_other_params_is_not_resumed(
    tmp_path: Path, rt: Runtime, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Defect: after a kill, a changed learning rate silently resumed the old run with the old rate."""
    paths = _paths(tmp_path)
    with monkeypatch.context() as m:
        _kill_after_checkpoint(m, 128)
        with pytest.raises(KeyboardInterrupt):
            train(_params(256), rt, paths)
    metrics = train(_params(256, learning_rate=1e-3, n_envs=4), rt, paths)
    out = capsys.readouterr().out
    assert metrics["resumed_from"] == 0
    assert "starting fresh" in out and "train.learning_rate" in out and "train.n_envs" in out


def test_two_runs_save_byte_identical_policies_and_metrics(tmp_path: Path, rt: Runtime) -> None:
    """Defect: policy.zip held a start time and episode timestamps, so dvc.lock changed between identical runs."""
    for run in ("a", "b"):
        train(_params(128), rt, _paths(tmp_path / run))
    for name in ("m/policy.zip", "train.json", "m/history.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert "seconds" not in json.loads((tmp_path / "a" / "train.json").read_text())
    # nor does it depend on where maprl is installed: no pickled object carries a source path
    fields = json.loads(zipfile.ZipFile(tmp_path / "a" / "m" / "policy.zip").read("data"))
    pickles = [
        base64.b64decode(v[":serialized:"]) for v in fields.values() if isinstance(v, dict) and ":serialized:" in v
    ]
    assert pickles and not any(str(Path(training.__file__).parent).encode() in b for b in pickles)


def test_linear_learning_rate_never_goes_negative() -> None:
    """Defect: SB3's last update passes progress_remaining slightly below 0, giving a negative lr."""
    schedule = lr_schedule(3e-4, "linear")
    assert schedule(1.0) == pytest.approx(3e-4) and schedule(-0.004) == 0.0 and lr_schedule(3e-4, "constant") == 3e-4


@pytest.mark.parametrize(
    ("text", "match"), [("learning_rate: 5.0", "less than or equal to 1"), ("gamma: 1.5", "train.gamma")]
)
def test_tuned_hyperparameters_out_of_range_are_refused(tmp_path: Path, text: str, match: str) -> None:
    """Defect: a best_hparams.yaml with learning_rate 5.0 or gamma 1.5 trained without a word."""
    (tmp_path / "best.yaml").write_text(text)
    with pytest.raises(InputError, match=match):
        load_best_hparams(tmp_path / "best.yaml")


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


def test_randomize_changes_the_training_photos_and_not_the_evaluation_episodes(rt: Runtime) -> None:
    from maprl.eval.episodes import make_episodes

    before = make_episodes(rt.scene, "test", 6, seed=3)
    clean = training.make_train_env(_params(64, randomize=0.0), rt, "train", 2, 0)
    randomized = training.make_train_env(_params(64, randomize=1.0, randomize_views=3), rt, "train", 2, 0)
    assert clean.scene is rt.scene
    sc = randomized.scene
    train_rows = rt.scene.split_rows("train")
    assert len(sc.targets) == len(rt.scene.targets) + 2 * len(train_rows)  # 3 photos per train target
    new_rows = sc.split_rows("train")
    clean_photos = {int(rt.scene.targets["id"].iat[r]): rt.scene.target_photo(int(r)) for r in train_rows}
    changed = [
        not np.array_equal(sc.target_photo(int(r)), clean_photos[int(sc.targets["id"].iat[r])]) for r in new_rows
    ]
    assert all(changed)
    assert not np.allclose(sc.target_embeddings()[new_rows[:2]], rt.scene.target_embeddings()[train_rows[:2]])
    for split in ("val", "test"):  # the other splits keep their photos
        a, b = sc.split_rows(split), rt.scene.split_rows(split)
        assert np.array_equal(sc.target_embeddings()[a], rt.scene.target_embeddings()[b])
    pd_equal = make_episodes(rt.scene, "test", 6, seed=3).equals(before)
    assert pd_equal and rt.scene.target_embeddings() is not sc.target_embeddings()


def test_a_curriculum_starts_easy_and_widens_to_the_whole_distribution(rt: Runtime) -> None:
    p = _params(64, curriculum=2, randomize=1.0, randomize_views=2, decoy_rate=0.6)
    env = training.make_train_env(p, rt, "train", 2, 0)
    caps = env.scene.targets["strength_cap"].to_numpy(float)
    train_rows = env.scene.split_rows("train")
    assert sorted(set(caps[train_rows])) == [0.0, 0.5, 1.0]  # own photo, copy 0 (cap 0.5), copy 1 (cap 1.0)

    def drawn(level: float) -> tuple[set[float], float]:
        env.set_curriculum(level)
        draws = [env._draw(i % 2) for i in range(400)]
        return {float(caps[r]) for r, _, _ in draws}, float(np.mean([not np.isnan(d[0]) for _, _, d in draws]))

    assert drawn(0.0) == ({0.0}, 0.0)  # own photos only, no decoys
    seen, decoys = drawn(0.5)
    assert seen == {0.0, 0.5} and 0.2 < decoys < 0.4
    seen, decoys = drawn(1.0)
    assert seen == {0.0, 0.5, 1.0} and 0.5 < decoys < 0.7
    assert "strength_cap" not in training.make_train_env(_params(64, randomize=1.0), rt, "train", 2, 0).scene.targets


def test_the_curriculum_moves_up_a_level_only_after_a_rollout_that_succeeded(rt: Runtime) -> None:
    p = _params(64, curriculum=3, curriculum_success=0.5, decoy_rate=0.6)
    model = training.build_model(p.train, VecMonitor(training.make_train_env(p, rt, "train", 2, 0)), 0)
    model.set_logger(Logger(None, []))
    env = training._training_env(model)
    env.set_curriculum(0.0)
    cb = training.Curriculum(3, 0.5)
    cb.init_callback(model)
    for wins, level in [([True, False, False], 0.0), ([True, True, False], 1 / 3), ([], 1 / 3), ([True], 2 / 3)]:
        for w in wins:
            cb.update_locals({"infos": [{"is_success": w}, {}]})
            cb.on_step()
        cb.on_rollout_end()
        assert env.level == pytest.approx(level)
    for _ in range(3):
        cb.update_locals({"infos": [{"is_success": True}]})
        cb.on_step()
        cb.on_rollout_end()
    assert env.level == 1.0 and len(cb.raised_at) == 3  # never past the whole distribution


def _template(tmp: Path) -> RunPaths:
    slot = tmp / "{agent}"
    return RunPaths(slot / "policy.zip", slot / "ck", slot / "history.json", slot / "train.json", slot / "live")


@pytest.mark.parametrize("workers", [1, 2])
def test_the_train_stage_gives_each_agent_its_own_paths_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int
) -> None:
    seen: list[training.TrainJob] = []

    def fake_map(fn: Any, jobs: list[training.TrainJob], n: int, **_: Any) -> list[str]:
        assert fn is training._train_job and n == workers
        seen.extend(jobs)
        return [job.agent for job in jobs]

    monkeypatch.setattr(training, "ordered_map", fake_map)
    params = _params(64, workers=workers, progress_bar=True)
    out = training.run_train_agents(
        params, ["search", "memory"], "m.tif", "t.csv", "f", None, _template(tmp_path), tmp_path / "w" / "{agent}"
    )
    assert out == {"search": "search", "memory": "memory"}
    assert [j.paths.policy for j in seen] == [tmp_path / "search" / "policy.zip", tmp_path / "memory" / "policy.zip"]
    assert [j.worlds_dir for j in seen] == [str(tmp_path / "w" / a) for a in ("search", "memory")]
    assert all(j.paths.timing is None and j.params.train.workers == workers for j in seen)
    # one bar per agent would interleave across processes: with several workers, one bar over the agents
    assert all(j.params.train.progress_bar is (workers == 1) for j in seen)


def test_the_train_stage_refuses_paths_that_several_agents_would_share(tmp_path: Path) -> None:
    shared = RunPaths(tmp_path / "{agent}" / "p.zip", tmp_path / "ck", tmp_path / "h.json", tmp_path / "m.json",
                      tmp_path / "{agent}" / "live")  # fmt: skip
    with pytest.raises(InputError, match=r"--checkpoints, --history, --metrics must hold \{agent\}"):
        training.run_train_agents(_params(64), ["memory", "original"], "m", "t", "f", None, shared)
    with pytest.raises(InputError, match="each agent once"):
        training.run_train_agents(_params(64), ["memory", "memory"], "m", "t", "f", None, _template(tmp_path))


def test_the_train_stage_checks_every_agent_before_any_trains(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(training, "ordered_map", lambda *a, **k: pytest.fail("an agent trained"))
    with pytest.raises(ParamsError, match="'nope'"):
        training.run_train_agents(_params(64), ["memory", "nope"], "m", "t", "f", None, _template(tmp_path))
    with pytest.raises(ParamsError, match="the search agent"):  # the searcher's PPO warm start, with a2c
        training.run_train_agents(_params(64, algo="a2c"), ["memory", "search"], "m", "t", "f", None,
                                  _template(tmp_path))  # fmt: skip
    assert not any(tmp_path.iterdir())
