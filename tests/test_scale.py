"""Scaling to large maps: the tiled dense cache equals the one-pass cache, the lean map reader
equals the plain one, and the FAISS map memory agrees with the exact one (tiny inputs, seconds)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch

from maprl.data.geo import NODATA, read_map, write_map
from maprl.features.cache import FIT_NODES, EncoderFeatures, Pooling, build_encoder, dense_grid, trunk_geometry
from maprl.views import valid_centres

from conftest import make_map, textured_rgb

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("kind", ["impala_cnn", "nature_cnn"])
def test_trunk_geometry_gives_the_output_length(kind: str) -> None:
    enc = build_encoder(kind, "random", local_norm=4.0)
    for n in (37, 64, 101):
        with torch.no_grad():
            out = enc.trunk(torch.zeros(1, 3, n, 24))
        assert out.shape[2] == trunk_geometry(enc.trunk, n)[1]
    assert trunk_geometry(enc.trunk, 0)[0] > 2 * 12  # LocalNorm's two blurs are in the receptive field


@pytest.mark.parametrize(("view", "input_size"), [(64, 32), (56, 24)])  # a cell of 16 px, and of 18 2/3 px
def test_tiled_cache_equals_one_pass(view: int, input_size: int) -> None:
    rgb = textured_rgb(700, seed=5)[:650]  # not square, not a whole number of cells
    enc = build_encoder("impala_cnn", "random", seed=1, local_norm=0.125 * input_size)
    pooling = Pooling(view, input_size, enc.stride, border=1, grid=2)
    whole = dense_grid(enc, rgb, pooling, stride=16)
    tiled = dense_grid(enc, rgb, pooling, stride=16, tile=96)  # margins of ~300 px: many overlapping tiles
    assert whole.shape == tiled.shape
    np.testing.assert_allclose(tiled, whole, rtol=1e-4, atol=1e-5 * float(np.abs(whole).max()))


def test_large_map_build_fits_on_a_subset(monkeypatch: pytest.MonkeyPatch) -> None:
    """Above FIT_NODES valid nodes the projection is fitted on a fixed subset; the grid stays close."""
    m = make_map(320, seed=2)
    enc = build_encoder("nature_cnn", "random", seed=0)
    pooling = Pooling(32, 32, enc.stride, border=1, grid=1)
    full = EncoderFeatures.build(enc, m, pooling, 4, whiten=False)
    monkeypatch.setattr("maprl.features.cache.FIT_NODES", 2000)
    monkeypatch.setattr("maprl.features.cache.STRIP_NODES", 500)
    sub = EncoderFeatures.build(enc, m, pooling, 4, whiten=False)
    assert FIT_NODES > 2000 and full.grid.shape == sub.grid.shape
    cos = np.sum(full.grid.astype(np.float32) * sub.grid.astype(np.float32), axis=-1)
    assert cos.min() > 0.95


def test_valid_centres_fast_path_and_counts() -> None:
    valid = np.ones((90, 70), bool)
    ok = valid_centres(valid, 16)
    assert ok.sum() == (90 - 15) * (70 - 15) and ok[8, 8] and not ok[7, 8]
    valid[40, 30] = False
    holed = valid_centres(valid, 16)
    assert not holed[40, 30] and holed.sum() == ok.sum() - 16 * 16


def _plain_read(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The reader before it went strip by strip: every band as float32 at once."""
    with rasterio.open(path) as src:
        data, nodata = src.read(out_dtype=np.float32), src.nodata
    valid = ~np.any(data == nodata, axis=0) & np.all(np.isfinite(data), axis=0)
    rgb = np.clip(np.nan_to_num(np.moveaxis(data[:3], 0, -1)), 0, 255).astype(np.uint8)
    return rgb, np.where(valid, data[3], np.nan).astype(np.float32), valid


def test_read_map_by_strips_equals_reading_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    m = make_map(300, seed=4, nodata_corner=50)
    rgb = m.rgb.astype(np.float32)
    rgb[100, 100] = [300.0, -5.0, np.nan]  # out of range and NaN colours are clipped / zeroed
    elev = m.elevation.copy()
    elev[200, 10] = np.inf
    write_map(tmp_path / "m.tif", rgb, elev, m.transform, m.crs, m.valid)
    monkeypatch.setattr("maprl.data.geo.READ_STRIP_BYTES", 300 * 4 * 4 * 7)  # 7 rows a strip
    got = read_map(tmp_path / "m.tif")
    want = _plain_read(tmp_path / "m.tif")
    assert got.rgb.dtype == np.uint8 and np.array_equal(got.rgb, want[0])
    assert np.array_equal(got.elevation, want[1], equal_nan=True) and np.array_equal(got.valid, want[2])
    assert not got.valid[200, 10] and not got.valid[0, 0] and NODATA < 0


def test_faiss_memory_agrees_with_exact_search() -> None:
    from maprl.features.memory import MapMemory

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(40, 32))
    emb = centres[rng.integers(0, 40, 4000)] + 0.3 * rng.normal(size=(4000, 32))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    pos = rng.uniform(0, 1000, (4000, 2))
    exact = MapMemory(pos, emb, 20.0)
    ivf = MapMemory(pos, emb, 20.0, index="ivf", nprobe=10_000)  # every cell scanned: exact
    q = emb[:50] + 0.05 * rng.normal(size=(50, 32))
    np.testing.assert_allclose(ivf.best_similarity(q), exact.best_similarity(q), rtol=1e-5)
    assert np.array_equal(ivf.search(q, 5)[1], exact.search(q, 5)[1])
    (p_ivf, s_ivf), (p_ex, s_ex) = ivf.query(q, k=3), exact.query(q, k=3)
    assert np.array_equal(p_ivf, p_ex) and np.allclose(s_ivf, s_ex, atol=1e-5)
    with pytest.raises(ValueError, match="index"):
        MapMemory(pos, emb, 20.0, index="hnsw")


def test_a_remembered_query_answers_as_a_fresh_one_and_cannot_be_spoilt() -> None:
    from maprl.features.memory import QUERY_MEMO, MapMemory

    rng = np.random.default_rng(1)
    emb = rng.normal(size=(500, 16))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    pos = rng.uniform(0, 500, (500, 2))
    memory = MapMemory(pos, emb, 10.0)
    q = emb[:7] + 0.1 * rng.normal(size=(7, 16))
    first = memory.query(q, k=3)
    first[0][:] = -1.0  # a caller that writes into the answer
    for answer in (memory.query(q, k=3), MapMemory(pos, emb, 10.0).query(q, k=3)):
        assert (answer[0] >= 0).all()
    assert np.array_equal(memory.query(q, k=3)[0], MapMemory(pos, emb, 10.0).query(q, k=3)[0])
    assert memory.query(q, k=2)[0].shape == (7, 2, 2)  # another k is another question
    for i in range(QUERY_MEMO + 3):
        memory.query(q[: i % 7 + 1] * (1 + i), k=3)
    assert len(memory._answers) <= QUERY_MEMO


def test_sample_centres_draws_as_the_index_array_did() -> None:
    """Drawn without an index array of every valid pixel, the same rng gives the same centres."""
    from maprl.views import sample_centres

    ok = np.random.default_rng(1).random((60, 50)) < 0.3
    ok[10] = False  # an empty row
    xs, ys = sample_centres(ok, 500, np.random.default_rng(7))
    flat = np.flatnonzero(ok)
    want_y, want_x = np.unravel_index(flat[np.random.default_rng(7).integers(0, len(flat), 500)], ok.shape)
    assert np.array_equal(xs, want_x) and np.array_equal(ys, want_y)


def test_stop_calibration_from_the_largest_far_samples_equals_all(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a large map only the largest far similarities are kept: the threshold and rates stay the same."""
    from maprl.config import EncoderParams
    from maprl.features import encode
    from maprl.features.photos import target_photos

    m = make_map(160, seed=3)
    p = EncoderParams(kind="nature_cnn", weights="random", input_size=64, cache_stride=4, local_norm=0.0,
                      stop_quantile=0.999)  # fmt: skip
    enc = build_encoder("nature_cnn", "random", seed=0)
    space = EncoderFeatures.build(enc, m, Pooling(32, 64, enc.stride, border=2), 4)
    rng = np.random.default_rng(0)
    xy = rng.uniform(20, 140, (30, 2))
    emb = space.embed_view(target_photos(m.rgb, xy, 32))
    train, test = (emb[:20], xy[:20]), (emb[20:], xy[20:])
    whole = encode.calibrate_stop(space, m, train, test, 8.0, p)
    monkeypatch.setattr(encode, "SIMS_MAX", 100)
    monkeypatch.setattr(encode, "FAR_KEEP", 50)
    top = encode.calibrate_stop(space, m, train, test, 8.0, p)
    assert whole["n_far"] > 50 * 20
    for key in ("stop_threshold", "far_pass_rate", "far_pass_rate_test", "near_recall", "far_max", "n_far"):
        assert top[key] == pytest.approx(whole[key], rel=1e-6), key
