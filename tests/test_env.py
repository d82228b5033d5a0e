import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import maprl
from maprl.data.geo import MapData
from maprl.nav.env import SatelliteNavEnv
from maprl.nav.scene import Scene

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
    env = make(scene, bonus_band=0.08, bonus_scale=10, stop_threshold=0.98, success_bonus=100)
    assert env.reward(0.5) == (pytest.approx(0.5 - 0.01), False)
    assert env.reward(0.95)[0] == pytest.approx(0.95 + 10 * 0.05 / 0.1 - 0.01)
    r, success = env.reward(0.99)
    assert success and r == pytest.approx(0.99 + 10 * 0.09 / 0.1 + 100 - 0.01)


def test_clipped_at_borders(scene: Scene) -> None:
    env = make(scene)
    env.reset(seed=0, options={"target_id": 0, "start": (111.0, 111.0)})
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


def test_bonus_band_follows_the_calibrated_stop_threshold(scene: Scene) -> None:
    """Defect: the bonus started at a fixed 0.90, above a calibrated stop of 0.75, so it never paid."""
    env = make(scene, stop_threshold=0.75, bonus_band=0.08, bonus_scale=10)
    assert env.reward(0.60) == (pytest.approx(0.60 - 0.01), False)  # below the band: no bonus
    r, success = env.reward(0.74)  # inside the band, below the stop: a bonus, no success
    assert not success and r == pytest.approx(0.74 + 10 * (0.74 - 0.67) / (1 - 0.67) - 0.01)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"start": np.array([70.0, 70.0]), "target_id": 99}, r"\['target_id'\]=99 is not a target"),
        ({"target_id": np.array([1, 2])}, "is not a target"),
        ({"start": (np.nan, 70.0)}, "two finite numbers"),
        ({"start": (70.0, 70.0, 1.0)}, "two finite numbers"),
        ({"start": "here"}, "two finite numbers"),
        ({"start": (500.0, 70.0)}, "off the map"),
        ({"decoy": (np.inf, 3.0)}, "two finite numbers"),
    ],
)
def test_bad_reset_options_are_clear_errors(scene: Scene, options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make(scene).reset(seed=0, options=options)


def test_start_may_be_an_array(scene: Scene) -> None:
    """Defect: ``options={"start": np.array([x, y])}`` raised (an ``or`` on an array)."""
    _, info = make(scene).reset(seed=0, options={"start": np.array([70.0, 75.0])})
    assert info["position"] == (70.0, 75.0)


@pytest.mark.parametrize("action", [np.array([np.nan, 0.0]), np.zeros(3), np.zeros((1, 2)), "up", None])
def test_bad_actions_are_clear_errors(scene: Scene, action: np.ndarray) -> None:
    env = make(scene)
    env.reset(seed=0)
    with pytest.raises(ValueError, match="action must be two finite numbers"):
        env.step(action)


@pytest.mark.parametrize(
    "bad", [{"max_steps": 0}, {"max_steps": -3}, {"stop_threshold": float("nan")}, {"success_radius": 0.0}]
)
def test_an_out_of_range_env_config_is_a_clear_error(scene: Scene, bad: dict) -> None:
    """Defect: max_steps=0 or a NaN stop threshold built an env that could never behave."""
    with pytest.raises(ValueError, match=f"NavConfig: {next(iter(bad))}="):
        make(scene, **bad)


def test_shaping_is_potential_based(scene: Scene) -> None:
    """Defect: the shaping omitted gamma and phi(terminal) = 0. Over an episode that ends at the target,
    the discounted shaping returns telescope to -phi(start) = start distance / step."""
    gamma, step = 0.9, 0.1 * 128
    env = make(scene, shaping=1.0, gamma=gamma, stop_threshold=0.999, step_penalty=0, bonus_scale=0)
    _, info = env.reset(seed=0, options={"target_id": 1, "start": (90.0 - 2 * step, 60.0)})
    ret, k, terminated = 0.0, 0, False
    while not terminated:
        _, r, terminated, _, info = env.step(np.array([1.0, 0.0], np.float32))
        ret += gamma**k * (r - info["similarity"] - 100 * terminated)  # the shaping part of the reward
        k += 1
    assert k == 2 and info["distance_px"] == pytest.approx(0, abs=1e-9)
    assert ret == pytest.approx(2 * step / step)


def test_moves_cross_a_nodata_gap_narrower_than_max_nodata(tiny_map: MapData) -> None:
    """Defect: any nodata pixel in the new view blocked the move, so agents froze at nodata edges."""
    valid = np.ones_like(tiny_map.valid)
    valid[:, 60:68] = False  # an 8 px strip from top to bottom, a quarter of the 32 px view
    m = MapData(tiny_map.rgb, tiny_map.elevation, valid, tiny_map.transform, tiny_map.crs)
    targets = grid_targets([100.0, 30.0], [64.0, 64.0], ["train", "train"])
    for max_nodata, crossed in ((0.0, False), (0.3, True)):
        env = SatelliteNavEnv(scene=Scene.build(m, targets, V, max_nodata=max_nodata), action_step=0.05)
        env.reset(seed=0, options={"target_id": 0, "start": (30.0, 64.0)})
        for _ in range(20):
            _, _, _, _, info = env.step(np.array([1.0, 0.0], np.float32))
        assert (info["position"][0] > 68) == crossed


def test_distance_in_true_metres_on_a_map_in_degrees() -> None:
    """Defect: a map in EPSG:4326 reported metres in degrees. At 46.5 deg N one degree of longitude
    is about 76.8 km and one of latitude about 111.2 km."""
    from rasterio.crs import CRS
    from rasterio.transform import from_origin

    m = MapData(
        np.zeros((64, 64, 3), np.uint8), np.zeros((64, 64), np.float32), np.ones((64, 64), bool),
        from_origin(6.0, 46.5, 1e-3, 1e-3), CRS.from_epsg(4326),
    )  # fmt: skip
    mx, my = m.metres_per_pixel_xy
    assert mx == pytest.approx(76.8, rel=0.01) and my == pytest.approx(111.2, rel=0.01)
    assert float(m.distance_m(np.array([0.0, 0.0]), np.array([3.0, 4.0]))) == pytest.approx(np.hypot(3 * mx, 4 * my))
