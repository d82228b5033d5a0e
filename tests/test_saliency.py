"""Perturbation saliency (Greydanus et al. 2018) and the episode video: a policy that reads one patch only
has its saliency peak at that patch, an unchanged view scores 0, the observation is rebuilt exactly as
the env builds it, ``maprl saliency`` writes PNGs, a GIF and the maps and fails cleanly on bad input,
and the MP4 branch is taken only where imageio's ffmpeg plugin is."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import imageio.v3 as iio
import numpy as np
import pandas as pd
import pytest
import yaml
from stable_baselines3 import PPO

from maprl.cli import main
from maprl.config import EncoderParams, Params, agent_variant, parse_params
from maprl.data.geo import MapData, write_map
from maprl.errors import InputError
from maprl.eval.agents import AgentController
from maprl.eval.episodes import make_eval_env, run_episodes
from maprl.eval.saliency import (
    EpisodeSpec,
    PixelObserver,
    PolicyProbe,
    SaliencySettings,
    evaluate_video,
    evenly_spaced,
    fly,
    gaussian_masks,
    mask_centres,
    parse_steps,
    perturbed_views,
    step_saliency,
    upsample,
)
from maprl.features.cache import make_space
from maprl.features.memory import MapMemory
from maprl.features.photos import embed_photos, save_photo_embeddings
from maprl.io import write_json
from maprl.learn.policies import MapRLPolicy
from maprl.nav.core import NavConfig
from maprl.nav.runtime import Runtime, load_runtime, nav_config, pooled_memory
from maprl.nav.scene import Scene
from maprl.nav.vecenv import NavVecEnv
from maprl.views import crop_views, unit
from maprl.viz import saliency as viz

from conftest import grid_targets, make_map

pytestmark = pytest.mark.usefixtures("one_torch_thread")

V = 32
PATCH = (slice(8, 16), slice(18, 26))  # rows 8..15, columns 18..25 of a view
SETTINGS = SaliencySettings(stride=2, sigma=1.5, blur=2.0)


class PatchSpace:
    """A feature space that sees one patch of the view only (and nothing else)."""

    name = "patch"

    def __init__(self, rgb: np.ndarray, view_size: int) -> None:
        self.rgb, self.view_size = rgb, view_size
        self.dim = 8 * 8 * 3

    def embed_view(self, views: np.ndarray) -> np.ndarray:
        single = views.ndim == 3
        batch = views[None] if single else views
        x = batch[:, PATCH[0], PATCH[1]].reshape(len(batch), -1).astype(np.float32)
        out = unit(x - x.mean(axis=1, keepdims=True))
        return out[0] if single else out

    def embed_at(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        return self.embed_view(crop_views(self.rgb, np.atleast_1d(xs), np.atleast_1d(ys), self.view_size))


def _ppo(scene: Scene, cfg: NavConfig, memory: MapMemory | None, seed: int = 0) -> PPO:
    venv = NavVecEnv(scene, 1, cfg, split="all", memory=memory)
    return PPO(MapRLPolicy, venv, n_steps=8, batch_size=8, seed=seed, device="cpu")


def _inside(yx: tuple[int, int]) -> bool:
    return PATCH[0].start <= yx[0] < PATCH[0].stop and PATCH[1].start <= yx[1] < PATCH[1].stop


def _peak(coarse: np.ndarray, stride: int) -> tuple[int, int]:
    c = mask_centres(V, stride)
    i, j = np.unravel_index(int(np.argmax(coarse)), coarse.shape)
    return int(c[i]), int(c[j])


def _far_from_patch(stride: int, margin: int) -> np.ndarray:
    """(gh, gw) bool: mask centres at least ``margin`` px from the patch (their mask cannot change it)."""
    c = mask_centres(V, stride)
    dy = np.maximum(np.maximum(PATCH[0].start - c, c - (PATCH[0].stop - 1)), 0)
    dx = np.maximum(np.maximum(PATCH[1].start - c, c - (PATCH[1].stop - 1)), 0)
    return np.hypot(dy[:, None], dx[None, :]) >= margin


# -- the perturbation -------------------------------------------------------------------------------------
def test_masks_perturbation_and_upsampling() -> None:
    m = gaussian_masks((V, V), np.array([[5, 20]]), 3.0)[0]
    assert m[5, 20] == pytest.approx(1.0) and np.unravel_index(np.argmax(m), m.shape) == (5, 20)
    view = make_map(64, seed=2).rgb[:V, :V]
    soft = np.full(view.shape, 100.0, np.float32)
    out = perturbed_views(view, soft, np.array([[5, 20]]), 3.0)[0]
    assert out[5, 20].tolist() == [100, 100, 100]  # the blurred image at the centre
    assert np.array_equal(out[25:, :8], view[25:, :8])  # far away: unchanged
    coarse = np.arange(16.0).reshape(4, 4)
    full = upsample(coarse, V, 8)
    c = mask_centres(V, 8)
    assert np.allclose(full[np.ix_(c, c)], coarse)  # the grid values sit at the mask centres
    assert full.shape == (V, V)


def test_parse_steps_and_frames() -> None:
    assert parse_steps("0, 3,-1", 10) == [0, 3, 9]
    assert parse_steps("all", 3) == [0, 1, 2]
    assert parse_steps("auto", 10) == [0, 3, 6, 9]
    assert evenly_spaced(2, 5) == [0, 1]
    for bad, needle in (("10", "outside this episode"), ("-11", "outside"), ("x", "not a step number"), (",", "empty")):
        with pytest.raises(InputError, match=needle):
            parse_steps(bad, 10)


# -- the test: a policy that depends on one patch only -----------------------------------------------
@pytest.fixture(scope="module")
def patch_scene() -> tuple[Scene, MapMemory]:
    m = make_map(96, seed=4)
    t = grid_targets([30.0, 60.0, 40.0, 64.0], [30.0, 40.0, 64.0, 64.0], ["train", "train", "test", "test"])
    scene = Scene(m, t, PatchSpace(m.rgb, V), V)  # type: ignore[arg-type]
    return scene, pooled_memory(scene, 4, 12.0)


@pytest.mark.parametrize("memory_kind", ["retrieval", "none"])
def test_feature_policy_reading_one_patch_peaks_there(patch_scene: tuple[Scene, MapMemory], memory_kind: str) -> None:
    scene, memory = patch_scene
    cfg = NavConfig.of(max_steps=3, memory=memory_kind, success_radius=6.0)
    model = _ppo(scene, cfg, memory if memory_kind == "retrieval" else None)
    flight = fly(model, scene, cfg, memory, 2, (50.0, 30.0))
    sal = step_saliency(flight.observer(0), PolicyProbe(model), flight.target_view, flight.current_view(0), SETTINGS)
    far = _far_from_patch(SETTINGS.stride, 8)
    for view in ("target", "current"):
        for kind in ("actor", "critic"):
            coarse = sal.maps[view, kind]
            assert coarse.max() > 0, (view, kind)
            assert _inside(_peak(coarse, SETTINGS.stride)), (view, kind, _peak(coarse, SETTINGS.stride))
            # a mask that cannot reach the patch changes nothing (up to BLAS rounding of another batch shape)
            assert np.all(coarse[far] <= 1e-12 * coarse.max()), (view, kind)
            full = sal.full(view, kind)
            assert full.shape == (V, V) and _inside(np.unravel_index(int(np.argmax(full)), full.shape))  # type: ignore[arg-type]


class PatchProbe:
    """A fake pixel policy: a fixed random function of the target's (or current view's) patch pixels."""

    kind = "probabilities"

    def __init__(self, key: str) -> None:
        rng = np.random.default_rng(0)
        self.key, self.w, self.v = key, rng.normal(size=(4, 8 * 8 * 3)) / 100, rng.normal(size=8 * 8 * 3) / 100

    def __call__(self, obs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        x = obs[self.key][:, PATCH[0], PATCH[1]].reshape(len(obs[self.key]), -1).astype(np.float64) / 255
        logits = x @ self.w.T
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        return p / p.sum(axis=1, keepdims=True), np.tanh(x @ self.v)


@pytest.mark.parametrize("key", ["target", "current"])
def test_pixel_policy_reading_one_patch_peaks_there(key: str) -> None:
    rgb = make_map(64, seed=5).rgb
    target, current = rgb[:V, :V], rgb[20 : 20 + V, 24 : 24 + V]
    sal = step_saliency(PixelObserver(), PatchProbe(key), target, current, SETTINGS)
    other = "current" if key == "target" else "target"
    for kind in ("actor", "critic"):
        assert _inside(_peak(sal.maps[key, kind], SETTINGS.stride))
        top = sal.maps[key, kind].max()
        assert top > 0 and np.all(sal.maps[key, kind][_far_from_patch(SETTINGS.stride, 8)] <= 1e-12 * top)
        assert np.all(sal.maps[other, kind] <= 1e-12 * top)  # the policy does not read the other view at all


def test_a_pixel_ppo_policy_flies_and_is_probed_as_sb3_runs_it(tiny_map: MapData) -> None:
    """The original design's pixel policy (``obs="pixels"``; SB3 stores its image spaces channel-first):
    the flight is the Gymnasium env's and the probe's float64 outputs are SB3's own."""
    import torch

    from maprl.eval.saliency import check_spaces
    from maprl.nav.env import SatelliteNavEnv

    scene = Scene.build(tiny_map, grid_targets([70.0, 90.0], [70.0, 60.0], ["test", "test"]), V)
    cfg = NavConfig.of(max_steps=3, action_step=0.1, success_radius=8.0)
    env = SatelliteNavEnv(scene=scene, obs="pixels", config=cfg, split="all")
    kw = {"features_extractor_kwargs": {"input_size": V}}
    model = PPO(MapRLPolicy, env, n_steps=8, batch_size=8, seed=0, device="cpu", policy_kwargs=kw)
    check_spaces(model, scene, cfg, "original")
    flight = fly(model, scene, cfg, None, 1, (90.0, 90.0))
    obs, _ = env.reset(options={"target_id": 1, "start": (90.0, 90.0)})
    path = [env.core.pos[0].copy()]
    for _ in range(flight.steps):
        obs, *_ = env.step(model.predict(obs, deterministic=True)[0])
        path.append(env.core.pos[0].copy())
    np.testing.assert_allclose(np.stack(path), flight.path)
    batch = {"target": np.stack([flight.target_view] * 2), "current": np.stack([flight.current_view(0)] * 2)}
    dist, value = PolicyProbe(model)(batch)
    tensors, _ = model.policy.obs_to_tensor(batch)
    with torch.no_grad():
        mean = model.policy.get_distribution(tensors).distribution.mean.numpy()
        v = model.policy.predict_values(tensors).numpy().ravel()
    np.testing.assert_allclose(dist, mean, atol=1e-5)
    np.testing.assert_allclose(value, v, atol=1e-4)


def test_an_unchanged_view_scores_zero(patch_scene: tuple[Scene, MapMemory]) -> None:
    """Flat views: blurring changes no pixel, so the rebuilt observation, and every score, is the baseline's."""
    scene, memory = patch_scene
    cfg = NavConfig.of(max_steps=3, memory="retrieval", success_radius=6.0)
    model = _ppo(scene, cfg, memory)
    flight = fly(model, scene, cfg, memory, 2, (50.0, 30.0))
    flat = np.full((V, V, 3), 90, np.uint8)
    flat[..., 1] = 140
    sal = step_saliency(flight.observer(1), PolicyProbe(model), flat, flat.copy(), SaliencySettings(4, 3.0, 3.0))
    assert all(np.all(m == 0) for m in sal.maps.values())


# -- the observation is the env's ------------------------------------------------------------------------
def test_rebuilt_observation_is_the_envs(tiny_map: MapData) -> None:
    """With the pooled space (its cache and a crop's embedding agree), the observation rebuilt from the two
    views equals the env's at every step, for the searcher's nav vector (history, candidate view and seen
    similarities, decoy) as well as the memory agent's."""
    t = grid_targets([70.0, 90.0, 100.0, 60.0], [70.0, 60.0, 100.0, 100.0], ["train"] * 4)
    scene = Scene.build(tiny_map, t, V)
    memory = pooled_memory(scene, 4, 16.0)
    search = {"sim_history": 2, "candidate_view_sim": True, "candidate_seen_sim": True, "n_candidates": 3}
    for kw in ({"memory": "retrieval"}, {"memory": "retrieval", **search}, {"memory": "none"}):
        cfg = NavConfig.of(max_steps=6, action_step=0.1, success_radius=8.0, **kw)
        model = _ppo(scene, cfg, memory)
        flight = fly(model, scene, cfg, memory, 1, (60.0, 60.0), decoy=(100.0, 60.0))
        venv = NavVecEnv(scene, 1, cfg, split="all", memory=memory)
        venv.set_episodes([(1, 60.0, 60.0, 100.0, 60.0)])
        obs = venv.reset()
        for step in range(flight.steps):
            o = flight.observer(step)
            rebuilt = o.observe(o.encode(flight.target_view[None]), o.encode(flight.current_view(step)[None]))
            assert rebuilt.keys() == obs.keys()
            for k in obs:
                np.testing.assert_allclose(rebuilt[k], obs[k], atol=2e-5, err_msg=f"{kw} step {step} {k}")
            action, _ = model.predict(obs, deterministic=True)
            obs, *_ = venv.step(action)


def test_fly_follows_the_evaluation_rollout(tiny_map: MapData) -> None:
    t = grid_targets([70.0, 90.0], [70.0, 60.0], ["test", "test"])
    scene = Scene.build(tiny_map, t, V)
    memory = pooled_memory(scene, 4, 16.0)
    cfg = NavConfig.of(max_steps=5, action_step=0.1, success_radius=8.0, memory="retrieval")
    model = _ppo(scene, cfg, memory, seed=3)
    episodes = pd.DataFrame({"target_row": [1], "start_x": [60.0], "start_y": [90.0]})
    df, paths = run_episodes(make_eval_env(scene, cfg, 1, memory), AgentController(model), episodes)
    flight = fly(model, scene, cfg, memory, 1, (60.0, 90.0))
    np.testing.assert_allclose(flight.path, paths[0])
    assert flight.steps == int(df.at[0, "steps"]) and flight.success() == bool(df.at[0, "success"])


# -- the video -------------------------------------------------------------------------------------------
def _frames(n: int = 2) -> list[np.ndarray]:
    return [np.full((20, 30, 3), 40 * i, np.uint8) for i in range(n)]


def test_mp4_is_written_only_with_the_ffmpeg_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert viz.mp4_available() == (importlib.util.find_spec("imageio_ffmpeg") is not None)
    monkeypatch.setattr(viz, "mp4_available", lambda: False)
    files, note = viz.write_video(_frames(), tmp_path / "a", fps=2)
    assert files == [tmp_path / "a.gif"] and note is not None and "imageio-ffmpeg" in note
    assert not (tmp_path / "a.mp4").exists() and iio.imread(tmp_path / "a.gif", index=None).shape[0] == 2

    got: dict[str, Any] = {"frames": []}

    class FakeWriter:
        def __init__(self, path: str, **kw: Any) -> None:
            got.update(path=path, kw=kw)

        def append_data(self, frame: np.ndarray) -> None:
            got["frames"].append(frame.shape)

        def close(self) -> None:
            Path(got["path"]).write_bytes(b"mp4")

    import imageio.v2

    monkeypatch.setattr(viz, "mp4_available", lambda: True)
    monkeypatch.setattr(imageio.v2, "get_writer", FakeWriter)
    files, note = viz.write_video(_frames(3), tmp_path / "b", fps=2)
    assert files == [tmp_path / "b.gif", tmp_path / "b.mp4"] and note is None
    assert (tmp_path / "b.mp4").read_bytes() == b"mp4" and got["kw"]["format"] == "FFMPEG"
    assert got["frames"] == [(32, 32, 3)] * 3  # padded to multiples of 16 for H.264
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gif", "b.gif", "b.mp4"]  # no temporary files left


# -- maprl saliency and the evaluate stage's video ---------------------------------------------------------
RAW = {
    "tile": {"view_size": V, "block_size": 64},
    "encoder": {"kind": "impala_cnn", "weights": "random", "input_size": 64, "cache_stride": 4, "torch_threads": 1,
                "local_norm": 0.0, "heading_search": 2},
    "evaluate": {"episodes": 3, "max_steps": 4, "success_radius": 8.0, "saliency_steps": 2, "saliency_stride": 16},
    "train": {"val_fraction": 0.3},
}  # fmt: skip


def _workspace(root: Path) -> dict[str, str]:
    """What the pipeline leaves for a tiny map: params, map, targets, features (a random CNN) and a policy."""
    params = parse_params(RAW)
    (root / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
    m = make_map(128, seed=6)
    write_map(root / "map.tif", m.rgb, m.elevation, m.transform, m.crs, m.valid)
    xy = np.random.default_rng(0).uniform(V, 128 - V, (12, 2)).round()
    split = ["train", "train", "test"] * 4
    targets = pd.DataFrame({"id": np.arange(12), "x": xy[:, 0], "y": xy[:, 1], "split": split})
    targets.to_csv(root / "targets.csv", index=False)
    space = make_space(EncoderParams(**RAW["encoder"]), m, V, seed=0)
    (root / "features").mkdir()
    space.save(root / "features")
    write_json(root / "features" / "calibration.json", {"stop_threshold": 0.9})
    memory = MapMemory(space.grid_positions(), space.grid_embeddings(), 2 * params.evaluate.success_radius)
    photos = crop_views(m.rgb, xy[:, 0], xy[:, 1], V)
    emb = embed_photos(space, memory, photos, 2, accept=0.9)
    save_photo_embeddings(root / "features" / "photos.npz", targets["id"].to_numpy(), {"same": emb}, 2)
    rt = load_runtime(params, root / "map.tif", root / "targets.csv", root / "features")
    ap = agent_variant(params, "memory")
    cfg = nav_config(ap, rt, max_steps=4, shaping=0.0)
    _ppo(rt.scene, cfg, rt.memory).save(root / "policy.zip")
    files = {"params": "params.yaml", "map": "map.tif", "targets": "targets.csv", "features": "features",
             "policy": "policy.zip"}  # fmt: skip
    return {k: str(root / v) for k, v in files.items()}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return _workspace(tmp_path_factory.mktemp("saliency"))


def _args(ws: dict[str, str], out: Path, *extra: str) -> list[str]:
    return ["saliency", *(f"--{k}={v}" for k, v in ws.items()), f"--out={out}", "--stride=16", "--sigma=6", *extra]


def test_cli_writes_pngs_video_and_maps(
    workspace: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sal"
    assert main(_args(workspace, out, "--steps", "0,-1", "--frames", "3")) == 0
    summary = json.loads(capsys.readouterr().out)
    last = summary["episode_steps"]
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted({"step_000.png", f"step_{last:03d}.png", "episode.gif", "saliency.npz"})
    gif = iio.imread(out / "episode.gif", index=None)
    assert gif.shape[0] == min(3, last + 1) and gif.shape[-1] == 3
    png = iio.imread(out / "step_000.png")
    assert png.ndim == 3 and png.shape[0] > 200
    with np.load(out / "saliency.npz") as npz:
        assert npz["target_actor"].shape == (len(npz["steps"]), 2, 2) and set(npz["steps"]) >= {0, last}
        assert np.all(npz["current_critic"] >= 0)
    assert summary["episode"] == "test episode 0" and summary["actor_distance"].endswith("mean")
    assert summary["seconds_per_step"] > 0 and all(Path(f).exists() for f in summary["files"])
    if importlib.util.find_spec("imageio_ffmpeg") is None:
        assert any("imageio-ffmpeg" in n for n in summary["notes"])


def test_cli_photo_and_target_id(workspace: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    photo = tmp_path / "p.png"
    Image.fromarray(make_map(128, seed=6).rgb[20:70, 30:80]).save(photo)
    out = tmp_path / "photo"
    assert main(_args(workspace, out, "--photo", str(photo), "--steps", "0", "--no-video")) == 0
    assert json.loads(capsys.readouterr().out)["episode"].startswith("photo p.png")
    assert sorted(p.name for p in out.iterdir()) == ["saliency.npz", "step_000.png"]
    assert main(_args(workspace, tmp_path / "t", "--target-id", "5", "--steps", "0", "--no-video")) == 0
    assert json.loads(capsys.readouterr().out)["episode"].startswith("target 5")


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (("--policy", "missing/policy.zip"), "missing/policy.zip does not exist"),
        (("--steps", "999"), "step 999 is outside this episode"),
        (("--photo", "BROKEN"), "corrupt"),
        (("--episode", "7"), "episodes 0..2"),
        (("--target-id", "99"), "not a target"),
        (("--stride", "0"), "stride 0"),
        (("--agent", "search"), "pass the --agent it was trained as"),
    ],
)
def test_cli_bad_input_exits_2_and_writes_nothing(
    workspace: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: tuple[str, ...], needle: str
) -> None:
    from PIL import Image

    broken = tmp_path / "broken.png"
    Image.fromarray(make_map(64, seed=1).rgb).save(broken)
    broken.write_bytes(broken.read_bytes()[:2000])  # truncated
    args = [a.replace("BROKEN", str(broken)) for a in extra]
    ws = dict(workspace)
    if "--policy" in args:
        ws.pop("policy")
    out = tmp_path / "out"
    assert main(_args(ws, out, *args)) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert not out.exists()


def test_evaluate_writes_the_saliency_video(workspace: dict[str, str], tmp_path: Path) -> None:
    params: Params = parse_params(yaml.safe_load(Path(workspace["params"]).read_text()))
    rt: Runtime = load_runtime(params, workspace["map"], workspace["targets"], workspace["features"])
    ep = EpisodeSpec(int(rt.scene.split_rows("test")[0]), (60.0, 60.0), label="test episode 0")
    files = evaluate_video(tmp_path, params, rt, "memory", workspace["policy"], ep)
    assert sorted(Path(f).name for f in files) == ["saliency.gif", "saliency.png"]
    assert iio.imread(tmp_path / "saliency.gif", index=None).shape[0] == 2
    off = params.model_copy(update={"evaluate": params.evaluate.model_copy(update={"saliency_steps": 0})})
    assert evaluate_video(tmp_path / "none", off, rt, "memory", workspace["policy"], ep) == []
