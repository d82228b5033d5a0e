import numpy as np
import pytest

from maprl.data.geo import MapData
from maprl.features.spaces import PooledFeatures
from maprl.views import crop_views, far_pairs, valid_centres


def test_pooled_cache_equals_direct_embedding(tiny_map: MapData) -> None:
    space = PooledFeatures(tiny_map.rgb, 32)
    xs, ys = np.array([16.0, 50.3, 111.5]), np.array([16.0, 77.7, 100.0])
    cached = space.embed_at(xs, ys)
    direct = space.embed_view(crop_views(tiny_map.rgb, xs, ys, 32))
    assert np.allclose(cached, direct, atol=1e-5)
    assert np.allclose(np.linalg.norm(cached, axis=1), 1, atol=1e-5)


def test_similarity_falls_with_distance(tiny_map: MapData) -> None:
    space = PooledFeatures(tiny_map.rgb, 32)
    base = space.embed_at(np.array([80.0]), np.array([80.0]))[0]
    sims = [float(space.embed_at(np.array([80.0 + d]), np.array([80.0]))[0] @ base) for d in (0, 2, 8, 24)]
    assert sims[0] == pytest.approx(1.0, abs=1e-5)
    assert sims[0] > sims[1] > sims[2] > sims[3]


def test_valid_centres_matches_brute_force(tiny_map: MapData) -> None:
    ok = valid_centres(tiny_map.valid, 16)
    for y in range(0, 128, 7):
        for x in range(0, 128, 7):
            x0, y0 = x - 8, y - 8
            inside = x0 >= 0 and y0 >= 0 and x0 + 16 <= 128 and y0 + 16 <= 128
            expect = inside and bool(tiny_map.valid[y0 : y0 + 16, x0 : x0 + 16].all())
            assert ok[y, x] == expect


def test_valid_centres_allows_a_share_of_nodata(tiny_map: MapData) -> None:
    valid = np.ones((64, 64), bool)
    valid[:, 30:34] = False  # a 4 px strip: a quarter of a 16 px view at most
    assert not valid_centres(valid, 16)[32, 32]
    assert valid_centres(valid, 16, max_nodata=0.25)[32, 32] and not valid_centres(valid, 16, max_nodata=0.2)[32, 32]


def test_far_pairs_are_far_and_distinct_texture_looks_distinct(tiny_map: MapData) -> None:
    space = PooledFeatures(tiny_map.rgb, 16)
    ys, xs = np.nonzero(valid_centres(tiny_map.valid, 16))
    centres = np.stack([xs, ys], 1).astype(float)
    pairs = far_pairs(centres, 16, 300, np.random.default_rng(0))
    a, b = centres[pairs[:, 0]], centres[pairs[:, 1]]
    assert len(pairs) == 300 and (np.linalg.norm(a - b, axis=1) > 16).all()
    sims = np.sum(space.embed_at(a[:, 0], a[:, 1]) * space.embed_at(b[:, 0], b[:, 1]), axis=1)
    assert np.mean(sims >= 0.9) < 0.05
