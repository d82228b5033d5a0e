"""Offline tests for maprl.data.earthengine: Earth Engine is faked at the ``ee.data`` boundary.

``ee.apitestcase.ApiTestCase`` initialises the ee library from its bundled algorithm list
without the network, so the real image expression is built; ``ee.Initialize``,
``ee.data.computeValue`` (``getInfo``) and ``ee.data.computePixels`` are patched.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import ee
import google.auth.exceptions
import httplib2
import numpy as np
import pytest
import rasterio
from ee import apitestcase
from rasterio.io import MemoryFile
from rasterio.transform import Affine

from maprl.config import EarthEngineParams
from maprl.data import earthengine as eem
from maprl.data.geo import NODATA, read_map
from maprl.errors import EarthEngineError

# About 1.5 km x 1.1 km near Lausanne (UTM zone 32N).
BBOX = (6.62, 46.51, 6.64, 46.52)


@contextmanager
def ee_offline(compute_value: Any) -> Iterator[mock.MagicMock]:
    """ee initialised offline, ee.Initialize patched out (yielded), computeValue as given."""
    case = apitestcase.ApiTestCase()
    case.setUp()
    try:
        with (
            mock.patch.object(ee, "Initialize") as init,
            mock.patch.object(ee.data, "computeValue", compute_value or case.old_compute_value),
        ):
            yield init
    finally:
        case.tearDown()


@pytest.fixture
def offline_ee() -> Iterator[mock.MagicMock]:
    """Offline ee whose getInfo answers 3 (the collection size)."""
    with ee_offline(mock.Mock(return_value=3)) as init:
        yield init


@pytest.fixture
def http_ee() -> Iterator[mock.MagicMock]:
    """Offline ee with the real computeValue, for tests that fake the HTTP transport instead."""
    with ee_offline(None) as init:
        yield init


def params(**kw: Any) -> EarthEngineParams:
    base: dict[str, Any] = {"project": "my-project", "bbox": BBOX, "scale": 20.0, "max_request_px": 32}
    base.update(kw)
    return EarthEngineParams(**base)


def geotiff(
    request: dict[str, Any],
    fill: Callable[[np.ndarray, np.ndarray], np.ndarray],
    nodata: float | None = None,
) -> bytes:
    """GeoTIFF bytes matching a computePixels request; ``fill(east, north)`` gives (4, h, w)."""
    g = request["grid"]
    w, h = g["dimensions"]["width"], g["dimensions"]["height"]
    at = g["affineTransform"]
    t = Affine(at["scaleX"], at["shearX"], at["translateX"], at["shearY"], at["scaleY"], at["translateY"])
    cols, rows = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)
    east, north = t * (cols, rows)
    data = fill(np.asarray(east), np.asarray(north)).astype(np.float32)
    profile = {
        "driver": "GTiff",
        "width": w,
        "height": h,
        "count": 4,
        "dtype": "float32",
        "crs": g["crsCode"],
        "transform": t,
        "nodata": nodata,
    }
    with MemoryFile() as mem:
        with mem.open(**profile) as dst:
            dst.write(data)
        return bytes(mem.read())


def coded(east: np.ndarray, north: np.ndarray, scale: float = 20.0) -> np.ndarray:
    """Values that identify a pixel by its position: col and row modulo 200, and easting."""
    return np.stack(
        [
            np.floor(east / scale) % 200 + 1,
            np.floor(north / scale) % 200 + 1,
            np.full_like(east, 50.0),
            east - 300_000.0,
        ]
    )


class FakeComputePixels:
    """Records requests; answers with GeoTIFFs made by ``fill`` or raises queued errors."""

    def __init__(
        self,
        fill: Callable[[np.ndarray, np.ndarray], np.ndarray] = coded,
        errors: list[BaseException] | None = None,
        nodata: float | None = None,
    ) -> None:
        self.fill, self.errors, self.nodata = fill, list(errors or []), nodata
        self.requests: list[dict[str, Any]] = []
        self.calls = 0

    def __call__(self, request: dict[str, Any]) -> bytes:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        # The expression must serialise offline, exactly as the real computePixels does.
        ee.serializer.encode(request["expression"])
        self.requests.append(request)
        return geotiff(request, self.fill, self.nodata)


def run(
    tmp_path: Path,
    fake: FakeComputePixels,
    p: EarthEngineParams | None = None,
    sleeps: list[float] | None = None,
) -> dict[str, Any]:
    """fetch_earthengine with computePixels faked; backoff waits are appended to ``sleeps``."""
    sleeps = [] if sleeps is None else sleeps
    out = tmp_path / "map.tif"
    with mock.patch.object(ee.data, "computePixels", fake):
        return eem.fetch_earthengine(p or params(), out, progress=False, sleep=sleeps.append)


# --------------------------------------------------------------------------- planning


def test_plan_grid_is_utm_north_up_and_covers_bbox() -> None:
    grid = eem.plan_grid(BBOX, 20.0)
    assert grid.crs.to_epsg() == 32632
    t = grid.transform
    assert (t.a, t.b, t.d, t.e) == (20.0, 0.0, 0.0, -20.0)
    assert t.c % 20 == 0 and t.f % 20 == 0
    # The bbox is about 1.53 km x 1.11 km, a little more in UTM because of convergence.
    assert 76 <= grid.width <= 82 and 55 <= grid.height <= 60
    from maprl.data.geo import lonlat_to_crs

    for lon in (BBOX[0], BBOX[2]):
        for lat in (BBOX[1], BBOX[3]):
            x, y = lonlat_to_crs(grid.crs, lon, lat)
            col, row = ~t * (x, y)
            assert 0 <= col <= grid.width and 0 <= row <= grid.height


def test_tile_side_respects_byte_and_side_limits() -> None:
    assert eem.tile_side(512) == 512
    big = eem.tile_side(32768)
    assert big < 32768
    assert big * big * 4 * 4 < 48 * 1024 * 1024
    assert (big + 200) ** 2 * 16 > 48 * 1024 * 1024 * 0.9


def test_plan_tiles_cover_grid_exactly_once() -> None:
    tiles = eem.plan_tiles(70, 45, 32)
    assert len(tiles) == 3 * 2
    cover = np.zeros((45, 70), int)
    for t in tiles:
        assert t.width <= 32 and t.height <= 32
        cover[t.row_off : t.row_off + t.height, t.col_off : t.col_off + t.width] += 1
    assert (cover == 1).all()


def test_transient_classification() -> None:
    assert eem.is_transient(ee.EEException("Too Many Requests: rate limit"))
    assert eem.is_transient(ee.EEException("HTTP 503 Service Unavailable"))
    assert eem.is_transient(ee.EEException("Computation timed out."))
    assert eem.is_transient(ConnectionResetError("reset by peer"))
    assert not eem.is_transient(ee.EEException("Image.load: Image asset 'x' not found."))
    assert not eem.is_transient(ee.EEException("User memory limit exceeded."))
    assert not eem.is_transient(
        ee.EEException("Total request size (50331649 bytes) must be less than or equal to 50331648 bytes.")
    )


# --------------------------------------------------------------------------- image expression


@pytest.mark.parametrize("collection", ["sentinel2", "naip"])
@pytest.mark.parametrize("dem", ["srtm", "glo30"])
def test_build_image_offline(offline_ee: Any, collection: str, dem: str) -> None:
    image, coll = eem.build_image(params(collection=collection, dem=dem))
    assert isinstance(image, ee.Image) and isinstance(coll, ee.ImageCollection)
    text = json.dumps(ee.serializer.encode(image))
    expected = {
        "sentinel2": ["COPERNICUS/S2_SR_HARMONIZED", "GOOGLE/CLOUD_SCORE_PLUS/V1/S2_HARMONIZED", "cs_cdf"],
        "naip": ["USDA/NAIP/DOQQ"],
    }[collection]
    expected += {"srtm": ["USGS/SRTMGL1_003"], "glo30": ["COPERNICUS/DEM/GLO30", "DEM"]}[dem]
    for needle in [*expected, "elevation", "red"]:
        assert needle in text


# --------------------------------------------------------------------------- requests and mosaic


def test_requests_sent(tmp_path: Path, offline_ee: Any) -> None:
    fake = FakeComputePixels()
    meta = run(tmp_path, fake)
    grid = eem.plan_grid(BBOX, 20.0)
    n_expected = math.ceil(grid.width / 32) * math.ceil(grid.height / 32)
    assert meta["n_requests"] == len(fake.requests) == n_expected
    offline_ee.assert_called_once_with(project="my-project")
    seen = np.zeros((grid.height, grid.width), int)
    for r in fake.requests:
        assert r["fileFormat"] == "GEO_TIFF"
        assert r["bandIds"] == ["red", "green", "blue", "elevation"]
        assert isinstance(r["expression"], ee.Image)
        g = r["grid"]
        assert g["crsCode"] == "EPSG:32632"
        w, h = g["dimensions"]["width"], g["dimensions"]["height"]
        assert 1 <= w <= 32 and 1 <= h <= 32
        at = g["affineTransform"]
        assert (at["scaleX"], at["shearX"], at["shearY"], at["scaleY"]) == (20.0, 0.0, 0.0, -20.0)
        col = (at["translateX"] - grid.transform.c) / 20.0
        row = (grid.transform.f - at["translateY"]) / 20.0
        assert col == int(col) and row == int(row)
        seen[int(row) : int(row) + h, int(col) : int(col) + w] += 1
    assert (seen == 1).all()


def test_mosaic_geotiff(tmp_path: Path, offline_ee: Any) -> None:
    meta = run(tmp_path, FakeComputePixels())
    grid = eem.plan_grid(BBOX, 20.0)
    assert meta == {
        "source": "earthengine",
        "collection": "sentinel2",
        "dem": "glo30",
        "date_range": ["2023-05-01", "2023-09-30"],
        "bbox_lonlat": list(BBOX),
        "crs": "EPSG:32632",
        "metres_per_pixel": 20.0,
        "width": grid.width,
        "height": grid.height,
        "n_requests": meta["n_requests"],
        "valid_fraction": 1.0,
    }
    with rasterio.open(tmp_path / "map.tif") as src:
        assert (src.width, src.height, src.count) == (grid.width, grid.height, 4)
        assert src.crs.to_epsg() == 32632
        assert src.transform.almost_equals(grid.transform)
        data = src.read()
    cols, rows = np.meshgrid(np.arange(grid.width) + 0.5, np.arange(grid.height) + 0.5)
    east, north = grid.transform * (cols, rows)
    expected = coded(np.asarray(east), np.asarray(north))
    assert grid.width > 64 and 32 < grid.height < 64  # 3 x 2 tiles of 32 px
    # Whole map, and explicitly the pixels either side of the tile seams.
    np.testing.assert_array_equal(data[:3], expected[:3])
    np.testing.assert_allclose(data[3], expected[3], atol=0.1)
    for seam in (31, 32, 63, 64):
        np.testing.assert_array_equal(data[0, :, seam], expected[0, :, seam])
    for seam in (31, 32):
        np.testing.assert_array_equal(data[1, seam, :], expected[1, seam, :])
    assert np.all(np.diff(data[0, 0, 28:36]) % 200 == 1)  # consecutive columns across the seam
    assert np.all(np.diff(data[1, 28:36, 0]) % 200 == 199)  # rows go south across the seam
    assert read_map(tmp_path / "map.tif").valid.all()


def test_nodata_pixels_are_invalid(tmp_path: Path, offline_ee: Any) -> None:
    def fill(east: np.ndarray, north: np.ndarray) -> np.ndarray:
        data = coded(east, north)
        data[:, 0, 0] = -1.0  # the GeoTIFF's own nodata value
        data[3, 0, 1] = np.nan  # NaN in one band
        data[:3, 0, 2] = 0.0  # masked S2 pixel exported as black
        data[:, 0, 3] = NODATA  # unmask(NODATA) sentinel
        return data

    meta = run(tmp_path, FakeComputePixels(fill=fill, nodata=-1.0))
    m = read_map(tmp_path / "map.tif")
    for tile in eem.plan_tiles(m.width, m.height, 32):
        assert not m.valid[tile.row_off, tile.col_off : tile.col_off + 4].any()
        assert m.valid[tile.row_off, tile.col_off + 4 : tile.col_off + min(tile.width, 6)].all()
    n_bad = sum(min(t.width, 4) for t in eem.plan_tiles(m.width, m.height, 32))
    assert meta["valid_fraction"] == pytest.approx(1 - n_bad / (m.width * m.height))
    assert m.valid.sum() == m.width * m.height - n_bad


# --------------------------------------------------------------------------- retries


def test_retries_transient_errors_then_succeeds(tmp_path: Path, offline_ee: Any) -> None:
    errors: list[BaseException] = [
        ee.EEException("Too Many Requests: request rate exceeded"),
        ConnectionResetError("connection reset by peer"),
    ]
    fake = FakeComputePixels(errors=errors)
    sleeps: list[float] = []
    meta = run(tmp_path, fake, sleeps=sleeps)
    assert sleeps == [1.0, 2.0]
    assert fake.calls == meta["n_requests"] + 2
    assert (tmp_path / "map.tif").exists()


def test_non_transient_error_fails_at_once(tmp_path: Path, offline_ee: Any) -> None:
    fake = FakeComputePixels(errors=[ee.EEException("User memory limit exceeded.")])
    sleeps: list[float] = []
    with pytest.raises(EarthEngineError, match="max_request_px"):
        run(tmp_path, fake, sleeps=sleeps)
    assert fake.calls == 1 and sleeps == []
    assert not (tmp_path / "map.tif").exists()


def test_max_retries_exceeded(tmp_path: Path, offline_ee: Any) -> None:
    fake = FakeComputePixels(errors=[ee.EEException("Earth Engine capacity exceeded.")] * 10)
    sleeps: list[float] = []
    with pytest.raises(EarthEngineError) as err:
        run(tmp_path, fake, params(max_retries=3), sleeps=sleeps)
    assert fake.calls == 4 and sleeps == [1.0, 2.0, 4.0]
    msg = str(err.value)
    assert "after 4 attempts" in msg and "Wait" in msg and "quota" in msg and "scale" in msg
    assert not (tmp_path / "map.tif").exists()


def test_backoff_is_capped(offline_ee: Any) -> None:
    fn = mock.Mock(side_effect=[ee.EEException("503")] * 9 + ["ok"])
    sleeps: list[float] = []
    assert eem.call_with_retries(fn, "x", params(max_retries=9), sleeps.append) == "ok"
    assert sleeps[-1] == eem.BACKOFF_MAX_S and sleeps[:3] == [1.0, 2.0, 4.0]


# --------------------------------------------------------------------------- init and empty collection


def test_missing_project(tmp_path: Path, offline_ee: Any) -> None:
    with pytest.raises(EarthEngineError, match=r"fetch\.earthengine\.project") as err:
        run(tmp_path, FakeComputePixels(), params(project=None))
    assert "register" in str(err.value)
    offline_ee.assert_not_called()


@pytest.mark.parametrize(
    "exc",
    [
        ee.EEException("Please authorize access to Earth Engine by running earthengine authenticate"),
        google.auth.exceptions.DefaultCredentialsError("no application default credentials"),
    ],
)
def test_missing_credentials(tmp_path: Path, offline_ee: Any, exc: Exception) -> None:
    offline_ee.side_effect = exc
    fake = FakeComputePixels()
    with pytest.raises(EarthEngineError, match="`earthengine authenticate`") as err:
        run(tmp_path, fake)
    assert "service_account" in str(err.value)
    assert fake.calls == 0


def test_missing_key_file(tmp_path: Path, offline_ee: Any) -> None:
    key = tmp_path / "nope.json"
    p = params(
        credentials="service_account",
        service_account="sa@x.iam.gserviceaccount.com",
        key_file=str(key),
    )
    with pytest.raises(EarthEngineError, match=r"nope\.json"):
        run(tmp_path, FakeComputePixels(), p)
    offline_ee.assert_not_called()


def test_service_account_initialises_with_credentials(tmp_path: Path, offline_ee: Any) -> None:
    key = tmp_path / "key.json"
    key.write_text("{}")
    p = params(
        credentials="service_account",
        service_account="sa@x.iam.gserviceaccount.com",
        key_file=str(key),
        project=None,
    )
    with mock.patch.object(ee, "ServiceAccountCredentials", return_value="CREDS") as sac:
        run(tmp_path, FakeComputePixels(), p)
    sac.assert_called_once_with("sa@x.iam.gserviceaccount.com", key_file=str(key))
    offline_ee.assert_called_once_with("CREDS", project=None)


def test_empty_collection(tmp_path: Path, offline_ee: Any) -> None:
    fake = FakeComputePixels()
    with (
        mock.patch.object(ee.data, "computeValue", return_value=0),
        pytest.raises(EarthEngineError, match="no sentinel2 images matched") as err,
    ):
        run(tmp_path, fake)
    assert "widen" in str(err.value)
    assert fake.calls == 0
    assert not (tmp_path / "map.tif").exists()


# --------------------------------------------------------------------------- through ee's real REST client


class FakeHttp:
    """The HTTP transport under ee's real client: ee.data.computePixels / computeValue run unpatched.

    ``failures`` are (status, message) answers given to the first computePixels calls.
    """

    def __init__(self, size: int = 3, failures: list[tuple[int, str]] | None = None) -> None:
        self.size, self.failures = size, list(failures or [])
        self.pixel_bodies: list[dict[str, Any]] = []
        self.value_calls = 0

    def request(self, uri: str, method: str = "GET", body: Any = None, headers: Any = None, **_: Any) -> Any:
        if uri.split("?")[0].endswith("/value:compute"):
            self.value_calls += 1
            return httplib2.Response({"status": "200"}), json.dumps({"result": self.size}).encode()
        assert uri.split("?")[0].endswith("/projects/my-project/image:computePixels"), uri
        if self.failures:
            status, message = self.failures.pop(0)
            error = {"error": {"code": status, "message": message}}
            return httplib2.Response({"status": str(status)}), json.dumps(error).encode()
        request = json.loads(body)
        self.pixel_bodies.append(request)
        return httplib2.Response({"status": "200"}), geotiff(request, coded)


def run_http(tmp_path: Path, http: FakeHttp, sleeps: list[float]) -> dict[str, Any]:
    out = tmp_path / "map.tif"
    with apitestcase.UsingCloudApi(mock_http=http):
        return eem.fetch_earthengine(params(), out, progress=True, sleep=sleeps.append)


def test_http_level_fetch_with_rate_limit(tmp_path: Path, http_ee: Any) -> None:
    http = FakeHttp(failures=[(429, "Too many concurrent aggregations.")])
    sleeps: list[float] = []
    meta = run_http(tmp_path, http, sleeps)
    assert sleeps == [1.0]  # one retry of ours; the client's own retries are switched off
    assert http.value_calls == 1
    assert len(http.pixel_bodies) == meta["n_requests"] == 6
    body = http.pixel_bodies[0]
    assert body["fileFormat"] == "GEO_TIFF" and body["bandIds"] == list(eem.BAND_IDS)
    assert body["grid"]["crsCode"] == "EPSG:32632"
    assert "COPERNICUS/S2_SR_HARMONIZED" in json.dumps(body["expression"])
    m = read_map(tmp_path / "map.tif")
    assert m.valid.all() and (m.width, m.height) == (meta["width"], meta["height"])


def test_http_level_permanent_error(tmp_path: Path, http_ee: Any) -> None:
    http = FakeHttp(failures=[(400, "Image.load: Image asset 'COPERNICUS/S2_SR_HARMONIZED' not found.")])
    sleeps: list[float] = []
    with pytest.raises(EarthEngineError, match="not found") as err:
        run_http(tmp_path, http, sleeps)
    assert "registered for Earth Engine" in str(err.value)
    assert sleeps == [] and http.failures == [] and http.pixel_bodies == []


def test_http_level_empty_collection(tmp_path: Path, http_ee: Any) -> None:
    http = FakeHttp(size=0)
    with pytest.raises(EarthEngineError, match="no sentinel2 images matched"):
        run_http(tmp_path, http, [])
    assert http.pixel_bodies == []
