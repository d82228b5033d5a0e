"""Confidence that means what it says: fitted on validation targets, measured on test targets.

The ``evaluate`` stage builds query sets (:func:`calibration_queries`) for the validation part
of the train split and for the test split. Every target gives one photo of each kind:

| kind            | photo                                                                   |
|-----------------|-------------------------------------------------------------------------|
| ``same``        | the map's own crop                                                      |
| ``domain_<d>``  | cut from query domain ``d`` (another season or date)                    |
| ``perturbed``   | from a random domain, one random perturbation up to ``calibration_strength`` |
| ``rotated``     | the map's crop at a uniformly random heading (true heading known)       |
| ``foreign``     | the map's crop mirrored: a place that is not on the map, never right     |

Each locate method (:mod:`maprl.eval.locate`) answers them all. :func:`fit_calibrator` fits a
logistic regression of "the answer lies within the success radius" on the answer's evidence
(:data:`~maprl.eval.locate.EVIDENCE`), then an isotonic regression of the outcome on its
score, on the validation answers only (scikit-learn). The test answers measure it: the
expected calibration error (:func:`expected_calibration_error`), the reliability diagram, the
precision of answers with confidence >= 0.9, and abstention (confidence below
``locate.abstain_below``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from maprl.config import LOCATE_METHODS, Params
from maprl.errors import InputError
from maprl.eval.locate import EVIDENCE, embed_aligned, locate_photos, method_setup
from maprl.features.photos import Embedded, perturbed_photos, randomized_photos, target_photos
from maprl.io import write_json
from maprl.nav.runtime import Runtime, asset_fingerprint

HIGH = 0.9
"""The confidence level whose precision is a target: answers at or above it should be right >= 90 %."""


@dataclass
class QuerySet:
    """Photos with their truth: where they were cut, whether a right answer exists, their heading."""

    kind: np.ndarray  # (N,) str
    target_id: np.ndarray  # (N,)
    photos: np.ndarray  # (N, V, V, 3) uint8
    truth_xy: np.ndarray  # (N, 2)
    possible: np.ndarray  # (N,) bool: False for photos of places not on the map
    heading_deg: np.ndarray  # (N,) true heading (clockwise), NaN where unknown


def calibration_queries(rt: Runtime, split: str, seed: int, strength: float) -> QuerySet:
    """One photo of every kind (module docstring) for each target of ``split``."""
    sc = rt.scene
    rows = sc.split_rows(split)
    xy, ids, view = sc.targets_xy[rows], sc.targets["id"].to_numpy()[rows], sc.view_size
    rng = np.random.default_rng([seed, 41, len(split)])
    same = np.stack([sc.target_photo(int(r)) for r in rows])
    parts: list[tuple[str, np.ndarray, bool, np.ndarray]] = [("same", same, True, np.zeros(len(rows)))]
    for d in (d for d in rt.imagery if d != "same"):
        parts.append((f"domain_{d}", target_photos(rt.imagery[d], xy, view), True, np.zeros(len(rows))))
    names = list(rt.imagery)
    pick = rng.integers(len(names), size=len(rows))
    perturbed = np.empty_like(same)
    for k, name in enumerate(names):
        mine = np.flatnonzero(pick == k)
        perturbed[mine] = randomized_photos(rt.imagery[name], xy[mine], view, strength, rng, n_kinds=1)
    parts.append(("perturbed", perturbed, True, np.full(len(rows), np.nan)))
    rotated, angles = perturbed_photos(sc.map.rgb, xy, view, "rotation", 1.0, rng)  # any heading
    parts.append(("rotated", rotated, True, np.mod(angles, 360.0)))
    parts.append(("foreign", same[:, :, ::-1].copy(), False, np.full(len(rows), np.nan)))
    n = len(rows)
    return QuerySet(
        kind=np.concatenate([np.full(n, k, dtype=object) for k, *_ in parts]),
        target_id=np.tile(ids, len(parts)),
        photos=np.concatenate([p for _, p, *_ in parts]),
        truth_xy=np.tile(xy, (len(parts), 1)),
        possible=np.concatenate([np.full(n, ok) for _, _, ok, _ in parts]),
        heading_deg=np.concatenate([h for *_, h in parts]),
    )


def angle_error(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Absolute difference of two headings, degrees in [0, 180]."""
    d = np.mod(np.asarray(a, float) - np.asarray(b, float), 360.0)
    return np.minimum(d, 360.0 - d)


def answer_queries(
    params: Params, rt: Runtime, q: QuerySet, emb: Embedded, method: str, policy: str | Path | None
) -> pd.DataFrame:
    """One row per query (embedded as ``emb``): its kind, the answer's evidence, whether it is right, its errors."""
    lp = params.locate
    cfg, controller = method_setup(params, rt, method, policy)
    res = locate_photos(
        rt, q.photos, cfg, controller, restarts=lp.restarts, top_k=lp.top_k, embedded=emb, truth_xy=q.truth_xy
    )
    dist = np.hypot(*(res.xy - q.truth_xy).T)
    df = pd.DataFrame({"method": method, "kind": q.kind, "target_id": q.target_id})
    df = pd.concat([df, res.evidence_frame()], axis=1)
    df["success"] = (dist <= params.evaluate.success_radius) & q.possible
    df["distance_px"] = np.where(q.possible, dist, np.nan)
    df["distance_m"] = np.where(q.possible, rt.scene.map.distance_m(res.xy, q.truth_xy), np.nan)
    df["heading_error_deg"] = angle_error(res.heading_deg, q.heading_deg)
    df["steps"] = res.steps
    return df


@dataclass
class Calibrator:
    """Evidence -> probability that the answer is right: standardise, logistic score, isotonic map."""

    mean: list[float]
    scale: list[float]
    coef: list[float]
    intercept: float
    iso_x: list[float]
    iso_y: list[float]
    n_fit: int
    constant: float | None = None  # set when the fitting answers were all right or all wrong

    def __call__(self, evidence: np.ndarray) -> np.ndarray:
        ev = np.atleast_2d(np.asarray(evidence, float))
        if self.constant is not None:
            return np.full(len(ev), self.constant)
        z = (np.nan_to_num(ev) - np.asarray(self.mean)) / np.asarray(self.scale)
        score = 1.0 / (1.0 + np.exp(-(z @ np.asarray(self.coef) + self.intercept)))
        return np.clip(np.interp(score, self.iso_x, self.iso_y), 0.0, 1.0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"evidence": list(EVIDENCE)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Calibrator:
        if list(d.get("evidence", [])) != list(EVIDENCE):
            raise ValueError(f"evidence {d.get('evidence')} is not {list(EVIDENCE)}")
        fields = {k: d[k] for k in cls.__dataclass_fields__}
        cal = cls(**fields)
        arrays = (cal.mean, cal.scale, cal.coef, cal.iso_x, cal.iso_y, [cal.intercept])
        if not all(np.all(np.isfinite(np.asarray(a, float))) for a in arrays):
            raise ValueError("non-finite numbers")
        return cal


def fit_calibrator(evidence: np.ndarray, right: np.ndarray) -> Calibrator:
    """Fit on (N, len(EVIDENCE)) evidence and (N,) outcomes (scikit-learn, deterministic)."""
    from sklearn.isotonic import IsotonicRegression
    from sklearn.linear_model import LogisticRegression

    x, y = np.nan_to_num(np.asarray(evidence, float)), np.asarray(right, bool).astype(int)
    mean, scale = x.mean(axis=0), np.maximum(x.std(axis=0), 1e-6)
    if len(np.unique(y)) < 2:
        empty: list[float] = []
        k = x.shape[1]
        return Calibrator(mean.tolist(), scale.tolist(), [0.0] * k, 0.0, empty, empty, len(y), float(y.mean()))
    z = (x - mean) / scale
    logit = LogisticRegression(C=1.0, max_iter=1000).fit(z, y)
    score = logit.predict_proba(z)[:, 1]
    iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(score, y)
    return Calibrator(
        mean.tolist(), scale.tolist(), logit.coef_[0].tolist(), float(logit.intercept_[0]),
        iso.X_thresholds_.tolist(), iso.y_thresholds_.tolist(), len(y),
    )  # fmt: skip


def reliability_table(conf: np.ndarray, right: np.ndarray, bins: int) -> pd.DataFrame:
    """Per equal-width confidence bin: its range, count, mean confidence and share right."""
    conf, right = np.asarray(conf, float), np.asarray(right, bool)
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1]), 0, bins - 1)
    rows = []
    for b in range(bins):
        m = idx == b
        rows.append(
            {
                "bin_low": edges[b],
                "bin_high": edges[b + 1],
                "count": int(m.sum()),
                "confidence": float(conf[m].mean()) if m.any() else float("nan"),
                "accuracy": float(right[m].mean()) if m.any() else float("nan"),
            }
        )
    return pd.DataFrame(rows)


def expected_calibration_error(conf: np.ndarray, right: np.ndarray, bins: int) -> float:
    """Sum over equal-width bins of (share of answers) x |share right - mean confidence|."""
    t = reliability_table(conf, right, bins)
    used = t[t["count"] > 0]
    return float((used["count"] * (used["accuracy"] - used["confidence"]).abs()).sum() / max(1, len(conf)))


def _share(mask: np.ndarray) -> float | None:
    return float(np.mean(mask)) if len(mask) else None


def summarise_confidence(df: pd.DataFrame, abstain_below: float, bins: int) -> dict[str, Any]:
    """Calibration and abstention figures of answered queries (columns ``confidence``, ``success``, ``kind``)."""
    conf, right = df["confidence"].to_numpy(float), df["success"].to_numpy(bool)
    high, located = conf >= HIGH, conf >= abstain_below
    rot = df[df["kind"] == "rotated"]
    by_kind = {
        str(k): {
            "n": len(g),
            "success_rate": float(g["success"].mean()),
            "abstention_rate": float((g["confidence"] < abstain_below).mean()),
            "mean_confidence": float(g["confidence"].mean()),
        }
        for k, g in df.groupby("kind", sort=True)
    }
    return {
        "n": len(df),
        "success_rate": float(right.mean()) if len(df) else None,
        "ece": expected_calibration_error(conf, right, bins),
        "n_confidence_ge_0.9": int(high.sum()),
        "precision_confidence_ge_0.9": float(right[high].mean()) if high.any() else None,
        "abstention_rate": _share(~located),
        "precision_located": float(right[located].mean()) if located.any() else None,
        "coverage_right": float((right & located).sum() / max(1, right.sum())),
        "rotated_heading_error_median_deg": float(rot["heading_error_deg"].median()) if len(rot) else None,
        "by_kind": by_kind,
    }


def fit_split(rt: Runtime, *, say: bool = False) -> str:
    """The split calibration is fitted on: ``val`` (held out of training), else ``train``; never ``test``.
    With ``say``, a fit on ``train`` is announced."""
    split = "val" if (rt.scene.targets["split"] == "val").any() else "train"
    if say and split != "val":
        print("evaluate: no validation targets (train.val_fraction 0): confidence is fitted on the train split")
    return split


def locate_methods(policy: str | Path | None) -> list[str]:
    """The locate methods that get a calibrator: every one with a ``policy``, else ``retrieve_then_fly`` only."""
    return [m for m in LOCATE_METHODS if policy is not None or m != "agent"]


def split_answers(params: Params, rt: Runtime, split: str, policy: str | Path | None) -> pd.DataFrame:
    """Every locate method's answers to ``split``'s calibration queries (column ``split``), method by method."""
    q = calibration_queries(rt, split, params.base.seed, params.locate.calibration_strength)
    emb = embed_aligned(rt, q.photos, None)  # shared by the methods
    frames = [answer_queries(params, rt, q, emb, m, policy).assign(split=split) for m in locate_methods(policy)]
    return pd.concat(frames, ignore_index=True)


def fit_calibrators(fit: pd.DataFrame, test: pd.DataFrame) -> tuple[dict[str, Calibrator], pd.DataFrame]:
    """Per method: a calibrator fitted on its ``fit`` answers; every answer (``fit`` then ``test``, method by
    method) with its ``confidence``. The answers come from :func:`split_answers`."""
    calibrators, frames = {}, []
    for method in pd.unique(fit["method"]):
        mine = [d[d["method"] == method].reset_index(drop=True) for d in (fit, test)]
        cal = fit_calibrator(mine[0][list(EVIDENCE)].to_numpy(), mine[0]["success"].to_numpy())
        calibrators[str(method)] = cal
        for df in mine:
            df["confidence"] = cal(df[list(EVIDENCE)].to_numpy())
            frames.append(df)
    return calibrators, pd.concat(frames, ignore_index=True)


def calibrate_methods(
    params: Params, rt: Runtime, policy: str | Path | None
) -> tuple[dict[str, Calibrator], pd.DataFrame]:
    """Fit a calibrator per locate method on the fitting split; answer the test split with each.

    Returns the calibrators and every answer (column ``split``: the fitting split or ``test``)
    with its ``confidence``. Without a ``policy``, only ``retrieve_then_fly`` is calibrated.
    The ``evaluate`` stage runs the two :func:`split_answers` in its worker processes.
    """
    fit_on = fit_split(rt, say=True)
    return fit_calibrators(split_answers(params, rt, fit_on, policy), split_answers(params, rt, "test", policy))


CALIBRATION_FILE = "calibration.json"


def save_calibration(path: str | Path, calibrators: dict[str, Calibrator], rt: Runtime, params: Params) -> None:
    """``calibration.json``: the calibrator of each method, the settings it holds for, and what map it belongs to."""
    lp = params.locate
    write_json(
        path,
        {
            "assets": asset_fingerprint(rt),
            "settings": {"restarts": lp.restarts, "max_steps": params.evaluate.max_steps,
                         "success_radius": params.evaluate.success_radius, "view_size": params.tile.view_size},
            "methods": {m: c.to_dict() for m, c in calibrators.items()},
        },
    )  # fmt: skip


def load_calibration(path: str | Path) -> dict[str, Any]:
    """Read ``calibration.json`` (see :func:`save_calibration`); its ``methods`` become :class:`Calibrator` objects."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"confidence calibration {path} does not exist; run `dvc repro evaluate` first")
    try:
        raw = json.loads(path.read_text())
        raw["methods"] = {m: Calibrator.from_dict(d) for m, d in raw["methods"].items()}
        _ = raw["assets"], raw["settings"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise InputError(
            f"confidence calibration {path} is damaged ({type(err).__name__}: {err}); rerun `dvc repro evaluate`"
        ) from None
    return dict(raw)
