"""Dense template matching: normalised cross-correlation (NCC) of a photo over every offset of a map.

:class:`NCC` correlates one template size against one image by a cached FFT; the image may be a
grey level or a multi-channel field. :func:`orientation_field` is the field that survives a change
of date: the gradient's double-angle orientation. :class:`OrientationMatcher` uses both to find a
photo's candidate places in a whole map, coarse to fine and at several headings, with no training:
the map memory's pixel retriever (``agent.retriever: orientation``).
"""

from __future__ import annotations

import functools
import hashlib
import math
import operator
from dataclasses import dataclass

import numpy as np
from scipy import fft as sfft
from scipy import ndimage

from maprl.data.perturb import rotate
from maprl.views import view_origin, window_sums


def block_mean(img: np.ndarray, f: int) -> np.ndarray:
    h, w = img.shape[0] // f * f, img.shape[1] // f * f
    return img[:h, :w].reshape(h // f, f, w // f, f).mean(axis=(1, 3))


def _window_sums(img: np.ndarray, v: int) -> tuple[np.ndarray, np.ndarray]:
    """Sums of ``img`` and ``img**2`` over every v x v window (valid positions)."""
    out = []
    for a in (img, img * img):
        sat = np.zeros((a.shape[0] + 1, a.shape[1] + 1))
        np.cumsum(np.cumsum(a, axis=0), axis=1, out=sat[1:, 1:])
        out.append(window_sums(sat, v))
    return out[0], out[1]


_FLAT = 0.25  # variance per pixel below which a window counts as flat (NCC 0)


_channel_sum = functools.partial(functools.reduce, operator.add)
"""The sum of per-channel arrays; one channel is returned as it is (no ``0 +``)."""


class NCC:
    """Normalised cross-correlation of one template size against one image, via a cached FFT.

    The image is (H, W) or a (C, H, W) field; a field's channels are correlated together (the
    numerators and the window variances summed over channels), as for the two components of
    :func:`orientation_field`. Only "valid" positions are wanted, so a circular correlation of
    the image's own (fast) size is exact there: no padding to image + template.
    """

    def __init__(self, image: np.ndarray, v: int) -> None:
        self.image, self.v = image, v
        channels = image[None] if image.ndim == 2 else image
        h, w = channels.shape[1:]
        self.shape = (sfft.next_fast_len(h, real=True), sfft.next_fast_len(w, real=True))
        self.specs = [sfft.rfft2(c, self.shape) for c in channels]
        self.var = _channel_sum(_window_var(c, v) for c in channels)  # window sum of squared deviations

    def scores(self, template: np.ndarray) -> np.ndarray:
        """NCC at every top-left corner (H - v + 1, W - v + 1), in [-1, 1]; ``template`` (v, v) or (C, v, v)."""
        v = self.v
        t0 = template - (template.mean() if template.ndim == 2 else template.mean(axis=(1, 2), keepdims=True))
        rows, cols = self.var.shape
        cross = _channel_sum(  # the channels' spectra summed: one inverse FFT (the transform is linear)
            spec * np.conj(sfft.rfft2(t, self.shape))
            for spec, t in zip(self.specs, t0[None] if t0.ndim == 2 else t0, strict=True)
        )
        num = sfft.irfft2(cross, self.shape)[:rows, :cols]
        t_var = float(np.sum(t0 * t0))
        flat = (self.var < _FLAT * v * v) | (t_var < _FLAT * v * v)  # under half a grey level of spread
        return np.where(flat, 0.0, num / np.sqrt(np.maximum(self.var * t_var, 1e-12)))


def _window_var(img: np.ndarray, v: int) -> np.ndarray:
    s1, s2 = _window_sums(img, v)
    return np.maximum(s2 - s1 * s1 / (v * v), 0.0)


def orientation_field(grey: np.ndarray, sigma: float = 1.5) -> np.ndarray:
    """(2, H, W) double-angle gradient orientation of a grey image, for :class:`NCC`.

    Per pixel ``(gx + i gy)^2 / |gx + i gy|`` after a Gaussian of ``sigma`` px: the gradient's
    orientation, doubled so that a reversed contrast gives the same value, weighted by the
    square root of its magnitude. Correlating it matches the layout of edges (roads, field
    boundaries, shorelines) and ignores monotone changes of brightness and colour, the changes
    between two dates of the same place.
    """
    smooth = ndimage.gaussian_filter(np.asarray(grey, np.float64), sigma)
    z = (ndimage.sobel(smooth, axis=1) + 1j * ndimage.sobel(smooth, axis=0)) ** 2
    z = z / (np.abs(z) + 1e-9) * np.sqrt(np.abs(z))
    return np.stack([z.real, z.imag])


def local_ncc(image: np.ndarray, template: np.ndarray, top: int, left: int, r: int) -> tuple[float, int, int]:
    """Best NCC of ``template`` with its top-left corner within ``r`` px of (top, left): (score, top, left).

    ``image`` is (H, W) or a (C, H, W) field, ``template`` (v, v) or (C, v, v) to match."""
    v = template.shape[-1]
    h, w = image.shape[-2:]
    y0, x0 = max(0, top - r), max(0, left - r)
    y1, x1 = min(h - v, top + r), min(w - v, left + r)
    if y1 < y0 or x1 < x0:
        return -np.inf, top, left
    patch = image[..., y0 : y1 + v, x0 : x1 + v]
    s = NCC(patch, v).scores(template)
    i, j = np.unravel_index(int(np.argmax(s)), s.shape)
    return float(s[i, j]), y0 + int(i), x0 + int(j)


def _digest(photo: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(photo).tobytes(), digest_size=16).digest()


@dataclass(frozen=True)
class Reference:
    """A photo's fine orientation field at its matched heading, zero-mean per channel (``t0``), and its
    sum of squares (``var``): what :meth:`OrientationMatcher.score` correlates with the map."""

    t0: np.ndarray
    var: float


def inscribed_side(view: int, factor: int) -> int:
    """Side of the centred square that a view turned by any angle still covers, in whole ``factor`` blocks on
    each side (so that its coarse crop is exact)."""
    margin = factor * math.ceil((view - view / math.sqrt(2)) / (2 * factor))
    return view - 2 * margin


MATCH_MEMO = 100_000
"""Answers an :class:`OrientationMatcher` remembers (one per photo and ``k``)."""
REFERENCE_MEMO = 1024
"""Photo references (:meth:`OrientationMatcher.reference`, a fine field each) an :class:`OrientationMatcher` keeps."""
REFINE_POOL = 8
"""Coarse peaks an :class:`OrientationMatcher` keeps per heading, and refines over all headings."""


class OrientationMatcher:
    """Candidate places of photos in a whole map by orientation correlation: no training, no features.

    The map's grey level and each photo become :func:`orientation_field` s. Coarse: the map is
    block-averaged by ``factor``, and the photo, turned to each of ``headings`` equally spaced
    headings (a heading off the quarter turns keeps only the photo's :func:`inscribed_side`
    square), is correlated with it at every offset (:class:`NCC` in single precision, one FFT per
    heading). Fine: the ``REFINE_POOL`` best coarse peaks over all headings, each more than
    ``min_separation`` from better ones and on ``ok`` centres, are refined at full resolution within
    ``factor + 1`` px. The ``k`` best refined peaks, again separated, are the candidates: view
    centres (x, y) and their NCC in [-1, 1].

    ``ok`` (H, W) bool says which centres hold a whole valid view. Answers are remembered per photo
    (every env built on one scene asks the same question), so a photo costs one search.
    """

    def __init__(
        self,
        rgb: np.ndarray,
        ok: np.ndarray,
        view: int,
        min_separation: float,
        headings: int = 1,
        factor: int = 2,
        sigma: float = 1.5,
    ) -> None:
        if headings < 1 or factor < 1 or view < 4 * factor:
            raise ValueError(f"OrientationMatcher: headings >= 1, factor >= 1 and view >= 4 factor (got {headings}, "
                             f"{factor}, {view})")  # fmt: skip
        self.view, self.min_separation, self.factor, self.sigma = view, float(min_separation), factor, sigma
        self.ok = np.asarray(ok, bool)
        grey = np.asarray(rgb, np.float64).mean(axis=2)
        self.fine = orientation_field(grey, sigma)
        coarse = orientation_field(block_mean(grey, factor), sigma / factor).astype(np.float32)  # single-precision FFTs
        self.angles = [360.0 * i / headings for i in range(headings)]
        sides = {view if a % 90 == 0 else inscribed_side(view, factor) for a in self.angles}
        self.coarse = {side: NCC(coarse, side // factor) for side in sorted(sides)}
        self.usable = {side: self._usable(side) for side in self.coarse}
        self._answers: dict[tuple[bytes, int], tuple[np.ndarray, np.ndarray, float]] = {}
        self._refs: dict[tuple[bytes, int], Reference] = {}
        self._fine_var: dict[int, np.ndarray] = {}  # per crop side: the fine field's window variance, for score

    def _templates(self, photo: np.ndarray, angle: float) -> tuple[int, np.ndarray, np.ndarray]:
        """The photo at ``angle``: the side this heading correlates, and its fine and coarse fields cropped to it."""
        grey = rotate(np.asarray(photo, np.float64).mean(axis=2, keepdims=True), angle)[..., 0]
        side = self.view if angle % 90 == 0 else inscribed_side(self.view, self.factor)
        m, f = (self.view - side) // 2, self.factor
        fine = orientation_field(grey, self.sigma)[:, m : m + side, m : m + side]
        a, b = m // f, (m + side) // f
        coarse = orientation_field(block_mean(grey, f), self.sigma / f)[:, a:b, a:b].astype(np.float32)
        return side, fine, coarse

    def _centre(self, top: np.ndarray | int, left: np.ndarray | int, side: int) -> tuple[np.ndarray, np.ndarray]:
        """View centres (x, y) of the photo whose ``side`` crop has its top-left corner at (top, left)."""
        m = (self.view - side) // 2
        return np.asarray(left) - m + self.view // 2, np.asarray(top) - m + self.view // 2

    def _usable(self, side: int) -> np.ndarray:
        """Which coarse offsets of a ``side`` crop put the photo's centre on an ``ok`` centre."""
        f = self.factor
        ii, jj = np.mgrid[0 : self.coarse[side].var.shape[0], 0 : self.coarse[side].var.shape[1]]
        x, y = self._centre(ii * f, jj * f, side)
        inside = (x >= 0) & (y >= 0) & (x < self.ok.shape[1]) & (y < self.ok.shape[0])
        out = np.zeros(ii.shape, bool)
        out[inside] = self.ok[y[inside], x[inside]]
        return out

    def _coarse_peaks(self, side: int, coarse: np.ndarray, pool: int) -> list[tuple[float, int, int]]:
        """Up to ``pool`` separated coarse peaks (score, top, left at full resolution) on valid centres."""
        f = self.factor
        s = np.where(self.usable[side], self.coarse[side].scores(coarse), -np.inf)
        r = max(1, int(self.min_separation // f))
        out = []
        for _ in range(pool):
            i, j = np.unravel_index(int(np.argmax(s)), s.shape)
            if not np.isfinite(s[i, j]):
                break
            out.append((float(s[i, j]), int(i) * f, int(j) * f))
            s[max(0, i - r) : i + r + 1, max(0, j - r) : j + r + 1] = -np.inf
        return out

    def _search(self, photo: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, float]:
        """The photo's ``k`` candidates (centres, NCC) and the heading of the best one."""
        peaks = []  # (coarse score, fine template, top, left, heading)
        for angle in self.angles:
            side, fine, coarse = self._templates(photo, angle)
            peaks += [(sc, fine, top, left, angle) for sc, top, left in self._coarse_peaks(side, coarse, REFINE_POOL)]
        peaks.sort(key=lambda p: -p[0])
        refined = []
        for _, fine, top, left, angle in peaks[:REFINE_POOL]:
            score, t, lft = local_ncc(self.fine, fine, top, left, self.factor + 1)
            x, y = self._centre(t, lft, fine.shape[-1])
            refined.append((score, float(x), float(y), angle))
        refined.sort(key=lambda r: -r[0])
        chosen: list[tuple[float, float, float, float]] = []
        for r in refined:
            if all(math.hypot(r[1] - c[1], r[2] - c[2]) > self.min_separation for c in chosen):
                chosen.append(r)
        chosen = (chosen or [(-1.0, self.ok.shape[1] / 2, self.ok.shape[0] / 2, 0.0)])[:k]
        chosen += [chosen[-1]] * (k - len(chosen))  # too few distinct places: repeat the last
        return np.array([(c[1], c[2]) for c in chosen]), np.array([c[0] for c in chosen]), chosen[0][3]

    def _answer(self, photo: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, float]:
        key = (_digest(photo), k)
        if key not in self._answers:
            if len(self._answers) >= MATCH_MEMO:
                self._answers.pop(next(iter(self._answers)))
            self._answers[key] = self._search(photo, k)
        return self._answers[key]

    def query(self, photos: np.ndarray, k: int = 3) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` separated candidates of each photo (N, V, V, 3): centres (N, k, 2) and NCC scores (N, k)."""
        pos, scores = np.zeros((len(photos), k, 2)), np.zeros((len(photos), k))
        for n, photo in enumerate(photos):
            pos[n], scores[n], _ = self._answer(photo, k)
        return pos, scores

    def reference(self, photo: np.ndarray, k: int = 3) -> Reference:
        """The photo as :meth:`score` compares it with the map: its fine field at the heading of its best match
        among ``k`` candidates (searched if not yet), zero-mean. Remembered per photo, the last ``REFERENCE_MEMO``."""
        key = (_digest(photo), k)
        if key not in self._refs:
            if len(self._refs) >= REFERENCE_MEMO:
                self._refs.pop(next(iter(self._refs)))
            _, fine, _ = self._templates(photo, self._answer(photo, k)[2])
            t0 = fine - fine.mean(axis=(1, 2), keepdims=True)
            self._refs[key] = Reference(t0, float(np.sum(t0 * t0)))
        return self._refs[key]

    def score(self, ref: Reference, x: float, y: float) -> float:
        """NCC in [-1, 1] of the photo (its :meth:`reference`) with the map's view centred at (x, y), as the
        candidates' scores are computed: 1 is a perfect match; its best candidate scores what :meth:`query` gave."""
        side = ref.t0.shape[-1]
        m = (self.view - side) // 2
        left, top = (int(v) + m for v in view_origin(x, y, self.view))
        h, w = self.fine.shape[1:]
        if top < 0 or left < 0 or top + side > h or left + side > w:
            return 0.0
        if side not in self._fine_var:  # the map's window variances once per side, from summed-area tables
            self._fine_var[side] = _channel_sum(_window_var(c, side) for c in self.fine)
        var = float(self._fine_var[side][top, left])
        if var < _FLAT * side * side or ref.var < _FLAT * side * side:  # flat: as NCC does
            return 0.0
        win = self.fine[:, top : top + side, left : left + side]
        return float(np.einsum("cij,cij->", ref.t0, win)) / math.sqrt(var * ref.var)  # t0 is zero-mean
