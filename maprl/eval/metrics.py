"""Per-episode outcomes summarised per method and split.

Per episode (one row of ``episodes.csv``):

* ``success``: ground truth, the final view centre lies within ``success_radius`` of the
  target centre. An agent that stops far away fails.
* ``stopped``: the agent's own stop rule fired (similarity >= ``stop_threshold``).
* ``spl``: success weighted by path length (Anderson et al. 2018), ``S * l / max(p, l)`` with
  ``l`` the start distance to the target centre and ``p`` the path flown; 0 on failure.
* ``texture``: the target's texture (mean grey gradient of its map crop; low = featureless);
  results by texture bin show a map's hard places instead of averaging them away.
* ``final_feature_cosine`` (the env's similarity) and ``final_pixel_cosine`` (raw uint8
  pixels of the final view against the target photo), ``episode_reward`` (sum).
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd

HEADLINE = "agent"


def spl(success: np.ndarray, shortest: np.ndarray, path: np.ndarray) -> np.ndarray:
    """Success weighted by path length: ``S * l / max(p, l)`` (1 for a success with l = p = 0)."""
    s, lo, p = np.asarray(success, float), np.asarray(shortest, float), np.asarray(path, float)
    denom = np.maximum(p, lo)
    ratio = np.divide(lo, denom, out=np.ones_like(lo), where=denom > 0)
    return s * ratio


def interval_estimates(
    scores: dict[str, np.ndarray],
    statistic: Callable[[np.ndarray], np.ndarray],
    reps: int,
    seed: int,
    task_bootstrap: bool = False,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """rliable's point estimates and 95 % stratified-bootstrap intervals (Agarwal et al. 2021), seeded by ``seed``.

    rliable's ``StratifiedBootstrap`` draws its resamples from numpy's global generator
    (``np.random.choice``), not from the ``random_state`` it is given, so its intervals would
    depend on whatever ran before. The global generator is therefore seeded here and restored after.
    """
    from rliable import library as rly

    saved = np.random.get_state()
    np.random.seed(seed)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # arch: random_state -> generator, inside rliable
            return rly.get_interval_estimates(
                scores, statistic, reps=reps, task_bootstrap=task_bootstrap, random_state=np.random.RandomState(seed)
            )
    finally:
        np.random.set_state(saved)


def bin_labels(edges: Sequence[float]) -> list[str]:
    """``[250, 500]`` -> ``["0-250", "250-500", "500+"]``."""
    e = [0.0, *sorted(float(x) for x in edges)]
    return [f"{a:g}-{b:g}" for a, b in itertools.pairwise(e)] + [f"{e[-1]:g}+"]


def distance_bin(start_distance: np.ndarray, edges: Sequence[float]) -> np.ndarray:
    """Bin label of each start distance."""
    labels = np.array(bin_labels(edges))
    return labels[np.digitize(np.asarray(start_distance, float), sorted(float(x) for x in edges))]


def _num(x: Any) -> float | None:
    x = float(x)
    return None if not np.isfinite(x) else x


def _by_bin(values: np.ndarray, success: np.ndarray, edges: Sequence[float]) -> dict[str, np.ndarray]:
    bins = distance_bin(values, edges)
    return {lab: success[bins == lab] for lab in bin_labels(edges)}


def _split_summary(d: pd.DataFrame, edges: Sequence[float], texture_edges: Sequence[float] = ()) -> dict[str, Any]:
    by_bin = _by_bin(d["start_distance_px"].to_numpy(), d["success"].to_numpy(), edges)
    extra: dict[str, Any] = {}
    if texture_edges and "texture" in d:
        by_tex = _by_bin(d["texture"].to_numpy(), d["success"].to_numpy(), texture_edges)
        extra["success_by_texture"] = {k: _num(v.mean()) if len(v) else None for k, v in by_tex.items()}
        extra["episodes_by_texture"] = {k: len(v) for k, v in by_tex.items()}
    return {
        "episodes": len(d),
        "success_rate": _num(d["success"].mean()),
        "spl": _num(d["spl"].mean()),
        "stop_rate": _num(d["stopped"].mean()),
        "false_stop_rate": _num((d["stopped"] & ~d["success"]).mean()),
        "final_distance_px_mean": _num(d["final_distance_px"].mean()),
        "final_distance_px_median": _num(d["final_distance_px"].median()),
        "final_distance_m_mean": _num(d["final_distance_m"].mean()),
        "final_distance_m_median": _num(d["final_distance_m"].median()),
        "steps_mean": _num(d["steps"].mean()),
        "final_feature_cosine_mean": _num(d["final_feature_cosine"].mean()),
        "final_pixel_cosine_mean": _num(d["final_pixel_cosine"].mean()),
        "mean_episode_reward": _num(d["episode_reward"].mean()),
        "success_by_distance": {k: _num(v.mean()) if len(v) else None for k, v in by_bin.items()},
        "episodes_by_distance": {k: len(v) for k, v in by_bin.items()},
        **extra,
    }


def summarise(df: pd.DataFrame, bins: Sequence[float], texture_bins: Sequence[float] = ()) -> dict[str, dict[str, Any]]:
    """Per split: rates, distances, steps, cosines, reward and success by start-distance bin.

    NaN (e.g. metres on a pixel-grid map, an empty bin) becomes ``None`` so the JSON is strict.
    """
    return {str(s): _split_summary(df[df["split"] == s], bins, texture_bins) for s in pd.unique(df["split"])}


def methods_table(df: pd.DataFrame, bins: Sequence[float]) -> pd.DataFrame:
    """Tidy table: one row per method and split with the scalar summary metrics."""
    rows = []
    for method, d in df.groupby("method", sort=False):
        for split, s in summarise(d, bins).items():
            scalars = {k: v for k, v in s.items() if not isinstance(v, dict)}
            rows.append({"method": method, "split": split, **scalars})
    return pd.DataFrame(rows)


def distance_table(df: pd.DataFrame, bins: Sequence[float], column: str = "start_distance_px") -> pd.DataFrame:
    """Tidy table: success rate and SPL per method, split and start-distance bin (or bin of ``column``)."""
    d = df.assign(bin=distance_bin(df[column].to_numpy(), bins))
    edges = [0.0, *sorted(float(x) for x in bins), float("inf")]
    rows = []
    for (method, split), g in d.groupby(["method", "split"], sort=False):
        for k, lab in enumerate(bin_labels(bins)):
            sel = g[g["bin"] == lab]
            rows.append(
                {
                    "method": method,
                    "split": split,
                    "bin": lab,
                    "bin_lo": edges[k],
                    "bin_hi": edges[k + 1],
                    "episodes": len(sel),
                    "success_rate": _num(sel["success"].mean()) if len(sel) else None,
                    "spl": _num(sel["spl"].mean()) if len(sel) else None,
                }
            )
    return pd.DataFrame(rows)


def texture_table(df: pd.DataFrame, bins: Sequence[float]) -> pd.DataFrame:
    """Tidy table: success rate and SPL per method, split and target-texture bin (empty without textures)."""
    if "texture" not in df:
        return pd.DataFrame(columns=["method", "split", "bin", "bin_lo", "bin_hi", "episodes", "success_rate", "spl"])
    return distance_table(df, bins, column="texture")


def metrics_dict(
    df: pd.DataFrame, bins: Sequence[float], stop_threshold: float | None = None, headline: str = HEADLINE,
    texture_bins: Sequence[float] = (),
) -> dict[str, Any]:  # fmt: skip
    """``{"agent": {split: ...}, "baselines": {method: {split: ...}}, "stop_threshold": ...}``."""
    out: dict[str, Any] = {"baselines": {}, "stop_threshold": stop_threshold}
    for method, d in df.groupby("method", sort=False):
        summary = summarise(d, bins, texture_bins)
        if method == headline:
            out[headline] = summary
        else:
            out["baselines"][str(method)] = summary
    return out
