import math

import numpy as np
import pytest

from maprl.data.perturb import (
    GEOMETRIC,
    KINDS,
    context_side,
    crop_centre,
    perturb,
    perturb_params,
    quarter_turns,
    random_perturbation,
    rotate,
)

from conftest import textured_rgb

DETERMINISTIC = {"contrast", "saturation", "grayscale", "haze", "blur", "jpeg"}  # no random draw at all


@pytest.fixture(scope="module")
def img() -> np.ndarray:
    return textured_rgb(64, seed=3)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10 * math.log10(255**2 / mse)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("strength", [0.3, 1.0])
def test_keeps_dtype_shape_and_range(img: np.ndarray, kind: str, strength: float) -> None:
    out = perturb(img, kind, strength, np.random.default_rng(0))
    assert out.dtype == np.uint8 and out.shape == img.shape
    batch = np.stack([img, img[::-1], img[:, ::-1]])
    out = perturb(batch, kind, strength, np.random.default_rng(0))
    assert out.dtype == np.uint8 and out.shape == batch.shape
    # the batch draws from the one rng in turn: its first image is the single-image result
    assert np.array_equal(out[0], perturb(img, kind, strength, np.random.default_rng(0)))


@pytest.mark.parametrize("kind", KINDS)
def test_deterministic_under_seed(img: np.ndarray, kind: str) -> None:
    a = perturb(img, kind, 0.7, np.random.default_rng(42))
    b = perturb(img, kind, 0.7, np.random.default_rng(42))
    assert np.array_equal(a, b)
    outs = [perturb(img, kind, 0.7, np.random.default_rng(seed)) for seed in range(8)]
    all_same = all(np.array_equal(outs[0], o) for o in outs[1:])
    assert all_same == (kind in DETERMINISTIC)


@pytest.mark.parametrize("kind", KINDS)
def test_strength_zero_is_identity(img: np.ndarray, kind: str) -> None:
    out = perturb(img, kind, 0.0, np.random.default_rng(1))
    assert np.array_equal(out, img) and out is not img


@pytest.mark.parametrize("kind", KINDS)
def test_moderate_strength_changes_the_image(img: np.ndarray, kind: str) -> None:
    out = perturb(img, kind, 0.5, np.random.default_rng(2))
    assert np.abs(out.astype(int) - img).mean() > 2
    if kind == "grayscale":
        assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 0], out[..., 2])


@pytest.mark.parametrize("strength", [-0.1, 1.5, float("nan"), float("inf")])
def test_bad_strength_raises(img: np.ndarray, strength: float) -> None:
    with pytest.raises(ValueError, match=rf"strength.*{strength}"):
        perturb(img, "blur", strength, np.random.default_rng(0))
    with pytest.raises(ValueError, match="max_strength"):
        random_perturbation(img, strength, np.random.default_rng(0))


def test_bad_kind_and_image_raise(img: np.ndarray) -> None:
    with pytest.raises(ValueError, match="'fog'"):
        perturb(img, "fog", 0.5, np.random.default_rng(0))
    with pytest.raises(ValueError, match="'fog'"):
        perturb_params("fog", 0.5, np.random.default_rng(0))
    with pytest.raises(ValueError, match="'fog'"):
        random_perturbation(img, 0.5, np.random.default_rng(0), kinds=("blur", "fog"))
    with pytest.raises(ValueError, match="uint8"):
        perturb(img.astype(np.float32), "blur", 0.5, np.random.default_rng(0))


def test_params_follow_the_table() -> None:
    rng = np.random.default_rng(0)
    assert perturb_params("blur", 0.5, rng) == {"sigma_px": 2.0}
    assert perturb_params("noise", 0.5, rng) == {"sigma": 15.0}
    assert perturb_params("jpeg", 0.5, rng) == {"quality": 20.0}
    assert perturb_params("jpeg", 0.01, rng) == {"quality": 95.0}
    assert perturb_params("contrast", 0.5, rng)["factor"] == pytest.approx(0.6)
    assert perturb_params("haze", 0.5, rng)["alpha"] == pytest.approx(0.35)
    assert perturb_params("cloud", 0.5, rng)["coverage"] == pytest.approx(0.3)
    assert {round(perturb_params("brightness", 0.5, rng)["factor"], 6) for _ in range(50)} == {0.7, 1.3}
    gammas = {round(perturb_params("gamma", 0.5, rng)["exponent"], 6) for _ in range(50)}
    assert gammas == {round(2**0.7, 6), round(2**-0.7, 6)}
    angles = [perturb_params("rotation", 1.0, rng)["angle_deg"] for _ in range(500)]
    assert -180 < min(angles) < -170 and 170 < max(angles) <= 180
    assert all(abs(perturb_params("rotation", 0.1, rng)["angle_deg"]) <= 36 for _ in range(100))
    zooms = [perturb_params("scale", 1.0, rng)["zoom"] for _ in range(500)]
    assert 0.5 <= min(zooms) < 0.55 and 1.9 < max(zooms) <= 2.0
    tilts = [perturb_params("tilt", 0.5, rng) for _ in range(100)]
    assert {t["shrink"] for t in tilts} == {0.25} and {t["edge"] for t in tilts} == {0, 1, 2, 3}


@pytest.mark.parametrize("angle", [90.0, -90.0, 180.0])
def test_rotation_matches_rot90(img: np.ndarray, angle: float) -> None:
    out = perturb(img, "rotation", 0.5, np.random.default_rng(0), params={"angle_deg": angle})
    assert np.array_equal(out, np.rot90(img, k=round(angle / 90)))


@pytest.mark.parametrize("angle", [135.0, 225.0, 315.0, -45.0, 112.5, 292.5])
@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_quarter_turns_split_is_bit_identical(img: np.ndarray, angle: float, dtype: type) -> None:
    split = quarter_turns(angle)
    assert split is not None and 0 < split[0] < 90 and split[1] == int(angle % 360 // 90)
    x = img.astype(dtype) if dtype == np.uint8 else img.astype(np.float32) * 0.37
    assert np.array_equal(rotate(x, angle), np.rot90(rotate(x, split[0]), split[1]))


@pytest.mark.parametrize("angle", [0.0, 90.0, 30.0, 60.0])
def test_quarter_turns_of_a_quarter_or_base_angle(angle: float) -> None:
    split = quarter_turns(angle)
    assert split is None if angle % 90 == 0 else split == (angle, 0)


def test_rotation_reports_the_heading(img: np.ndarray) -> None:
    rng = np.random.default_rng(7)
    p = perturb_params("rotation", 0.5, rng)
    a = perturb(img, "rotation", 0.5, rng, params=p)
    b = perturb(img, "rotation", 0.5, np.random.default_rng(123), params=p)
    assert np.array_equal(a, b)
    # small positive angle: the content turns counter-clockwise, like a small step toward np.rot90
    cw, ccw = np.rot90(img, k=-1), np.rot90(img, k=1)
    turned = perturb(img, "rotation", 0.5, rng, params={"angle_deg": 45.0})
    centre = (slice(16, 48), slice(16, 48))
    assert _psnr(turned[centre], ccw[centre]) > _psnr(turned[centre], cw[centre])


def test_scale_zooms_about_the_centre() -> None:
    img = np.zeros((65, 65, 3), np.uint8)
    img[28:37, 28:37] = 255  # a 9 px bright square at the centre
    out = perturb(img, "scale", 1.0, np.random.default_rng(0), params={"zoom": 2.0})
    bright = np.argwhere(out[..., 0] > 127)
    assert bright.min(0).tolist() == [23, 23] and bright.max(0).tolist() == [41, 41]  # 19 px ~ 2 x 9


@pytest.mark.parametrize("edge", [0, 1, 2, 3])
def test_tilt_shrinks_one_edge(edge: int) -> None:
    img = np.zeros((64, 64, 3), np.uint8)
    img[:, 16:48] = 255  # a vertical bright band, half the width
    img = np.rot90(img, k=edge % 2).copy()  # bands across the edge that shrinks
    out = perturb(img, "tilt", 1.0, np.random.default_rng(0), params={"shrink": 0.5, "edge": float(edge)})
    out = np.rot90(out, k=edge)  # shrunk edge to the top
    top, bottom = (_central_run(out[r, :, 0] > 127) for r in (1, 62))
    assert top == pytest.approx(16, abs=2) and bottom == pytest.approx(32, abs=2)


def _central_run(row: np.ndarray) -> int:
    """Length of the run of True through the middle of ``row`` (the reflected border repeats the band)."""
    mid = row.size // 2
    left = mid - np.argmin(row[mid::-1]) if not row[mid::-1].all() else 0
    right = mid + np.argmin(row[mid:]) if not row[mid:].all() else row.size
    return int(right - left)


def test_blur_sigma() -> None:
    img = np.zeros((32, 64, 3), np.uint8)
    img[:, 32:] = 255  # vertical step edge
    out = perturb(img, "blur", 0.5, np.random.default_rng(0))
    profile = np.diff(out[16, :, 0].astype(float))
    x = np.arange(profile.size)
    mean = (x * profile).sum() / profile.sum()
    sigma = math.sqrt(((x - mean) ** 2 * profile).sum() / profile.sum())
    assert sigma == pytest.approx(2.0, rel=0.1)


def test_noise_std() -> None:
    grey = np.full((64, 64, 3), 128, np.uint8)
    out = perturb(grey, "noise", 0.5, np.random.default_rng(0)).astype(float)
    assert out.std() == pytest.approx(15.0, rel=0.05) and out.mean() == pytest.approx(128, abs=0.5)


def test_jpeg_moderate(img: np.ndarray) -> None:
    out = perturb(img, "jpeg", 0.5, np.random.default_rng(0))
    assert not np.array_equal(out, img)
    assert 22 < _psnr(out, img) < 45


@pytest.mark.parametrize("strength", [0.25, 0.5, 1.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cloud_coverage(strength: float, seed: int) -> None:
    dark = (textured_rgb(96, seed) // 4).astype(np.uint8)  # 0..63: clouds stand out
    out = perturb(dark, "cloud", strength, np.random.default_rng(seed))
    strongly_changed = (out.astype(float) - dark).mean(-1) > 80
    assert strongly_changed.mean() == pytest.approx(0.6 * strength, abs=0.05)
    assert out.max() <= 248


def test_random_perturbation(img: np.ndarray) -> None:
    a = random_perturbation(img, 0.8, np.random.default_rng(5))
    assert a.dtype == np.uint8 and a.shape == img.shape and not np.array_equal(a, img)
    assert np.array_equal(a, random_perturbation(img, 0.8, np.random.default_rng(5)))
    assert np.array_equal(random_perturbation(img, 0.0, np.random.default_rng(5)), img)
    assert np.array_equal(random_perturbation(img, 0.8, np.random.default_rng(5), n=0), img)
    batch = random_perturbation(np.stack([img, img]), 0.8, np.random.default_rng(5), kinds=GEOMETRIC, n=3)
    assert batch.shape == (2, *img.shape) and not np.array_equal(batch[0], batch[1])


def test_crop_centre_and_context_side(img: np.ndarray) -> None:
    assert np.array_equal(crop_centre(img, 32), img[16:48, 16:48])
    assert np.array_equal(crop_centre(img[:63], 31), img[16:47, 16:47])
    batch = np.stack([img, img])
    assert crop_centre(batch, 20).shape == (2, 20, 20, 3)
    with pytest.raises(ValueError, match="65"):
        crop_centre(img, 65)
    assert context_side(32) == 64 and context_side(224) == 448


@pytest.mark.parametrize("kind", GEOMETRIC)
def test_context_crop_keeps_the_view_real(kind: str) -> None:
    """With a context_side crop, the central view never samples the reflected border."""
    view = 16
    side = context_side(view)
    marker = np.full((side, side, 3), 255, np.uint8)  # reflection of a white image stays white...
    marker[0] = marker[-1] = marker[:, 0] = marker[:, -1] = 0  # ...except the border ring maps inward
    extreme = {"rotation": {"angle_deg": 45.0}, "scale": {"zoom": 0.5}, "tilt": {"shrink": 0.5, "edge": 0.0}}
    out = perturb(marker, kind, 1.0, np.random.default_rng(0), params=extreme[kind])
    assert crop_centre(out, view - 2).min() == 255
