"""``maprl locate``: where was this photo taken?

:class:`Locator` loads what the pipeline made (the map, its feature cache and stop threshold,
the trained memory agent and the confidence calibration of the ``evaluate`` stage), checks they
belong together, and answers photos with :class:`LocateResult`:

1. the photo is read (:func:`~maprl.data.photo.read_photo`: JPEG, PNG or GeoTIFF), resampled
   to the map's ground sample distance (``gsd``: given, from a georeferenced GeoTIFF, searched
   over ``locate.gsd_scales`` with ``"auto"``, or assumed to be the map's), and its centre cut
   to one view;
2. its heading is searched (``encoder.heading_search`` headings) unless given;
3. the agent (or retrieve-then-fly) flies from ``locate.restarts`` spread starts
   (:func:`~maprl.eval.locate.locate_photos`);
4. the evidence becomes a calibrated confidence; below ``locate.abstain_below`` the answer
   is reported as not located, with its best guess.

From Python: ``from maprl import locate; result = locate("photo.jpg")``.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from maprl.config import LOCATE_INPUTS, Params, agent_variant, load_params
from maprl.data.geojson import answer_features, feature_collection, footprint
from maprl.data.photo import Photo, read_photo, square_view, to_map_gsd
from maprl.errors import InputError
from maprl.eval.agents import read_policy_info
from maprl.eval.calibration import Calibrator, load_calibration
from maprl.eval.locate import EVIDENCE, embed_aligned, locate_photos, method_setup
from maprl.features.nets import configure_torch
from maprl.features.photos import Embedded
from maprl.nav.runtime import Runtime, asset_fingerprint, fingerprint_differences, load_map_runtime


@dataclass
class Alternative:
    """Another place the photo could show: a retrieval candidate away from the answer."""

    rank: int
    pixel_x: float
    pixel_y: float
    lon: float | None
    lat: float | None
    similarity: float
    distance_m: float | None  # from the answer


@dataclass
class LocateResult:
    """The answer for one photo. Pixel positions are map columns (x) and rows (y) of the view centre."""

    photo: str
    located: bool  # False: no place is credible (confidence below locate.abstain_below); the best guess is given
    confidence: float  # calibrated probability that the answer is within the success radius
    lon: float | None  # WGS84 (None for a map without a CRS)
    lat: float | None
    crs: str | None
    x: float | None  # map CRS coordinates
    y: float | None
    pixel_x: float
    pixel_y: float
    heading_deg: float  # the direction the photo's top faces, clockwise from north (the map's up)
    heading_source: str
    gsd_m: float | None  # the photo's ground sample distance used
    gsd_source: str
    scale: float  # photo GSD / map GSD
    method: str
    evidence: dict[str, float]
    alternatives: list[Alternative]
    steps: int
    seconds: float
    success_radius_m: float | None
    path_px: np.ndarray = field(repr=False)  # (T + 1, 2) the flown path
    footprint_px: np.ndarray = field(repr=False)  # (5, 2) the matched view, turned by the heading
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the CLI's output)."""
        d = asdict(self)
        d["path_px"] = np.round(self.path_px, 2).tolist()
        d["footprint_px"] = np.round(self.footprint_px, 2).tolist()
        return d

    def csv_row(self) -> dict[str, Any]:
        """One flat row for the batch CSV."""
        keep = ("photo", "located", "confidence", "lon", "lat", "crs", "x", "y", "pixel_x", "pixel_y", "heading_deg",
                "heading_source", "gsd_m", "gsd_source", "scale", "method", "steps", "seconds")  # fmt: skip
        row = {k: getattr(self, k) for k in keep} | dict(self.evidence)
        row["alternatives"] = ";".join(f"{a.pixel_x:.0f},{a.pixel_y:.0f}:{a.similarity:.3f}" for a in self.alternatives)
        row["notes"] = " | ".join(self.notes)
        return row


@dataclass
class _Prepared:
    view: np.ndarray  # (V, V, 3) at the map's GSD
    emb: Embedded
    gsd_m: float | None
    gsd_source: str
    scale: float
    heading_source: str
    notes: list[str]
    seconds: float


def check_policy(path: str | Path, params: Params, assets: dict[str, Any], where: str) -> None:
    """The policy at ``path`` was trained on these assets (map, features, stop) with these env settings."""
    info = read_policy_info(path)
    differ = fingerprint_differences({k: info["data"].get(k) for k in assets}, assets)
    if differ:
        raise InputError(
            f"policy {path} was trained on another map or feature cache than {where} ({'; '.join(differ)}); "
            "run `dvc repro` (or `dvc checkout`) so they belong together, or pass the matching --map, "
            "--features and --policy"
        )
    ap = agent_variant(params, "memory")
    trained = {"view_size": info.get("view_size"), "env": info.get("env"), "agent": info.get("agent")}
    wanted = {"view_size": ap.tile.view_size, "env": ap.env.model_dump(), "agent": ap.agent.model_dump()}
    differ = fingerprint_differences(trained, wanted)
    if differ:
        raise InputError(
            f"policy {path} was trained with other params than the params file gives "
            f"({', '.join(d[:80] for d in differ)}); use the params it was trained with, or retrain (`dvc repro`)"
        )


def check_calibration(raw: dict[str, Any], path: str | Path, params: Params, assets: dict[str, Any]) -> None:
    """The calibration at ``path`` was fitted on these assets with these locate settings."""
    differ = fingerprint_differences(raw["assets"], assets)
    if differ:
        raise InputError(
            f"confidence calibration {path} belongs to another map or feature cache ({'; '.join(differ)}); "
            "rerun `dvc repro evaluate` (or `dvc checkout`)"
        )
    now = {"restarts": params.locate.restarts, "max_steps": params.evaluate.max_steps,
           "success_radius": params.evaluate.success_radius, "view_size": params.tile.view_size}  # fmt: skip
    differ = fingerprint_differences(raw["settings"], now)
    if differ:
        raise InputError(
            f"confidence calibration {path} was fitted with other settings ({'; '.join(differ)}); "
            "rerun `dvc repro evaluate` with these params"
        )


class Locator:
    """Answers photos on one map (see the module docstring). Build it with :meth:`load`."""

    def __init__(self, params: Params, rt: Runtime, calibrator: Calibrator, method: str, policy: str | Path | None):
        self.params, self.rt, self.calibrator, self.method = params, rt, calibrator, method
        self.config, self.controller = method_setup(params, rt, method, policy)
        m = rt.scene.map
        self.map_gsd = float(m.metres_per_pixel)  # NaN for a plain pixel grid

    @classmethod
    def load(
        cls,
        params: str | Path = LOCATE_INPUTS["params"],
        map_path: str | Path = LOCATE_INPUTS["map"],
        features: str | Path = LOCATE_INPUTS["features"],
        policy: str | Path = LOCATE_INPUTS["policy"],
        calibration: str | Path = LOCATE_INPUTS["calibration"],
        method: str | None = None,
    ) -> Locator:
        """Load the pipeline's outputs and check they belong together (a clear :class:`InputError` if not)."""
        p = load_params(params)
        configure_torch(p.encoder.torch_threads)
        method = method or p.locate.method
        rt = load_map_runtime(p, map_path, features)
        assets = asset_fingerprint(rt)
        if method == "agent":
            check_policy(policy, p, assets, f"{map_path} + {features}")
        raw = load_calibration(calibration)
        check_calibration(raw, calibration, p, assets)
        if method not in raw["methods"]:
            raise InputError(
                f"confidence calibration {calibration} has no method {method!r}; rerun `dvc repro evaluate`"
            )
        return cls(p, rt, raw["methods"][method], method, policy if method == "agent" else None)

    # -- one photo to one view ----------------------------------------------------------------
    def _embed(self, view: np.ndarray, heading: float | None) -> Embedded:
        align = None if heading is None else np.array([-float(heading)])
        return embed_aligned(self.rt, view[None], align)

    def _view(self, photo: Photo, gsd_m: float | None) -> tuple[np.ndarray, list[str]]:
        rgb = photo.rgb if gsd_m is None else to_map_gsd(photo.rgb, gsd_m, self.map_gsd)
        view, note = square_view(rgb, self.rt.scene.view_size)
        return view, [note] if note else []

    def _auto_scale(self, photo: Photo, heading: float | None) -> tuple[float, str, np.ndarray, Embedded, list[str]]:
        """Try each of ``locate.gsd_scales`` x the map's GSD; keep the scale whose best map match is closest."""
        tries = []
        for s in self.params.locate.gsd_scales:
            view, extra = self._view(photo, s * self.map_gsd)
            tries.append((s, view, self._embed(view, heading), extra))
        s, view, emb, extra = max(tries, key=lambda t: float(t[2].top_similarity[0]))
        scales = ", ".join(f"{t[0]:g}" for t in tries)
        return s * self.map_gsd, f"auto (best of {scales} x the map's)", view, emb, extra

    def _known_gsd(self, photo: Photo, gsd: float | str | None, notes: list[str]) -> tuple[float | None, str]:
        """The photo's GSD: given, from its GeoTIFF, or (None) assumed to be the map's, which is noted."""
        if isinstance(gsd, str):
            raise InputError(f"--gsd must be a number of metres or 'auto', got {gsd!r}")
        if gsd is not None:
            return float(gsd), "given"
        if photo.gsd_m is not None:
            return photo.gsd_m, "GeoTIFF"
        notes.append(
            f"no --gsd given: the photo is assumed to have the map's ground sample distance ({self.map_gsd:.3g} m)"
        )
        return None, "assumed: the map's"

    def prepare(self, photo: Photo, gsd: float | str | None = None, heading: float | None = None) -> _Prepared:
        """Resample ``photo`` to the map's GSD, cut its central view and embed it at its (searched) heading."""
        t0 = time.perf_counter()
        notes = list(photo.notes)
        if gsd is not None and not np.isfinite(self.map_gsd):
            raise InputError(
                "--gsd: the map has no coordinate reference system, so its ground sample distance is unknown"
            )
        gsd_m: float | None
        if gsd == "auto":
            gsd_m, source, view, emb, extra = self._auto_scale(photo, heading)
        else:
            gsd_m, source = self._known_gsd(photo, gsd, notes)
            view, extra = self._view(photo, gsd_m)
            emb = self._embed(view, heading)
        notes += extra
        n = self.rt.n_headings
        heading_source = (
            "given" if heading is not None else (f"searched ({n} headings)" if n > 1 else "assumed north up")
        )
        scale = (gsd_m / self.map_gsd) if gsd_m is not None and np.isfinite(self.map_gsd) else 1.0
        return _Prepared(view, emb, gsd_m, source, scale, heading_source, notes, time.perf_counter() - t0)

    # -- locating -----------------------------------------------------------------------------
    def locate(self, photo: str | Path | np.ndarray | Photo, gsd: float | str | None = None,
               heading: float | None = None) -> LocateResult:  # fmt: skip
        """Locate one photo: a file path, an (H, W, 3) uint8 array or a :class:`~maprl.data.photo.Photo`."""
        return self.locate_many([photo], gsd=gsd, heading=heading, progress=False)[0]

    def locate_many(
        self,
        photos: Sequence[str | Path | np.ndarray | Photo],
        gsd: float | str | None = None,
        heading: float | None = None,
        progress: bool = True,
    ) -> list[LocateResult]:
        """Locate several photos: every file is read and checked before any is flown; flights are batched."""
        prepared, names = [], []
        for item in tqdm(photos, desc="locate: reading and embedding", unit="photo", disable=not progress):
            photo = _as_photo(item)
            prepared.append(self.prepare(photo, gsd, heading))
            names.append(photo.path)
        if not prepared:
            return []
        t0 = time.perf_counter()
        lp = self.params.locate
        emb = Embedded(*(np.concatenate([getattr(p.emb, f) for p in prepared]) for f in Embedded.__dataclass_fields__))
        res = locate_photos(
            self.rt, np.stack([p.view for p in prepared]), self.config, self.controller,
            restarts=lp.restarts, top_k=lp.top_k + 1, embedded=emb,
        )  # fmt: skip
        flight = (time.perf_counter() - t0) / len(prepared)
        conf = self.calibrator(res.evidence)
        return [self._result(res, i, names[i], prepared[i], float(conf[i]), flight) for i in range(len(prepared))]

    def _result(self, res: Any, i: int, name: str, prep: _Prepared, conf: float, flight: float) -> LocateResult:
        m, lp, radius = self.rt.scene.map, self.params.locate, self.params.evaluate.success_radius
        xy = res.xy[i]
        lon, lat = (float(v[0]) for v in m.pixel_to_lonlat(xy[:1], xy[1:]))
        has_crs = m.crs is not None
        cx, cy = m.pixel_to_crs(xy[0], xy[1])
        far = np.hypot(*(res.candidates[i] - xy).T) > radius
        alts = []
        for rank, j in enumerate(np.flatnonzero(far)[: lp.top_k], start=1):
            ax, ay = res.candidates[i, j]
            alon: float | None = None
            alat: float | None = None
            dist: float | None = None
            if has_crs:
                alon, alat = (round(float(v[0]), 7) for v in m.pixel_to_lonlat(np.array([ax]), np.array([ay])))
                dist = round(float(m.distance_m(res.candidates[i, j], xy)), 2)
            sim = round(float(res.candidate_similarity[i, j]), 4)
            alts.append(Alternative(rank, float(ax), float(ay), alon, alat, sim, dist))
        heading = float(res.heading_deg[i])
        gsd = self.map_gsd if np.isfinite(self.map_gsd) else None
        return LocateResult(
            photo=name,
            located=bool(conf >= lp.abstain_below),
            confidence=round(conf, 4),
            lon=round(lon, 7) if has_crs else None,
            lat=round(lat, 7) if has_crs else None,
            crs=m.crs.to_string() if m.crs is not None else None,
            x=round(float(cx), 3) if has_crs else None,
            y=round(float(cy), 3) if has_crs else None,
            pixel_x=round(float(xy[0]), 2),
            pixel_y=round(float(xy[1]), 2),
            heading_deg=round(heading, 1),
            heading_source=prep.heading_source,
            gsd_m=round(prep.gsd_m, 4) if prep.gsd_m is not None else (round(gsd, 4) if gsd else None),
            gsd_source=prep.gsd_source,
            scale=round(prep.scale, 4),
            method=self.method,
            evidence={k: round(float(v), 4) for k, v in zip(EVIDENCE, res.evidence[i], strict=True)},
            alternatives=alts,
            steps=int(res.steps[i]),
            seconds=round(prep.seconds + flight, 3),
            success_radius_m=round(radius * gsd, 2) if gsd else None,
            path_px=res.paths[i],
            footprint_px=footprint(float(xy[0]), float(xy[1]), self.rt.scene.view_size, heading),
            notes=prep.notes,
        )

    # -- outputs ------------------------------------------------------------------------------
    def geojson(self, results: Sequence[LocateResult]) -> dict[str, Any]:
        """One FeatureCollection (RFC 7946, WGS84) holding every result's features."""
        m = self.rt.scene.map
        feats = []
        for r in results:
            props = {"photo": r.photo, "located": r.located, "confidence": r.confidence, "heading_deg": r.heading_deg,
                     "gsd_m": r.gsd_m, "scale": r.scale, "method": r.method, "steps": r.steps}  # fmt: skip
            alts = np.array([[a.pixel_x, a.pixel_y] for a in r.alternatives]).reshape(-1, 2)
            xy = np.array([r.pixel_x, r.pixel_y])
            scores = [a.similarity for a in r.alternatives]
            feats += answer_features(m, xy, r.footprint_px, r.path_px, alts, props, scores)
        return feature_collection(feats)

    def plot(self, results: Sequence[LocateResult], path: str | Path, photos: Sequence[np.ndarray] = ()) -> None:
        """The map with every answer (path, footprint, alternatives); with one photo, the photo beside it."""
        from maprl.io import atomic_path
        from maprl.viz.plots import plot_located

        answers = [
            {"path": r.path_px, "footprint": r.footprint_px, "xy": (r.pixel_x, r.pixel_y),
             "alternatives": [(a.pixel_x, a.pixel_y) for a in r.alternatives], "located": r.located,
             "label": f"{Path(r.photo).name or 'photo'}: {'located' if r.located else 'NOT located'}, "
                      f"confidence {r.confidence:.2f}, heading {r.heading_deg:.0f} deg"}
            for r in results
        ]  # fmt: skip
        with atomic_path(path) as tmp:
            plot_located(self.rt.scene.map.rgb, answers, str(tmp), photos)


def _as_photo(item: str | Path | np.ndarray | Photo) -> Photo:
    if isinstance(item, Photo):
        return item
    if isinstance(item, np.ndarray):
        if item.ndim != 3 or item.shape[2] != 3 or item.dtype != np.uint8:
            raise InputError(f"a photo array must be (H, W, 3) uint8, got {item.shape} {item.dtype}")
        return Photo(item, "<array>")
    return read_photo(item)


@functools.lru_cache(maxsize=4)
def _cached(params: str, map_path: str, features: str, policy: str, calibration: str, method: str | None) -> Locator:
    return Locator.load(params, map_path, features, policy, calibration, method)


def locate(
    photo: str | Path | np.ndarray | Photo,
    gsd: float | str | None = None,
    heading: float | None = None,
    method: str | None = None,
    root: str | Path = ".",
) -> LocateResult:
    """Where was ``photo`` taken? Uses the pipeline outputs under ``root`` (loaded once, then cached)."""
    r = Path(root)
    paths = (str(r / LOCATE_INPUTS[k]) for k in ("params", "map", "features", "policy", "calibration"))
    return _cached(*paths, method).locate(photo, gsd=gsd, heading=heading)
