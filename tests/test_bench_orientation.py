"""benchmarks/bench_orientation.py and the library's NCC over fields: dense template matching across dates."""

from __future__ import annotations

import copy
from pathlib import Path

import bench_orientation as bo
import bench_stop
import numpy as np
import pandas as pd
import pytest
import yaml
from rasterio.transform import from_origin

from maprl.data.geo import utm_crs, write_map
from maprl.features.matching import NCC

from conftest import make_map


def _textured(size: int = 96, seed: int = 0) -> np.ndarray:
    return make_map(size, seed=seed).rgb


@pytest.mark.parametrize("method", bo.METHODS)
def test_a_crop_of_the_field_scores_one_at_its_offset_and_less_elsewhere(method: str) -> None:
    field = bo.field(_textured(), method, 1.5)
    corr = NCC(field, 32)
    x, y = 41, 17
    scores = corr.scores(field[..., y : y + 32, x : x + 32])
    assert scores.shape == (96 - 32 + 1, 96 - 32 + 1)
    assert scores[y, x] == pytest.approx(1.0, abs=1e-6)
    scores[y, x] = -np.inf
    assert np.max(scores) < 0.999


@pytest.mark.parametrize("method", bo.METHODS)
def test_a_photo_cut_from_the_map_is_found_at_its_place(method: str) -> None:
    rgb = _textured()
    x, y = 41, 17
    scores = NCC(bo.field(rgb, method, 1.5), 32).scores(bo.field(rgb[y : y + 32, x : x + 32], method, 1.5))
    assert np.unravel_index(int(np.argmax(scores)), scores.shape) == (y, x)
    assert scores[y, x] > 0.9  # the photo's own gradients differ from the map's only at its border


def test_a_one_channel_field_scores_as_its_grey_image() -> None:
    grey = _textured().astype(np.float64).mean(axis=2)
    template = grey[10:42, 20:52]
    np.testing.assert_array_equal(NCC(grey[None], 32).scores(template[None]), NCC(grey, 32).scores(template))


def test_orientation_ignores_an_inverted_contrast_that_defeats_grey_ncc() -> None:
    rgb = _textured(seed=4)
    x, y = 30, 50
    photo = 255 - rgb[y : y + 32, x : x + 32]  # another "date": every edge's contrast reversed
    grey = NCC(bo.field(rgb, "gray-ncc", 1.5), 32).scores(bo.field(photo, "gray-ncc", 1.5))
    orient = NCC(bo.field(rgb, "orientation", 1.5), 32).scores(bo.field(photo, "orientation", 1.5))
    assert grey[y, x] == pytest.approx(-1.0, abs=1e-6)
    assert np.unravel_index(int(np.argmax(orient)), orient.shape) == (y, x)


def test_best_offsets_are_separated_and_best_first() -> None:
    scores = np.zeros((50, 60))
    scores[10, 10], scores[12, 11], scores[40, 50], scores[30, 5] = 1.0, 0.9, 0.8, 0.7
    got = bo.best_offsets(scores, 3, separation=5.0)
    assert got.tolist() == [[10, 10], [50, 40], [5, 30]]  # (x, y); (11, 12) lies within 5 px of the best


@pytest.mark.parametrize(("k", "n"), [(0, 10), (5, 10), (10, 10), (37, 100)])
def test_wilson_interval_brackets_the_proportion(k: int, n: int) -> None:
    lo, hi = bo.wilson(k, n)
    assert 0.0 <= lo <= k / n <= hi <= 1.0
    assert hi - lo > 0.05


def test_bench_map_on_a_tiny_geotiff(tmp_path: Path) -> None:
    rgb = make_map(160, seed=3).rgb
    other = (255 - rgb).astype(np.uint8)  # another "date": contrast reversed
    paths = []
    for name, img in (("a", rgb), ("b", other)):
        path = tmp_path / f"{name}.tif"
        write_map(
            path, img, np.zeros(img.shape[:2], np.float32), from_origin(500000, 5150000, 2.0, 2.0), utm_crs(46.5, 6.6)
        )
        paths.append(path)
    base = yaml.safe_load((bench_stop.REPO / "params.yaml").read_text())
    params = bench_stop.make_params(base, paths[0], {"later": paths[1]}, copy.deepcopy(bench_stop.QUICK))
    rows, stops = bo.bench_map("tiny", params, 1.0, False, tmp_path / "work")
    frame = pd.DataFrame(rows, columns=bo.COLUMNS)
    pipeline = frame["method"].iat[-1]
    assert pipeline.startswith("orientation matcher (agent.retriever;")
    assert list(frame["method"]) == ["gray-ncc", "gray-ncc", "orientation", "orientation", pipeline, pipeline]
    assert list(frame["query"]) == ["same", "later"] * 3
    by = frame.set_index(["method", "query"])
    assert by.loc[("orientation", "same"), "top1"] == 1.0 and by.loc[("gray-ncc", "same"), "top1"] == 1.0
    assert by.loc[("orientation", "later"), "top1"] > by.loc[("gray-ncc", "later"), "top1"]
    assert by.loc[(pipeline, "later"), "top1"] > by.loc[("gray-ncc", "later"), "top1"]
    assert (frame["top3"] >= frame["top1"]).all() and (frame["n_targets"] > 0).all()
    assert "| tiny | later | orientation |" in bo.markdown(frame)
    rules = pd.DataFrame(stops, columns=bo.STOP_COLUMNS).set_index(["query", "rule"])
    relative = next(r for r in rules.index.get_level_values("rule") if r.startswith("relative"))
    assert rules.loc[("same", relative), "near_recall"] == 1.0 and rules.loc[("same", relative), "false_stops"] == 0.0
    assert rules["near_recall"].between(0, 1).all() and rules["false_stops"].between(0, 1).all()
    assert len(rules) == 4 and "| tiny | later | relative" in bo.stop_markdown(rules.reset_index())
