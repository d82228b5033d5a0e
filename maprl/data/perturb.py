"""Query-photo perturbations for robustness tests and domain randomization.

:func:`perturb` applies one kind of perturbation at a strength in ``[0, 1]``;
:func:`random_perturbation` stacks ``n`` random kinds at random strengths. Images are
uint8 ``(H, W, 3)`` or ``(N, H, W, 3)`` (each image in turn, drawing from the same ``rng``)
and come back with the same dtype, shape and 0..255 range. Strength 0 returns an identical
copy; strength 0.5 is "moderate" for every kind. All randomness comes from the explicit
``np.random.Generator``, so a seed reproduces the output.

The physical parameters are drawn by :func:`perturb_params`; pass them back through
``perturb(..., params=p)`` to know, e.g., the true heading change of a rotated photo.

| kind | parameters (``perturb_params`` keys) | strength ``s`` maps to | ``s = 0.5`` |
|---|---|---|---|
| brightness | ``factor`` | pixels x ``1 ± 0.6 s`` (random sign) | ±30 % |
| contrast | ``factor`` | ``mean + (x - mean) * (1 - 0.8 s)``, mean over the image | x0.6 |
| gamma | ``exponent`` | ``255 (x / 255) ** 2 ** (±1.4 s)`` (random sign) | 1.62 or 1/1.62 |
| colour_cast | ``gain_r, gain_g, gain_b`` | R ``1 + 0.4 s d``, G ``1 ± 0.1 s``, B ``1 - 0.4 s d``, d = ±1 | 20 % |
| saturation | ``factor`` | blend with luminance, saturation x ``1 - s`` | halved |
| grayscale | ``fraction`` | blend ``min(1, 2 s)`` toward luminance | fully grey |
| haze | ``alpha`` | blend ``0.7 s`` toward haze colour (200, 205, 215) | 35 % haze |
| blur | ``sigma_px`` | Gaussian, ``sigma = 4 s`` px | 2 px |
| noise | ``sigma`` | additive Gaussian per pixel and channel, ``sigma = 30 s`` grey levels | 15 levels |
| jpeg | ``quality`` | JPEG round trip at quality ``round(100 - 160 s)`` clipped to [5, 95] | quality 20 |
| cloud | ``coverage, opacity`` | soft fractal cloud over ``60 s`` % of the view, core opacity U(0.85, 0.95) | 30 % |
| rotation | ``angle_deg`` | angle U(``-360 s, 360 s``) deg wrapped to (-180, 180] | any heading |
| scale | ``zoom`` | zoom ``2 ** u``, u U(``-s, s``) (> 1 magnifies) | 0.71 - 1.41 |
| tilt | ``shrink, edge`` | trapezoid (perspective) warp: one edge shrinks by ``0.5 s`` | 25 % |

Conventions: luminance is ``0.299 R + 0.587 G + 0.114 B``. A positive ``angle_deg`` turns the
image content counter-clockwise as displayed (``angle_deg = 90`` is ``np.rot90(img)``).
``edge`` of a tilt is the edge that shrinks, the far side of the oblique view: 0 top,
1 right, 2 bottom, 3 left. Geometric kinds (rotation, scale, tilt) turn about the image
centre with bilinear interpolation and fill what comes from outside the image by
reflection; cut a context crop of :func:`context_side` and :func:`crop_centre` the result
so that the view holds real imagery only. The cloud also casts a faint shadow, offset by
up to 3 % of the image side.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter, map_coordinates

from maprl.config import PERTURBATIONS

KINDS: tuple[str, ...] = PERTURBATIONS  # defined with the params that name them (robustness.kinds)
GEOMETRIC: tuple[str, ...] = ("rotation", "scale", "tilt")
# Order in which random_perturbation applies the kinds it picked: scene geometry, atmosphere,
# optics, sensor, in-camera colour processing, compression.
PIPELINE_ORDER: tuple[str, ...] = (
    *GEOMETRIC,
    "cloud",
    "haze",
    "blur",
    "noise",
    "brightness",
    "contrast",
    "gamma",
    "colour_cast",
    "saturation",
    "grayscale",
    "jpeg",
)

Params = dict[str, float]
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)
_HAZE_RGB = np.array([200.0, 205.0, 215.0], np.float32)
_CLOUD_OCTAVES = ((1 / 6, 1.0), (1 / 12, 0.6), (1 / 24, 0.4), (1 / 48, 0.3))  # (sigma / side, weight)
_CLOUD_DOWN = 4  # the cloud field is made at 1/4 resolution, then upsampled bilinearly
_CLOUD_EDGE = 0.3  # half width of the soft cloud edge, in field standard deviations
_SHADOW_OFFSET = 0.03  # most shadow offset, as a fraction of the image side
_SHADOW_DARKEN = 0.3


def _sign(rng: np.random.Generator) -> float:
    return 1.0 if rng.random() < 0.5 else -1.0


def _wrap_deg(angle: float) -> float:
    """Angle wrapped to (-180, 180]."""
    return 180.0 - (180.0 - angle) % 360.0


def _colour_cast_params(s: float, rng: np.random.Generator) -> Params:
    d = _sign(rng)
    return {"gain_r": 1 + 0.4 * s * d, "gain_g": 1 + 0.1 * s * _sign(rng), "gain_b": 1 - 0.4 * s * d}


_PARAMS: dict[str, Callable[[float, np.random.Generator], Params]] = {
    "brightness": lambda s, rng: {"factor": 1 + 0.6 * s * _sign(rng)},
    "contrast": lambda s, rng: {"factor": 1 - 0.8 * s},
    "gamma": lambda s, rng: {"exponent": 2.0 ** (1.4 * s * _sign(rng))},
    "colour_cast": _colour_cast_params,
    "saturation": lambda s, rng: {"factor": 1 - s},
    "grayscale": lambda s, rng: {"fraction": min(1.0, 2 * s)},
    "haze": lambda s, rng: {"alpha": 0.7 * s},
    "blur": lambda s, rng: {"sigma_px": 4 * s},
    "noise": lambda s, rng: {"sigma": 30 * s},
    "jpeg": lambda s, rng: {"quality": float(np.clip(round(100 - 160 * s), 5, 95))},
    "cloud": lambda s, rng: {"coverage": 0.6 * s, "opacity": rng.uniform(0.85, 0.95)},
    "rotation": lambda s, rng: {"angle_deg": _wrap_deg(rng.uniform(-360 * s, 360 * s))},
    "scale": lambda s, rng: {"zoom": 2.0 ** rng.uniform(-s, s)},
    "tilt": lambda s, rng: {"shrink": 0.5 * s, "edge": float(rng.integers(4))},
}


def _check_kind(kind: str) -> None:
    if kind not in _PARAMS:
        raise ValueError(f"unknown perturbation kind {kind!r}; expected one of {', '.join(KINDS)}")


def _check_strength(strength: float, what: str) -> float:
    """The strength as a float; ValueError naming ``what`` unless it is finite and in [0, 1]."""
    s = float(strength)
    if not (math.isfinite(s) and 0.0 <= s <= 1.0):
        raise ValueError(f"{what} must be a finite number in [0, 1], got {strength!r}")
    return s


def _check(kind: str, strength: float) -> float:
    _check_kind(kind)
    return _check_strength(strength, f"strength of {kind!r}")


def _check_image(img: np.ndarray) -> None:
    if img.dtype != np.uint8 or img.ndim not in (3, 4) or img.shape[-1] != 3:
        raise ValueError(f"expected a uint8 (H, W, 3) or (N, H, W, 3) image, got {img.dtype} {img.shape}")


def perturb_params(kind: str, strength: float, rng: np.random.Generator) -> Params:
    """Draw the physical parameters of one perturbation (keys in the module table)."""
    s = _check(kind, strength)
    return _PARAMS[kind](s, rng)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _luma(x: np.ndarray) -> np.ndarray:
    """Luminance as (H, W, 1), to broadcast against (H, W, 3)."""
    return (x @ _LUMA)[..., None]


def _contrast(x: np.ndarray, p: Params, rng: np.random.Generator) -> np.ndarray:
    mean = float(x.mean())
    return mean + (x - mean) * p["factor"]


def _colour_cast(x: np.ndarray, p: Params, rng: np.random.Generator) -> np.ndarray:
    return x * np.array([p["gain_r"], p["gain_g"], p["gain_b"]], np.float32)


def _blend_luma(x: np.ndarray, fraction: float) -> np.ndarray:
    """Move ``fraction`` of the way from x toward its luminance (1: grey)."""
    return x + fraction * (_luma(x) - x)


def _jpeg(x: np.ndarray, p: Params, rng: np.random.Generator) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(_to_uint8(x)).save(buf, format="JPEG", quality=int(p["quality"]))
    buf.seek(0)
    with Image.open(buf) as decoded:
        return np.asarray(decoded.convert("RGB"), np.float32)


def _noise(x: np.ndarray, p: Params, rng: np.random.Generator) -> np.ndarray:
    return x + p["sigma"] * rng.standard_normal(x.shape, dtype=np.float32)


def _warp(x: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Resample (H, W, C) ``x`` through the 3x3 homography ``m``: output -> input pixel.

    ``m`` maps centred homogeneous (col, row, 1) of each output pixel to the input pixel it
    samples (bilinear, reflected outside the image).
    """
    h, w = x.shape[:2]
    cy, cx = (h - 1) / 2, (w - 1) / 2
    xo = np.arange(w, dtype=np.float32)[None, :] - cx
    yo = np.arange(h, dtype=np.float32)[:, None] - cy
    m = m.astype(np.float32)
    den = m[2, 0] * xo + m[2, 1] * yo + m[2, 2]
    coords = np.stack(
        [(m[1, 0] * xo + m[1, 1] * yo + m[1, 2]) / den + cy, (m[0, 0] * xo + m[0, 1] * yo + m[0, 2]) / den + cx]
    )
    out = np.empty_like(x)
    for c in range(x.shape[2]):
        map_coordinates(x[..., c], coords, output=out[..., c], order=1, mode="reflect")
    return out


def _turn_matrix(angle_deg: float) -> np.ndarray:
    a = math.radians(angle_deg)
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _rotation(x: np.ndarray, p: Params, rng: np.random.Generator) -> np.ndarray:
    return _warp(x, _turn_matrix(p["angle_deg"]))


def rotate(img: np.ndarray, angle_deg: float) -> np.ndarray:
    """(H, W, C) ``img`` turned counter-clockwise by ``angle_deg`` about its centre (exact for multiples of 90)."""
    quarter = angle_deg / 90.0
    if float(quarter).is_integer():
        return np.ascontiguousarray(np.rot90(img, int(quarter) % 4))
    return _rotation(img, {"angle_deg": float(angle_deg)}, np.random.default_rng(0))


def quarter_turns(angle_deg: float) -> tuple[float, int] | None:
    """``(base, k)`` such that, on a square image, ``rotate(img, angle_deg)`` is ``np.rot90(rotate(img, base), k)``
    bit for bit; None where no such split is exact.

    :func:`_warp` samples at coordinates computed in float32 from the turn's matrix, so the split is
    exact when the float32 matrix of ``angle_deg`` is the float32 matrix of ``base`` (in ``(0, 90)``)
    turned by ``k`` quarter turns: each output pixel then samples the same input point.
    """
    base, k = float(angle_deg) % 90.0, int(float(angle_deg) // 90.0) % 4
    if base == 0.0:
        return None  # rotate is already a quarter turn
    quarter = np.array([[0.0, -1.0], [1.0, 0.0]], np.float32)  # entries 0 and ±1: the products below are exact
    turned = np.linalg.matrix_power(quarter, k) @ _turn_matrix(base)[:2, :2].astype(np.float32)
    return (base, k) if np.array_equal(_turn_matrix(angle_deg)[:2, :2].astype(np.float32), turned) else None


def _scale(x: np.ndarray, p: Params, rng: np.random.Generator) -> np.ndarray:
    return _warp(x, np.diag([1 / p["zoom"], 1 / p["zoom"], 1.0]))


def _homography(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 3x3 projective map taking the four (x, y) points ``src`` to ``dst``."""
    a = np.zeros((8, 8))
    for i, ((x, y), (u, v)) in enumerate(zip(src, dst, strict=True)):
        a[2 * i] = [x, y, 1, 0, 0, 0, -u * x, -u * y]
        a[2 * i + 1] = [0, 0, 0, x, y, 1, -v * x, -v * y]
    return np.append(np.linalg.solve(a, dst.reshape(8)), 1.0).reshape(3, 3)


def _tilt(x: np.ndarray, p: Params, rng: np.random.Generator) -> np.ndarray:
    h, w = x.shape[:2]
    cx, cy = (w - 1) / 2, (h - 1) / 2
    square = np.array([[-cx, -cy], [cx, -cy], [cx, cy], [-cx, cy]])  # TL, TR, BR, BL
    i, j = int(p["edge"]), (int(p["edge"]) + 1) % 4  # edge 0 top: TL-TR, 1 right: TR-BR, ...
    trapezoid = square.copy()
    mid = (square[i] + square[j]) / 2
    trapezoid[[i, j]] = mid + (1 - p["shrink"]) * (square[[i, j]] - mid)
    return _warp(x, _homography(trapezoid, square))


def _resize(a: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a 2-D array, pixel centres aligned."""
    r = (np.arange(shape[0], dtype=np.float32) + 0.5) * (a.shape[0] / shape[0]) - 0.5
    c = (np.arange(shape[1], dtype=np.float32) + 0.5) * (a.shape[1] / shape[1]) - 0.5
    rr, cc = np.broadcast_arrays(r[:, None], c[None, :])
    return map_coordinates(a, np.stack([rr, cc]), order=1, mode="nearest", output=np.float32)


def _fractal_field(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Smooth random field of the given shape: blurred white noise summed over octaves."""
    low = (math.ceil(shape[0] / _CLOUD_DOWN), math.ceil(shape[1] / _CLOUD_DOWN))
    side = max(low)
    field = np.zeros(low, np.float32)
    for frac, weight in _CLOUD_OCTAVES:
        octave = gaussian_filter(rng.standard_normal(low, dtype=np.float32), frac * side, mode="wrap")
        field += weight * octave / max(float(octave.std()), 1e-6)
    return _resize(field, shape)


def _cloud_depth(field: np.ndarray, coverage: float) -> np.ndarray:
    """How far (in field standard deviations) each pixel lies inside the cloud: ``coverage`` of it is >= 0."""
    if coverage <= 0:
        return np.full_like(field, -np.inf)
    return (field - float(np.quantile(field, 1 - coverage))) / max(float(field.std()), 1e-6)


def _cloud_alpha(depth: np.ndarray) -> np.ndarray:
    """Soft cloud mask in [0, 1], 0.5 at depth 0, ramping over +-_CLOUD_EDGE."""
    a = np.clip(0.5 + depth / (2 * _CLOUD_EDGE), 0, 1)
    return a * a * (3 - 2 * a)


def _cloud(x: np.ndarray, p: Params, rng: np.random.Generator) -> np.ndarray:
    h, w = x.shape[:2]
    m = max(1, round(_SHADOW_OFFSET * max(h, w)))
    field = _fractal_field((h + 2 * m, w + 2 * m), rng)
    dy, dx = (int(v) for v in rng.integers(-m, m + 1, size=2))
    cloud, shadow = field[m : m + h, m : m + w], field[m + dy : m + dy + h, m + dx : m + dx + w]
    depth = _cloud_depth(cloud, p["coverage"])
    # Thin cloud edges are greyer, the thick core brighter: the field itself gives the texture.
    tone = 226 + 20 * np.clip((depth + _CLOUD_EDGE) / 2, 0, 1)
    shaded = x * (1 - _SHADOW_DARKEN * _cloud_alpha(_cloud_depth(shadow, p["coverage"])))[..., None]
    return shaded + (p["opacity"] * _cloud_alpha(depth))[..., None] * (tone[..., None] - shaded)


_Apply = Callable[[np.ndarray, Params, np.random.Generator], np.ndarray]
_APPLY: dict[str, _Apply] = {
    "brightness": lambda x, p, rng: x * p["factor"],
    "contrast": _contrast,
    "gamma": lambda x, p, rng: 255 * (x / 255) ** p["exponent"],
    "colour_cast": _colour_cast,
    "saturation": lambda x, p, rng: _blend_luma(x, 1 - p["factor"]),
    "grayscale": lambda x, p, rng: _blend_luma(x, p["fraction"]),
    "haze": lambda x, p, rng: x + p["alpha"] * (_HAZE_RGB - x),
    "blur": lambda x, p, rng: gaussian_filter(x, (p["sigma_px"], p["sigma_px"], 0)),
    "noise": _noise,
    "jpeg": _jpeg,
    "cloud": _cloud,
    "rotation": _rotation,
    "scale": _scale,
    "tilt": _tilt,
}


def perturb(
    img: np.ndarray, kind: str, strength: float, rng: np.random.Generator, params: Params | None = None
) -> np.ndarray:
    """Apply one perturbation ``kind`` at ``strength`` in [0, 1] to a uint8 image (or batch).

    ``params`` (from :func:`perturb_params`) fixes the drawn parameters; without it they are
    drawn from ``rng`` (per image for a batch). Strength 0 returns an unchanged copy.
    """
    s = _check(kind, strength)
    _check_image(img)
    if s == 0:
        return img.copy()
    if img.ndim == 4:
        return np.stack([perturb(im, kind, s, rng, params) for im in img])
    p = perturb_params(kind, s, rng) if params is None else params
    return _to_uint8(_APPLY[kind](img.astype(np.float32), p, rng))


def random_perturbation(
    img: np.ndarray, max_strength: float, rng: np.random.Generator, kinds: Sequence[str] = KINDS, n: int = 2
) -> np.ndarray:
    """Domain randomization: ``n`` distinct random ``kinds``, each at strength U(0, max_strength).

    At most one geometric kind is picked (a :func:`context_side` crop then stays real in the
    central view). The picked kinds are applied in :data:`PIPELINE_ORDER`; a batch draws anew per image.
    """
    max_s = _check_strength(max_strength, "max_strength")
    for k in kinds:
        _check_kind(k)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    _check_image(img)
    if img.ndim == 4:
        return np.stack([random_perturbation(im, max_s, rng, kinds, n) for im in img])
    picked: list[str] = []
    for k in (kinds[i] for i in rng.permutation(len(kinds))):
        if len(picked) < n and not (k in GEOMETRIC and any(q in GEOMETRIC for q in picked)):
            picked.append(k)
    out = img.copy()
    for kind in sorted(picked, key=PIPELINE_ORDER.index):
        out = perturb(out, kind, rng.uniform(0.0, max_s), rng)
    return out


def crop_centre(img: np.ndarray, size: int) -> np.ndarray:
    """The central ``size`` x ``size`` of an (H, W, C) or (N, H, W, C) array."""
    h, w = img.shape[-3], img.shape[-2]
    if not 0 < size <= min(h, w):
        raise ValueError(f"crop size {size} does not fit in a {h}x{w} image")
    top, left = (h - size) // 2, (w - size) // 2
    return img[..., top : top + size, left : left + size, :]


def context_side(view: int) -> int:
    """Side of the context crop that any one geometric perturbation leaves real in the central ``view``.

    Zooming out by 0.5 samples twice the view, so ``ceil(2 view)``; this also covers any
    rotation (needs ``sqrt(2) view``) and any tilt. :func:`random_perturbation` therefore picks
    at most one geometric kind (a zoom-out and a rotation together would need ``2 sqrt(2) view``).
    """
    return math.ceil(2 * view)
