from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from maprl.config import TileParams
from maprl.data.geo import MapData
from maprl.data.tile import block_interiors, build_targets, read_targets, run_tile, sample_targets
from maprl.errors import InputError
from maprl.views import valid_centres, view_origin

from conftest import tiny_params


def _targets(m: MapData, **tile: object) -> pd.DataFrame:
    p = TileParams(**{"n_targets": 60, "view_size": 16, "block_size": 32, **tile})  # type: ignore[arg-type]
    return build_targets(m, p, seed=7, crops_dir=None)


@pytest.mark.parametrize("mode", ["random", "spatial"])
@pytest.mark.parametrize("fraction", [0.2, 0.3, 0.5])
def test_split_fraction(tiny_map: MapData, mode: str, fraction: float) -> None:
    t = _targets(tiny_map, mode=mode, test_fraction=fraction)
    assert len(t) == 60
    assert (t["split"] == "test").sum() == round(60 * fraction)


@pytest.mark.parametrize("mode", ["random", "spatial"])
def test_deterministic(tiny_map: MapData, mode: str) -> None:
    pd.testing.assert_frame_equal(_targets(tiny_map, mode=mode), _targets(tiny_map, mode=mode))


def test_seed_changes_targets(tiny_map: MapData) -> None:
    p = TileParams(n_targets=30, view_size=16, block_size=32)
    a = build_targets(tiny_map, p, seed=1, crops_dir=None)
    b = build_targets(tiny_map, p, seed=2, crops_dir=None)
    assert not np.array_equal(a[["x", "y"]].to_numpy(), b[["x", "y"]].to_numpy())


def test_spatial_blocks_never_shared_and_views_inside_block(tiny_map: MapData) -> None:
    t = _targets(tiny_map, mode="spatial")
    train_blocks = set(t.loc[t["split"] == "train", "block"])
    test_blocks = set(t.loc[t["split"] == "test", "block"])
    assert train_blocks and test_blocks and not train_blocks & test_blocks
    x0, y0 = view_origin(t["x"].to_numpy(), t["y"].to_numpy(), 16)
    nbx = -(-tiny_map.width // 32)
    assert np.array_equal(x0 // 32, (x0 + 15) // 32) and np.array_equal(y0 // 32, (y0 + 15) // 32)
    assert np.array_equal((y0 // 32) * nbx + x0 // 32, t["block"].to_numpy())


@pytest.mark.parametrize("mode", ["random", "spatial"])
def test_no_target_touches_nodata(tiny_map: MapData, mode: str) -> None:
    t = _targets(tiny_map, mode=mode, n_targets=200)
    x0, y0 = view_origin(t["x"].to_numpy(), t["y"].to_numpy(), 16)
    for a, b in zip(x0, y0, strict=True):
        assert tiny_map.valid[b : b + 16, a : a + 16].all()


def test_lonlat_columns(tiny_map: MapData) -> None:
    t = _targets(tiny_map)
    assert t["lon"].between(8.9, 9.1).all() and t["lat"].between(45, 48).all()


def test_too_few_blocks_is_clear(tiny_map: MapData) -> None:
    ok = valid_centres(tiny_map.valid, 16)
    p = TileParams(n_targets=10, view_size=16, block_size=512)
    with pytest.raises(InputError, match="tile.block_size"):
        sample_targets(ok, p, np.random.default_rng(0))


def test_block_interiors_marks_whole_views_only() -> None:
    ok = np.ones((64, 64), bool)
    ids = block_interiors(ok, 32, 16)
    assert ids[8, 8] == 0 and ids[7, 8] == -1 and ids[8, 40] == 1 and ids[40, 40] == 3


def test_run_tile_writes_csv_crops_and_preview(tmp_path: Path, tiny_map_path: Path) -> None:
    params = tiny_params(tile={"n_targets": 20, "view_size": 16, "block_size": 32})
    metrics = run_tile(params, tiny_map_path, tmp_path / "targets", tmp_path / "tile.json")
    t = pd.read_csv(tmp_path / "targets" / "targets.csv")
    assert list(t.columns) == ["id", "x", "y", "lon", "lat", "split", "block", "texture"]
    assert len(list((tmp_path / "targets" / "crops").glob("*.png"))) == 20
    assert (tmp_path / "targets" / "preview.png").stat().st_size > 1000
    assert metrics["n_test"] == 4 and metrics["n_train"] == 16
    fewer = tiny_params(tile={"n_targets": 10, "view_size": 16, "block_size": 32})
    run_tile(fewer, tiny_map_path, tmp_path / "targets", tmp_path / "tile.json")
    assert len(list((tmp_path / "targets" / "crops").glob("*.png"))) == 10  # no stale crops from the first run


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("id,x,split\n0,5,train\n", "lacks column.*y"),
        ("", "not a readable CSV"),
        ("id,x,y,split\n", "no rows"),
        ("id,x,y,split\n0,abc,5,train\n", "column x must hold finite numbers"),
        ("id,x,y,split\n0,nan,5,train\n", "column x must hold finite numbers"),
        ("id,x,y,split\n0,1,5,train\n0,2,5,test\n", "ids must be unique"),
        ("id,x,y,split\n0,1,5,holdout\n", "split must be train or test"),
    ],
)
def test_a_bad_targets_table_is_a_clear_error(tmp_path: Path, text: str, match: str) -> None:
    """Defect: a targets.csv with missing columns gave a KeyError traceback in a later stage."""
    path = tmp_path / "targets.csv"
    path.write_text(text)
    with pytest.raises(InputError, match=match):
        read_targets(path)


def test_targets_whose_views_leave_the_map_are_a_clear_error(tmp_path: Path, tiny_map: MapData) -> None:
    """Defect: a target at x = 1e6 (tiled on another map) gave a numpy traceback in train."""
    path = tmp_path / "targets.csv"
    path.write_text("id,x,y,split\n0,64,64,train\n1,1000000,64,test\n")
    assert len(read_targets(path)) == 2  # on its own the table is fine
    with pytest.raises(InputError, match=r"1 target view\(s\) of 32 px leave the 128x128 map \(first: id 1"):
        read_targets(path, tiny_map, 32)
