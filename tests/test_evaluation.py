import json
from pathlib import Path
from typing import Any

import imageio.v3 as iio
import numpy as np
import pandas as pd
import pytest

from maprl.config import EvaluateParams
from maprl.data.geo import MapData
from maprl.eval.agents import AgentController
from maprl.eval.baselines import (
    ControllerFactory,
    GreedyHillClimb,
    Lawnmower,
    RandomWalk,
    RetrieveThenFly,
    TemplateMatcher,
    TemplateOracle,
    default_baselines,
    fly_action,
    lawnmower_plan,
)
from maprl.eval.episodes import evaluate_methods, make_episodes, make_eval_env, make_split_episodes, run_episodes
from maprl.eval.evaluate import write_outputs
from maprl.eval.metrics import bin_labels, spl, summarise
from maprl.features.memory import MapMemory
from maprl.nav.core import NavConfig
from maprl.nav.scene import Scene
from maprl.nav.vecenv import NavVecEnv

from conftest import grid_targets, make_map

V = 32
PLAIN = NavConfig.of(action_step=0.1, max_steps=40, success_radius=8.0)
CFG = NavConfig.of(action_step=0.1, max_steps=40, success_radius=8.0, memory="retrieval")


def _valid_targets(m: MapData, n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    xs: list[float] = []
    ys: list[float] = []
    while len(xs) < n:
        x, y = (int(v) for v in rng.integers(V // 2, m.width - V // 2, 2))
        if m.valid[y - V // 2 : y + V // 2, x - V // 2 : x + V // 2].all():
            xs.append(float(x))
            ys.append(float(y))
    return grid_targets(xs, ys, ["train"] * (n // 2) + ["test"] * (n - n // 2))


@pytest.fixture(scope="module")
def scene() -> Scene:
    m = make_map(128, seed=3, nodata_corner=30)
    return Scene.build(m, _valid_targets(m, 10, 0), V)


@pytest.fixture(scope="module")
def memory(scene: Scene) -> MapMemory:
    ys, xs = np.nonzero(scene.ok)
    keep = (xs % 4 == 0) & (ys % 4 == 0)
    xs, ys = xs[keep].astype(float), ys[keep].astype(float)
    return MapMemory(np.stack([xs, ys], 1), scene.space.embed_at(xs, ys), min_separation=16.0)


@pytest.fixture(scope="module")
def episodes(scene: Scene) -> pd.DataFrame:
    return make_split_episodes(scene, ["train", "test"], 6, seed=5)


class GroundTruth:
    """Test-only cheat: flies straight at the true target centre, then holds still."""

    def reset(self, venv: NavVecEnv) -> None:
        return None

    def act(self, obs: dict[str, np.ndarray], venv: NavVecEnv) -> np.ndarray:
        return fly_action(venv.core.pos, venv.core.targets_xy[venv.core.rows], venv.core.step_px)


class Hold:
    def reset(self, venv: NavVecEnv) -> None:
        return None

    def act(self, obs: dict[str, np.ndarray], venv: NavVecEnv) -> np.ndarray:
        return np.zeros((venv.num_envs, 2), np.float32)


# -- episodes ------------------------------------------------------------------------------------
def test_make_episodes_seeded_and_cycling(scene: Scene) -> None:
    a = make_episodes(scene, "test", 12, seed=1)
    pd.testing.assert_frame_equal(a, make_episodes(scene, "test", 12, seed=1))
    assert not a.equals(make_episodes(scene, "test", 12, seed=2))
    cols = ["episode", "split", "target_row", "target_id", "start_x", "start_y", "decoy_x", "decoy_y"]
    assert list(a.columns) == cols and a["decoy_x"].isna().all()
    rows = scene.split_rows("test")
    assert set(a["target_row"]) == set(rows)
    counts = a["target_row"].value_counts()
    assert counts.max() - counts.min() <= 1  # cycles through the split's targets
    assert scene.is_valid(a["start_x"].to_numpy(), a["start_y"].to_numpy()).all()
    both = make_split_episodes(scene, ["train", "test"], 4, seed=1)
    assert list(both["split"]) == ["train"] * 4 + ["test"] * 4


# -- baselines -------------------------------------------------------------------------------------
def test_every_baseline_runs(scene: Scene, memory: MapMemory, episodes: pd.DataFrame) -> None:
    methods = default_baselines(scene, memory, seed=0)
    assert set(methods) == {
        "random_walk",
        "lawnmower",
        "greedy",
        "retrieve_then_fly",
        "retrieve_then_search",
        "template_oracle",
    }
    df, paths = evaluate_methods(scene, memory, CFG, methods, episodes)
    assert len(df) == len(methods) * len(episodes)
    for name, d in df.groupby("method"):
        assert len(paths[name]) == len(d)
        for p, (_, row) in zip(paths[name], d.iterrows(), strict=True):
            assert p.shape == (row["steps"] + 1, 2)
            assert np.allclose(p[-1], (row["final_x"], row["final_y"]))
            assert np.allclose(p[0], (row["start_x"], row["start_y"]))
    assert df["steps"].between(1, CFG.max_steps).all()
    assert df["spl"].between(0, 1).all() and df["final_pixel_cosine"].between(0, 1).all()
    rate = df.groupby("method")["success"].mean()
    assert rate["template_oracle"] == 1.0 and rate["retrieve_then_fly"] == 1.0


def test_template_oracle_finds_exact_crops(scene: Scene) -> None:
    rng = np.random.default_rng(4)
    for factor in (None, 1, 4):
        matcher = TemplateMatcher(scene, factor=factor)
        for _ in range(10):
            x, y = scene.sample_start(rng)
            x, y = float(round(x)), float(round(y))
            ex, ey, score = matcher.locate(scene.view(x, y))
            assert abs(ex - x) <= 1 and abs(ey - y) <= 1 and score > 0.99
    goals = TemplateOracle(TemplateMatcher(scene)).locate(make_eval_env(scene, PLAIN, 1), np.arange(len(scene.targets)))
    assert np.abs(goals - scene.targets[["x", "y"]].to_numpy(float)).max() <= 1
    assert scene.target_photo(0).shape == (V, V, 3)


def test_lawnmower_sweeps_the_map(scene: Scene) -> None:
    plan = lawnmower_plan(scene, np.array([60.0, 80.0]))
    assert plan[0, 1] == 80.0 and {plan[0, 0], plan[1, 0]} == {scene.lo, scene.hi_x}
    ys = np.unique(plan[:, 1])
    assert ys.min() <= scene.lo + V / 2 and ys.max() >= scene.hi_y - V / 2
    assert np.diff(ys).max() <= V + 1e-9


def test_controllers_output_unit_box(scene: Scene, memory: MapMemory, episodes: pd.DataFrame) -> None:
    rng = np.random.default_rng(0)
    venv = make_eval_env(scene, CFG, len(episodes), memory)
    for ctrl in (RandomWalk(rng), Lawnmower(), GreedyHillClimb(rng), RetrieveThenFly()):
        venv.set_episodes(list(zip(episodes["target_row"], episodes["start_x"], episodes["start_y"], strict=True)))
        obs = venv.reset()
        ctrl.reset(venv)
        for _ in range(3):
            a = ctrl.act(obs, venv)  # type: ignore[arg-type]
            assert a.shape == (len(episodes), 2) and np.abs(a).max() <= 1.0
            obs = venv.step(a)[0]


# -- metrics ----------------------------------------------------------------------------------------
def test_spl_is_one_for_a_straight_line_oracle(scene: Scene, episodes: pd.DataFrame) -> None:
    cfg = NavConfig.of(action_step=0.1, max_steps=40, success_radius=8.0, stop_threshold=0.999)
    df, paths = run_episodes(make_eval_env(scene, cfg, len(episodes)), GroundTruth(), episodes)
    assert df["success"].all() and df["stopped"].all()
    assert np.allclose(df["spl"], 1.0)
    # a straight line, possibly ending a fraction of a pixel early (the same view, so the stop rule fires)
    assert (df["path_length_px"] <= df["start_distance_px"] + 1e-6).all()
    assert np.allclose(df["path_length_px"] + df["final_distance_px"], df["start_distance_px"])
    assert (df["final_distance_px"] < 1).all()
    assert np.allclose(df["final_pixel_cosine"], 1.0) and np.allclose(df["final_feature_cosine"], 1.0, atol=1e-4)


def test_success_is_ground_truth_not_the_stop_rule(scene: Scene, episodes: pd.DataFrame) -> None:
    far = episodes[(episodes["start_x"] - scene.targets["x"].to_numpy()[episodes["target_row"]]).abs() > 30]
    assert len(far) > 0
    eager = NavConfig.of(action_step=0.1, max_steps=40, success_radius=8.0, stop_threshold=-1.0)  # stops at once
    df, _ = run_episodes(make_eval_env(scene, eager, len(far)), Hold(), far)
    assert df["stopped"].all() and not df["success"].any()
    assert (df["spl"] == 0).all() and (df["steps"] == 1).all()
    summary = summarise(df, [])[str(df["split"].iat[0])]
    assert summary["false_stop_rate"] == 1.0 and summary["success_rate"] == 0.0
    df, _ = run_episodes(make_eval_env(scene, PLAIN, len(far)), Hold(), far)
    assert not df["stopped"].any() and (df["steps"] == CFG.max_steps).all() and (df["spl"] == 0).all()


def test_spl_formula() -> None:
    out = spl(np.array([1, 1, 0, 1]), np.array([100.0, 100.0, 100.0, 0.0]), np.array([100.0, 200.0, 100.0, 0.0]))
    assert np.allclose(out, [1.0, 0.5, 0.0, 1.0])


def test_evaluation_is_deterministic(scene: Scene, memory: MapMemory, episodes: pd.DataFrame) -> None:
    def run() -> tuple[pd.DataFrame, dict]:
        df, _ = evaluate_methods(scene, memory, CFG, default_baselines(scene, memory, seed=3), episodes)
        return df, {m: summarise(d, [20, 40]) for m, d in df.groupby("method")}

    (a, sa), (b, sb) = run(), run()
    pd.testing.assert_frame_equal(a, b)
    assert sa == sb


def test_summarise_bins() -> None:
    assert bin_labels([250, 500, 1000]) == ["0-250", "250-500", "500-1000", "1000+"]
    df = pd.DataFrame(
        {
            "split": ["test"] * 5 + ["train"],
            "success": [True, False, True, True, False, True],
            "stopped": [True, True, False, True, False, True],
            "spl": [1.0, 0.0, 0.5, 0.8, 0.0, 1.0],
            "start_distance_px": [100.0, 200.0, 300.0, 600.0, 1500.0, 10.0],
            "final_distance_px": [1.0, 90.0, 2.0, 3.0, 900.0, 0.0],
            "final_distance_m": [np.nan] * 6,
            "steps": [3, 4, 5, 6, 100, 1],
            "final_feature_cosine": [0.99] * 6,
            "final_pixel_cosine": [0.9] * 6,
            "episode_reward": [1.0] * 6,
        }
    )
    s = summarise(df, [250, 500, 1000])
    assert set(s) == {"test", "train"}
    t = s["test"]
    assert t["episodes"] == 5 and t["success_rate"] == pytest.approx(0.6) and t["spl"] == pytest.approx(0.46)
    assert t["success_by_distance"] == {"0-250": 0.5, "250-500": 1.0, "500-1000": 1.0, "1000+": 0.0}
    assert t["episodes_by_distance"] == {"0-250": 2, "250-500": 1, "500-1000": 1, "1000+": 1}
    assert t["false_stop_rate"] == pytest.approx(0.2) and t["final_distance_px_median"] == 3.0
    assert t["final_distance_m_mean"] is None  # NaN becomes null in the JSON
    assert s["train"]["success_by_distance"]["1000+"] is None
    json.dumps(s, allow_nan=False)


# -- the trained agent wrapper ------------------------------------------------------------------------
class FakeRecurrent:
    def __init__(self) -> None:
        self.starts: list[np.ndarray] = []

    def predict(
        self, obs: dict, state: object = None, episode_start: object = None, deterministic: bool = False
    ) -> tuple[np.ndarray, tuple[str, int]]:
        assert deterministic
        self.starts.append(np.array(episode_start))
        return np.zeros((len(obs["nav"]), 2), np.float32), ("h", len(self.starts))


def test_agent_controller_passes_episode_start(scene: Scene, episodes: pd.DataFrame) -> None:
    model = FakeRecurrent()
    ctrl = AgentController(model, recurrent=True)
    cfg = NavConfig.of(action_step=0.1, max_steps=3, success_radius=8.0)
    run_episodes(make_eval_env(scene, cfg, len(episodes)), ctrl, episodes)
    assert model.starts[0].all() and not model.starts[1].any() and len(model.starts) == 3
    assert ctrl.state == ("h", 3)


# -- outputs ----------------------------------------------------------------------------------------
def test_write_outputs(tmp_path: Path, scene: Scene, memory: MapMemory, episodes: pd.DataFrame) -> None:
    methods: dict[str, ControllerFactory] = {
        "agent": lambda: RetrieveThenFly(),
        "random_walk": lambda: RandomWalk(np.random.default_rng(0)),
    }
    df, paths = evaluate_methods(scene, memory, CFG, methods, episodes)
    params = EvaluateParams(episodes=6, max_steps=40, distance_bins=[20, 40], gif_steps=5)
    metrics = write_outputs(
        df, paths, scene, tmp_path / "eval", tmp_path / "m.json", params, seed=5, stop_threshold=0.98
    )
    on_disk = json.loads((tmp_path / "m.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics))
    assert set(on_disk["agent"]) == {"train", "test"} and set(on_disk["baselines"]) == {"random_walk"}
    assert on_disk["stop_threshold"] == 0.98 and on_disk["agent"]["test"]["success_rate"] == 1.0
    out = tmp_path / "eval"
    assert len(pd.read_csv(out / "episodes.csv")) == 2 * len(episodes)
    table = pd.read_csv(out / "methods.csv")
    assert set(zip(table["method"], table["split"], strict=True)) == {
        (m, s) for m in methods for s in ("train", "test")
    }
    bins = pd.read_csv(out / "success_by_distance.csv")
    assert len(bins) == 2 * 2 * 3 and set(bins["bin"]) == {"0-20", "20-40", "40+"}
    assert (out / "trajectories.png").read_bytes()[:4] == b"\x89PNG"
    frames = iio.imread(out / "episode.gif", index=None)
    assert 2 <= len(frames) <= 5


@pytest.mark.parametrize("algo", ["ppo", "recurrent_ppo"])
def test_agent_controller_with_sb3_models(scene: Scene, episodes: pd.DataFrame, algo: str) -> None:
    from sb3_contrib import RecurrentPPO
    from stable_baselines3 import PPO

    cfg = NavConfig.of(action_step=0.1, max_steps=5, success_radius=8.0)
    venv = make_eval_env(scene, cfg, len(episodes))
    kw: dict[str, Any] = {"n_steps": 8, "batch_size": 8, "seed": 0, "device": "cpu"}
    model = PPO("MultiInputPolicy", venv, **kw) if algo == "ppo" else RecurrentPPO("MultiInputLstmPolicy", venv, **kw)
    ctrl = AgentController(model)
    assert ctrl.recurrent == (algo == "recurrent_ppo")
    a, _ = run_episodes(venv, ctrl, episodes)
    b, _ = run_episodes(make_eval_env(scene, cfg, len(episodes)), AgentController(model), episodes)
    pd.testing.assert_frame_equal(a, b)  # deterministic actions
    assert (a["steps"] <= 5).all()


def test_decoys_defeat_retrieve_then_fly_but_not_a_search(scene: Scene, memory: MapMemory) -> None:
    clean = make_episodes(scene, "test", 10, seed=2)
    decoyed = make_episodes(scene, "test", 10, seed=2, decoy_rate=1.0, decoy_distance=32.0)
    assert decoyed["decoy_x"].notna().all()
    pd.testing.assert_frame_equal(clean.iloc[:, :6], decoyed.iloc[:, :6])  # decoys are drawn after the rest
    target_xy = scene.targets[["x", "y"]].to_numpy()[decoyed["target_row"]]
    far = np.hypot(*(decoyed[["decoy_x", "decoy_y"]].to_numpy() - target_xy).T)
    assert (far >= 32.0).all()
    methods: dict[str, ControllerFactory] = {"fly": RetrieveThenFly, "search": lambda: RetrieveThenFly(search=True)}
    base, _ = evaluate_methods(scene, memory, CFG, methods, clean, record_paths=False)
    hard, _ = evaluate_methods(scene, memory, CFG, methods, decoyed, record_paths=False)
    ok = {
        (m, name): d.groupby("method")["success"].mean()[m]
        for name, d in (("clean", base), ("decoy", hard))
        for m in methods
    }
    assert ok["fly", "clean"] == ok["search", "clean"] == 1.0  # no decoy: the search is retrieve-then-fly
    assert ok["fly", "decoy"] == 0.0 and ok["search", "decoy"] == 1.0
