"""``maprl locate`` on a tiny map: photos in every format, finding held-out and rotated crops, the
calibrated confidence and abstention, GeoJSON that a GeoJSON library reads, batch mode, bad input."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import geojson
import numpy as np
import pandas as pd
import pytest
import rasterio
import yaml
from PIL import Image
from rasterio.crs import CRS
from rasterio.transform import from_origin

from maprl.cli import main
from maprl.config import EncoderParams, parse_params
from maprl.data.geo import MapData, write_map
from maprl.data.perturb import rotate
from maprl.data.photo import read_photo
from maprl.errors import InputError
from maprl.eval.agents import POLICY_INFO
from maprl.eval.calibration import calibrate_methods, save_calibration
from maprl.features.cache import make_space
from maprl.features.memory import MapMemory
from maprl.io import write_json
from maprl.locator import Locator
from maprl.nav.runtime import Runtime, asset_fingerprint
from maprl.nav.scene import Scene

from conftest import make_map, textured_rgb

VIEW, SIZE = 32, 256
RAW = {
    "tile": {"view_size": VIEW, "block_size": 64},
    "encoder": {"kind": "impala_cnn", "weights": "random", "input_size": 64, "cache_stride": 4, "torch_threads": 1,
                "local_norm": 0.0,
                "heading_search": 4},
    "evaluate": {"max_steps": 40, "success_radius": 8.0},
    "train": {"val_fraction": 0.3},
    "locate": {"method": "retrieve_then_fly", "restarts": 2, "top_k": 2},
}  # fmt: skip


def _targets(rng: np.random.Generator, n: int) -> pd.DataFrame:
    xy = rng.uniform(VIEW, SIZE - VIEW, (n, 2)).round()
    split = np.array(["train", "val", "test"])[np.arange(n) % 3]
    return pd.DataFrame({"id": np.arange(n), "x": xy[:, 0], "y": xy[:, 1], "split": split})


def _build(root: Path, m: MapData) -> dict[str, str]:
    """What the pipeline would leave for map ``m``: features, a stop threshold and a confidence calibration."""
    params = parse_params(RAW)
    (root / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
    write_map(root / "map.tif", m.rgb, m.elevation, m.transform, m.crs, m.valid)
    space = make_space(EncoderParams(**RAW["encoder"]), m, VIEW, seed=0)
    (root / "features").mkdir()
    space.save(root / "features")
    stop = 0.9
    write_json(root / "features" / "calibration.json", {"stop_threshold": stop})
    memory = MapMemory(space.grid_positions(), space.grid_embeddings(), 2 * params.evaluate.success_radius)
    scene = Scene(m, _targets(np.random.default_rng(0), 36), space, VIEW)
    rt = Runtime(scene, memory, stop, n_headings=params.encoder.heading_search)
    calibrators, _ = calibrate_methods(params, rt, None)
    save_calibration(root / "calibration.json", calibrators, rt, params)
    policy = root / "policy.zip"  # a policy record of another map: enough to be refused before loading
    with zipfile.ZipFile(policy, "w") as z:
        info = {"data": asset_fingerprint(rt) | {"map": "0123456789abcdef"}, "view_size": VIEW}
        z.writestr(POLICY_INFO, json.dumps(info))
    files = {"params": "params.yaml", "map": "map.tif", "features": "features", "calibration": "calibration.json",
             "policy": "policy.zip"}  # fmt: skip
    return {k: str(root / v) for k, v in files.items()}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return _build(tmp_path_factory.mktemp("locate"), make_map(SIZE, seed=3))


def _args(ws: dict[str, str]) -> list[str]:
    return [f"--{k}={v}" for k, v in ws.items() if k != "policy"]


@pytest.fixture(scope="module")
def locator(workspace: dict[str, str]) -> Locator:
    return Locator.load(workspace["params"], workspace["map"], workspace["features"], workspace["policy"],
                        workspace["calibration"])  # fmt: skip


# -- reading photos ---------------------------------------------------------------------------------------
def _save(tmp_path: Path, name: str, img: Image.Image, **kw: object) -> Path:
    path = tmp_path / name
    img.save(path, **kw)
    return path


@pytest.mark.parametrize(
    ("mode", "note"),
    [("L", "grayscale"), ("RGBA", "alpha"), ("P", "palette"), ("I;16", "16-bit"), ("CMYK", "CMYK"), ("RGB", None)],
)
def test_read_photo_converts_modes_and_says_so(tmp_path: Path, mode: str, note: str | None) -> None:
    rgb = textured_rgb(40, seed=1)
    img = Image.fromarray(rgb)
    if mode == "I;16":
        img = Image.fromarray(rgb[:, :, 0].astype(np.uint16) * 257)
    elif mode == "P":
        img = img.quantize(16)
    elif mode != "RGB":
        img = img.convert(mode)
    path = _save(tmp_path, "p.jpg" if mode == "CMYK" else "p.png", img)
    photo = read_photo(path)
    assert photo.rgb.shape == (40, 40, 3) and photo.rgb.dtype == np.uint8
    assert (note is None and not photo.notes) or any(note.lower() in n.lower() for n in photo.notes)


def test_read_photo_applies_exif_orientation(tmp_path: Path) -> None:
    rgb = textured_rgb(40, seed=2)[:, :30]  # 30 wide, 40 high
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was turned: display rotated 90 degrees clockwise
    path = _save(tmp_path, "p.jpg", Image.fromarray(rgb), exif=exif, quality=95)
    photo = read_photo(path)
    assert photo.rgb.shape == (30, 40, 3)
    assert any("EXIF orientation 6" in n for n in photo.notes)


def test_read_geotiff_gives_its_gsd(tmp_path: Path) -> None:
    path = tmp_path / "p.tif"
    profile = {"driver": "GTiff", "width": 40, "height": 40, "count": 3, "dtype": "uint8", "crs": "EPSG:32632",
               "transform": from_origin(500000, 5150000, 0.5, 0.5)}  # fmt: skip
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(np.moveaxis(textured_rgb(40), -1, 0))
    assert read_photo(path).gsd_m == pytest.approx(0.5)


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    good = _save(tmp_path, "good.jpg", Image.fromarray(textured_rgb(64)), quality=90)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    tiny = _save(tmp_path, "tiny.png", Image.fromarray(np.zeros((2, 2, 3), np.uint8)))
    return {"truncated": truncated, "not an image": text, "tiny": tiny, "missing": tmp_path / "nope.jpg",
            "directory": tmp_path}  # fmt: skip


def test_bad_photos_are_input_errors_naming_the_file(tmp_path: Path) -> None:
    for what, path in _bad_files(tmp_path).items():
        with pytest.raises(InputError, match=str(path.name) if what != "directory" else "directory"):
            read_photo(path)


# -- locating ---------------------------------------------------------------------------------------------
def _crop(rgb: np.ndarray, x: int, y: int, side: int) -> np.ndarray:
    return rgb[y - side // 2 : y + side // 2, x - side // 2 : x + side // 2].copy()


@pytest.mark.parametrize("turn", [0, 90, 180, 270])
def test_locate_finds_held_out_crops_also_rotated(locator: Locator, turn: int) -> None:
    rgb = locator.rt.scene.map.rgb
    for x, y in [(60, 70), (180, 120), (130, 200)]:  # not targets of the calibration
        photo = rotate(_crop(rgb, x, y, VIEW), turn)
        r = locator.locate(photo)
        assert np.hypot(r.pixel_x - x, r.pixel_y - y) <= locator.params.evaluate.success_radius
        assert r.heading_deg == pytest.approx(turn)
        assert 0.0 <= r.confidence <= 1.0 and r.steps >= 1


def test_locate_with_known_heading_and_gsd(locator: Locator) -> None:
    rgb = locator.rt.scene.map.rgb
    big = _crop(rgb, 150, 150, 2 * VIEW)  # twice the ground of a view, at half the map's metres per pixel
    photo = np.asarray(Image.fromarray(np.ascontiguousarray(rotate(big, 90))).resize((4 * VIEW, 4 * VIEW)))
    r = locator.locate(photo, gsd=locator.map_gsd / 2, heading=90.0)
    assert r.heading_source == "given" and r.scale == pytest.approx(0.5)
    assert np.hypot(r.pixel_x - 150, r.pixel_y - 150) <= locator.params.evaluate.success_radius
    auto = locator.locate(photo, gsd="auto", heading=90.0)
    assert auto.gsd_source.startswith("auto") and auto.scale == pytest.approx(0.5)


def test_abstains_on_a_photo_from_another_map(locator: Locator) -> None:
    elsewhere = textured_rgb(VIEW, seed=99)
    r = locator.locate(elsewhere)
    assert not r.located and r.confidence < locator.params.locate.abstain_below
    here = locator.locate(_crop(locator.rt.scene.map.rgb, 100, 100, VIEW))
    assert here.confidence > r.confidence


# -- outputs ---------------------------------------------------------------------------------------------
def _check_rfc7946(fc: dict) -> None:
    assert fc["type"] == "FeatureCollection" and "crs" not in fc
    kinds = {f["geometry"]["type"] for f in fc["features"]}
    assert {"Point", "Polygon", "LineString"} <= kinds
    for f in fc["features"]:
        g = f["geometry"]
        coords = np.array(g["coordinates"][0] if g["type"] == "Polygon" else g["coordinates"], float).reshape(-1, 2)
        assert np.all(np.abs(coords[:, 0]) <= 180) and np.all(np.abs(coords[:, 1]) <= 90)
        if g["type"] == "Polygon":
            ring = coords
            assert np.array_equal(ring[0], ring[-1]) and len(ring) >= 4
            area2 = np.sum(ring[:-1, 0] * ring[1:, 1] - ring[1:, 0] * ring[:-1, 1])
            assert area2 > 0  # exterior rings counter-clockwise
        if g["type"] == "LineString":
            assert len(coords) >= 2
    parsed = geojson.loads(json.dumps(fc))
    assert parsed.is_valid, parsed.errors()


def test_cli_single_photo_json_geojson_and_plot(workspace: dict[str, str], tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    rgb = make_map(SIZE, seed=3).rgb
    photo = _save(tmp_path, "q.png", Image.fromarray(rotate(_crop(rgb, 90, 160, VIEW), 90)))
    gj, png = tmp_path / "where.geojson", tmp_path / "where.png"
    assert main(["locate", str(photo), "--geojson", str(gj), "--plot", str(png), *_args(workspace)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert abs(out["pixel_x"] - 90) <= 8 and abs(out["pixel_y"] - 160) <= 8
    assert -180 <= out["lon"] <= 180 and -90 <= out["lat"] <= 90 and out["heading_deg"] == 90
    assert {"confidence", "located", "alternatives", "steps", "seconds", "x", "y", "crs"} <= set(out)
    _check_rfc7946(json.loads(gj.read_text()))
    assert png.stat().st_size > 1000


def test_cli_batch_writes_one_row_per_photo(workspace: dict[str, str], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    rgb = make_map(SIZE, seed=3).rgb
    photos = [_save(tmp_path, f"q{i}.jpg", Image.fromarray(_crop(rgb, x, 120, VIEW)), quality=92)
              for i, x in enumerate((60, 120, 180))]  # fmt: skip
    csv, gj = tmp_path / "all.csv", tmp_path / "all.geojson"
    args = ["locate", *map(str, photos), "--out", str(csv), "--geojson", str(gj), *_args(workspace)]
    assert main(args) == 0
    assert len(json.loads(capsys.readouterr().out)) == 3
    table = pd.read_csv(csv)
    assert len(table) == 3 and list(table["photo"]) == list(map(str, photos))
    fc = json.loads(gj.read_text())
    _check_rfc7946(fc)
    assert sum(f["properties"]["role"] == "answer" for f in fc["features"]) == 3


@pytest.mark.parametrize("what", ["truncated", "not an image", "tiny", "missing", "directory"])
def test_cli_bad_photo_exits_2_and_writes_nothing(workspace: dict[str, str], tmp_path: Path, what: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    bad = _bad_files(tmp_path)[what]
    good = tmp_path / "good.jpg"
    out = tmp_path / "out"
    args = ["locate", str(good), str(bad), "--out", str(out / "r.csv"), "--geojson", str(out / "r.geojson")]
    assert main([*args, *_args(workspace)]) == 2
    err = capsys.readouterr().err
    assert bad.name in err and "error" in err
    assert not out.exists()


def test_cli_refuses_a_policy_of_another_map(workspace: dict[str, str], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    photo = _save(tmp_path, "q.png", Image.fromarray(textured_rgb(VIEW)))
    args = ["locate", str(photo), "--method", "agent", f"--policy={workspace['policy']}", *_args(workspace)]
    assert main([*args, "--out", str(tmp_path / "r.csv")]) == 2
    err = capsys.readouterr().err
    assert "trained on another map" in err and "dvc repro" in err
    assert not (tmp_path / "r.csv").exists()


def test_cli_rejects_bad_gsd(workspace: dict[str, str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["locate", "x.jpg", "--gsd", "nan", *_args(workspace)])
    assert exc.value.code == 2


def test_locate_on_a_map_in_degrees_measures_true_metres(tmp_path: Path) -> None:
    """A map in EPSG:4326 (like the Landsat data): distances and the radius in true metres, GeoJSON in place."""
    deg = 2e-5  # about 1.5 m east-west and 2.2 m north-south at 46.5 N
    m = make_map(SIZE, seed=3)
    m = MapData(m.rgb, m.elevation, m.valid, from_origin(6.6, 46.5, deg, deg), CRS.from_epsg(4326))
    ws = _build(tmp_path, m)
    loc = Locator.load(ws["params"], ws["map"], ws["features"], ws["policy"], ws["calibration"])
    r = loc.locate(_crop(m.rgb, 120, 100, VIEW))
    assert np.hypot(r.pixel_x - 120, r.pixel_y - 100) <= loc.params.evaluate.success_radius
    mx, my = 2e-5 * 111_320 * np.cos(np.radians(46.5)), 2e-5 * 111_150  # metres per pixel along x and y
    assert r.success_radius_m == pytest.approx(8.0 * (mx + my) / 2, rel=0.02)
    assert r.lon == pytest.approx(6.6 + (120 + 0.5) * deg, abs=deg) and r.lat == pytest.approx(
        46.5 - 100.5 * deg, abs=deg
    )
    for a in r.alternatives:
        d = np.hypot((a.pixel_x - r.pixel_x) * mx, (a.pixel_y - r.pixel_y) * my)
        assert a.distance_m == pytest.approx(d, rel=0.02)
    _check_rfc7946(loc.geojson([r]))


def test_heading_search_reusing_quarter_turns_embeds_as_turning_each_angle(
    locator: Locator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """embed_photos turns 45 degrees once and quarter-turns it for 135, 225 and 315: bit for bit the same result."""
    import maprl.features.photos as photos_mod

    rt, rgb = locator.rt, locator.rt.scene.map.rgb
    places = [(60, 70, 135), (180, 120, 300), (130, 200, 0)]
    photos = np.stack([rotate(_crop(rgb, x, y, VIEW), a) for x, y, a in places])
    reused = photos_mod.embed_photos(rt.scene.space, rt.memory, photos, 8)
    monkeypatch.setattr(photos_mod, "quarter_turns", lambda angle: None)
    direct = photos_mod.embed_photos(rt.scene.space, rt.memory, photos, 8)
    for field in ("embeddings", "heading_deg", "top_similarity"):
        assert np.array_equal(getattr(reused, field), getattr(direct, field))
    assert set(reused.heading_deg) - {0.0, 90.0, 180.0, 270.0}  # a diagonal heading won: the reuse was exercised
