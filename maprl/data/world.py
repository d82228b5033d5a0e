"""Procedural, deterministic top-down world: the default offline map.

:func:`synthesize_world` builds a square patch of countryside and renders it as an aerial
photograph together with a matching surface model:

* fractal terrain from spectral (1/f^beta) synthesis, with a meandering river valley and lakes
  where the terrain lies below a level (water is flat in the elevation band);
* land cover: agricultural parcels (each with its own crop colour and row texture at its own
  orientation), meadows, bare soil, managed forest stands, hedgerows and isolated trees;
* settlements with a perturbed street grid, main roads that wind between them (bridging
  water), and buildings along the streets, each with its own height and roof;
* rendering: base colours times a hillshade of the surface (terrain, buildings, tree canopy),
  with cast shadows traced along the sun direction, plus mild sensor noise.

Every random choice comes from one ``np.random.default_rng(seed)`` passed down explicitly (other
seasons add one generator each, see below), so the same ``(size, seed, metres_per_pixel, season)``
always yields byte-identical arrays. Sizes are in
metres inside the generator and converted with ``metres_per_pixel``, so a coarser pixel shows
the same kind of landscape over a larger area.

Seasons: the same world can be photographed in any of :data:`SEASONS`. The geometry (terrain,
water, roads, buildings, parcels, forest, tree crowns) is built once from the main generator;
each season then renders it with its own :class:`Look`: sun azimuth and altitude (so hillshade
and cast shadows move), haze, white balance, a new crop stage for every parcel, autumn, leafless
or fresh-green tree colours and canopy density, and a lower (exposed mud) or higher (flooded
fringe) water level. ``"summer"`` is the original rendering, drawn from the main generator and
byte-identical to the single-season output; every other season draws its crops, crown colours
and sensor noise from ``np.random.default_rng([seed, SEASONS.index(season)])``, so the main
stream and hence the geometry are untouched. :func:`synthesize_worlds` renders several seasons
from one geometry.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import fft as sfft
from scipy import ndimage

SUN_AZIMUTH_DEG = 135.0  # clockwise from north: the sun stands in the south-east
SUN_ALTITUDE_DEG = 40.0  # above the horizon
AMBIENT = 0.42  # share of the light that still reaches a pixel in full shadow
HAZE_SHARE = 0.1  # the atmosphere dims the ground by this share ...
HAZE_RGB = (8.0, 10.0, 20.0)  # ... and adds this bluish path radiance
MAX_STREET_MPP = 12.0  # coarser pixels show villages without their streets and houses
MAX_ROAD_MPP = 25.0  # coarser pixels show no roads at all
SEASONS = ("summer", "autumn", "winter", "spring")

_F32 = np.float32
_Arrays3 = tuple[np.ndarray, np.ndarray, np.ndarray]
_Box = tuple[int, int, int, int]  # r0, r1, c0, c1: rows [r0, r1) x columns [c0, c1)
_RGB = tuple[float, float, float]
_Crop = tuple[str, _RGB, float, float]  # name, RGB, probability, stripe contrast

# Agricultural cover types: name, RGB, probability, stripe contrast.
_CROPS: tuple[_Crop, ...] = (
    ("young cereal", (98, 130, 60), 0.16, 0.07),
    ("meadow", (112, 140, 70), 0.18, 0.03),
    ("ripe cereal", (184, 166, 110), 0.13, 0.07),
    ("stubble", (200, 186, 140), 0.08, 0.10),
    ("ploughed", (128, 102, 78), 0.12, 0.16),
    ("wet soil", (100, 84, 68), 0.06, 0.12),
    ("maize", (76, 110, 50), 0.10, 0.09),
    ("hay", (150, 148, 86), 0.08, 0.06),
    ("rapeseed", (196, 184, 78), 0.03, 0.05),
    ("bare soil", (158, 132, 100), 0.06, 0.05),
)
_GRASSLAND = (1, 7)  # summer crops that stay grass all year (meadow, hay); the rest is arable
_FOREST = ((56, 82, 44), (36, 56, 38), (46, 70, 42), (66, 90, 50))  # deciduous, conifer, mixed, young
_PLOTS = ((104, 128, 72), (150, 146, 138), (84, 98, 62), (140, 126, 104), (120, 134, 84))
_ROOFS = (
    (168, 86, 62),
    (122, 66, 52),
    (72, 74, 78),
    (176, 174, 168),
    (128, 96, 72),
    (208, 206, 198),
    (108, 118, 110),
    (150, 110, 90),
)
_WATER_DEEP = (26, 44, 56)
_WATER_SHALLOW = (70, 88, 74)
_ASPHALT = {1: (124, 122, 118), 2: (96, 96, 98)}  # street, main road
_TREE = (50, 74, 40)
_MARGIN = (92, 112, 64)
_MUD_WET = (86, 80, 66)  # shore uncovered by low water, next to the water line ...
_MUD_DRY = (142, 130, 106)  # ... and where it has dried out
_FLOOD = (92, 96, 78)  # turbid shallow water over flooded ground
_SHORE_SLOPE = 0.15  # metres of depth gained per metre from the shore (rivers are flat-bottomed)


@dataclass(frozen=True)
class Look:
    """How one season renders the world: light, atmosphere, vegetation colours and water level.

    Tree palettes hold five colours: deciduous, conifer, mixed and young stands, then lone trees.
    """

    sun_azimuth_deg: float = SUN_AZIMUTH_DEG  # clockwise from north
    sun_altitude_deg: float = SUN_ALTITUDE_DEG
    ambient: float = AMBIENT
    haze_share: float = HAZE_SHARE
    haze_rgb: _RGB = HAZE_RGB
    tint: _RGB | None = None  # white-balance gain of the sunlight; None: neutral
    arable: tuple[_Crop, ...] | None = None  # new cover for arable parcels; None: keep the summer crops
    grassland: tuple[_Crop, ...] = ()  # new cover for meadows and hay fields (with ``arable``)
    trees: tuple[_RGB, ...] = (*_FOREST, _TREE)
    trees_alt: tuple[_RGB, ...] | None = None  # second colour, mixed in crown by crown
    trees_mix: tuple[float, ...] = (0.0,) * 5  # largest share of the second colour
    leaf: tuple[float, ...] | None = None  # canopy density (scales its relief); None: full leaf
    margin: _RGB = _MARGIN
    plots: tuple[_RGB, ...] = _PLOTS
    water_dz: float = 0.0  # water level change in metres: < 0 uncovers shores, > 0 floods flats


LOOKS: dict[str, Look] = {
    "summer": Look(),
    "autumn": Look(
        sun_azimuth_deg=200.0,
        sun_altitude_deg=25.0,
        ambient=0.45,
        haze_share=0.16,
        haze_rgb=(16.0, 16.0, 20.0),
        tint=(1.05, 1.0, 0.9),
        arable=(
            ("stubble", (186, 170, 124), 0.22, 0.10),
            ("ploughed", (118, 94, 72), 0.22, 0.18),
            ("harrowed", (136, 112, 86), 0.12, 0.08),
            ("winter cereal", (112, 118, 72), 0.12, 0.10),
            ("dry maize", (150, 134, 80), 0.08, 0.09),
            ("cover crop", (100, 124, 60), 0.08, 0.05),
            ("wet soil", (96, 80, 64), 0.08, 0.12),
            ("bare soil", (150, 126, 96), 0.08, 0.05),
        ),
        grassland=(("meadow", (118, 128, 72), 0.6, 0.03), ("aftermath", (140, 136, 86), 0.4, 0.05)),
        trees=((100, 90, 52), (34, 52, 36), (68, 74, 44), (112, 102, 58), (104, 94, 52)),
        trees_alt=((146, 100, 52), (44, 60, 40), (132, 92, 50), (150, 124, 64), (140, 104, 54)),
        trees_mix=(0.8, 0.15, 0.6, 0.8, 0.7),
        margin=(118, 116, 72),
        plots=((110, 122, 70), (150, 146, 138), (96, 90, 60), (136, 118, 96), (124, 126, 80)),
        water_dz=-0.45,
    ),
    "winter": Look(
        sun_azimuth_deg=170.0,
        sun_altitude_deg=18.0,
        ambient=0.5,
        haze_share=0.14,
        haze_rgb=(18.0, 19.0, 24.0),
        tint=(0.96, 0.99, 1.05),
        arable=(
            ("ploughed", (124, 108, 92), 0.28, 0.16),
            ("wet ploughed", (92, 80, 70), 0.15, 0.14),
            ("dormant cereal", (104, 112, 80), 0.25, 0.08),
            ("grey stubble", (160, 150, 124), 0.12, 0.08),
            ("bare soil", (140, 126, 108), 0.12, 0.05),
            ("frosted field", (176, 174, 166), 0.08, 0.06),
        ),
        grassland=(("dormant meadow", (124, 126, 96), 0.6, 0.03), ("frosted meadow", (168, 170, 158), 0.4, 0.03)),
        trees=((98, 88, 76), (32, 50, 36), (62, 68, 50), (112, 100, 84), (102, 92, 80)),
        trees_alt=((126, 112, 94), (32, 50, 36), (110, 100, 84), (132, 120, 100), (128, 116, 98)),
        trees_mix=(0.8, 0.0, 0.6, 0.8, 0.7),
        leaf=(0.45, 1.0, 0.7, 0.4, 0.45),
        margin=(120, 116, 96),
        plots=((112, 114, 86), (150, 146, 138), (92, 88, 72), (132, 120, 104), (120, 118, 92)),
        water_dz=0.15,
    ),
    "spring": Look(
        sun_azimuth_deg=120.0,
        sun_altitude_deg=45.0,
        haze_share=0.08,
        haze_rgb=(8.0, 11.0, 22.0),
        arable=(
            ("young cereal", (102, 142, 62), 0.26, 0.08),
            ("rapeseed in flower", (204, 190, 72), 0.12, 0.04),
            ("seedbed", (140, 116, 88), 0.18, 0.10),
            ("ploughed", (122, 98, 76), 0.10, 0.16),
            ("emerging crop", (122, 132, 80), 0.14, 0.12),
            ("winter cereal", (88, 126, 58), 0.20, 0.07),
        ),
        grassland=(("fresh meadow", (110, 146, 72), 0.7, 0.03), ("dandelions", (140, 150, 76), 0.3, 0.03)),
        trees=((84, 120, 56), (38, 60, 40), (66, 98, 50), (94, 128, 60), (90, 124, 58)),
        trees_alt=((110, 140, 68), (38, 60, 40), (92, 122, 60), (116, 144, 70), (112, 140, 66)),
        trees_mix=(0.5, 0.0, 0.4, 0.5, 0.5),
        leaf=(0.85, 1.0, 0.9, 0.8, 0.85),
        margin=(100, 146, 66),
        plots=((100, 140, 66), (150, 146, 138), (82, 110, 58), (140, 126, 104), (116, 146, 76)),
        water_dz=0.3,
    ),
}


@dataclass
class World:
    """A rendered world: an aerial image and the layers it was drawn from, all ``(size, size)``."""

    rgb: np.ndarray  # (size, size, 3) uint8, rendered top-down image
    elevation: np.ndarray  # (size, size) float32, metres: terrain + building heights (a surface model)
    water: np.ndarray  # (size, size) bool
    roads: np.ndarray  # (size, size) bool
    buildings: np.ndarray  # (size, size) bool (roof footprint)


@dataclass
class _Settlement:
    """A village: centre (row, col) and radius, in pixels."""

    row: float
    col: float
    radius: float


@dataclass
class _Roads:
    """Road raster (0 none, 1 street, 2 main road) and the drawn segments, for placing buildings."""

    cls: np.ndarray
    segments: list[tuple[np.ndarray, np.ndarray, float, int]] = field(default_factory=list)


@dataclass
class _Buildings:
    """Building footprints: id raster (0 none, k + 1 for building k) and per-building attributes."""

    ids: np.ndarray
    boxes: list[_Box] = field(default_factory=list)
    heights: list[float] = field(default_factory=list)
    pitched: list[bool] = field(default_factory=list)
    roofs: list[tuple[float, float, float]] = field(default_factory=list)


@dataclass
class _Parcels:
    """Voronoi parcels: label raster and the label's seed point, in pixel coordinates."""

    labels: np.ndarray
    n_labels: int
    seed_rows: np.ndarray
    seed_cols: np.ndarray


# --------------------------------------------------------------------------- noise


def _spectral_noise(
    rng: np.random.Generator, size: int, mpp: float, beta: float, outer_m: float, inner_m: float = 0.0
) -> np.ndarray:
    """Gaussian field with power ~ (f^2 + 1/outer^2)^(-beta/2), zero mean and unit std.

    Frequencies are in cycles per metre, so the field's look does not depend on the pixel size;
    wavelengths shorter than ``inner_m`` are damped.
    """
    fy = np.fft.fftfreq(size).astype(_F32)[:, None]
    fx = np.fft.rfftfreq(size).astype(_F32)[None, :]
    f2 = (fy * fy + fx * fx) / _F32(mpp * mpp)
    amp = (f2 + _F32(1.0 / outer_m**2)) ** _F32(-beta / 4.0)
    if inner_m > 0:
        amp *= np.exp(-f2 * _F32(inner_m**2))
    amp[0, 0] = 0.0
    spec = np.empty(amp.shape, np.complex64)
    spec.real = rng.standard_normal(amp.shape, dtype=_F32) * amp
    spec.imag = rng.standard_normal(amp.shape, dtype=_F32) * amp
    out = sfft.irfft2(spec, s=(size, size), workers=-1).astype(_F32, copy=False)
    return _standardise(out)


def _standardise(a: np.ndarray) -> np.ndarray:
    """``a`` shifted and scaled in place to zero mean and unit std (a constant stays zero)."""
    a -= a.mean(dtype=np.float64)
    std = float(a.std(dtype=np.float64))
    if std > 0:
        a /= _F32(std)
    return a


def _blurred_noise(rng: np.random.Generator, size: int, sigma_px: float) -> np.ndarray:
    """White noise blurred by a Gaussian of ``sigma_px`` (none below half a pixel), unit std."""
    white = rng.standard_normal((size, size), dtype=_F32)
    if sigma_px >= 0.5:
        white = ndimage.gaussian_filter(white, sigma_px, mode="wrap")
    return _standardise(white)


# --------------------------------------------------------------------------- terrain and water


def _terrain(rng: np.random.Generator, size: int, mpp: float) -> np.ndarray:
    """Fractal terrain in metres: ~12 m std over 2 km, growing like extent^0.7 (capped)."""
    extent_m = size * mpp
    relief_std = min(12.0 * (extent_m / 2048.0) ** 0.7, 400.0)
    base_altitude = rng.uniform(150.0, 700.0) + 2.5 * relief_std
    field_ = _spectral_noise(rng, size, mpp, beta=3.3, outer_m=6000.0, inner_m=max(25.0, 2.0 * mpp))
    return field_ * _F32(relief_std) + _F32(base_altitude)


def _meander(rng: np.random.Generator, n: int, mpp: float) -> np.ndarray:
    """Lateral offset (pixels) of a meandering line sampled at ``n`` pixel steps."""
    t = np.arange(n, dtype=np.float64) * mpp
    out = np.zeros(n)
    for _ in range(4):
        wavelength = rng.uniform(250.0, 2500.0)
        amplitude = 0.09 * wavelength * rng.uniform(0.3, 1.0)
        out += amplitude * np.sin(2 * np.pi * t / wavelength + rng.uniform(0, 2 * np.pi))
    return out / mpp


def _river(rng: np.random.Generator, terrain: np.ndarray, mpp: float) -> _Arrays3:
    """Carve a meandering river valley across the map.

    Returns the carved terrain, the river mask and the river's water surface (metres; only
    meaningful on the mask). Worked out in a rotated frame where the river runs left to right.
    """
    size = terrain.shape[0]
    k = int(rng.integers(4))
    t = np.rot90(terrain, k)
    centre = size * rng.uniform(0.2, 0.8) + _meander(rng, size, mpp)
    cos_dir = 1.0 / np.sqrt(1.0 + np.gradient(centre) ** 2)
    rows = np.arange(size, dtype=_F32)[:, None]
    dist_m = np.abs(rows - centre.astype(_F32)[None, :]) * (mpp * cos_dir).astype(_F32)[None, :]
    idx = np.clip(np.rint(centre), 0, size - 1).astype(np.intp)
    along_river = t[idx, np.arange(size)].astype(np.float64)
    floor = ndimage.gaussian_filter1d(along_river, max(1.0, 150.0 / mpp), mode="nearest")
    surface = (floor - 1.0).astype(_F32)[None, :]
    valley_m = rng.uniform(50.0, 140.0)
    weight = np.exp(-((dist_m / _F32(valley_m)) ** 2))
    bank = surface + _F32(1.0) + _F32(0.05) * dist_m
    carved = t + weight * (bank - t)
    river = dist_m < rng.uniform(4.0, 11.0)
    surface2d = np.broadcast_to(surface, t.shape)
    back = [np.ascontiguousarray(np.rot90(a, -k)) for a in (carved, river, surface2d)]
    return back[0], back[1], back[2]


def _drop_small(mask: np.ndarray, min_px: float) -> np.ndarray:
    """``mask`` without connected components smaller than ``min_px`` pixels."""
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    counts = np.bincount(labels.ravel())
    keep = counts >= min_px
    keep[0] = False
    return keep[labels]


def _hydrology(rng: np.random.Generator, terrain: np.ndarray, mpp: float) -> _Arrays3:
    """Rivers and lakes: carved terrain, water mask and water surface elevation (metres)."""
    surface = np.zeros_like(terrain)
    water = np.zeros(terrain.shape, bool)
    if rng.random() < 0.75:
        terrain, water, surface = _river(rng, terrain, mpp)
    level = float(np.quantile(terrain, rng.uniform(0.02, 0.07)))
    lakes = _drop_small(terrain < level, (25.0 / mpp) ** 2)
    lakes = ndimage.binary_opening(lakes, iterations=max(1, min(2, int(3.0 / mpp))))
    surface = np.where(lakes, _F32(level), surface).astype(_F32)
    water = water | lakes
    return terrain, water, surface


# --------------------------------------------------------------------------- settlements and roads


def _settlements(rng: np.random.Generator, water: np.ndarray, mpp: float) -> list[_Settlement]:
    """Village centres on dry land, kept apart; at least one per map."""
    size = water.shape[0]
    extent_m = size * mpp
    wanted = min(150, max(1, int(rng.poisson((extent_m / 1000.0) ** 2 * 0.7))))
    cands = rng.uniform(0.12, 0.88, (wanted * 40 + 40, 2)) * size
    radii = np.minimum(rng.uniform(90.0, 260.0, len(cands)), 0.42 * extent_m) / mpp
    out: list[_Settlement] = []
    for (r, c), rad in zip(cands, radii, strict=True):
        if water[int(r), int(c)]:
            continue
        if any(math.hypot(r - s.row, c - s.col) < 1.25 * (rad + s.radius) for s in out):
            continue
        out.append(_Settlement(float(r), float(c), float(rad)))
        if len(out) == wanted:
            break
    if not out:
        out.append(_Settlement(size / 2.0, size / 2.0, min(200.0, 0.42 * extent_m) / mpp))
    return out


def _urban_mask(rng: np.random.Generator, towns: list[_Settlement], size: int, mpp: float) -> np.ndarray:
    """Union of the villages' built-up areas: discs with a ragged, noisy edge."""
    edge = _spectral_noise(rng, size, mpp, beta=2.5, outer_m=250.0, inner_m=8.0)
    mask = np.zeros((size, size), bool)
    for s in towns:
        r0, r1, c0, c1 = _bbox(s.row, s.col, 1.4 * s.radius, size)
        rr = np.arange(r0, r1, dtype=_F32)[:, None]
        cc = np.arange(c0, c1, dtype=_F32)[None, :]
        d = np.hypot(rr - s.row, cc - s.col) / _F32(s.radius)
        mask[r0:r1, c0:c1] |= d < 1.0 + 0.22 * edge[r0:r1, c0:c1]
    return mask


def _bbox(row: float, col: float, half: float, size: int) -> _Box:
    """Integer box ``[r0, r1) x [c0, c1)`` around a point, clipped to the map."""
    r0 = max(0, int(math.floor(row - half)))
    c0 = max(0, int(math.floor(col - half)))
    r1 = min(size, int(math.ceil(row + half)) + 1)
    c1 = min(size, int(math.ceil(col + half)) + 1)
    return r0, max(r0, r1), c0, max(c0, c1)


def _stamp_segment(cls: np.ndarray, a: np.ndarray, b: np.ndarray, half_w: float, value: int) -> None:
    """Set pixels of ``cls`` within ``half_w`` of segment a-b (row, col) to ``value``."""
    size = cls.shape[0]
    r0 = max(0, int(math.floor(min(a[0], b[0]) - half_w)))
    r1 = min(size, int(math.ceil(max(a[0], b[0]) + half_w)) + 1)
    c0 = max(0, int(math.floor(min(a[1], b[1]) - half_w)))
    c1 = min(size, int(math.ceil(max(a[1], b[1]) + half_w)) + 1)
    if r0 >= r1 or c0 >= c1:
        return
    rr = np.arange(r0, r1, dtype=np.float64)[:, None] - a[0]
    cc = np.arange(c0, c1, dtype=np.float64)[None, :] - a[1]
    d = b - a
    t = np.clip((rr * d[0] + cc * d[1]) / max(float(d @ d), 1e-9), 0.0, 1.0)
    dist2 = (rr - t * d[0]) ** 2 + (cc - t * d[1]) ** 2
    view = cls[r0:r1, c0:c1]
    view[dist2 <= half_w * half_w] = value


def _curvy_path(rng: np.random.Generator, a: np.ndarray, b: np.ndarray, step: float) -> np.ndarray:
    """Points (row, col) of a winding road from a to b: the chord plus a random sine series."""
    chord = b - a
    length = float(np.hypot(*chord))
    n = max(2, int(math.ceil(length / step)) + 1)
    t = np.linspace(0.0, 1.0, n)
    offset = np.zeros(n)
    for k in range(1, 6):
        offset += rng.normal(0.0, 0.05 * length / k) * np.sin(np.pi * k * t)
    normal = np.array([-chord[1], chord[0]]) / max(length, 1e-9)
    return a[None, :] + t[:, None] * chord[None, :] + offset[:, None] * normal[None, :]


def _edge_point(rng: np.random.Generator, size: int, row: float, col: float) -> np.ndarray:
    """A point on a random side of the map border, roughly level with (row, col)."""
    side = int(rng.integers(4))
    edge = float(size - 1) * (side % 2)
    along = col if side < 2 else row
    u = float(np.clip(along + rng.normal(0.0, 0.15 * size), 0.0, size - 1.0))
    return np.array([edge, u]) if side < 2 else np.array([u, edge])


def _main_road_legs(rng: np.random.Generator, settlements: list[_Settlement], size: int) -> list[np.ndarray]:
    """Waypoint pairs for main roads: each village to its nearest neighbours, plus spurs to the border."""
    pts = np.array([(s.row, s.col) for s in settlements])
    pairs: set[tuple[int, int]] = set()
    if len(pts) > 1:
        dist = np.hypot(*(pts[:, None, :] - pts[None, :, :]).transpose(2, 0, 1))
        np.fill_diagonal(dist, np.inf)
        order = np.argsort(dist, axis=1)
        for i in range(len(pts)):
            pairs.add((min(i, int(order[i, 0])), max(i, int(order[i, 0]))))
            if len(pts) > 2 and rng.random() < 0.4:
                pairs.add((min(i, int(order[i, 1])), max(i, int(order[i, 1]))))
    legs = [np.stack([pts[i], pts[j]]) for i, j in sorted(pairs)]
    spurs = [int(i) for i in rng.permutation(len(pts))[: max(2, len(pts) // 3)]]
    if len(pts) == 1:
        spurs = [0, 0]
    for i in spurs:
        legs.append(np.stack([pts[i], _edge_point(rng, size, *pts[i])]))
    return legs


def _main_roads(
    rng: np.random.Generator, roads: _Roads, settlements: list[_Settlement], water: np.ndarray, mpp: float
) -> None:
    """Draw winding main roads; of a few random shapes per leg, the one crossing least water."""
    size = water.shape[0]
    half_w = max(0.6, rng.uniform(3.0, 4.5) / mpp)
    step = max(2.0, 8.0 / mpp)
    max_bridge_m = 45.0
    for a, b in _main_road_legs(rng, settlements, size):
        best, best_wet = None, np.inf
        for _ in range(4):
            path = _curvy_path(rng, a, b, step)
            ij = np.clip(np.rint(path).astype(np.intp), 0, size - 1)
            wet = float(water[ij[:, 0], ij[:, 1]].sum())
            if wet < best_wet:
                best, best_wet = path, wet
        if best is None or best_wet * step * mpp > max_bridge_m:
            continue
        for p, q in itertools.pairwise(best):
            _stamp_segment(roads.cls, p, q, half_w, 2)
            roads.segments.append((p, q, half_w, 2))


def _street_grid(
    rng: np.random.Generator, roads: _Roads, s: _Settlement, urban: np.ndarray, water: np.ndarray, mpp: float
) -> None:
    """Draw a perturbed street grid inside one village."""
    size = water.shape[0]
    spacing = rng.uniform(45.0, 85.0) / mpp
    half_w = max(0.6, rng.uniform(2.2, 3.2) / mpp)
    theta = rng.uniform(-0.25, 0.25)
    n = int(math.ceil(1.3 * s.radius / spacing)) + 1
    i, j = np.meshgrid(np.arange(-n, n + 1), np.arange(-n, n + 1), indexing="ij")
    u = i * spacing + rng.normal(0.0, 0.13 * spacing, i.shape)
    v = j * spacing + rng.normal(0.0, 0.13 * spacing, i.shape)
    rows = s.row + u * np.cos(theta) - v * np.sin(theta)
    cols = s.col + u * np.sin(theta) + v * np.cos(theta)
    ri = np.clip(np.rint(rows).astype(np.intp), 0, size - 1)
    ci = np.clip(np.rint(cols).astype(np.intp), 0, size - 1)
    ok = urban[ri, ci] & ~water[ri, ci]
    for di, dj in ((1, 0), (0, 1)):
        keep = ok[: ok.shape[0] - di, : ok.shape[1] - dj] & ok[di:, dj:]
        keep &= rng.random(keep.shape) > 0.1
        for a_i, a_j in zip(*np.nonzero(keep), strict=True):
            a = np.array([rows[a_i, a_j], cols[a_i, a_j]])
            b = np.array([rows[a_i + di, a_j + dj], cols[a_i + di, a_j + dj]])
            _stamp_segment(roads.cls, a, b, half_w, 1)
            roads.segments.append((a, b, half_w, 1))


def _road_network(
    rng: np.random.Generator, settlements: list[_Settlement], urban: np.ndarray, water: np.ndarray, mpp: float
) -> _Roads:
    """Streets in every village, then the main roads over them."""
    roads = _Roads(np.zeros(water.shape, np.uint8))
    if mpp <= MAX_STREET_MPP:
        for s in settlements:
            _street_grid(rng, roads, s, urban, water, mpp)
    if mpp <= MAX_ROAD_MPP:
        _main_roads(rng, roads, settlements, water, mpp)
    return roads


# --------------------------------------------------------------------------- buildings


def _try_building(b: _Buildings, blocked: np.ndarray, box: _Box) -> bool:
    """Claim ``box`` for a new building unless it (with a 1 px margin) touches something."""
    r0, r1, c0, c1 = box
    size = blocked.shape[0]
    if r1 - r0 < 1 or c1 - c0 < 1 or r0 < 0 or c0 < 0 or r1 > size or c1 > size:
        return False
    if blocked[max(0, r0 - 1) : r1 + 1, max(0, c0 - 1) : c1 + 1].any():
        return False
    if b.ids[max(0, r0 - 1) : r1 + 1, max(0, c0 - 1) : c1 + 1].any():
        return False
    b.boxes.append(box)
    b.ids[r0:r1, c0:c1] = len(b.boxes)
    return True


def _building_box(centre: np.ndarray, along: float, across: float, horizontal: bool) -> _Box:
    """Axis-aligned box (pixels) of a building ``along`` x ``across`` its street."""
    h_rows, h_cols = (across / 2, along / 2) if horizontal else (along / 2, across / 2)
    r0 = int(round(centre[0] - h_rows))
    c0 = int(round(centre[1] - h_cols))
    return r0, r0 + max(1, int(round(2 * h_rows))), c0, c0 + max(1, int(round(2 * h_cols)))


def _add_attributes(rng: np.random.Generator, b: _Buildings, tall_chance: float, big: bool) -> None:
    """Height, roof shape and roof colour for the building just added."""
    if big:
        height = rng.uniform(5.0, 12.0)
    elif rng.random() < tall_chance:
        height = rng.uniform(12.0, 30.0)
    else:
        height = rng.uniform(3.5, 10.0)
    b.heights.append(float(height))
    b.pitched.append(bool(rng.random() < (0.45 if big else 0.7)))
    roof = np.array(_ROOFS[int(rng.integers(len(_ROOFS)))], float) * rng.uniform(0.85, 1.12)
    r, g, bl = (float(x) for x in roof * rng.uniform(0.95, 1.05, 3))
    b.roofs.append((r, g, bl))


def _buildings_along(
    rng: np.random.Generator,
    b: _Buildings,
    blocked: np.ndarray,
    seg: tuple[np.ndarray, np.ndarray, float, int],
    s: _Settlement,
    mpp: float,
) -> None:
    """Line both sides of one street segment with houses, centre-most ones taller."""
    a, e, half_w, _ = seg
    chord = e - a
    length = float(np.hypot(*chord))
    if length < 1:
        return
    unit = chord / length
    normal = np.array([-unit[1], unit[0]])
    horizontal = abs(unit[1]) >= abs(unit[0])
    mid = (a + e) / 2
    tall_chance = 0.3 * max(0.0, 1.0 - math.hypot(mid[0] - s.row, mid[1] - s.col) / s.radius) ** 2
    for side in (-1.0, 1.0):
        pos = rng.uniform(0.0, 6.0) / mpp
        while pos < length:
            big = rng.random() < 0.08
            along = max(1.0, rng.uniform(18.0, 40.0) / mpp if big else rng.uniform(8.0, 17.0) / mpp)
            across = max(1.0, rng.uniform(14.0, 26.0) / mpp if big else rng.uniform(7.0, 13.0) / mpp)
            setback = half_w + rng.uniform(2.0, 9.0) / mpp + across / 2
            centre = a + unit * (pos + along / 2) + normal * side * setback
            box = _building_box(centre, along, across, horizontal)
            if rng.random() > 0.15 and _try_building(b, blocked, box):
                _add_attributes(rng, b, tall_chance, big)
            pos += along + max(1.0, rng.uniform(2.0, 12.0) / mpp)


def _farmsteads(
    rng: np.random.Generator, b: _Buildings, blocked: np.ndarray, roads: _Roads, urban: np.ndarray, mpp: float
) -> None:
    """A few clusters of barns next to main roads out in the fields."""
    size = blocked.shape[0]
    mains = [sg for sg in roads.segments if sg[3] == 2]
    n = min(400, int(rng.poisson((size * mpp / 1000.0) ** 2 * 1.5)))
    for _ in range(min(n, len(mains))):
        a, e, half_w, _ = mains[int(rng.integers(len(mains)))]
        if urban[int(np.clip(a[0], 0, size - 1)), int(np.clip(a[1], 0, size - 1))]:
            continue
        chord = e - a
        normal = np.array([-chord[1], chord[0]]) / max(float(np.hypot(*chord)), 1e-9)
        base = a + normal * rng.choice([-1.0, 1.0]) * (half_w + rng.uniform(15.0, 35.0) / mpp)
        for _ in range(int(rng.integers(2, 6))):
            centre = base + rng.normal(0.0, 18.0 / mpp, 2)
            along, across = rng.uniform(12.0, 45.0) / mpp, rng.uniform(9.0, 22.0) / mpp
            if _try_building(b, blocked, _building_box(centre, along, across, bool(rng.random() < 0.5))):
                _add_attributes(rng, b, 0.0, True)


def _place_buildings(
    rng: np.random.Generator,
    roads: _Roads,
    settlements: list[_Settlement],
    urban: np.ndarray,
    water: np.ndarray,
    mpp: float,
) -> _Buildings:
    """Houses along streets (and main roads) in villages, plus farmsteads in the country."""
    size = water.shape[0]
    b = _Buildings(np.zeros((size, size), np.int32))
    blocked = (roads.cls > 0) | water
    for seg in roads.segments:
        mid = (seg[0] + seg[1]) / 2
        r, c = int(np.clip(mid[0], 0, size - 1)), int(np.clip(mid[1], 0, size - 1))
        if not urban[r, c]:
            continue
        s = min(settlements, key=lambda t: math.hypot(t.row - mid[0], t.col - mid[1]))
        _buildings_along(rng, b, blocked, seg, s, mpp)
    _farmsteads(rng, b, blocked, roads, urban, mpp)
    return b


# --------------------------------------------------------------------------- land cover


def _row_blocks(size: int, block: int = 256) -> list[slice]:
    """Row ranges for processing a map in cache-friendly, memory-light strips."""
    return [slice(r, min(size, r + block)) for r in range(0, size, block)]


def _voronoi(rng: np.random.Generator, spacing: float, warp_r: np.ndarray, warp_c: np.ndarray) -> _Parcels:
    """Jittered-grid Voronoi cells of about ``spacing`` pixels, pixel positions displaced by the warp."""
    size = warp_r.shape[0]
    ncell = int(math.ceil(size / spacing)) + 3
    grid = np.arange(ncell, dtype=np.float64) - 1.0
    seed_r = ((grid[:, None] + rng.uniform(0.1, 0.9, (ncell, ncell))) * spacing).astype(_F32).ravel()
    seed_c = ((grid[None, :] + rng.uniform(0.1, 0.9, (ncell, ncell))) * spacing).astype(_F32).ravel()
    labels = np.empty((size, size), np.int32)
    for rows in _row_blocks(size):
        pr = np.arange(rows.start, rows.stop, dtype=_F32)[:, None] + warp_r[rows]
        pc = np.arange(size, dtype=_F32)[None, :] + warp_c[rows]
        labels[rows] = _nearest_seed(pr, pc, spacing, ncell, seed_r, seed_c)
    return _Parcels(labels, ncell * ncell, seed_r, seed_c)


def _nearest_seed(
    pr: np.ndarray, pc: np.ndarray, spacing: float, ncell: int, seed_r: np.ndarray, seed_c: np.ndarray
) -> np.ndarray:
    """Index of the nearest seed for points (pr, pc), searching the 3 x 3 grid cells around each."""
    inv = _F32(1.0 / spacing)
    cell = np.clip((pr * inv).astype(np.intp) + 1, 1, ncell - 2) * ncell
    cell += np.clip((pc * inv).astype(np.intp) + 1, 1, ncell - 2)
    best = np.full(pr.shape, np.inf, _F32)
    labels = np.zeros(pr.shape, np.intp)
    for off in (-ncell - 1, -ncell, -ncell + 1, -1, 0, 1, ncell - 1, ncell, ncell + 1):
        idx = cell + off
        d = pr - np.take(seed_r, idx, mode="clip")
        d *= d
        e = pc - np.take(seed_c, idx, mode="clip")
        d += e * e
        closer = d < best
        np.minimum(best, d, out=best)
        np.copyto(labels, idx, where=closer)
    return labels


def _split_parcels(rng: np.random.Generator, p: _Parcels) -> _Parcels:
    """Cut many cells by up to two random straight lines: parcels of varied size and shape."""
    n = p.n_labels
    cuts = []
    for chance in (0.65, 0.4):
        ang = rng.uniform(0, np.pi, n)
        off = rng.normal(0.0, 12.0, n).astype(_F32)
        cut = rng.random(n) < chance
        cuts.append((np.cos(ang).astype(_F32), np.sin(ang).astype(_F32), np.where(cut, off, _F32(np.inf))))
    size = p.labels.shape[0]
    out = np.empty_like(p.labels)
    cols = np.arange(size, dtype=_F32)[None, :]
    for rows in _row_blocks(size):
        lab = p.labels[rows].astype(np.intp)
        dr = np.arange(rows.start, rows.stop, dtype=_F32)[:, None] - p.seed_rows[lab]
        dc = cols - p.seed_cols[lab]
        sub = lab * 4
        for bit, (cos_a, sin_a, offset) in zip((1, 2), cuts, strict=True):
            sub += bit * ((dr * cos_a[lab] + dc * sin_a[lab]) > offset[lab])
        out[rows] = sub
    return _Parcels(out, n * 4, p.seed_rows, p.seed_cols)


def _parcel_look(rng: np.random.Generator, n: int, mpp: float) -> dict[str, np.ndarray]:
    """Per-parcel crop, colour and row texture (orientation, period, contrast, phase)."""
    probs = np.array([c[2] for c in _CROPS])
    crop = rng.choice(len(_CROPS), n, p=probs / probs.sum())
    colour = np.array([c[1] for c in _CROPS], _F32)[crop]
    colour *= rng.uniform(0.82, 1.15, (n, 1)).astype(_F32) * rng.uniform(0.93, 1.07, (n, 3)).astype(_F32)
    period_px = rng.uniform(3.0, 12.0, n) / mpp
    resolved = np.clip((period_px - 2.0) / 2.0, 0, 1)  # rows finer than ~2 px blur away
    contrast = np.array([c[3] for c in _CROPS])[crop] * rng.uniform(0.5, 1.6, n) * resolved
    angle = rng.uniform(0, np.pi, n)
    freq = 2 * np.pi / np.maximum(period_px, 1.0)
    return {
        "crop": crop,
        "colour": colour,
        "kx": (freq * np.cos(angle)).astype(_F32),
        "ky": (freq * np.sin(angle)).astype(_F32),
        "contrast": contrast.astype(_F32),
        "phase": rng.uniform(0, 2 * np.pi, n).astype(_F32),
        "hedge": rng.random(n) < 0.15,
        "wood": rng.random(n) < 0.05,
        "stand": rng.integers(len(_FOREST), size=n),
        "stand_tone": rng.uniform(0.85, 1.15, n).astype(_F32),
        "canopy": rng.uniform(12.0, 26.0, n).astype(_F32),
    }


def _field_colours(p: _Parcels, look: dict[str, np.ndarray], tone: np.ndarray) -> np.ndarray:
    """Base RGB of the agricultural layer: parcel colour x crop rows x slow tone variation."""
    size = p.labels.shape[0]
    out = np.empty((size, size, 3), _F32)
    cols = np.arange(size, dtype=_F32)[None, :]
    for rows in _row_blocks(size):
        lab = p.labels[rows].astype(np.intp)
        r = np.arange(rows.start, rows.stop, dtype=_F32)[:, None]
        wave = np.sin(cols * look["kx"][lab] + r * look["ky"][lab] + look["phase"][lab])
        mod = _F32(1.0) + look["contrast"][lab] * wave + _F32(0.07) * tone[rows]
        out[rows] = look["colour"][lab] * mod[..., None]
    return out


def _boundaries(labels: np.ndarray) -> np.ndarray:
    """Pixels whose right or lower neighbour lies in another parcel."""
    edge = np.zeros(labels.shape, bool)
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge[:-1, :] |= labels[:-1, :] != labels[1:, :]
    return edge


@dataclass
class _Cover:
    """Land-cover layers needed by the renderer."""

    parcels: _Parcels
    look: dict[str, np.ndarray]
    forest: np.ndarray
    trees: np.ndarray
    margins: np.ndarray
    plots: np.ndarray


def _land_cover(rng: np.random.Generator, water: np.ndarray, urban: np.ndarray, mpp: float) -> _Cover:
    """Parcels, forest (noise-shaped and whole-parcel woods), hedgerows, trees and garden plots."""
    size = water.shape[0]
    warp_r = _spectral_noise(rng, size, mpp, 2.5, 400.0, 20.0)
    warp_c = _spectral_noise(rng, size, mpp, 2.5, 400.0, 20.0)
    spacing = max(3.0, rng.uniform(120.0, 170.0) / mpp)
    parcels = _split_parcels(rng, _voronoi(rng, spacing, warp_r * _F32(6.0 / mpp), warp_c * _F32(6.0 / mpp)))
    look = _parcel_look(rng, parcels.n_labels, mpp)
    share = rng.uniform(0.18, 0.32)
    f = _spectral_noise(rng, size, mpp, beta=3.0, outer_m=1500.0, inner_m=15.0)
    forest = (f > np.quantile(f, 1.0 - share)) | look["wood"][parcels.labels]
    forest &= ~water & ~urban
    margins = _boundaries(parcels.labels)
    hedge = margins & look["hedge"][parcels.labels]
    if mpp < 2.0:
        hedge = ndimage.binary_dilation(hedge, iterations=1)
    blobs = _blurred_noise(rng, size, 2.2 / mpp)
    loose = (urban & (blobs > 1.3)) | (~urban & (blobs > 3.0)) | hedge
    trees = (forest | loose) & ~water
    plots = _voronoi(rng, max(2.0, 24.0 / mpp), warp_r * _F32(2.0 / mpp), warp_c * _F32(2.0 / mpp)).labels
    return _Cover(parcels, look, forest, trees, margins & ~forest, plots)


# --------------------------------------------------------------------------- surface model


def _surface(
    terrain: np.ndarray, water: np.ndarray, surface: np.ndarray, roads: _Roads, b: _Buildings, mpp: float
) -> np.ndarray:
    """Elevation band: terrain, flat water, bridge decks and building roofs (pitched or flat)."""
    elev = np.where(water, surface, terrain).astype(_F32)
    bridges = water & (roads.cls > 0)
    elev[bridges] = surface[bridges] + _F32(2.5)
    for k, (r0, r1, c0, c1) in enumerate(b.boxes):
        base = float(terrain[r0:r1, c0:c1].max())
        roof = np.full((r1 - r0, c1 - c0), base + b.heights[k], _F32)
        if b.pitched[k]:
            roof += _ridge(r1 - r0, c1 - c0, mpp)
        elev[r0:r1, c0:c1] = roof
    return elev


def _ridge(h: int, w: int, mpp: float) -> np.ndarray:
    """Gable roof profile (metres above the eaves), ridge along the longer side, ~25 deg pitch."""
    n, vertical = (h, False) if w >= h else (w, True)
    x = np.abs(np.arange(n, dtype=_F32) - _F32((n - 1) / 2.0)) * _F32(mpp)
    prof = _F32(0.47) * (_F32(n * mpp / 2.0) - x)
    return np.broadcast_to(prof[None, :] if vertical else prof[:, None], (h, w))


# --------------------------------------------------------------------------- geometry


@dataclass
class _Geometry:
    """Everything a season's rendering needs that does not depend on the season."""

    terrain: np.ndarray  # carved terrain, metres (without water, bridges and roofs)
    water: np.ndarray  # all water, including under bridges
    water_only: np.ndarray  # water not covered by a bridge
    surface: np.ndarray  # water surface, metres (meaningful on ``water``)
    depth: np.ndarray  # water depth plus 0.5 m, metres
    urban: np.ndarray
    roads: _Roads
    buildings: _Buildings
    cover: _Cover
    elevation: np.ndarray
    mpp: float


@dataclass
class _Canvas:
    """Rendering inputs shared by every season, drawn from the main generator in summer's order."""

    tone: np.ndarray  # slow brightness variation
    plot_idx: np.ndarray  # garden plot colour index ...
    plot_jitter: np.ndarray  # ... and brightness
    crowns: np.ndarray  # tree crown bumps


def _geometry(rng: np.random.Generator, size: int, mpp: float) -> _Geometry:
    """Terrain, water, villages, roads, buildings and land cover, drawn from ``rng`` in a fixed order."""
    terrain = _terrain(rng, size, mpp)
    terrain, water, surface = _hydrology(rng, terrain, mpp)
    settlements = _settlements(rng, water, mpp)
    urban = _urban_mask(rng, settlements, size, mpp) & ~water
    roads = _road_network(rng, settlements, urban, water, mpp)
    b = _place_buildings(rng, roads, settlements, urban, water, mpp)
    cover = _land_cover(rng, water, urban, mpp)
    cover.trees &= (roads.cls == 0) & (b.ids == 0)
    water_only = water & (roads.cls == 0)
    depth = np.clip(surface - terrain, 0.0, None) + _F32(0.5)
    elevation = _surface(terrain, water, surface, roads, b, mpp)
    return _Geometry(terrain, water, water_only, surface, depth, urban, roads, b, cover, elevation, mpp)


def _canvas(rng: np.random.Generator, cover: _Cover, mpp: float) -> _Canvas:
    """Draw the season-independent rendering noise (same draws, same order as the summer render)."""
    size = cover.trees.shape[0]
    tone = _spectral_noise(rng, size, mpp, beta=2.0, outer_m=120.0, inner_m=6.0)
    n_plots = int(cover.plots.max()) + 1
    plot_idx = rng.integers(len(_PLOTS), size=n_plots)
    plot_jitter = rng.uniform(0.85, 1.15, (n_plots, 1)).astype(_F32)
    crowns = _blurred_noise(rng, size, 1.3 / mpp)
    return _Canvas(tone, plot_idx, plot_jitter, crowns)


# --------------------------------------------------------------------------- rendering


def _sun_vector(azimuth_deg: float, altitude_deg: float) -> tuple[float, float, float]:
    """Unit vector towards the sun in (east, south, up)."""
    az, alt = math.radians(azimuth_deg), math.radians(altitude_deg)
    return math.cos(alt) * math.sin(az), -math.cos(alt) * math.cos(az), math.sin(alt)


def _hillshade(height: np.ndarray, mpp: float, sun: tuple[float, float, float]) -> np.ndarray:
    """Direct-light factor, 1 on flat ground, from the surface normal and the sun vector."""
    gs, ge = np.gradient(height, _F32(mpp))
    se, ss, su = sun
    cos_i = (-ge * _F32(se) - gs * _F32(ss) + _F32(su)) / np.sqrt(ge * ge + gs * gs + _F32(1.0))
    return np.clip(cos_i / _F32(su), 0.0, 1.6).astype(_F32)


def _cast_shadow(height: np.ndarray, mpp: float, max_rise_m: float, sun: tuple[float, float, float]) -> np.ndarray:
    """Shadow strength 0..1: how far each pixel lies below the highest ray towards the sun.

    March pixel by pixel towards the sun, keeping the running max of ``height - distance *
    tan(altitude)``; only rises up to ``max_rise_m`` are traced.
    """
    size = height.shape[0]
    se, ss, su = sun
    horiz = math.hypot(se, ss)
    de, ds, tan_alt = se / horiz, ss / horiz, su / horiz
    steps = min(int(math.ceil(max_rise_m / tan_alt / mpp)), size - 1, 96)
    horizon = height.copy()
    seen: set[tuple[int, int]] = set()
    for k in range(1, steps + 1):
        sr, sc = int(round(k * ds)), int(round(k * de))
        if (sr, sc) in seen or max(abs(sr), abs(sc)) >= size:
            continue
        seen.add((sr, sc))
        drop = _F32(math.hypot(sr, sc) * mpp * tan_alt)
        dst = horizon[max(0, -sr) : size - max(0, sr), max(0, -sc) : size - max(0, sc)]
        src = height[max(0, sr) : size + min(0, sr), max(0, sc) : size + min(0, sc)]
        np.maximum(dst, src - drop, out=dst)
    depth = horizon - height
    return np.clip((depth - _F32(0.15)) / _F32(0.8), 0.0, 1.0)


def _paint(base: np.ndarray, mask: np.ndarray, colour: np.ndarray | _RGB) -> None:
    """``base[mask] = colour`` for one RGB colour or one colour per masked pixel."""
    base[mask] = np.asarray(colour, _F32)


def _water_colours(depth: np.ndarray, tint: np.ndarray) -> np.ndarray:
    """Water RGB from depth (shallow greenish to deep blue-black) and a slow turbidity tint."""
    w = np.clip(depth / 4.0, 0.0, 1.0)[:, None] * _F32(0.8) + _F32(0.1) + _F32(0.1) * np.tanh(tint)[:, None]
    w = np.clip(w, 0.0, 1.0)
    return np.asarray(_WATER_SHALLOW, _F32) * (1 - w) + np.asarray(_WATER_DEEP, _F32) * w


def _pick_crops(rng: np.random.Generator, crops: tuple[_Crop, ...], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Colour (n, 3) and stripe contrast (n,) of ``n`` parcels drawn from a crop palette."""
    probs = np.array([c[2] for c in crops])
    pick = rng.choice(len(crops), n, p=probs / probs.sum())
    return np.array([c[1] for c in crops], _F32)[pick], np.array([c[3] for c in crops], _F32)[pick]


def _reseason_parcels(rng: np.random.Generator, look: Look, summer: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Parcel look with a new crop stage per parcel: grassland stays grass, arable gets ``look.arable``.

    Row orientation, period and phase are the field's own and stay; the stripe contrast keeps the
    parcel's summer gain over its crop's nominal contrast.
    """
    if look.arable is None:
        return summer
    crop = summer["crop"]
    n = len(crop)
    grass = np.isin(crop, _GRASSLAND)
    arable_rgb, arable_stripe = _pick_crops(rng, look.arable, n)
    grass_rgb, grass_stripe = _pick_crops(rng, look.grassland, n)
    colour = np.where(grass[:, None], grass_rgb, arable_rgb)
    colour *= rng.uniform(0.85, 1.12, (n, 1)).astype(_F32) * rng.uniform(0.94, 1.06, (n, 3)).astype(_F32)
    gain = summer["contrast"] / np.array([c[3] for c in _CROPS], _F32)[crop]
    out = dict(summer)
    out["colour"] = colour
    out["contrast"] = (gain * np.where(grass, grass_stripe, arable_stripe)).astype(_F32)
    return out


def _tree_kind(cover: _Cover) -> np.ndarray:
    """Per pixel: forest stand type 0-3, or 4 for a lone tree (meaningful on ``cover.trees``)."""
    return np.where(cover.forest, cover.look["stand"][cover.parcels.labels], 4)


def _tree_colours(cover: _Cover, palette: tuple[_RGB, ...], tone: np.ndarray) -> np.ndarray:
    """Colour of every tree pixel: its stand's colour and tone, or the flat lone-tree colour."""
    lab = cover.parcels.labels[cover.trees]
    col = np.array(palette[:4], _F32)[cover.look["stand"][lab]]
    col *= (cover.look["stand_tone"][lab] * (1 + 0.1 * tone[cover.trees]))[:, None]
    loose = cover.trees & ~cover.forest
    col[loose[cover.trees]] = np.asarray(palette[4], _F32)
    return col


def _seasonal_trees(rng: np.random.Generator, cover: _Cover, look: Look, tone: np.ndarray, mpp: float) -> np.ndarray:
    """Tree colours mixed crown by crown between the season's two palettes (autumn leaves, bare twigs)."""
    col = _tree_colours(cover, look.trees, tone)
    if look.trees_alt is None:
        return col
    size = tone.shape[0]
    spread = min(1.0, 3.0 / mpp)  # coarse pixels average many crowns
    share = np.clip(_F32(0.5) + _F32(0.35 * spread) * _blurred_noise(rng, size, 2.0 / mpp)[cover.trees], 0.0, 1.0)
    share *= np.asarray(look.trees_mix, _F32)[_tree_kind(cover)[cover.trees]]
    alt = _tree_colours(cover, look.trees_alt, tone)
    col += share[:, None] * (alt - col)
    return col


def _base_colours(
    rng: np.random.Generator, geo: _Geometry, canvas: _Canvas, look: Look, parcels: dict[str, np.ndarray]
) -> np.ndarray:
    """Unlit RGB (float32, 0-255 scale) of every pixel, layer by layer."""
    cover, tone = geo.cover, canvas.tone
    base = _field_colours(cover.parcels, parcels, tone)
    _paint(base, cover.margins, look.margin)
    plot_col = np.array(look.plots, _F32)[canvas.plot_idx]
    plot_col *= canvas.plot_jitter
    ground = geo.urban & ~cover.forest
    _paint(base, ground, plot_col[cover.plots[ground]] * (1 + 0.05 * tone[ground])[:, None])
    _paint(base, cover.trees, _seasonal_trees(rng, cover, look, tone, geo.mpp))
    _paint(base, geo.water_only, _water_colours(geo.depth[geo.water_only], tone[geo.water_only]))
    for cls, col in _ASPHALT.items():
        m = geo.roads.cls == cls
        _paint(base, m, np.asarray(col, _F32) * (1 + 0.04 * tone[m])[:, None])
    b = geo.buildings
    if b.boxes:
        roofs = np.concatenate([np.zeros((1, 3), _F32), np.array(b.roofs, _F32)])
        m = b.ids > 0
        _paint(base, m, roofs[b.ids[m]])
    return base


def _shore_distance_m(water: np.ndarray, max_m: float, mpp: float) -> np.ndarray:
    """Distance (metres, taxicab, capped near ``max_m``) from each water pixel's centre to the shore."""
    dist = np.zeros(water.shape, _F32)
    inner = water
    for _ in range(min(64, int(math.ceil(max_m / mpp)) + 1)):
        inner = ndimage.binary_erosion(inner, border_value=1)
        if not inner.any():
            break
        dist += inner
    return (dist + _F32(0.5)) * _F32(mpp)


def _expose_shores(base: np.ndarray, geo: _Geometry, drop_m: float, tone: np.ndarray) -> None:
    """Low water: paint shallow margins as mud, wet at the new water line and dry further up."""
    dist = _shore_distance_m(geo.water, drop_m / _SHORE_SLOPE, geo.mpp)
    depth = geo.depth - _F32(0.5) + _F32(_SHORE_SLOPE) * dist
    dry = geo.water_only & (depth < _F32(drop_m))
    wet = (depth[dry] / _F32(drop_m))[:, None]
    mud = np.asarray(_MUD_DRY, _F32) + wet * (np.asarray(_MUD_WET, _F32) - np.asarray(_MUD_DRY, _F32))
    _paint(base, dry, mud * (1 + 0.06 * tone[dry])[:, None])


def _flood(base: np.ndarray, geo: _Geometry, rise_m: float) -> None:
    """High water: open ground next to water and less than ``rise_m`` above it goes under."""
    reach = 2 * max(1, int(math.ceil(20.0 / geo.mpp))) + 1
    near = ndimage.maximum_filter(np.where(geo.water, geo.surface, _F32(-np.inf)), size=reach)
    open_ground = ~geo.water & ~geo.cover.trees & ~geo.urban & (geo.roads.cls == 0) & (geo.buildings.ids == 0)
    wet = open_ground & (geo.terrain < near + _F32(rise_m))
    base[wet] = _F32(0.3) * base[wet] + _F32(0.7) * np.asarray(_FLOOD, _F32)


def _canopy(cover: _Cover, crowns: np.ndarray, leaf: tuple[float, ...] | None, mpp: float) -> np.ndarray:
    """Tree canopy height (metres) with crown bumps, for shading only (not in the elevation band)."""
    height = np.where(cover.forest, cover.look["canopy"][cover.parcels.labels], _F32(9.0))
    canopy = cover.trees * (height + _F32(2.2) * crowns)
    if leaf is not None:
        canopy *= np.asarray(leaf, _F32)[_tree_kind(cover)]
    if mpp < 3.0:
        canopy = ndimage.gaussian_filter(canopy, 0.7 / mpp)
    return canopy.astype(_F32)


def _light(geo: _Geometry, canvas: _Canvas, look: Look) -> np.ndarray:
    """Irradiance factor per pixel: ambient + direct light x hillshade x (not in cast shadow)."""
    sun = _sun_vector(look.sun_azimuth_deg, look.sun_altitude_deg)
    relief = geo.elevation + _canopy(geo.cover, canvas.crowns, look.leaf, geo.mpp)
    direct = _hillshade(relief, geo.mpp, sun) * (_F32(1.0) - _cast_shadow(relief, geo.mpp, 45.0, sun))
    del relief
    return _F32(look.ambient) + _F32(1.0 - look.ambient) * direct


def _render(rng: np.random.Generator, geo: _Geometry, canvas: _Canvas, look: Look) -> np.ndarray:
    """Aerial image: base colours x light, water level, white balance, haze and sensor noise."""
    size = geo.elevation.shape[0]
    base = _base_colours(rng, geo, canvas, look, _reseason_parcels(rng, look, geo.cover.look))
    if look.water_dz < 0:
        _expose_shores(base, geo, -look.water_dz, canvas.tone)
    elif look.water_dz > 0:
        _flood(base, geo, look.water_dz)
    base *= (_F32(1.0 - look.haze_share) * _light(geo, canvas, look))[..., None]
    if look.tint is not None:
        base *= np.asarray(look.tint, _F32)
    base += np.asarray(look.haze_rgb, _F32)
    base += _F32(3.0) * rng.standard_normal((size, size, 1), dtype=_F32)
    base += _F32(1.5) * rng.standard_normal((size, size, 3), dtype=_F32)
    return np.clip(base + _F32(0.5), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- entry points


def _check_arguments(size: int, metres_per_pixel: float, seasons: Sequence[str]) -> None:
    """Raise ``ValueError`` for a too small map, a non-positive pixel size or an unknown season."""
    if size < 16:
        raise ValueError(f"size must be at least 16 pixels, got {size}")
    if not metres_per_pixel > 0:
        raise ValueError(f"metres_per_pixel must be positive, got {metres_per_pixel}")
    for season in seasons:
        if season not in SEASONS:
            raise ValueError(f"unknown season {season!r}; choose one of {', '.join(SEASONS)}")


def synthesize_worlds(
    size: int, seed: int, metres_per_pixel: float = 1.0, seasons: Sequence[str] = SEASONS
) -> dict[str, World]:
    """Generate one deterministic world and render it in each of ``seasons``.

    The geometry is built once; each season costs one rendering. All worlds share the same
    elevation, water, road and building arrays (as separate copies); ``"summer"`` equals
    ``synthesize_world(size, seed, metres_per_pixel)``.

    Args:
        size: side of the square world in pixels (at least 16; 64 to 8192 is the tested range).
        seed: seed of the random generators; equal inputs give byte-identical output.
        metres_per_pixel: ground sample distance; all features are sized in metres.
        seasons: names from :data:`SEASONS` (a repeated name is rendered once).

    Returns:
        The worlds by season name, in the order asked for.
    """
    if isinstance(seasons, str):
        seasons = (seasons,)
    _check_arguments(size, metres_per_pixel, seasons)
    mpp = float(metres_per_pixel)
    rng = np.random.default_rng(seed)
    geo = _geometry(rng, size, mpp)
    canvas = _canvas(rng, geo.cover, mpp)
    worlds: dict[str, World] = {}
    for season in dict.fromkeys(seasons):
        render_rng = rng if season == "summer" else np.random.default_rng([seed, SEASONS.index(season)])
        copy = bool(worlds)
        worlds[season] = World(
            rgb=_render(render_rng, geo, canvas, LOOKS[season]),
            elevation=geo.elevation.copy() if copy else geo.elevation,
            water=geo.water_only.copy() if copy else geo.water_only,
            roads=geo.roads.cls > 0,
            buildings=geo.buildings.ids > 0,
        )
    return worlds


def synthesize_world(size: int, seed: int, metres_per_pixel: float = 1.0, season: str = "summer") -> World:
    """Generate and render a deterministic world ``size`` x ``size`` pixels.

    Args:
        size: side of the square world in pixels (at least 16; 64 to 8192 is the tested range).
        seed: seed of the random generators; equal inputs give byte-identical output.
        metres_per_pixel: ground sample distance; all features are sized in metres.
        season: one of :data:`SEASONS`; every season shows the same geometry in its own light,
            vegetation and water level.

    Returns:
        The rendered image with its elevation (terrain, bridges and roofs), water, road and
        building masks.
    """
    return synthesize_worlds(size, seed, metres_per_pixel, (season,))[season]
