"""Shared fixtures: tiny maps made in tmp_path, never downloaded."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pytest
from rasterio.transform import from_origin
from scipy.ndimage import gaussian_filter

from maprl.config import Params, parse_params
from maprl.data.geo import MapData, utm_crs, write_map

if TYPE_CHECKING:
    from maprl.features.memory import MapMemory
    from maprl.nav.scene import Scene


def textured_rgb(size: int, seed: int = 0) -> np.ndarray:
    """Smooth multi-scale random texture: every small view is distinct."""
    rng = np.random.default_rng(seed)
    img = np.zeros((size, size, 3))
    for sigma, w in ((1.0, 0.3), (3.0, 0.5), (8.0, 1.0)):
        noise = gaussian_filter(rng.normal(size=(size, size, 3)), sigma=(sigma, sigma, 0))
        img += w * noise / noise.std()
    img = (img - img.min()) / (img.max() - img.min()) * 255
    return img.astype(np.uint8)


def make_map(size: int = 128, seed: int = 0, nodata_corner: int = 0) -> MapData:
    rgb = textured_rgb(size, seed)
    valid = np.ones((size, size), bool)
    if nodata_corner:
        valid[:nodata_corner, :nodata_corner] = False
    elev = np.linspace(100, 140, size * size, dtype=np.float32).reshape(size, size)
    return MapData(rgb, elev, valid, from_origin(500000, 5150000, 2.0, 2.0), utm_crs(46.5, 6.6))


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny inputs gain nothing from threads, and a busy machine slows OpenMP threads badly
    (use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_map() -> MapData:
    return make_map(128, seed=1, nodata_corner=40)


@pytest.fixture
def tiny_map_path(tmp_path: Path, tiny_map: MapData) -> Path:
    path = tmp_path / "map.tif"
    write_map(path, tiny_map.rgb, tiny_map.elevation, tiny_map.transform, tiny_map.crs, tiny_map.valid)
    return path


def tiny_params(**sections: dict) -> Params:
    raw: dict = {
        "fetch": {"size": 256},
        "tile": {"n_targets": 40, "view_size": 32, "block_size": 64},
    }
    for key, val in sections.items():
        raw.setdefault(key, {}).update(val)
    return parse_params(raw)


def grid_targets(xs: list[float], ys: list[float], splits: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"id": range(len(xs)), "x": xs, "y": ys, "split": splits})


@pytest.fixture
def scene(tiny_map: MapData) -> Scene:
    """Four train targets on the tiny map, 32 px views (a test module may define its own ``scene``)."""
    from maprl.nav.scene import Scene

    t = grid_targets([70.0, 90.0, 100.0, 60.0], [70.0, 60.0, 100.0, 100.0], ["train"] * 4)
    return Scene.build(tiny_map, t, 32)


@pytest.fixture
def memory(scene: Scene) -> MapMemory:
    """A pooled map memory of the ``scene`` fixture (stride 4, candidates 16 px apart)."""
    from maprl.nav.runtime import pooled_memory

    return pooled_memory(scene, 4, 16.0)
