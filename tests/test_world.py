"""Tests for the procedural world generator (maprl.data.world)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from maprl.data.world import LOOKS, SEASONS, World, synthesize_world, synthesize_worlds


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
    for w in synthesize_worlds(size, 1, mpp).values():
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


# --------------------------------------------------------------------------- seasons

_GEOMETRY = ("elevation", "water", "roads", "buildings")


@pytest.fixture(scope="module")
def seasons() -> dict[str, World]:
    return synthesize_worlds(256, 0)


def _shift(mask: np.ndarray, dr: int, dc: int) -> np.ndarray:
    """``mask`` moved by ``dr`` rows and ``dc`` columns, filled with False."""
    out = np.zeros_like(mask)
    n_r, n_c = mask.shape
    out[max(0, dr) : n_r + min(0, dr), max(0, dc) : n_c + min(0, dc)] = mask[
        max(0, -dr) : n_r - max(0, dr), max(0, -dc) : n_c - max(0, dc)
    ]
    return out


def _shade_ratio(w: World, dr: int, dc: int) -> float:
    """Mean luminance of open ground ``(dr, dc)`` px from buildings over that of the opposite side."""
    free = ~w.buildings & ~w.roads & ~w.water
    there = _shift(w.buildings, dr, dc)
    opposite = _shift(w.buildings, -dr, -dc)
    lum = _luminance(w.rgb)
    return float(lum[there & free & ~opposite].mean() / lum[opposite & free & ~there].mean())


def test_summer_is_the_default_rendering() -> None:
    default = synthesize_world(128, 3)
    summer = synthesize_world(128, 3, season="summer")
    together = synthesize_worlds(128, 3, 1.0, ["autumn", "summer", "winter"])
    for name in ("rgb", *_GEOMETRY):
        assert getattr(default, name).tobytes() == getattr(summer, name).tobytes(), name
        assert getattr(default, name).tobytes() == getattr(together["summer"], name).tobytes(), name


def test_seasons_are_deterministic_and_independent_of_the_others_asked_for() -> None:
    a = synthesize_world(128, 5, season="autumn")
    b = synthesize_world(128, 5, season="autumn")
    c = synthesize_worlds(128, 5, 1.0, ["spring", "summer", "autumn"])["autumn"]
    for name in ("rgb", *_GEOMETRY):
        assert getattr(a, name).tobytes() == getattr(b, name).tobytes(), name
        assert getattr(a, name).tobytes() == getattr(c, name).tobytes(), name
    assert not np.array_equal(a.rgb, synthesize_world(128, 6, season="autumn").rgb)


def test_unknown_season_is_rejected() -> None:
    with pytest.raises(ValueError, match="summer, autumn, winter, spring"):
        synthesize_world(64, 0, season="monsoon")
    with pytest.raises(ValueError, match="monsoon"):
        synthesize_worlds(64, 0, 1.0, ["summer", "monsoon"])


def test_synthesize_worlds_returns_the_seasons_asked_for(seasons: dict[str, World]) -> None:
    assert list(seasons) == list(SEASONS)
    assert list(synthesize_worlds(64, 0, 1.0, ["winter", "winter", "spring"])) == ["winter", "spring"]


@pytest.mark.parametrize("season", [s for s in SEASONS if s != "summer"])
def test_season_keeps_the_geometry(seasons: dict[str, World], season: str) -> None:
    for name in _GEOMETRY:
        assert np.array_equal(getattr(seasons[season], name), getattr(seasons["summer"], name)), name
    assert seasons[season].elevation is not seasons["summer"].elevation  # own copies


@pytest.mark.parametrize("season", [s for s in SEASONS if s != "summer"])
def test_season_changes_the_appearance_beyond_a_colour_shift(seasons: dict[str, World], season: str) -> None:
    summer = seasons["summer"].rgb.reshape(-1, 3).astype(np.float64)
    other = seasons[season].rgb.reshape(-1, 3).astype(np.float64)
    assert np.abs(other - summer).mean() > 12.0
    # The best affine colour map summer -> season still leaves a large per-pixel residual.
    x = np.column_stack([summer, np.ones(len(summer))])
    coef, *_ = np.linalg.lstsq(x, other, rcond=None)
    assert np.sqrt(((x @ coef - other) ** 2).mean()) > 12.0


@pytest.mark.parametrize("season", SEASONS)
def test_buildings_cast_shadows_away_from_the_seasons_sun(seasons: dict[str, World], season: str) -> None:
    az = math.radians(LOOKS[season].sun_azimuth_deg)
    dr, dc = round(3 * math.cos(az)), round(-3 * math.sin(az))  # 3 px away from the sun (rows point south)
    assert _shade_ratio(seasons[season], dr, dc) < 0.85


def test_autumn_shadows_point_elsewhere_than_summer(seasons: dict[str, World]) -> None:
    # Summer's sun (south-east) shades the ground west of buildings; autumn's (south-south-west) lights it.
    assert _shade_ratio(seasons["summer"], 0, -3) < 0.75
    assert _shade_ratio(seasons["autumn"], 0, -3) > 1.0


def test_low_autumn_water_uncovers_the_shores(seasons: dict[str, World]) -> None:
    def shore_contrast(w: World) -> float:
        shore = w.water & ~ndimage.binary_erosion(w.water, iterations=2, border_value=1)
        inner = ndimage.binary_erosion(w.water, iterations=4, border_value=1)
        lum = _luminance(w.rgb)
        return float(lum[shore].mean() - lum[inner].mean())

    assert shore_contrast(seasons["autumn"]) > shore_contrast(seasons["summer"]) + 10.0
