"""benchmarks/bench_stop.py: the stop-rule benchmark runs end to end on tiny maps (a few seconds each)."""

from __future__ import annotations

import copy
from pathlib import Path

import bench_stop
import numpy as np
import pandas as pd
import pytest
import yaml
from rasterio.transform import from_origin

from maprl.data.geo import utm_crs, write_map

from conftest import make_map

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _write(path: Path, rgb: np.ndarray) -> Path:
    elev = np.zeros(rgb.shape[:2], np.float32)
    write_map(path, rgb, elev, from_origin(500000, 5150000, 2.0, 2.0), utm_crs(46.5, 6.6))
    return path


def test_bench_map_on_a_tiny_geotiff(tmp_path: Path) -> None:
    rgb = make_map(160, seed=3).rgb
    other = np.clip(rgb.astype(np.float32) * 0.8 + 20, 0, 255).astype(np.uint8)  # another "date": darker, hazier
    map_path, query_path = _write(tmp_path / "a.tif", rgb), _write(tmp_path / "b.tif", other)
    base = yaml.safe_load((bench_stop.REPO / "params.yaml").read_text())
    overrides = copy.deepcopy(bench_stop.QUICK)
    overrides["encoder"]["torch_threads"] = 1
    params = bench_stop.make_params(base, map_path, {"later": query_path}, overrides)
    result = bench_stop.bench_map("tiny", params, None, tmp_path / "work")
    frame = pd.DataFrame(result.rows, columns=bench_stop.COLUMNS)
    assert list(frame["query"]) == ["same", "same", "later", "later"]
    assert list(frame["rule"]) == ["far-quantile", "relative"] * 2
    rates = frame[["near_recall", "at_target", "false_stops", "targets_far_pass", "top1"]].to_numpy()
    assert np.all((rates >= 0) & (rates <= 1))
    assert (frame["n_targets"] > 0).all() and (frame["n_near"] > 0).all()
    assert frame.loc[0, "threshold"] == f"{result.calibration['stop_threshold']:.3f}"
    assert "| tiny | later | relative |" in bench_stop.markdown(frame)


def test_quick_run_on_the_real_landsat_map(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if not (bench_stop.DATA / "landsat-pucallpa" / "landsat_2020.tif").exists():
        pytest.skip(f"the shared real data is absent ({bench_stop.DATA})")
    out = tmp_path / "stop.csv"
    frame = bench_stop.main(["--quick", "--maps", "landsat", "--threads", "1", "--out", str(out)])
    assert list(pd.read_csv(out)["query"]) == ["same", "same", "y2000", "y2000"]
    assert len(frame) == 4
    printed = capsys.readouterr().out
    assert "| landsat | y2000 | far-quantile |" in printed and "wall" in printed


def test_map_params_names_the_missing_raster_and_the_fix(tmp_path: Path) -> None:
    base = yaml.safe_load((bench_stop.REPO / "params.yaml").read_text())
    with pytest.raises(SystemExit, match=r"missing .*naip_20200831\.tif.*pass --data"):
        bench_stop.map_params(base, "naip", tmp_path, copy.deepcopy(bench_stop.QUICK))
