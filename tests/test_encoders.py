"""Encoders, the dense feature cache, SSL and the stop calibration, on tiny maps (offline, seconds)."""

from __future__ import annotations

import json
import urllib.error
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from maprl.config import EncoderParams
from maprl.data.geo import MapData
from maprl.errors import InputError, ParamsError
from maprl.features.cache import (
    EncoderFeatures,
    PooledGrid,
    build_encoder,
    load_space,
    make_space,
    pretrain_ssl,
)
from maprl.features.encode import calibrate_stop, run_encode
from maprl.features.nets import LocalNorm
from maprl.features.photos import target_photos
from maprl.views import crop_views, valid_centres

from conftest import grid_targets, make_map, tiny_params

VIEW = 32
# nature_cnn at 64 px input for 32 px views: 8 cells of 4 map px, 2 dropped at each edge (exact).
# local_norm 0: the cache mechanism is exact only without it (a lone photo's edges are padded; see below)
NATURE = {"kind": "nature_cnn", "weights": "random", "input_size": 64, "cache_stride": 4, "torch_threads": 1,
          "local_norm": 0.0}  # fmt: skip
SSL = {"kind": "nature_cnn", "weights": "ssl", "input_size": 32, "torch_threads": 1}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def small_map() -> MapData:
    return make_map(160, seed=3)


@pytest.fixture(scope="module")
def nature_space(small_map: MapData) -> EncoderFeatures:
    space = make_space(EncoderParams(**NATURE), small_map, VIEW, seed=0)
    assert isinstance(space, EncoderFeatures)
    return space


@pytest.mark.parametrize(("kind", "dim"), [("mobilenet_v2", 1280), ("nature_cnn", 256), ("impala_cnn", 256)])
def test_encoder_output_shape(kind: str, dim: int) -> None:
    enc = build_encoder(kind, "random", seed=0)
    with torch.no_grad():
        out = enc(torch.zeros(2, 3, 64, 64))
    assert out.shape == (2, dim) and enc.dim == dim


def test_unknown_kind_and_imagenet_for_small_cnns_are_refused() -> None:
    with pytest.raises(ParamsError, match="encoder.kind"):
        build_encoder("resnet", "random")
    with pytest.raises(ParamsError, match="imagenet"):
        build_encoder("nature_cnn", "imagenet")
    with pytest.raises(ValueError, match="imagenet"):
        EncoderParams(kind="impala_cnn", weights="imagenet")


def _no_network(*args: object, **kwargs: object) -> None:
    raise urllib.error.URLError("network disabled in tests")


def _fake_imagenet_state() -> dict[str, torch.Tensor]:
    from torchvision.models import mobilenet_v2

    torch.manual_seed(123)
    return mobilenet_v2().state_dict()


def test_imagenet_weights_load_from_torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_network)
    state = _fake_imagenet_state()
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(state, tmp_path / "hub" / "checkpoints" / "mobilenet_v2-b0353104.pth")
    enc = build_encoder("mobilenet_v2", "imagenet", seed=0)
    assert torch.equal(enc.trunk.state_dict()["0.0.weight"], state["features.0.0.weight"])


def test_imagenet_weights_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_network)
    state = _fake_imagenet_state()
    torch.save(state, tmp_path / "mnv2.pth")
    enc = build_encoder("mobilenet_v2", "imagenet", weights_path=str(tmp_path / "mnv2.pth"))
    assert torch.equal(enc.trunk.state_dict()["18.0.weight"], state["features.18.0.weight"])
    with pytest.raises(InputError, match="does not exist"):
        build_encoder("mobilenet_v2", "imagenet", weights_path=str(tmp_path / "missing.pth"))


def test_imagenet_offline_fails_clearly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_network)
    with pytest.raises(InputError) as err:
        build_encoder("mobilenet_v2", "imagenet")
    msg = str(err.value)
    assert "TORCH_HOME" in msg and "hub/checkpoints" in msg and "mobilenet_v2-b0353104.pth" in msg
    assert "encoder.weights: ssl or random" in msg


def test_cache_matches_exact_embeddings(small_map: MapData, nature_space: EncoderFeatures) -> None:
    space = nature_space
    nodes = space.grid_positions()[::37]
    exact = space.embed_view(crop_views(small_map.rgb, nodes[:, 0], nodes[:, 1], VIEW))
    on_grid = np.sum(space.embed_at(nodes[:, 0], nodes[:, 1]) * exact, axis=1)
    assert on_grid.min() > 0.999  # border cells dropped: the cache is exact at grid nodes
    rng = np.random.default_rng(0)
    pos = rng.uniform(VIEW / 2, 160 - VIEW / 2 - 1, (60, 2))
    exact = space.embed_view(crop_views(small_map.rgb, pos[:, 0], pos[:, 1], VIEW))
    off_grid = np.sum(space.embed_at(pos[:, 0], pos[:, 1]) * exact, axis=1)
    assert off_grid.mean() > 0.8  # bilinear between nodes 4 px apart
    assert np.allclose(np.linalg.norm(space.embed_at(pos[:, 0], pos[:, 1]), axis=1), 1, atol=1e-4)


def test_shifted_passes_reach_a_finer_grid_than_the_network_stride(small_map: MapData) -> None:
    p = EncoderParams(**{**NATURE, "cache_stride": 2})  # cells are 4 map px: 2 passes per axis
    space = make_space(p, small_map, VIEW, seed=0)
    nodes = space.grid_positions()
    odd = nodes[(nodes[:, 0] % 4 != nodes[0, 0] % 4) & (nodes[:, 1] % 4 != nodes[0, 1] % 4)][::29]
    exact = space.embed_view(crop_views(small_map.rgb, odd[:, 0], odd[:, 1], VIEW))
    assert np.sum(space.embed_at(odd[:, 0], odd[:, 1]) * exact, axis=1).min() > 0.999


def test_grid_interface(nature_space: EncoderFeatures, small_map: MapData) -> None:
    pos, emb = nature_space.grid_positions(), nature_space.grid_embeddings()
    assert pos.shape == (33 * 33, 2) and emb.shape == (len(pos), nature_space.dim) and emb.dtype == np.float32
    assert np.allclose(nature_space.embed_at(pos[:50, 0], pos[:50, 1]), emb[:50], atol=1e-3)
    pooled = make_space(EncoderParams(kind="pooled", cache_stride=4, torch_threads=1), small_map, VIEW)
    assert isinstance(pooled, PooledGrid)
    ppos = pooled.grid_positions()
    assert np.allclose(pooled.grid_embeddings(), pooled.embed_at(ppos[:, 0], ppos[:, 1]))


def test_ssl_runs_and_reduces_its_loss(small_map: MapData) -> None:
    p = EncoderParams(**SSL, ssl_steps=30, ssl_batch_size=32)
    enc = build_encoder("nature_cnn", "ssl", seed=0)
    losses = pretrain_ssl(enc, small_map.rgb, small_map.valid, VIEW, p, seed=0)
    assert len(losses) == 30 and np.isfinite(losses).all()
    assert np.mean(losses[:5]) > np.log(2 * 32 - 1) - 0.3  # starts near chance: ln(63)
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5


def _grid_targets(spacing: int, lo: int, hi: int) -> pd.DataFrame:
    xs, ys = np.meshgrid(np.arange(lo, hi, spacing), np.arange(lo, hi, spacing))
    split = np.where(np.arange(xs.size) % 5 == 0, "test", "train")
    return grid_targets(list(xs.ravel().astype(float)), list(ys.ravel().astype(float)), list(split))


def test_threshold_separates_near_from_far(small_map: MapData, nature_space: EncoderFeatures) -> None:
    targets = _grid_targets(12, 20, 140)
    p = EncoderParams(**NATURE, stop_quantile=0.999, stop_margin=0.02)

    def side(split: str) -> tuple[np.ndarray, np.ndarray]:
        rows = targets[targets["split"] == split]
        xy = rows[["x", "y"]].to_numpy(float)
        return nature_space.embed_view(target_photos(small_map.rgb, xy, VIEW)), xy

    cal = calibrate_stop(nature_space, small_map, side("train"), side("test"), VIEW / 4, p)
    assert cal["median_similarity_0px"] > 0.99 > cal["stop_threshold"]
    assert cal["threshold_below_on_target"] and cal["near_recall"] > 0.05
    assert cal["far_pass_rate"] <= 0.001 + 1e-9 and cal["far_pass_rate_test"] < 0.01


def test_save_load_roundtrip(tmp_path: Path, small_map: MapData, nature_space: EncoderFeatures) -> None:
    nature_space.save(tmp_path)
    loaded = EncoderFeatures.load(tmp_path, small_map)
    assert loaded.dim == nature_space.dim
    xs, ys = np.array([20.5, 77.0, 120.2]), np.array([30.0, 64.4, 119.9])
    assert np.array_equal(loaded.embed_at(xs, ys), nature_space.embed_at(xs, ys))
    views = crop_views(small_map.rgb, xs, ys, VIEW)
    assert np.allclose(loaded.embed_view(views), nature_space.embed_view(views), atol=1e-5)
    with pytest.raises(InputError, match="larger map"):
        load_space(tmp_path, make_map(96))
    with pytest.raises(InputError, match="does not exist"):
        load_space(tmp_path / "nowhere")


def test_pooled_save_load_roundtrip(tmp_path: Path, small_map: MapData) -> None:
    pooled = make_space(EncoderParams(kind="pooled", cache_stride=8, torch_threads=1), small_map, VIEW)
    pooled.save(tmp_path)
    loaded = load_space(tmp_path, small_map)
    assert isinstance(loaded, PooledGrid)
    assert np.array_equal(loaded.grid_embeddings(), pooled.grid_embeddings())
    with pytest.raises(ValueError, match="needs the map"):
        load_space(tmp_path)
    with pytest.raises(InputError, match="pooled cache"):
        EncoderFeatures.load(tmp_path, small_map)


def test_same_seed_same_cache(small_map: MapData, nature_space: EncoderFeatures) -> None:
    again = make_space(EncoderParams(**NATURE), small_map, VIEW, seed=0)
    other = make_space(EncoderParams(**NATURE), small_map, VIEW, seed=1)
    assert isinstance(again, EncoderFeatures) and isinstance(other, EncoderFeatures)
    assert np.array_equal(again.grid, nature_space.grid)
    assert not np.array_equal(other.grid, nature_space.grid)


def test_embed_at_reads_the_float32_copy_as_the_float16_grid(
    nature_space: EncoderFeatures, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(4)
    xs, ys = rng.uniform(0, nature_space.xs[-1] + 9, 64), rng.uniform(-5, nature_space.ys[-1], 64)
    assert nature_space.grid.dtype == np.float16 and nature_space._lookup.dtype == np.float32
    fast = nature_space.embed_at(xs, ys)
    monkeypatch.setattr(nature_space, "_lookup", nature_space.grid)
    assert np.array_equal(fast, nature_space.embed_at(xs, ys))


def test_ssl_is_deterministic(small_map: MapData) -> None:
    p = EncoderParams(**SSL, ssl_steps=3, ssl_batch_size=8)
    runs = []
    for _ in range(2):
        enc = build_encoder("nature_cnn", "ssl", seed=5)
        runs.append((pretrain_ssl(enc, small_map.rgb, small_map.valid, VIEW, p, seed=5), enc.state_dict()))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])


def test_border_too_wide_is_a_params_error(small_map: MapData) -> None:
    with pytest.raises(ParamsError, match="encoder.border"):
        make_space(EncoderParams(**{**NATURE, "border": 4}), small_map, VIEW)


def test_run_encode_stage(tmp_path: Path, tiny_map_path: Path, tiny_map: MapData) -> None:
    targets = _grid_targets(10, 60, 112)  # the tiny map's top-left 40 px are nodata
    targets.to_csv(tmp_path / "targets.csv", index=False)
    params = tiny_params(encoder={**NATURE, "weights": "ssl", "ssl_steps": 2, "ssl_batch_size": 8})
    metrics = run_encode(params, tiny_map_path, tmp_path / "targets.csv", tmp_path / "enc", tmp_path / "m.json")
    again = run_encode(params, tiny_map_path, tmp_path / "targets.csv", tmp_path / "enc2", tmp_path / "m2.json")
    for name in ("cache.npz", "encoder.pt", "calibration.json", "ssl_loss.csv"):  # byte-reproducible
        assert (tmp_path / "enc" / name).read_bytes() == (tmp_path / "enc2" / name).read_bytes(), name
    assert (tmp_path / "m.json").read_bytes() == (tmp_path / "m2.json").read_bytes()
    assert metrics["seconds"] and again["seconds"]  # timings are returned, and kept out of the metrics file
    written = json.loads((tmp_path / "m.json").read_text())
    assert written == {k: v for k, v in json.loads(json.dumps(metrics)).items() if k != "seconds"}
    cal = json.loads((tmp_path / "enc" / "calibration.json").read_text())
    assert cal["stop_threshold"] == metrics["stop"]["stop_threshold"]
    assert metrics["ssl"]["steps"] == 2 and metrics["grid_nodes"] > 0
    assert metrics["far_pair_similarity"]["pixels_mean"] > metrics["far_pair_similarity"]["encoder_mean"]
    pos = load_space(tmp_path / "enc").grid_positions().astype(int)
    assert valid_centres(tiny_map.valid, VIEW)[pos[:, 1], pos[:, 0]].all()  # no view touches the nodata corner


@pytest.mark.parametrize("damage", ["truncate", "garbage", "missing_array"])
def test_a_damaged_feature_cache_is_a_clear_error(tmp_path: Path, tiny_map: MapData, damage: str) -> None:
    """Defect: a truncated cache.npz gave a traceback from deep inside numpy."""
    space = make_space(EncoderParams(**NATURE), tiny_map, VIEW)
    space.save(tmp_path)
    cache = tmp_path / "cache.npz"
    if damage == "truncate":
        cache.write_bytes(cache.read_bytes()[: cache.stat().st_size // 2])
    elif damage == "garbage":
        cache.write_bytes(b"not a zip at all")
    else:
        with np.load(cache) as npz:
            arrays = {k: npz[k] for k in npz.files if k != "grid"}
        np.savez(cache, **arrays)
    with pytest.raises(InputError, match=r"damaged or incomplete.*dvc repro encode"):
        load_space(tmp_path, tiny_map)


def test_local_norm_undoes_per_channel_gain_and_offset() -> None:
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(1, 3, 48, 48)).astype(np.float32))
    gain, offset = torch.tensor([1.6, 0.7, 1.2]).view(1, 3, 1, 1), torch.tensor([0.3, -0.2, 0.1]).view(1, 3, 1, 1)
    norm = LocalNorm(6.0, eps=1e-3)
    assert torch.allclose(norm(x * gain + offset), norm(x), atol=1e-3)
    assert not torch.allclose(LocalNorm(6.0)(x), x, atol=0.1)


def test_local_norm_encoder_survives_save_and_load(tmp_path: Path, small_map: MapData) -> None:
    space = make_space(EncoderParams(**{**NATURE, "local_norm": 0.125}), small_map, VIEW, seed=0)
    assert space.encoder.local_norm == 0.125 * 64
    space.save(tmp_path)
    loaded = EncoderFeatures.load(tmp_path, small_map)
    views = crop_views(small_map.rgb, np.array([60.0, 90.0]), np.array([70.0, 80.0]), VIEW)
    assert loaded.encoder.local_norm == space.encoder.local_norm
    assert np.allclose(loaded.embed_view(views), space.embed_view(views), atol=1e-5)
    bright = np.clip(views.astype(np.int16) * 5 // 4 + 10, 0, 255).astype(np.uint8)
    assert np.sum(space.embed_view(bright) * space.embed_view(views), axis=1).min() > 0.95
