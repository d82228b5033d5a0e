import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import maprl
from maprl.env import SatelliteNavEnv
from maprl.geo import MapData
from maprl.scene import Scene

from conftest import grid_targets

V = 32


@pytest.fixture
def scene(tiny_map: MapData) -> Scene:
    t = grid_targets([70.0, 90.0, 100.0, 60.0], [70.0, 60.0, 100.0, 100.0], ["train", "train", "test", "test"])
    return Scene.build(tiny_map, t, V)


def make(scene: Scene, **kw: object) -> SatelliteNavEnv:
    return SatelliteNavEnv(scene=scene, view_size=V, action_step=0.1, **kw)  # type: ignore[arg-type]


def test_gymnasium_checker(scene: Scene) -> None:
    check_env(make(scene), skip_render_check=True)


def test_sb3_checker(scene: Scene) -> None:
    from stable_baselines3.common.env_checker import check_env as sb3_check

    sb3_check(make(scene), warn=True)


def test_registered_with_time_limit(scene: Scene) -> None:
    env = gym.make(maprl.ENV_ID, scene=scene, view_size=V, max_episode_steps=5)
    env.reset(seed=0)
    for _ in range(4):
        *_, truncated, _info = env.step(np.zeros(2, np.float32))
        assert not truncated
    assert env.step(np.zeros(2, np.float32))[3]
    assert gym.spec(maprl.ENV_ID).max_episode_steps == 1000


def _rollout(env: SatelliteNavEnv, seed: int) -> list:
    obs, info = env.reset(seed=seed)
    out = [info["position"]]
    rng = np.random.default_rng(0)
    for _ in range(15):
        obs, r, term, trunc, info = env.step(rng.uniform(-1, 1, 2).astype(np.float32))
        out.append((info["position"], r, obs["current"].sum()))
    return out


def test_same_seed_same_rollout(scene: Scene) -> None:
    assert _rollout(make(scene), 3) == _rollout(make(scene), 3)
    assert _rollout(make(scene), 3) != _rollout(make(scene), 4)


def test_reward_formula_on_hand_built_cases(scene: Scene) -> None:
    env = make(scene, bonus_threshold=0.9, bonus_scale=10, success_threshold=0.98, success_bonus=100)
    assert env.reward(0.5) == (pytest.approx(0.5 - 0.01), False)
    assert env.reward(0.95)[0] == pytest.approx(0.95 + 10 * 0.05 / 0.1 - 0.01)
    r, success = env.reward(0.99)
    assert success and r == pytest.approx(0.99 + 10 * 0.09 / 0.1 + 100 - 0.01)


def test_clipped_at_borders(scene: Scene) -> None:
    env = make(scene)
    env.reset(seed=0, options={"target_id": 0, "start": (120.0, 120.0)})
    for _ in range(30):
        *_, info = env.step(np.array([1.0, 1.0], np.float32))
    x, y = info["position"]
    assert x == pytest.approx(128 - V / 2 - 0.5) and y == pytest.approx(128 - V / 2 - 0.5)
    assert env.observation_space["current"].contains(env.step(np.zeros(2, np.float32))[0]["current"])


def test_nodata_blocks_moves(scene: Scene) -> None:
    env = make(scene)
    env.reset(seed=0, options={"target_id": 0, "start": (60.0, 60.0)})
    for _ in range(20):
        *_, info = env.step(np.array([-1.0, -1.0], np.float32))
    x0, y0 = int(info["position"][0] - V / 2 + 0.5), int(info["position"][1] - V / 2 + 0.5)
    assert scene.map.valid[y0 : y0 + V, x0 : x0 + V].all()


def test_success_when_started_on_target(scene: Scene) -> None:
    env = make(scene)
    obs, info = env.reset(seed=0, options={"target_id": 1, "start": (90.0, 60.0)})
    assert info["distance_px"] == 0 and info["similarity"] == pytest.approx(1.0, abs=1e-5)
    assert np.array_equal(obs["target"], obs["current"])
    _, reward, terminated, _, info = env.step(np.zeros(2, np.float32))
    assert terminated and info["is_success"] and reward > 100


def test_splits_draw_only_their_targets(scene: Scene) -> None:
    env = make(scene, split="test")
    ids = {env.reset(seed=s)[1]["target_id"] for s in range(30)}
    assert ids == {2, 3}


def test_info_distance_in_metres(scene: Scene) -> None:
    _, info = make(scene).reset(seed=1)
    assert info["distance_m"] == pytest.approx(info["distance_px"] * 2.0)


def test_render_shows_path(scene: Scene) -> None:
    env = make(scene, render_mode="rgb_array")
    env.reset(seed=0)
    env.step(np.array([1.0, 0.0], np.float32))
    frame = env.render()
    assert frame is not None and frame.dtype == np.uint8 and frame.shape[2] == 3
    assert (frame == (255, 40, 40)).all(axis=-1).any()


def test_pixel_similarity_option(scene: Scene, tiny_map: MapData) -> None:
    pix = Scene.build(tiny_map, scene.targets, V, similarity="pixels")
    env = make(pix)
    _, info = env.reset(seed=0, options={"target_id": 0, "start": (70.0, 70.0)})
    assert info["similarity"] == pytest.approx(1.0, abs=1e-5)
