"""maprl: locate a photo on a map with a reinforcement-learning agent.

``from maprl import locate; result = locate("photo.jpg")`` answers with a
:class:`~maprl.locator.LocateResult` (see :mod:`maprl.locator`).
"""

import importlib
import os
import platform
from pathlib import Path
from typing import Any

from gymnasium.envs.registration import register, registry

__version__ = "0.1.0"

ENV_ID = "maprl/SatelliteNav-v0"
GRID_ENV_ID = "maprl/GridNav-v0"  # the published grid protocol (maprl.nav.grid); it truncates at its own budget

if ENV_ID not in registry:
    register(id=ENV_ID, entry_point="maprl.nav.env:SatelliteNavEnv", max_episode_steps=1000)
if GRID_ENV_ID not in registry:
    register(id=GRID_ENV_ID, entry_point="maprl.nav.grid:GridNavEnv")


def _pin_cpu_code_paths() -> None:
    """Pin the CPU code paths that float results depend on, so machines of other CPU generations
    compute the same numbers: ATen's vector kernels, MKL (conditional numerical reproducibility)
    and oneDNN all use AVX2, even where AVX-512 is there. A value the user set is kept. Set
    before torch computes anything; measured in README "Reproducibility" (no slowdown here)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return
    if " avx2" in flags:
        for key, value in (("ATEN_CPU_CAPABILITY", "avx2"), ("MKL_CBWR", "AVX2"), ("DNNL_MAX_CPU_ISA", "AVX2")):
            os.environ.setdefault(key, value)


_pin_cpu_code_paths()


_LAZY = {"locate": "locate", "Locator": "Locator", "LocateResult": "LocateResult"}


def __getattr__(name: str) -> Any:
    """``maprl.locate``, ``maprl.Locator`` and ``maprl.LocateResult``, imported on first use (torch is heavy)."""
    if name in _LAZY:  # PEP 562: the pipeline stages never pay for (or depend on) the locator
        return getattr(importlib.import_module("maprl.locator"), _LAZY[name])
    raise AttributeError(f"module 'maprl' has no attribute {name!r}")
