import json
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import rasterio

from maprl.data.fetch import run_fetch
from maprl.data.geo import NODATA, read_map, write_map
from maprl.errors import InputError

from conftest import make_map, textured_rgb, tiny_params


def test_synthetic_fetch_is_deterministic(tmp_path: Path) -> None:
    params = tiny_params(fetch={"size": 128}, tile={"view_size": 32})
    run_fetch(params, tmp_path / "a", tmp_path / "a.json")
    run_fetch(params, tmp_path / "b", tmp_path / "b.json")
    a, b = read_map(tmp_path / "a" / "map.tif"), read_map(tmp_path / "b" / "map.tif")
    assert np.array_equal(a.rgb, b.rgb) and np.array_equal(a.elevation, b.elevation)
    meta = json.loads((tmp_path / "a" / "map.json").read_text())
    assert meta["source"] == "synthetic" and meta["crs"].startswith("EPSG:326")
    w, s, e, n = meta["bounds_lonlat"]
    assert w < 6.63 < e and s < 46.52 < n
    assert meta["width"] == meta["height"] == 128 and meta["metres_per_pixel"] == 1.0
    metrics = json.loads((tmp_path / "a.json").read_text())
    assert 0 < metrics["usable_view_fraction"] <= 1


def test_synthetic_geotiff_has_four_bands_and_crs(tmp_path: Path) -> None:
    run_fetch(tiny_params(fetch={"size": 128}), tmp_path / "out", tmp_path / "m.json")
    with rasterio.open(tmp_path / "out" / "map.tif") as src:
        assert src.count == 4 and src.crs is not None and src.nodata == NODATA
        assert src.descriptions == ("red", "green", "blue", "elevation")


def test_file_geotiff_with_nodata(tmp_path: Path) -> None:
    m = make_map(96, nodata_corner=30)
    src = tmp_path / "in.tif"
    with rasterio.open(
        src,
        "w",
        driver="GTiff",
        width=96,
        height=96,
        count=3,
        dtype="uint8",
        crs=m.crs,
        transform=m.transform,
        nodata=0,
    ) as dst:
        rgb = np.maximum(m.rgb, 1)
        rgb[~m.valid] = 0
        dst.write(np.moveaxis(rgb, -1, 0))
    params = tiny_params(fetch={"source": "file", "path": str(src), "queries": []}, tile={"view_size": 16})
    run_fetch(params, tmp_path / "out", tmp_path / "m.json")
    out = read_map(tmp_path / "out" / "map.tif")
    assert out.crs == m.crs and out.transform == m.transform
    assert not out.valid[:30, :30].any() and out.valid[40:, 40:].all()
    meta = json.loads((tmp_path / "out" / "map.json").read_text())
    assert meta["georeferenced"] and meta["valid_fraction"] == pytest.approx(1 - 900 / 96**2)


def test_file_plain_jpeg_gets_pixel_grid_and_resample(tmp_path: Path) -> None:
    jpg = tmp_path / "photo.jpg"
    iio.imwrite(jpg, textured_rgb(120, seed=3))
    fetch = {"source": "file", "path": str(jpg), "resample": 0.5, "queries": []}
    params = tiny_params(fetch=fetch, tile={"view_size": 16})
    run_fetch(params, tmp_path / "out", tmp_path / "m.json")
    meta = json.loads((tmp_path / "out" / "map.json").read_text())
    assert meta["crs"] is None and meta["georeferenced"] is False
    assert meta["width"] == meta["height"] == 60


def test_corrupt_image_is_clear_and_keeps_outputs(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "map.tif").write_bytes(b"earlier output")
    bad = tmp_path / "broken.tif"
    bad.write_bytes(b"II*\x00 this is not a tiff")
    params = tiny_params(fetch={"source": "file", "path": str(bad), "queries": []})
    with pytest.raises(InputError, match="broken.tif"):
        run_fetch(params, out, tmp_path / "m.json")
    assert (out / "map.tif").read_bytes() == b"earlier output"
    assert sorted(p.name for p in out.iterdir()) == ["map.tif"]


def test_missing_file_is_clear(tmp_path: Path) -> None:
    params = tiny_params(fetch={"source": "file", "path": str(tmp_path / "nope.png"), "queries": []})
    with pytest.raises(InputError, match="does not exist"):
        run_fetch(params, tmp_path / "out", tmp_path / "m.json")


def _snapshot(*folders: Path) -> dict[str, bytes]:
    return {str(f): f.read_bytes() for d in folders for f in sorted(d.rglob("*")) if f.is_file()}


@pytest.mark.parametrize(
    "bad",
    [
        {"fetch": {"size": 64}, "tile": {"view_size": 100, "block_size": 256}},  # a view larger than the map
        {"fetch": {"source": "file", "path": "ALLNODATA", "queries": []}, "tile": {"view_size": 16}},
    ],
)
def test_a_failed_fetch_leaves_the_previous_map_and_metrics(tmp_path: Path, bad: dict) -> None:
    """Defect: fetch replaced map.tif before its last check, so map.json and fetch.json described another map."""
    out, metrics, timing = tmp_path / "map", tmp_path / "metrics" / "fetch.json", tmp_path / "timing.json"
    run_fetch(tiny_params(fetch={"size": 128}, tile={"view_size": 32}), out, metrics, timing)
    before = _snapshot(out, metrics.parent) | {"timing": timing.read_bytes()}
    empty = tmp_path / "empty.tif"
    with rasterio.open(empty, "w", driver="GTiff", width=64, height=64, count=3, dtype="uint8", nodata=0) as dst:
        dst.write(np.zeros((3, 64, 64), np.uint8))
    if bad["fetch"].get("path") == "ALLNODATA":
        bad = {**bad, "fetch": {**bad["fetch"], "path": str(empty)}}
    with pytest.raises(InputError, match="view"):
        run_fetch(tiny_params(**bad), out, metrics, timing)
    assert _snapshot(out, metrics.parent) | {"timing": timing.read_bytes()} == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary left


def test_timings_go_to_their_own_file(tmp_path: Path) -> None:
    params = tiny_params(fetch={"size": 128}, tile={"view_size": 32})
    run_fetch(params, tmp_path / "a", tmp_path / "a.json", tmp_path / "a-timing.json")
    run_fetch(params, tmp_path / "b", tmp_path / "b.json", tmp_path / "b-timing.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    assert (tmp_path / "a" / "map.tif").read_bytes() == (tmp_path / "b" / "map.tif").read_bytes()
    assert "seconds" not in json.loads((tmp_path / "a.json").read_text())
    assert json.loads((tmp_path / "a-timing.json").read_text())["seconds"] >= 0


def test_an_image_too_large_for_memory_is_refused_before_reading(tmp_path: Path) -> None:
    """Defect: a GeoTIFF declaring 200000x200000 pixels made fetch try to allocate 112 GiB."""
    huge = tmp_path / "huge.tif"
    profile = {"driver": "GTiff", "width": 200_000, "height": 200_000, "count": 3, "dtype": "uint8"}
    with rasterio.open(huge, "w", **profile, tiled=True, compress="deflate", sparse_ok=True) as dst:
        dst.write(np.ones((3, 16, 16), np.uint8), window=rasterio.windows.Window(0, 0, 16, 16))
    assert huge.stat().st_size < 10_000_000
    params = tiny_params(fetch={"source": "file", "path": str(huge), "queries": []}, tile={"view_size": 16})
    with pytest.raises(InputError, match=r"200000x200000.*GiB.*fetch.resample"):
        run_fetch(params, tmp_path / "out", tmp_path / "m.json")


def test_write_map_roundtrip(tmp_path: Path) -> None:
    m = make_map(64, nodata_corner=10)
    write_map(tmp_path / "x.tif", m.rgb, m.elevation, m.transform, m.crs, m.valid)
    back = read_map(tmp_path / "x.tif")
    assert np.array_equal(back.valid, m.valid)
    assert np.array_equal(back.rgb[m.valid], m.rgb[m.valid])
    assert np.allclose(back.elevation[m.valid], m.elevation[m.valid])
