"""A trained agent: loading its SB3 policy by algorithm name, and flying it as a controller.

:func:`algo_class` is the one table from ``train.algo`` (:data:`maprl.config.ALGOS`) to the SB3 /
sb3-contrib class; training (build and resume) and evaluation both use it.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from stable_baselines3 import PPO
from stable_baselines3.common.base_class import BaseAlgorithm

from maprl.config import ALGOS
from maprl.errors import InputError

if TYPE_CHECKING:
    from maprl.nav.vecenv import NavVecEnv


def algo_class(algo: str) -> type[BaseAlgorithm]:
    """The SB3 / sb3-contrib class of ``train.algo``."""
    if algo in ("ppo", "a2c", "reinforce", "sac", "td3", "dqn"):
        import stable_baselines3 as sb3

        table: dict[str, type[BaseAlgorithm]] = {
            "ppo": PPO, "a2c": sb3.A2C, "reinforce": sb3.A2C, "sac": sb3.SAC, "td3": sb3.TD3, "dqn": sb3.DQN,
        }  # fmt: skip
        return table[algo]
    if algo in ("recurrent_ppo", "qrdqn"):
        import sb3_contrib

        return sb3_contrib.RecurrentPPO if algo == "recurrent_ppo" else sb3_contrib.QRDQN
    raise ValueError(f"unknown train.algo {algo!r}; one of {', '.join(ALGOS)}")


def load_policy(path: str | Path, algo: str, env: Any = None) -> BaseAlgorithm:
    """Load a saved model of ``algo``; a missing or unreadable file is an :class:`InputError`."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"policy {path} does not exist; run `dvc repro train` first")
    try:
        return algo_class(algo).load(path, env=env, device="cpu")
    except (zipfile.BadZipFile, EOFError, KeyError, ValueError, RuntimeError, OSError) as err:
        raise InputError(
            f"cannot load policy {path} as a {algo} model ({type(err).__name__}: {err}); it is truncated, "
            "corrupt or from another version: rerun `dvc repro train`"
        ) from None


POLICY_INFO = "maprl.json"
"""The entry of a saved policy.zip holding what it was trained with and on (SB3 ignores it)."""


def read_policy_info(path: str | Path) -> dict[str, Any]:
    """The training fingerprint saved inside ``path`` (params, and hashes of the map, features and stop)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"policy {path} does not exist; run `dvc repro train` first")
    try:
        with zipfile.ZipFile(path) as z:
            info = json.loads(z.read(POLICY_INFO))
    except KeyError:
        raise InputError(
            f"policy {path} carries no record of the map and features it was trained on (an older maprl "
            "made it); rerun `dvc repro train`"
        ) from None
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        raise InputError(f"policy {path} is damaged ({type(err).__name__}: {err}); rerun `dvc repro train`") from None
    if not isinstance(info, dict) or not isinstance(info.get("data"), dict):
        raise InputError(f"policy {path}: {POLICY_INFO} is not a maprl training record; rerun `dvc repro train`")
    return info


def _fresh(venv: NavVecEnv) -> np.ndarray:
    """Agents at the first step of an episode (after a reset or an auto-reset)."""
    return np.asarray(venv.core.steps == 0)


def _is_recurrent(model: Any) -> bool:
    try:
        from sb3_contrib import RecurrentPPO
    except ImportError:  # pragma: no cover - sb3-contrib is a dependency
        return False
    return isinstance(model, RecurrentPPO)


class AgentController:
    """A trained SB3 model, deterministic. Recurrent models keep their LSTM state per agent.

    ``obs_transform`` is applied to observations first (e.g. ``VecNormalize.normalize_obs``).
    """

    def __init__(
        self,
        model: Any,
        recurrent: bool | None = None,
        obs_transform: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None,
    ) -> None:
        self.model = model
        self.recurrent = _is_recurrent(model) if recurrent is None else recurrent
        self.obs_transform = obs_transform
        self.state: Any = None

    def reset(self, venv: NavVecEnv) -> None:
        self.state = None

    def act(self, obs: dict[str, np.ndarray], venv: NavVecEnv) -> np.ndarray:
        if self.obs_transform is not None:
            obs = self.obs_transform(obs)
        if self.recurrent:
            start = _fresh(venv)  # True at each agent's first step, also after an auto-reset
            actions, self.state = self.model.predict(obs, state=self.state, episode_start=start, deterministic=True)
        else:
            actions, _ = self.model.predict(obs, deterministic=True)
        space = venv.action_space
        return np.asarray(actions, space.dtype).reshape(venv.num_envs, *(space.shape or ()))
