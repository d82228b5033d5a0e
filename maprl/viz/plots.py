"""Drawing helpers for renders, trajectory pictures and README figures (numpy + matplotlib)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

Colour = tuple[int, int, int]


def downscale(rgb: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """Block-average an image so its longer side is at most ``max_side``; returns (image, scale)."""
    k = max(1, int(np.ceil(max(rgb.shape[:2]) / max_side)))
    h, w = rgb.shape[0] // k * k, rgb.shape[1] // k * k
    small = rgb[:h, :w].reshape(h // k, k, w // k, k, -1).mean(axis=(1, 3))
    return small.astype(np.uint8), 1.0 / k


def draw_line(img: np.ndarray, p0: Sequence[float], p1: Sequence[float], colour: Colour, width: int = 1) -> None:
    """Draw a straight segment in place (pixel coordinates x, y)."""
    n = int(max(abs(p1[0] - p0[0]), abs(p1[1] - p0[1]))) + 1
    xs = np.rint(np.linspace(p0[0], p1[0], n)).astype(int)
    ys = np.rint(np.linspace(p0[1], p1[1], n)).astype(int)
    r = width // 2
    for dx in range(-r, width - r):
        for dy in range(-r, width - r):
            x, y = xs + dx, ys + dy
            keep = (x >= 0) & (y >= 0) & (x < img.shape[1]) & (y < img.shape[0])
            img[y[keep], x[keep]] = colour


def draw_polyline(img: np.ndarray, pts: Sequence[Sequence[float]], colour: Colour, width: int = 1) -> None:
    for a, b in itertools.pairwise(pts):
        draw_line(img, a, b, colour, width)


def draw_box(img: np.ndarray, cx: float, cy: float, side: float, colour: Colour, width: int = 2) -> None:
    """Draw the outline of a square view of side ``side`` centred at (cx, cy)."""
    h = side / 2
    corners = [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h), (cx - h, cy - h)]
    draw_polyline(img, corners, colour, width)


def render_episode(
    rgb: np.ndarray,
    path: Sequence[Sequence[float]],
    target: Sequence[float],
    view_size: int,
    max_side: int = 512,
) -> np.ndarray:
    """The map with the path flown (yellow), the current view (cyan) and the target (red)."""
    img, s = downscale(rgb, max_side)
    img = img.copy()
    pts = [(x * s, y * s) for x, y in path]
    if len(pts) > 1:
        draw_polyline(img, pts, (255, 220, 0), 2)
    draw_box(img, target[0] * s, target[1] * s, view_size * s, (255, 40, 40))
    if pts:
        draw_box(img, pts[-1][0], pts[-1][1], view_size * s, (0, 230, 255))
    return img


def save_preview(
    rgb: np.ndarray,
    elevation: np.ndarray,
    targets: pd.DataFrame,
    crops: Sequence[np.ndarray],
    path: str,
    title: str = "",
) -> None:
    """README figure: the map, its elevation band, targets by split, and sample target crops."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(15, 7.6), dpi=90)
    grid = fig.add_gridspec(2, max(3, len(crops)), height_ratios=[3, 1])
    n = max(3, len(crops))
    span = n // 3
    ax_map = fig.add_subplot(grid[0, :span])
    ax_map.imshow(rgb)
    ax_map.set_title("RGB (map.tif bands 1-3)")
    ax_elev = fig.add_subplot(grid[0, span : 2 * span])
    im = ax_elev.imshow(elevation, cmap="terrain")
    fig.colorbar(im, ax=ax_elev, fraction=0.046, label="elevation, m")
    ax_elev.set_title("elevation (band 4)")
    ax_t = fig.add_subplot(grid[0, 2 * span :])
    ax_t.imshow(rgb, alpha=0.6)
    for split, colour in (("train", "tab:blue"), ("test", "tab:red")):
        sel = targets[targets["split"] == split]
        ax_t.scatter(sel["x"], sel["y"], s=6, c=colour, label=f"{split} ({len(sel)})")
    ax_t.legend(loc="lower right", fontsize=8)
    ax_t.set_title("target centres by split")
    for i, crop in enumerate(crops):
        ax = fig.add_subplot(grid[1, i])
        ax.imshow(crop)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in (ax_map, ax_elev, ax_t):
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_trajectories(
    rgb: np.ndarray,
    methods: Sequence[str],
    paths: Sequence[Sequence[np.ndarray]],
    targets: Sequence[Sequence[float]],
    success: Sequence[Sequence[bool]],
    view_size: int,
    out_path: str,
    titles: Sequence[str] | None = None,
    max_side: int = 512,
) -> None:
    """Grid of episodes (columns) by method (rows): the path flown, green on success, red on failure.

    ``paths[m][e]`` is an (T, 2) array of view centres; the target view is the white box, the
    start a black dot, the final view a box in the path's colour.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    small, _ = downscale(rgb, max_side)
    h, w = rgb.shape[:2]
    half = view_size / 2
    n_rows, n_cols = len(methods), max(1, len(targets))
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(2.6 * n_cols, 2.6 * n_rows), dpi=90, squeeze=False)
    for r, method in enumerate(methods):
        for c in range(n_cols):
            ax = axes[r, c]
            ax.imshow(small, extent=(-0.5, w - 0.5, h - 0.5, -0.5))
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(targets):
                continue
            colour = "limegreen" if success[r][c] else "red"
            p = np.asarray(paths[r][c], float).reshape(-1, 2)
            tx, ty, fx, fy, v = targets[c][0] - half, targets[c][1] - half, p[-1, 0] - half, p[-1, 1] - half, view_size
            ax.add_patch(Rectangle((tx, ty), v, v, fill=False, ec="white", lw=1.2))
            ax.plot(p[:, 0], p[:, 1], "-", color=colour, lw=1.2)
            ax.plot(p[:1, 0], p[:1, 1], "o", color="black", ms=3)
            ax.add_patch(Rectangle((fx, fy), v, v, fill=False, ec=colour, lw=1))
            if r == 0 and titles is not None:
                ax.set_title(titles[c], fontsize=8)
        axes[r, 0].set_ylabel(method, fontsize=9)
    fig.tight_layout()
    fig.savefig(str(out_path), format="png")
    plt.close(fig)


def _resize_nearest(img: np.ndarray, side: int) -> np.ndarray:
    ys = (np.arange(side) * img.shape[0] / side).astype(int)
    xs = (np.arange(side) * img.shape[1] / side).astype(int)
    return img[ys][:, xs]


def _framed(img: np.ndarray, colour: Colour, width: int = 2) -> np.ndarray:
    out = img.copy()
    out[:width], out[-width:], out[:, :width], out[:, -width:] = colour, colour, colour, colour
    return out


def episode_frames(
    rgb: np.ndarray,
    path: np.ndarray,
    target: Sequence[float],
    view_size: int,
    max_frames: int = 60,
    max_side: int = 384,
) -> list[np.ndarray]:
    """GIF frames of one episode: the map with the path so far (yellow), the current view (cyan)
    and the target (red); on the right the current view (cyan frame) above the target photo (red)."""
    from maprl.views import crop_views

    small, s = downscale(rgb, max_side)
    path = np.asarray(path, float).reshape(-1, 2)
    steps = np.unique(np.linspace(0, len(path) - 1, min(max_frames, len(path))).round().astype(int))
    side = small.shape[0] // 2
    tgt = _framed(
        _resize_nearest(crop_views(rgb, np.array([target[0]]), np.array([target[1]]), view_size)[0], side),
        (255, 40, 40),
    )
    frames = []
    for t in steps:
        img = small.copy()
        pts = [(x * s, y * s) for x, y in path[: t + 1]]
        if len(pts) > 1:
            draw_polyline(img, pts, (255, 220, 0), 2)
        draw_box(img, target[0] * s, target[1] * s, view_size * s, (255, 40, 40))
        draw_box(img, pts[-1][0], pts[-1][1], view_size * s, (0, 230, 255))
        cur = crop_views(rgb, path[t : t + 1, 0], path[t : t + 1, 1], view_size)[0]
        column = np.zeros((small.shape[0], side, 3), np.uint8)
        column[:side] = _framed(_resize_nearest(cur, side), (0, 230, 255))
        column[side : 2 * side] = tgt
        frames.append(np.concatenate([img, column], axis=1))
    return frames


def save_gif(frames: Sequence[np.ndarray], path: str, fps: float = 8.0) -> None:
    """Write an animated GIF that loops forever."""
    import imageio.v3 as iio

    iio.imwrite(str(path), np.stack(frames), extension=".gif", duration=1000.0 / fps, loop=0)


def _figure(nrows: int, ncols: int, size: tuple[float, float]) -> tuple[object, np.ndarray]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(nrows, ncols, figsize=size, squeeze=False)
    return fig, axes


def _save(fig: object, path: str) -> None:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=90, format="png", metadata={"Software": None})  # type: ignore[attr-defined]
    plt.close(fig)  # type: ignore[arg-type]


def plot_robustness_curves(table: pd.DataFrame, path: str) -> None:
    """Success against perturbation strength, one panel per kind and domain, one line per method."""
    domains = list(dict.fromkeys(table["domain"]))
    kinds = [k for k in dict.fromkeys(table["kind"]) if k != "none"]
    ncols = min(7, max(1, len(kinds)))
    nrows = len(domains) * -(-len(kinds) // ncols)
    fig, axes = _figure(nrows, ncols, (2.3 * ncols, 2.0 * nrows + 0.6))
    methods = list(dict.fromkeys(table["method"]))
    for ax in axes.ravel():
        ax.set_visible(False)
    for di, domain in enumerate(domains):
        d = table[table["domain"] == domain]
        base = d[d["kind"] == "none"]
        for ki, kind in enumerate(kinds):
            ax = axes.ravel()[di * len(kinds) + ki]
            ax.set_visible(True)
            rows = _concat(base, d[d["kind"] == kind])
            for m in methods:
                r = rows[rows["method"] == m].sort_values("strength")
                ax.plot(r["strength"], r["success_rate"], marker="o", ms=3, label=m)
            ax.axhline(0.5, color="grey", lw=0.5, ls=":")
            ax.set_ylim(-0.02, 1.02)
            ax.set_title(f"{domain}: {kind}", fontsize=8)
            ax.tick_params(labelsize=7)
    axes.ravel()[0].legend(fontsize=6, loc="lower left")
    fig.suptitle("success rate against perturbation strength (0 = the photo as it is)", fontsize=9)  # type: ignore[attr-defined]
    fig.tight_layout()  # type: ignore[attr-defined]
    _save(fig, path)


def _concat(*frames: pd.DataFrame) -> pd.DataFrame:
    import pandas

    return pandas.concat(frames, ignore_index=True)


def plot_domain_bars(table: pd.DataFrame, path: str, methods: Sequence[str] = ("agent", "agent_randomized")) -> None:
    """Success by method: light bars the map's own photos, dark bars each shifted domain (unperturbed),
    and hatched bars the mean over all perturbations at strength 0.5 of the map's photos."""
    fig, axes = _figure(1, 1, (6.5, 3.2))
    ax = axes[0, 0]
    present = [m for m in dict.fromkeys(table["method"]) if m in methods] or list(dict.fromkeys(table["method"]))
    domains = list(dict.fromkeys(table["domain"]))
    groups = [(d, table[(table["domain"] == d) & (table["kind"] == "none")]) for d in domains]
    moderate = table[(table["domain"] == "same") & (table["strength"] == 0.5)]
    groups.append(("same, perturbed (s=0.5, mean)", moderate))
    width = 0.8 / max(1, len(groups))
    for gi, (label, g) in enumerate(groups):
        vals = [
            float(g.loc[g["method"] == m, "success_rate"].mean()) if (g["method"] == m).any() else 0.0 for m in present
        ]
        shade = 0.35 if gi == 0 else 0.9
        hatch = "//" if gi == len(groups) - 1 else None
        ax.bar(
            np.arange(len(present)) + gi * width, vals, width, label=label, color=(0.1, 0.3, 0.6, shade), hatch=hatch
        )
    ax.set_xticks(np.arange(len(present)) + 0.4 - width / 2, present, fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("success rate")
    ax.legend(fontsize=7)
    ax.set_title("same-domain (light) against shifted-domain (dark) photos", fontsize=9)
    fig.tight_layout()  # type: ignore[attr-defined]
    _save(fig, path)


def plot_perturbation_grid(
    originals: dict[str, np.ndarray], examples: dict[str, dict[str, np.ndarray]], path: str
) -> None:
    """Each domain's original photo, then the same photo under each perturbation at the strongest strength."""
    domains = list(examples)
    kinds = list(next(iter(examples.values()))) if examples else []
    fig, axes = _figure(max(1, len(domains)), len(kinds) + 1, (1.5 * (len(kinds) + 1), 1.7 * max(1, len(domains))))
    for di, d in enumerate(domains):
        panels = [("original", originals[d]), *((k, examples[d][k]) for k in kinds)]
        for ki, (title, img) in enumerate(panels):
            ax = axes[di, ki]
            ax.imshow(img)
            ax.set_title(f"{d}: {title}" if ki == 0 else title, fontsize=7)
            ax.axis("off")
    fig.tight_layout()  # type: ignore[attr-defined]
    _save(fig, path)


def plot_reliability(tables: dict[str, pd.DataFrame], path: str, title: str) -> None:
    """Reliability diagram: share of right answers against mean confidence per bin, one line per method,
    with the diagonal of perfect calibration; below, how many answers fall in each bin."""
    fig, axes = _figure(2, 1, (4.6, 5.6))
    top, bottom = axes[0, 0], axes[1, 0]
    top.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--", label="perfectly calibrated")
    width = 0.9 / max(1, len(tables))
    for i, (method, t) in enumerate(tables.items()):
        used = t[t["count"] > 0]
        top.plot(used["confidence"], used["accuracy"], marker="o", ms=4, label=method)
        lows = t["bin_low"].to_numpy(float)
        bottom.bar(lows + (i + 0.5) * width * (lows[1] - lows[0] if len(lows) > 1 else 1), t["count"],
                   width * (lows[1] - lows[0] if len(lows) > 1 else 1), label=method)  # fmt: skip
    top.set_xlim(0, 1)
    top.set_ylim(-0.02, 1.02)
    top.set_xlabel("confidence (mean in bin)")
    top.set_ylabel("share within the success radius")
    top.legend(fontsize=7)
    top.set_title(title, fontsize=9)
    bottom.set_xlim(0, 1)
    bottom.set_xlabel("confidence bin")
    bottom.set_ylabel("answers")
    fig.tight_layout()  # type: ignore[attr-defined]
    _save(fig, path)


def plot_located(
    map_rgb: np.ndarray,
    answers: Sequence[dict[str, object]],
    path: str,
    photos: Sequence[np.ndarray] = (),
    max_side: int = 1600,
) -> None:
    """The map with each answer's flown path, view footprint (a polygon in map pixels), answer and
    alternatives; with one answer, the photo as given and the map's view at the answer beside it.

    Each answer is a dict with ``path`` (T, 2), ``footprint`` (5, 2), ``xy`` (2,), ``alternatives``
    (k, 2), ``label`` (str) and ``located`` (bool), all in map pixels.
    """
    single = len(answers) == 1 and len(photos) == 1
    small, s = downscale(map_rgb, max_side)
    ncols = 3 if single else 1
    fig, axes = _figure(1, ncols, (12.0 if single else 7.0, 5.2 if single else 7.0))
    ax = axes[0, 0]
    ax.imshow(small, extent=(-0.5, small.shape[1] - 0.5, small.shape[0] - 0.5, -0.5))
    for i, a in enumerate(answers):
        colour = "#ffd400" if a["located"] else "#ff4040"
        p = np.asarray(a["path"], float) * s
        ax.plot(p[:, 0], p[:, 1], color="white", lw=1.0, alpha=0.9)
        ax.plot(p[:1, 0], p[:1, 1], "o", color="white", ms=3)
        fp = np.asarray(a["footprint"], float) * s
        ax.plot(fp[:, 0], fp[:, 1], color=colour, lw=1.6)
        xy = np.asarray(a["xy"], float) * s
        ax.plot(xy[0], xy[1], "+", color=colour, ms=10, mew=2)
        alts = np.asarray(a["alternatives"], float).reshape(-1, 2) * s
        ax.plot(alts[:, 0], alts[:, 1], "x", color="#40c0ff", ms=6, mew=1.5)
        if not single:
            ax.annotate(str(i + 1), (xy[0], xy[1]), color=colour, fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax.set_title(" | ".join(str(a["label"]) for a in answers[:1]) if single else f"{len(answers)} photos", fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    if single:
        axes[0, 1].imshow(photos[0])
        axes[0, 1].set_title("photo (as given)", fontsize=8)
        a = answers[0]
        x, y = (int(round(float(v))) for v in np.asarray(a["xy"], float))
        half = int(np.ptp(np.asarray(a["footprint"], float)[:, 0]) // 2) or 1
        crop = map_rgb[max(0, y - half) : y + half, max(0, x - half) : x + half]
        axes[0, 2].imshow(crop)
        axes[0, 2].set_title("map around the answer (north up)", fontsize=8)
        for b in axes[0, 1:]:
            b.set_xticks([])
            b.set_yticks([])
    fig.tight_layout()  # type: ignore[attr-defined]
    _save(fig, path)
