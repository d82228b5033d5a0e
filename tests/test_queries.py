"""Query domains: rasters aligned onto the map grid by coordinates, written beside the map."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from unittest import mock

import ee
import imageio.v3 as iio
import numpy as np
import pytest
import rasterio
from rasterio.crs import CRS
from rasterio.transform import Affine, from_origin
from rasterio.warp import reproject, transform_bounds
from test_earthengine import FakeComputePixels, ee_offline

from maprl.config import EarthEngineParams
from maprl.data import earthengine as eem
from maprl.data import fetch
from maprl.data.fetch import run_fetch
from maprl.data.geo import read_map, utm_crs, write_map
from maprl.data.queries import align_to_map, fetch_queries, query_names, query_path, read_query
from maprl.errors import InputError

from conftest import textured_rgb, tiny_params

UTM = utm_crs(46.5, 6.6)
MAP_T = from_origin(500_000, 5_150_000, 5.0, 5.0)  # 200 x 200 px of 5 m: 1 km square
SIDE = 200
SQUARE = (slice(80, 100), slice(100, 120))  # rows, cols of a bright square on the map


def _map_rgb() -> np.ndarray:
    rgb = np.full((SIDE, SIDE, 3), 60, np.uint8)
    rgb[SQUARE] = 230
    return rgb


@pytest.fixture
def map_tif(tmp_path: Path) -> Path:
    path = tmp_path / "map" / "map.tif"
    write_map(path, _map_rgb(), np.zeros((SIDE, SIDE), np.float32), MAP_T, UTM)
    return path


def _write(path: Path, data: np.ndarray, crs: CRS | str | None, transform: Affine, **kw: Any) -> Path:
    profile = {"driver": "GTiff", "count": data.shape[0], "height": data.shape[1], "width": data.shape[2]}
    with rasterio.open(path, "w", **profile, dtype=data.dtype, crs=crs, transform=transform, **kw) as dst:
        dst.write(data)
    return path


def _ground_in(dst_crs: str, east_shift_m: float, res: float) -> tuple[np.ndarray, Affine]:
    """The map's ground pattern over the map's area shifted east, on a north-up grid of ``dst_crs``."""
    left, top = MAP_T.c + east_shift_m, MAP_T.f
    w, s, e, n = transform_bounds(UTM, dst_crs, left, top - SIDE * 5.0, left + SIDE * 5.0, top)
    width, height = round((e - w) / res), round((n - s) / res)
    transform = from_origin(w, n, res, res)
    out = np.zeros((3, height, width), np.uint8)
    src = np.moveaxis(_map_rgb(), -1, 0)
    reproject(src, out, src_transform=MAP_T, src_crs=UTM, dst_transform=transform, dst_crs=dst_crs, src_nodata=0)
    return out, transform


def test_another_crs_and_offset_land_on_the_map_coordinates(tmp_path: Path, map_tif: Path) -> None:
    """EPSG:3857, bounds 300 m east of the map's, 7 units (about 4.8 m) pixels: aligned by coordinates."""
    data, transform = _ground_in("EPSG:3857", 300.0, 7.0)
    src = _write(tmp_path / "q.tif", data, "EPSG:3857", transform, nodata=0)
    rgb, valid = align_to_map(src, map_tif)
    assert rgb.shape == (SIDE, SIDE, 3) and rgb.dtype == np.uint8 and valid.shape == (SIDE, SIDE)
    assert not valid[:, :58].any()  # west of the query's footprint (300 m = 60 px)
    assert valid[5:-5, 62:].all()
    bright = (rgb[..., 0] > 145) & valid
    rows, cols = np.nonzero(bright)
    assert abs(rows.min() - 80) <= 1 and abs(rows.max() - 99) <= 1
    assert abs(cols.min() - 100) <= 1 and abs(cols.max() - 119) <= 1
    assert abs(int(bright.sum()) - 400) <= 2 * 20 * 2  # the 20 x 20 square, within a pixel at each edge


def test_a_finer_source_in_degrees_is_read_averaged(tmp_path: Path, map_tif: Path) -> None:
    """EPSG:4326 at about 1 m (finer than the 5 m map): read at twice the map's resolution, then warped."""
    data, transform = _ground_in("EPSG:4326", 0.0, 1e-5)
    src = _write(tmp_path / "q.tif", data, "EPSG:4326", transform, nodata=0)
    rgb, valid = align_to_map(src, map_tif)
    assert valid[3:-3, 3:-3].all()
    inner = (slice(82, 98), slice(102, 118))
    assert (rgb[inner] > 200).all() and (rgb[20:60, 20:60] < 90).all()


@pytest.mark.parametrize(("count", "dtype"), [(1, "uint8"), (1, "uint16"), (3, "uint16"), (4, "float32")])
def test_single_band_and_wide_dtypes(tmp_path: Path, map_tif: Path, count: int, dtype: str) -> None:
    ramp = (
        np.tile(np.linspace(1000, 5000, SIDE), (SIDE, 1))
        if dtype != "uint8"
        else np.tile(np.arange(1, SIDE + 1), (SIDE, 1))
    )
    data = np.stack([ramp] * count).astype(dtype)
    rgb, valid = align_to_map(_write(tmp_path / "q.tif", data, UTM, MAP_T), map_tif)
    assert valid.all()
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
    row = rgb[100, :, 0].astype(int)
    assert (np.diff(row) >= 0).all()
    if dtype == "uint8":
        assert np.array_equal(row, np.arange(1, SIDE + 1))  # same grid, uint8: passes through
    else:  # stretched 2-98 %
        assert row[0] == 0 and row[-1] == 255 and 100 < row[SIDE // 2] < 155


def test_nodata_and_mask_of_the_source_are_invalid(tmp_path: Path, map_tif: Path) -> None:
    data = np.full((3, SIDE, SIDE), 120, np.uint8)
    data[:, :50, :] = 7
    src = _write(tmp_path / "q.tif", data, UTM, MAP_T, nodata=7)
    rgb, valid = align_to_map(src, map_tif)
    assert not valid[:50].any() and valid[51:].all()
    assert (rgb[51:] == 120).all() and (rgb[:50] == 0).all()  # no dark fringe from the nodata neighbours


def test_a_raster_too_large_for_memory_is_refused(
    tmp_path: Path, map_tif: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = _write(tmp_path / "q.tif", np.ones((3, SIDE, SIDE), np.uint8), UTM, MAP_T)
    monkeypatch.setattr(fetch, "available_memory", lambda: 100_000)
    with pytest.raises(InputError, match=r"fetch.queries\[2\].path: .*q.tif .*GiB.*Crop the image"):
        align_to_map(src, map_tif, "fetch.queries[2].path")


def test_a_source_that_misses_the_map(tmp_path: Path, map_tif: Path) -> None:
    far = from_origin(MAP_T.c + 50_000, MAP_T.f, 5.0, 5.0)
    src = _write(tmp_path / "far.tif", np.ones((3, 50, 50), np.uint8), UTM, far)
    with pytest.raises(InputError, match=r"fetch.queries\[0\].path: .*far.tif does not overlap the map"):
        align_to_map(src, map_tif, "fetch.queries[0].path")


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_missing_unreadable_and_plain_images(tmp_path: Path, map_tif: Path) -> None:
    with pytest.raises(InputError, match=r"nope.tif does not exist"):
        align_to_map(tmp_path / "nope.tif", map_tif)
    bad = tmp_path / "broken.tif"
    bad.write_bytes(b"II*\x00 this is not a tiff")
    with pytest.raises(InputError, match=r"cannot read .*broken.tif"):
        align_to_map(bad, map_tif)
    png = tmp_path / "photo.png"
    iio.imwrite(png, textured_rgb(64))
    with pytest.raises(InputError, match=r"photo.png is not georeferenced"):
        align_to_map(png, map_tif)
    plain_map = tmp_path / "plain.tif"
    write_map(plain_map, _map_rgb(), np.zeros((SIDE, SIDE), np.float32), Affine.scale(2.0), None)
    with pytest.raises(InputError, match=r"plain.tif has no coordinate reference system.*fetch.queries: \[\]"):
        align_to_map(tmp_path / "nope.tif", plain_map)


# --------------------------------------------------------------------------- the fetch stage


def test_synthetic_query_is_on_the_map_grid(tmp_path: Path) -> None:
    out, metrics_path = tmp_path / "map", tmp_path / "fetch.json"
    params = tiny_params(fetch={"size": 128}, tile={"view_size": 32})
    run_fetch(params, out, metrics_path)
    run_fetch(params, tmp_path / "again", tmp_path / "again.json")
    assert (out / "queries" / "autumn.tif").read_bytes() == (tmp_path / "again" / "queries" / "autumn.tif").read_bytes()
    with rasterio.open(out / "map.tif") as m, rasterio.open(out / "queries" / "autumn.tif") as q:
        assert (q.crs, q.transform, q.width, q.height) == (m.crs, m.transform, m.width, m.height)
        assert q.count == 3 and q.dtypes == ("uint8",) * 3
    assert sorted(p.name for p in out.iterdir()) == ["map.json", "map.tif", "queries"]  # no mask sidecar
    meta = json.loads((out / "map.json").read_text())
    assert meta["queries"] == [
        {
            "name": "autumn",
            "source": "synthetic",
            "season": "autumn",
            "file": "queries/autumn.tif",
            "valid_fraction": 1.0,
            "overlap_fraction": 1.0,
        }
    ]
    assert json.loads(metrics_path.read_text())["queries"] == {
        "autumn": {"valid_fraction": 1.0, "overlap_fraction": 1.0}
    }
    assert query_names(out) == ["autumn"]
    rgb, valid = read_query(out, "autumn")
    summer = read_map(out / "map.tif").rgb
    assert rgb.shape == summer.shape and valid.all()
    assert np.abs(rgb.astype(int) - summer).mean() > 5  # another season, not the map again


def test_no_query_domains_writes_none(tmp_path: Path) -> None:
    out, metrics_path = tmp_path / "map", tmp_path / "fetch.json"
    run_fetch(tiny_params(fetch={"size": 128, "queries": []}, tile={"view_size": 32}), out, metrics_path)
    assert sorted(p.name for p in out.iterdir()) == ["map.json", "map.tif"]
    assert "queries" not in json.loads((out / "map.json").read_text())
    assert "queries" not in json.loads(metrics_path.read_text())
    assert query_names(out) == []


def _file_params(map_src: Path, query_src: Path) -> Any:
    fetch = {
        "source": "file",
        "path": str(map_src),
        "queries": [{"name": "older", "source": "file", "path": str(query_src)}],
    }
    return tiny_params(fetch=fetch, tile={"view_size": 16})


def test_file_query_beside_a_file_map(tmp_path: Path) -> None:
    map_src = _write(tmp_path / "new.tif", np.moveaxis(_map_rgb(), -1, 0), UTM, MAP_T)
    data, transform = _ground_in("EPSG:3857", 300.0, 7.0)
    query_src = _write(tmp_path / "old.tif", data, "EPSG:3857", transform, nodata=0)
    metrics = run_fetch(_file_params(map_src, query_src), tmp_path / "map", tmp_path / "fetch.json")
    overlap = metrics["queries"]["older"]["overlap_fraction"]
    assert 0.65 < overlap < 0.72  # 700 of the map's 1000 m
    meta = json.loads((tmp_path / "map" / "map.json").read_text())
    assert meta["queries"][0]["path"] == str(query_src) and meta["queries"][0]["source"] == "file"
    rgb, valid = read_query(tmp_path / "map", "older")
    assert valid.mean() == pytest.approx(overlap, abs=0.01)


def test_a_query_covering_under_half_the_map_is_refused_and_keeps_the_old_map(tmp_path: Path) -> None:
    out = tmp_path / "map"
    run_fetch(tiny_params(fetch={"size": 128}, tile={"view_size": 32}), out, tmp_path / "fetch.json")
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    map_src = _write(tmp_path / "new.tif", np.moveaxis(_map_rgb(), -1, 0), UTM, MAP_T)
    data, transform = _ground_in("EPSG:3857", 700.0, 7.0)
    query_src = _write(tmp_path / "old.tif", data, "EPSG:3857", transform, nodata=0)
    with pytest.raises(InputError, match=r"fetch.queries\[0\] \('older'.*old.tif.*only 30%"):
        run_fetch(_file_params(map_src, query_src), out, tmp_path / "fetch.json")
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before


def test_read_query_errors(tmp_path: Path) -> None:
    out = tmp_path / "map"
    run_fetch(tiny_params(fetch={"size": 64}, tile={"view_size": 16, "block_size": 32}), out, tmp_path / "m.json")
    with pytest.raises(InputError, match=r"'winter'.*winter.tif does not exist; rerun `dvc repro fetch`"):
        read_query(out, "winter")
    query_path(out, "autumn").write_bytes(b"II*\x00 damaged")
    with pytest.raises(InputError, match=r"'autumn'.*cannot read .*autumn.tif.*rerun `dvc repro fetch`"):
        read_query(out, "autumn")
    query_path(out, "autumn").unlink()
    _write(query_path(out, "autumn"), np.ones((3, 32, 32), np.uint8), UTM, MAP_T)
    with pytest.raises(InputError, match=r"32x32 but the map is 64x64"):
        read_query(out, "autumn")
    (out / "map.json").write_text("{not json")
    with pytest.raises(InputError, match=r"cannot read .*map.json"):
        query_names(out)
    (out / "map.json").unlink()
    assert query_names(out) == []  # a map.tif not written by fetch has no query domains


# --------------------------------------------------------------------------- earth engine


def _fake_earthengine(calls: list[EarthEngineParams]) -> Any:
    """Writes what fetch_earthengine would (a 4-band map GeoTIFF, 0-255) on its own grid in EPSG:3857."""

    def fake(p: EarthEngineParams, out_path: Path, **_: Any) -> dict[str, Any]:
        calls.append(p)
        data, transform = _ground_in("EPSG:3857", 0.0, 7.0)
        rgb = np.moveaxis(data, 0, -1).astype(np.float32)
        write_map(out_path, rgb, np.zeros(rgb.shape[:2], np.float32), transform, CRS.from_epsg(3857), data[0] > 0)
        return {}

    return fake


def test_earthengine_query_gets_its_dates(tmp_path: Path, map_tif: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[EarthEngineParams] = []
    monkeypatch.setattr(eem, "fetch_earthengine", _fake_earthengine(calls))
    queries = [
        {"name": "older", "source": "earthengine", "start_date": "2016-06-01", "end_date": "2016-08-31"},
        {"name": "same_dates", "source": "earthengine"},
    ]
    params = tiny_params(fetch={"source": "earthengine", "earthengine": {"collection": "naip"}, "queries": queries})
    out = map_tif.parent
    infos = fetch_queries(params.fetch, 0, map_tif, out)
    assert [(c.start_date, c.end_date, c.collection) for c in calls] == [
        ("2016-06-01", "2016-08-31", "naip"),
        ("2023-05-01", "2023-09-30", "naip"),
    ]
    assert infos[0]["date_range"] == ["2016-06-01", "2016-08-31"] and infos[0]["collection"] == "naip"
    assert infos[1]["date_range"] == ["2023-05-01", "2023-09-30"]
    assert infos[0]["overlap_fraction"] > 0.97
    rgb, valid = read_query(out, "older")
    inner = (slice(82, 98), slice(102, 118))
    assert (rgb[inner] >= 228).all() and (rgb[20:60, 20:60] <= 62).all()  # 0-255 map values, not stretched
    assert sorted(p.name for p in out.iterdir()) == ["map.tif", "queries"]  # the temporary download is gone


def test_earthengine_map_and_query_through_computepixels(tmp_path: Path) -> None:
    """The offline Earth Engine fake of test_earthengine: same grid and values, the query's own dates sent."""
    ee_p = {"project": "p", "bbox": (6.62, 46.51, 6.64, 46.52), "scale": 20.0, "max_request_px": 32}
    query = {"name": "older", "source": "earthengine", "start_date": "2019-06-01", "end_date": "2019-08-31"}
    params = tiny_params(
        fetch={"source": "earthengine", "earthengine": ee_p, "queries": [query]},
        tile={"view_size": 16, "block_size": 32},
    )
    fake = FakeComputePixels()
    with ee_offline(mock.Mock(return_value=3)), mock.patch.object(ee.data, "computePixels", fake):
        metrics = run_fetch(params, tmp_path / "map", tmp_path / "fetch.json")
        expressions = [json.dumps(ee.serializer.encode(r["expression"])) for r in fake.requests]
    n = len(expressions) // 2
    assert all("2023-05-01" in e for e in expressions[:n]) and all("2019-06-01" in e for e in expressions[n:])
    assert metrics["queries"]["older"] == {"valid_fraction": 1.0, "overlap_fraction": 1.0}
    rgb, valid = read_query(tmp_path / "map", "older")
    assert valid.all() and np.array_equal(rgb, read_map(tmp_path / "map" / "map.tif").rgb)


def test_a_synthetic_domain_is_skipped_beside_a_file_map(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The default autumn domain re-renders the synthetic world: with a file map it is skipped, and said so."""
    map_src = _write(tmp_path / "new.tif", np.moveaxis(_map_rgb(), -1, 0), UTM, MAP_T)
    fetch = {"source": "file", "path": str(map_src), "queries": [{"name": "autumn", "source": "synthetic"}]}
    run_fetch(tiny_params(fetch=fetch, tile={"view_size": 16}), tmp_path / "map", tmp_path / "fetch.json")
    assert "autumn (source synthetic)" in capsys.readouterr().out
    assert query_names(tmp_path / "map") == [] and not (tmp_path / "map" / "queries").exists()
