"""User-facing errors: each says what went wrong and what to do about it."""

from __future__ import annotations


class MapRLError(Exception):
    """An error the user can fix; the CLI prints it without a traceback and exits 2."""


class ParamsError(MapRLError):
    """params.yaml is malformed: the message names the key and what is allowed."""


class InputError(MapRLError):
    """An input file is missing, unreadable or corrupt."""


class EarthEngineError(MapRLError):
    """Earth Engine could not deliver imagery: credentials, project, quota or empty collection."""
