"""train.worlds: distinct procedural worlds, held-out worlds apart from training ones, one policy across them."""

import hashlib
from pathlib import Path

import numpy as np
import pytest

from maprl.config import agent_variant
from maprl.errors import ParamsError
from maprl.learn.training import RunPaths, train, world_envs
from maprl.learn.worlds import build_world, training_worlds, world_seeds
from maprl.nav.vecenv import MultiWorldVecEnv

from conftest import tiny_params

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def params(**train: object):  # type: ignore[no-untyped-def]
    return tiny_params(
        encoder={"kind": "pooled", "cache_stride": 8, "heading_search": 1},
        train={"n_envs": 4, "n_steps": 16, "batch_size": 32, "hparams": "params", "progress_bar": False,
               "eval_freq": 10_000, "eval_episodes": 2, "total_timesteps": 128, **train},
        evaluate={"success_radius": 8.0},
    )  # fmt: skip


def test_world_seeds_are_distinct_and_held_out_ones_never_train() -> None:
    train_seeds, held = world_seeds(42, 15), world_seeds(42, 15, held_out=True)
    assert len(set(train_seeds)) == 15 and len(set(held)) == 15 and not set(train_seeds) & set(held)
    assert 42 not in train_seeds + held
    assert world_seeds(42, 3) == world_seeds(42, 3) and world_seeds(42, 3) != world_seeds(7, 3)


@pytest.fixture(scope="module")
def worlds(tmp_path_factory: pytest.TempPathFactory) -> list:
    folder = tmp_path_factory.mktemp("worlds")
    p = agent_variant(params(worlds=3), "search")
    built = training_worlds(p, folder)
    held = build_world(p, world_seeds(p.base.seed, 1, held_out=True)[0], folder)[0]
    return [built, held, folder, p]


def _digest(rt) -> str:  # type: ignore[no-untyped-def]
    return hashlib.sha256(rt.scene.map.rgb.tobytes()).hexdigest()


def test_train_worlds_builds_distinct_worlds_and_a_held_out_world_apart_from_them(worlds: list) -> None:
    built, held, folder, p = worlds
    assert len(built) == 2  # world 0 is the pipeline's own map
    digests = [_digest(rt) for rt in built]
    assert len(set(digests)) == 2 and _digest(held) not in digests
    xy = [set(map(tuple, rt.scene.targets_xy.round(1).tolist())) for rt in built]
    assert xy[0] != xy[1]
    assert sorted(q.name for q in Path(folder).iterdir()) == sorted(
        f"world-{s}" for s in [*world_seeds(p.base.seed, 2), *world_seeds(p.base.seed, 1, held_out=True)]
    )


def test_a_world_is_built_once_and_reused(worlds: list) -> None:
    built, _, folder, p = worlds
    stamp = {f: f.stat().st_mtime_ns for f in Path(folder).rglob("*.tif")}
    again = training_worlds(p, folder)
    assert [_digest(r) for r in again] == [_digest(r) for r in built]
    assert {f: f.stat().st_mtime_ns for f in Path(folder).rglob("*.tif")} == stamp


def test_one_policy_trains_across_worlds(worlds: list, tmp_path: Path) -> None:
    built, held, _, p = worlds
    venv = world_envs(p, [held, *built], 4, 0, None)
    assert isinstance(venv, MultiWorldVecEnv) and venv.num_envs == 4
    assert sorted(e.num_envs for e in venv.envs) == [1, 1, 2]
    obs = venv.reset()
    assert obs["nav"].shape == (4, venv.observation_space["nav"].shape[0])
    _, reward, done, infos = venv.step(np.array([venv.action_space.sample() for _ in range(4)]))
    assert reward.shape == (4,) and len(infos) == 4
    paths = RunPaths(
        tmp_path / "policy.zip", tmp_path / "ck", tmp_path / "h.json", tmp_path / "m.json", tmp_path / "live"
    )
    metrics = train(p, held, paths, None, built)
    assert metrics["worlds"] == 3 and paths.policy.exists()


def test_worlds_need_a_portable_agent(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match="agent.portable"):
        training_worlds(params(worlds=2), tmp_path)
    assert agent_variant(params(worlds=4), "memory").train.worlds == 1
