"""Tests for the procedural world generator (maprl.data.world)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from maprl.data.world import World, synthesize_world


@pytest.fixture(scope="module")
def world() -> World:
    return synthesize_world(256, 0)


def _luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])


def test_same_inputs_give_identical_arrays() -> None:
    a = synthesize_world(128, 3)
    b = synthesize_world(128, 3)
    for name in ("rgb", "elevation", "water", "roads", "buildings"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert a.rgb.tobytes() == b.rgb.tobytes()


def test_other_seed_or_pixel_size_gives_another_world() -> None:
    a = synthesize_world(128, 3)
    assert not np.array_equal(a.rgb, synthesize_world(128, 4).rgb)
    assert not np.array_equal(a.rgb, synthesize_world(128, 3, 2.0).rgb)


@pytest.mark.parametrize(("size", "mpp"), [(64, 1.0), (128, 0.5), (128, 10.0), (96, 100.0)])
def test_shapes_and_dtypes(size: int, mpp: float) -> None:
    w = synthesize_world(size, 1, mpp)
    assert w.rgb.shape == (size, size, 3) and w.rgb.dtype == np.uint8
    assert w.elevation.shape == (size, size) and w.elevation.dtype == np.float32
    assert np.isfinite(w.elevation).all()
    for mask in (w.water, w.roads, w.buildings):
        assert mask.shape == (size, size) and mask.dtype == bool
    assert not (w.water & w.buildings).any()


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        synthesize_world(8, 0)
    with pytest.raises(ValueError):
        synthesize_world(64, 0, 0.0)


def test_world_has_water_roads_and_buildings(world: World) -> None:
    assert 0.01 < world.water.mean() < 0.3
    assert 0.01 < world.roads.mean() < 0.3
    assert 0.005 < world.buildings.mean() < 0.2
    relief = float(np.ptp(world.elevation[~world.buildings]))
    assert 3.0 < relief < 200.0
    assert world.rgb.std() > 10  # not a flat image


def test_lakes_are_flat(world: World) -> None:
    labels, n = ndimage.label(world.water)
    assert n >= 1
    for k in range(1, n + 1):
        z = world.elevation[labels == k]
        if z.size > 400:  # lakes (a river's surface may slope gently)
            assert np.ptp(z) < 5.0


def test_buildings_stand_above_the_surrounding_ground(world: World) -> None:
    labels, n = ndimage.label(world.buildings)
    assert n >= 5
    raised = 0
    for k, box in enumerate(ndimage.find_objects(labels), start=1):
        footprint = labels == k
        ring = ndimage.binary_dilation(footprint, iterations=3) & ~world.buildings & ~footprint
        if ring.any() and world.elevation[footprint].min() > np.median(world.elevation[ring]) + 2.0:
            raised += 1
        del box
    assert raised >= 0.9 * n


def test_buildings_cast_shadows_away_from_the_sun(world: World) -> None:
    # The sun stands in the south-east (lower right), so shadows fall to the upper left.
    b = world.buildings
    lum = _luminance(world.rgb)
    free = ~b & ~world.roads & ~world.water
    anti_sun = np.zeros_like(b)
    anti_sun[:-3, :-3] = b[3:, 3:]
    sun_side = np.zeros_like(b)
    sun_side[3:, 3:] = b[:-3, :-3]
    shadow = anti_sun & free & ~sun_side
    lit = sun_side & free & ~anti_sun
    assert shadow.sum() > 50 and lit.sum() > 50
    assert lum[shadow].mean() < 0.8 * lum[lit].mean()
