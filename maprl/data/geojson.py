"""GeoJSON (RFC 7946) of located photos: WGS84 longitude/latitude, counter-clockwise exterior rings.

Geometry comes in map pixels (x = column, y = row, fractional) and is converted with the map's
CRS (:meth:`~maprl.data.geo.MapData.pixel_to_lonlat`), so any projected or geographic map works.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from maprl.data.geo import MapData
from maprl.errors import InputError

DECIMALS = 7  # about 1 cm


def footprint(x: float, y: float, side: float, heading_deg: float) -> np.ndarray:
    """The closed square (5, 2) in map pixels of a view of ``side`` centred at (x, y), turned so that
    its top faces ``heading_deg`` (clockwise from the map's up). Corners: top-left, top-right,
    bottom-right, bottom-left, top-left."""
    h = np.radians(heading_deg)
    up = np.array([np.sin(h), -np.cos(h)])  # rows grow downwards
    right = np.array([np.cos(h), np.sin(h)])
    half = side / 2
    corners = [(-1, 1), (1, 1), (1, -1), (-1, -1), (-1, 1)]
    return np.array([[x, y] + half * (u * right + v * up) for u, v in corners])


def lonlat(m: MapData, xy: np.ndarray) -> list[list[float]]:
    """Map pixels (N, 2) to [[lon, lat], ...] rounded to :data:`DECIMALS`."""
    if m.crs is None:
        raise InputError("the map has no coordinate reference system (a plain image), so there is no GeoJSON")
    xy = np.asarray(xy, float).reshape(-1, 2)
    lon, lat = m.pixel_to_lonlat(xy[:, 0], xy[:, 1])
    return [[round(float(a), DECIMALS), round(float(b), DECIMALS)] for a, b in zip(lon, lat, strict=True)]


def _ccw(ring: list[list[float]]) -> list[list[float]]:
    """``ring`` (closed) counter-clockwise, as RFC 7946 wants exterior rings."""
    a = np.asarray(ring)
    area2 = float(np.sum(a[:-1, 0] * a[1:, 1] - a[1:, 0] * a[:-1, 1]))
    return ring if area2 > 0 else ring[::-1]


def feature(geometry: dict[str, Any], properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "Feature", "geometry": geometry, "properties": properties}


def answer_features(
    m: MapData,
    xy: np.ndarray,
    footprint_px: np.ndarray,
    path_px: np.ndarray,
    alternatives_px: np.ndarray,
    properties: dict[str, Any],
    alternative_scores: list[float],
) -> list[dict[str, Any]]:
    """The features of one answer: a Point (``properties`` plus ``role: answer``), the Polygon of the
    matched view, the LineString of the flown path and a Point per alternative place."""
    name = {"photo": properties.get("photo")}
    path = lonlat(m, path_px)
    if len(path) < 2:  # RFC 7946: a LineString has two or more positions; no move is a zero-length line
        path = path * 2
    out = [
        feature({"type": "Point", "coordinates": lonlat(m, xy)[0]}, {"role": "answer", **properties}),
        feature({"type": "Polygon", "coordinates": [_ccw(lonlat(m, footprint_px))]}, {"role": "footprint", **name}),
        feature({"type": "LineString", "coordinates": path}, {"role": "path", "steps": len(path_px) - 1, **name}),
    ]
    for rank, (pt, score) in enumerate(zip(lonlat(m, alternatives_px), alternative_scores, strict=True), start=1):
        props = {"role": "alternative", "rank": rank, "similarity": round(float(score), 4), **name}
        out.append(feature({"type": "Point", "coordinates": pt}, props))
    return out


def feature_collection(features: list[dict[str, Any]]) -> dict[str, Any]:
    return {"type": "FeatureCollection", "features": features}
