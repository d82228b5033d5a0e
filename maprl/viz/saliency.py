"""Drawing saliency: per-step PNG overlays and the episode video (GIF, and MP4 where imageio's ffmpeg plugin is).

The saliency itself is computed in :mod:`maprl.eval.saliency`; this module only draws it. Actor
saliency (how much the action distribution changes) is drawn in blue, critic saliency (how much the
value changes) in red, as in Greydanus et al. (2018). At each step, each kind is scaled to its largest
value over both views, so the target photo and the current view compare on one scale; that largest
value is printed (saliency varies over orders of magnitude from step to step, so one scale for a
whole video would leave most frames blank).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from maprl.io import atomic_path

KIND_CHANNEL = {"actor": 2, "critic": 0}  # blue, red
KIND_COLOUR = {"actor": "blue", "critic": "red"}
VIEW_TITLE = {"target": "target photo", "current": "current view"}


@dataclass
class SaliencyPanels:
    """One step: the two views and their saliency maps, each (V, V), keyed by (view, kind)."""

    step: int
    target_view: np.ndarray
    current_view: np.ndarray
    maps: dict[tuple[str, str], np.ndarray]
    caption: str = ""

    def view(self, name: str) -> np.ndarray:
        return self.target_view if name == "target" else self.current_view


def scales(steps: Sequence[SaliencyPanels]) -> dict[str, float]:
    """The largest actor and critic saliency over ``steps`` (both views): what each colour is scaled to."""
    return {
        kind: float(max((float(np.max(p.maps[v, kind])) for p in steps for v in ("target", "current")), default=0.0))
        for kind in KIND_CHANNEL
    }


def overlay(view: np.ndarray, saliency: np.ndarray, vmax: float, kind: str) -> np.ndarray:
    """``view`` (V, V, 3) uint8, dimmed, with ``saliency`` / ``vmax`` added to the colour channel of ``kind``."""
    out = view.astype(np.float32) * 0.7
    if vmax > 0:
        s = np.clip(saliency / vmax, 0.0, 1.0)
        ch = KIND_CHANNEL[kind]
        for c in range(3):
            out[..., c] = out[..., c] + 255.0 * s if c == ch else out[..., c] * (1.0 - 0.6 * s)
    return np.clip(out, 0, 255).astype(np.uint8)


def plot_saliency_step(p: SaliencyPanels, path: str, vmax: Mapping[str, float] | None = None) -> None:
    """A PNG of one step: for the target photo (top) and the current view (bottom), the view as the policy
    gets it, then its actor saliency (blue) and its critic saliency (red)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vm = dict(vmax) if vmax is not None else scales([p])
    fig, axes = plt.subplots(2, 3, figsize=(9.0, 6.6), squeeze=False, layout="constrained")
    for r, name in enumerate(("target", "current")):
        axes[r, 0].imshow(p.view(name))
        axes[r, 0].set_title(VIEW_TITLE[name], fontsize=9)
        for c, kind in enumerate(("actor", "critic"), start=1):
            axes[r, c].imshow(overlay(p.view(name), p.maps[name, kind], vm[kind], kind))
            axes[r, c].set_title(f"{kind} saliency ({KIND_COLOUR[kind]}), max {np.max(p.maps[name, kind]):.2e}",
                                 fontsize=8)  # fmt: skip
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(
        f"{p.caption}\nwhen a Gaussian patch centred there is blurred: blue 0.5 |pi - pi'|^2 (actor, colour scale "
        f"max {vm['actor']:.2e}), red 0.5 (V - V')^2 (critic, colour scale max {vm['critic']:.2e})",
        fontsize=8,
    )
    fig.savefig(path, dpi=90, format="png", metadata={"Software": None})
    plt.close(fig)


def _resize(img: np.ndarray, side: int) -> np.ndarray:
    from PIL import Image

    if img.shape[0] == side and img.shape[1] == side:
        return img
    return np.asarray(Image.fromarray(img).resize((side, side), Image.Resampling.BILINEAR))


def _label(img: np.ndarray, text: str, xy: tuple[int, int] = (3, 2)) -> np.ndarray:
    """``text`` written on ``img`` (white on a dark box), with PIL's built-in font."""
    from PIL import Image, ImageDraw, ImageFont

    pil = Image.fromarray(img)
    draw = ImageDraw.Draw(pil)
    font = ImageFont.load_default()
    box = draw.textbbox(xy, text, font=font)
    draw.rectangle((box[0] - 2, box[1] - 1, box[2] + 2, box[3] + 1), fill=(0, 0, 0))
    draw.text(xy, text, fill=(255, 255, 255), font=font)
    return np.asarray(pil)


def saliency_frames(
    map_rgb: np.ndarray,
    path: np.ndarray,
    target_xy: Sequence[float] | np.ndarray,
    view_size: int,
    steps: Sequence[SaliencyPanels],
    max_side: int = 384,
) -> list[np.ndarray]:
    """Video frames, one per step: the map with the path flown so far (yellow), the current view (cyan) and
    the target (red, unless its place is unknown); beside it the target photo and the current view, each
    with its actor (blue) and critic (red) saliency (scaled per step, see the module docstring); above,
    the step's caption."""
    from maprl.viz.plots import downscale, draw_box, draw_polyline

    small, s = downscale(map_rgb, max_side)
    path = np.asarray(path, float).reshape(-1, 2)
    side = small.shape[0] // 2
    known = bool(np.all(np.isfinite(np.asarray(target_xy, float))))
    frames = []
    for p in steps:
        img = small.copy()
        pts = [(x * s, y * s) for x, y in path[: p.step + 1]]
        if len(pts) > 1:
            draw_polyline(img, pts, (255, 220, 0), 2)
        if known:
            draw_box(img, target_xy[0] * s, target_xy[1] * s, view_size * s, (255, 40, 40))
        draw_box(img, pts[-1][0], pts[-1][1], view_size * s, (0, 230, 255))
        grid = np.zeros((small.shape[0], 2 * side, 3), np.uint8)
        vm = scales([p])
        for r, name in enumerate(("target", "current")):
            for c, kind in enumerate(("actor", "critic")):
                sal = p.maps[name, kind]
                tile = _resize(overlay(p.view(name), sal, vm[kind], kind), side)
                tile = _label(tile, f"{name}: {kind} (max {np.max(sal):.1e})")
                grid[r * side : (r + 1) * side, c * side : (c + 1) * side] = tile
        body = np.concatenate([img, grid], axis=1)
        head = np.zeros((16, body.shape[1], 3), np.uint8)
        head = _label(head, p.caption[: body.shape[1] // 6], (3, 2))
        frames.append(np.concatenate([head, body], axis=0))
    return frames


def mp4_available() -> bool:
    """Whether imageio's ffmpeg plugin (the ``imageio-ffmpeg`` package) can be imported."""
    return importlib.util.find_spec("imageio_ffmpeg") is not None


MP4_MISSING = (
    "MP4 skipped: imageio's ffmpeg plugin is not installed (`pip install imageio-ffmpeg` adds it); the GIF was written"
)


def _even(frame: np.ndarray, block: int = 16) -> np.ndarray:
    """``frame`` padded (black, bottom and right) to sides that are multiples of ``block`` (what H.264 wants)."""
    h, w = frame.shape[:2]
    return np.pad(frame, ((0, -h % block), (0, -w % block), (0, 0)))


def write_video(frames: Sequence[np.ndarray], stem: str | Path, fps: float = 4.0) -> tuple[list[Path], str | None]:
    """``stem``.gif always and ``stem``.mp4 when :func:`mp4_available`, each atomically.

    Returns the files written and, if the MP4 was skipped, why."""
    from maprl.viz.plots import save_gif

    if not frames:
        raise ValueError("no frames to write")
    stem = Path(stem)
    gif = stem.with_name(stem.name + ".gif")
    with atomic_path(gif) as tmp:
        save_gif(frames, str(tmp), fps)
    if not mp4_available():
        return [gif], MP4_MISSING
    import imageio.v2 as imageio

    mp4 = stem.with_name(stem.name + ".mp4")
    with atomic_path(mp4) as tmp:
        writer = imageio.get_writer(str(tmp), format="FFMPEG", mode="I", fps=fps, codec="libx264", macro_block_size=1)
        try:
            for f in frames:
                writer.append_data(_even(f))
        finally:
            writer.close()
    return [gif, mp4], None
