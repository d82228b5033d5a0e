"""Perturbation saliency of a trained agent (Greydanus et al. 2018, "Visualizing and Understanding Atari Agents").

For a view ``I`` (the target photo or the current view) and a location on a grid every ``stride``
pixels, the perturbed view is ``I * (1 - M) + blur(I) * M``: ``M`` is a Gaussian mask of ``sigma``
pixels centred there (1 at its centre) and ``blur(I)`` the view under a Gaussian blur of ``blur``
pixels, so the patch loses its detail but keeps its colours. The perturbed view then takes the path
the env's observation takes: a feature policy's view is re-embedded by the map's encoder
(``space.embed_view``) and the observation rebuilt as :class:`~maprl.nav.core.NavCore` builds it, with
every similarity in the ``nav`` vector recomputed from the new embedding; a pixel policy gets the
perturbed pixels themselves. Each location scores

    actor  = 0.5 * || pi(o) - pi(o') ||^2     pi: the action probabilities (Discrete action space)
                                              or the Gaussian's mean action (Box: continuous moves)
    critic = 0.5 * (V(o) - V(o'))^2

where ``o'`` is the observation with the perturbed view and ``o`` the one rebuilt from the unperturbed
views through the same re-embedding path (not the env's cache lookup, which differs slightly from an
embedding of the crop), so a view that a perturbation leaves unchanged scores exactly 0. The coarse
(grid) maps are upsampled bilinearly to the view for display (:meth:`StepSaliency.full`).

What one step's perturbation changes and what it keeps: as Greydanus et al. keep the recurrent
state of the unperturbed history, only what the env computes from the views *at this step* is
recomputed: the target embedding, the current embedding, the own similarity, the retrieval
candidates' similarities to the target (their places stay those retrieved at the episode's start),
the similarity of the current view to each candidate's view, and the best similarity seen at a
candidate the agent stands on now. The similarity history of earlier steps, the visited flags and the
candidates' places are the episode's memory and stay as they were (at step 0, where the history is
the current similarity repeated, it is recomputed too).

:func:`fly` runs one episode of a policy step by step (deterministic, as evaluation flies it) and keeps
the env's state at every observation; :func:`episode_saliency` scores chosen steps of it;
:func:`write_saliency` draws PNGs of steps and the episode video (:mod:`maprl.viz.saliency`).
"""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch
from gymnasium import spaces
from scipy.ndimage import gaussian_filter, map_coordinates

from maprl.config import Params, agent_variant
from maprl.data.perturb import rotate
from maprl.errors import InputError
from maprl.eval.agents import load_policy
from maprl.eval.locate import embed_aligned
from maprl.features.memory import MapMemory
from maprl.features.spaces import FeatureSpace
from maprl.io import atomic_path
from maprl.nav.core import NavConfig, NavCore
from maprl.nav.runtime import Runtime, nav_config
from maprl.nav.scene import Scene
from maprl.viz.saliency import SaliencyPanels, plot_saliency_step, saliency_frames, write_video

KINDS = ("actor", "critic")
VIEWS = ("target", "current")


@dataclass(frozen=True)
class SaliencySettings:
    """Where and how views are perturbed (pixels of the view)."""

    stride: int = 16  # grid step of the mask centres (16: one feature cell of the default encoder on the view)
    sigma: float = 8.0  # Gaussian mask, standard deviation
    blur: float = 5.0  # Gaussian blur of the view that the mask blends in, standard deviation
    batch: int = 64  # perturbed views per encoder (and policy) call

    def check(self, view_size: int) -> None:
        if not 1 <= self.stride <= view_size:
            raise InputError(f"saliency stride {self.stride} must lie in [1, {view_size}] (the view's side)")
        if not (0 < self.sigma < float("inf") and 0 < self.blur < float("inf")):
            raise InputError(f"saliency sigma ({self.sigma}) and blur ({self.blur}) must be positive pixels")
        if self.batch < 1:
            raise InputError(f"saliency batch {self.batch} must be >= 1")


def mask_centres(size: int, stride: int) -> np.ndarray:
    """Mask centres along one side of a view: every ``stride`` pixels, starting half a stride in."""
    return np.arange(stride // 2, size, stride)


def gaussian_masks(shape: tuple[int, int], centres: np.ndarray, sigma: float) -> np.ndarray:
    """(N, H, W) float32 Gaussian masks, 1 at each (y, x) centre of ``centres`` (N, 2)."""
    h, w = shape
    gy = np.exp(-((np.arange(h)[None, :] - centres[:, :1]) ** 2) / (2 * sigma**2))
    gx = np.exp(-((np.arange(w)[None, :] - centres[:, 1:]) ** 2) / (2 * sigma**2))
    return (gy[:, :, None] * gx[:, None, :]).astype(np.float32)


def blurred(view: np.ndarray, sigma: float) -> np.ndarray:
    """(H, W, 3) float32: ``view`` under a Gaussian blur of ``sigma`` pixels (each channel alone)."""
    return gaussian_filter(view.astype(np.float32), sigma=(sigma, sigma, 0), mode="reflect")


def perturbed_views(view: np.ndarray, blur_img: np.ndarray, centres: np.ndarray, sigma: float) -> np.ndarray:
    """(N, H, W, 3) uint8: ``view * (1 - M) + blur_img * M`` for the mask ``M`` at each (y, x) of ``centres``.

    Only a window of 4 sigma around each centre is computed: beyond it the mask is below e^-8, so the
    change is below 0.09 of a grey level and rounds away (the result is the same as over the whole view)."""
    h, w = view.shape[:2]
    r = int(np.ceil(4 * sigma))
    out = np.repeat(view[None], len(centres), axis=0)
    base = view.astype(np.float32)
    for k, (cy, cx) in enumerate(np.asarray(centres, np.int64)):
        y0, y1, x0, x1 = max(cy - r, 0), min(cy + r + 1, h), max(cx - r, 0), min(cx + r + 1, w)
        gy = np.exp(-((np.arange(y0, y1) - cy) ** 2) / (2 * sigma**2)).astype(np.float32)
        gx = np.exp(-((np.arange(x0, x1) - cx) ** 2) / (2 * sigma**2)).astype(np.float32)
        win = base[y0:y1, x0:x1]
        mixed = win + (blur_img[y0:y1, x0:x1] - win) * (gy[:, None] * gx[None, :])[..., None]
        out[k, y0:y1, x0:x1] = np.clip(np.rint(mixed), 0, 255).astype(np.uint8)
    return out


def upsample(coarse: np.ndarray, size: int, stride: int) -> np.ndarray:
    """A coarse (gh, gw) map on the :func:`mask_centres` grid, bilinear at every pixel of a ``size`` view."""
    c = (np.arange(size) - stride // 2) / stride
    yy, xx = np.meshgrid(c, c, indexing="ij")
    return map_coordinates(coarse.astype(np.float64), [yy, xx], order=1, mode="nearest").astype(np.float32)


# -- the policy's outputs ------------------------------------------------------------------
class Probe(Protocol):
    """What saliency asks of a policy: its action distribution and value on a batch of observations."""

    kind: str  # what the action-distribution vector is: "probabilities" or "mean"

    def __call__(self, obs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(N, A) action-distribution vectors and (N,) values."""
        ...


class PolicyProbe:
    """An SB3 actor-critic policy (PPO, A2C): probabilities of a Discrete action space, the mean of a Box one.

    The policy's network runs in float64 (a copy of it): the value is of order 10-100 and a patch changes
    it by far less than float32 resolves there, so in float32 the critic saliency would be rounding noise.
    The forward pass is SB3's own (``get_distribution`` / ``predict_values``), step by step.
    """

    def __init__(self, model: Any, batch: int = 256) -> None:
        from sb3_contrib.common.recurrent.policies import RecurrentActorCriticPolicy
        from stable_baselines3.common.policies import ActorCriticPolicy

        policy = getattr(model, "policy", model)
        if isinstance(policy, RecurrentActorCriticPolicy) or not isinstance(policy, ActorCriticPolicy):
            raise InputError(
                f"saliency needs a feed-forward actor-critic policy (train.algo ppo, a2c or reinforce); this one is a "
                f"{type(policy).__name__}"
            )
        space = policy.action_space
        if isinstance(space, spaces.Discrete):
            self.kind = "probabilities"
        elif isinstance(space, spaces.Box):
            self.kind = "mean"
        else:
            raise InputError(f"saliency supports Discrete and Box action spaces, not {space}")
        self.policy = copy.deepcopy(policy).double()
        self.policy.set_training_mode(False)
        self.batch = batch
        self.observation_space = policy.observation_space

    def _forward(self, obs: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        from stable_baselines3.common.preprocessing import preprocess_obs

        p = self.policy
        tensors, _ = p.obs_to_tensor(obs)
        pre = preprocess_obs(tensors, p.observation_space, normalize_images=p.normalize_images)
        pre = {k: v.double() for k, v in pre.items()} if isinstance(pre, dict) else pre.double()
        if p.share_features_extractor:
            pi_features = vf_features = p.features_extractor(pre)
        else:
            pi_features, vf_features = p.pi_features_extractor(pre), p.vf_features_extractor(pre)
        d: Any = p._get_action_dist_from_latent(p.mlp_extractor.forward_actor(pi_features)).distribution
        vec = d.probs if self.kind == "probabilities" else d.mean
        return vec.reshape(len(vec), -1), p.value_net(p.mlp_extractor.forward_critic(vf_features)).reshape(-1)

    @torch.no_grad()
    def __call__(self, obs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        n = len(next(iter(obs.values())))
        dists, values = [], []
        for i in range(0, n, self.batch):
            vec, value = self._forward({k: v[i : i + self.batch] for k, v in obs.items()})
            dists.append(vec.numpy())
            values.append(value.numpy())
        return np.concatenate(dists).astype(np.float64), np.concatenate(values).astype(np.float64)


# -- the env's observation, rebuilt from views ----------------------------------------------
class Observer(Protocol):
    """Builds a policy's observations at one step from (codes of) the two views, as the env does."""

    def encode(self, views: np.ndarray) -> np.ndarray:
        """(N, V, V, 3) uint8 views to what :meth:`observe` takes (embeddings, or the pixels)."""
        ...

    def observe(self, target: np.ndarray, current: np.ndarray) -> dict[str, np.ndarray]:
        """The batch of observations with these target and current codes (N each)."""
        ...


class PixelObserver:
    """A pixel policy (``obs="pixels"``): the observation is the two views."""

    def encode(self, views: np.ndarray) -> np.ndarray:
        return views

    def observe(self, target: np.ndarray, current: np.ndarray) -> dict[str, np.ndarray]:
        return {"target": target, "current": current}


def _node_embeddings(memory: MapMemory, positions: np.ndarray) -> np.ndarray:
    """The memory's embeddings at grid ``positions`` (k, 2) (retrieval candidates are grid nodes)."""
    d = np.linalg.norm(memory.positions[None, :, :] - positions[:, None, :], axis=2)
    return memory.embeddings[np.argmin(d, axis=1)]


class FeatureObserver:
    """A feature policy: embeddings from ``space.embed_view`` and the env's own observation code
    (:meth:`NavCore.observe`) on a copy of its state at the step, with the view-dependent parts replaced."""

    def __init__(
        self, core: NavCore, state: dict[str, np.ndarray], prev_seen: np.ndarray, memory: MapMemory | None
    ) -> None:
        self.core, self.state, self.prev_seen = core, state, prev_seen
        self.space: FeatureSpace = core.scene.space
        self.node_embs: np.ndarray | None = None
        if core.cfg.retrieval:
            if memory is None:
                raise ValueError("a retrieval observation needs the map memory")
            retrieved = core.cands[int(state["rows"][0])]  # the row's candidates, ranked as retrieved at reset
            self.node_embs = _node_embeddings(memory, retrieved)

    def encode(self, views: np.ndarray) -> np.ndarray:
        return np.asarray(self.space.embed_view(views), np.float32)

    def observe(self, target: np.ndarray, current: np.ndarray) -> dict[str, np.ndarray]:
        n = len(target)
        sub = copy.copy(self.core)  # shallow: every array it changes is replaced, never written into
        for name in NavCore.STATE:
            setattr(sub, name, np.repeat(self.state[name], n, axis=0))
        sub.n, sub.rows = n, np.arange(n)
        sub.target_embs, sub.cur_emb = np.asarray(target, np.float32), np.asarray(current, np.float32)
        sub.sim = np.sum(sub.cur_emb * sub.target_embs, axis=1).astype(np.float32)
        if int(self.state["steps"][0]) == 0:  # at the start, the history is the current similarity repeated
            sub.sim_hist = np.repeat(sub.sim[:, None], sub.sim_hist.shape[1], axis=1)
        if self.node_embs is not None:
            # elementwise, not a matrix product: a BLAS product rounds differently with the batch's size
            sub.cand_sims = np.sum(sub.target_embs[:, None, :] * self.node_embs[None], axis=2)
            at = sub.at_candidates()
            prev = np.repeat(self.prev_seen, n, axis=0)
            sub.cand_seen = np.where(at, np.maximum(prev, sub.sim[:, None]), prev)
        return sub.observe()


# -- one episode ----------------------------------------------------------------------------
@dataclass
class Flight:
    """One episode flown by a policy: the env's state at each of its T + 1 observations."""

    core: NavCore
    memory: MapMemory | None
    states: list[dict[str, np.ndarray]]  # NavCore.STATE of the one agent, at observations 0..T
    path: np.ndarray  # (T + 1, 2) view centres
    target_xy: np.ndarray  # (2,), NaN for a photo of an unknown place
    target_view: np.ndarray  # (V, V, 3) the target as the policy's observation is built from it
    pixels: bool
    actions: list[np.ndarray] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return len(self.path) - 1

    def current_view(self, t: int) -> np.ndarray:
        return self.core.scene.view(*self.path[t])

    def observer(self, t: int) -> Observer:
        if self.pixels:
            return PixelObserver()
        prev = self.states[t - 1]["cand_seen"] if t > 0 else np.full_like(self.states[t]["cand_seen"], -np.inf)
        return FeatureObserver(self.core, self.states[t], prev, self.memory)

    def success(self) -> bool:
        d = float(np.hypot(*(self.path[-1] - self.target_xy)))
        stopped = bool(self.states[-1]["stopped"][0])
        return d <= self.core.cfg.success_radius and (stopped or not self.core.cfg.env.stop_action)


def _snapshot(core: NavCore) -> dict[str, np.ndarray]:
    return {k: getattr(core, k)[:1].copy() for k in NavCore.STATE}


def wants_pixels(model: Any) -> bool:
    """Whether a policy observes the two views as pixels (the original design's ``obs="pixels"``)."""
    target = getattr(model, "observation_space", spaces.Dict({})).spaces.get("target")
    return isinstance(target, spaces.Box) and target.shape is not None and len(target.shape) == 3


def check_spaces(model: Any, scene: Scene, cfg: NavConfig, agent: str) -> None:
    """A clear error when the policy was trained on other observations or actions than the env's of ``agent``."""
    from maprl.nav.env import feature_obs_space

    v = scene.view_size
    if wants_pixels(model):  # SB3 keeps image spaces channel-first (VecTransposeImage); predict transposes
        want: spaces.Space[Any] = spaces.Dict({k: spaces.Box(0, 255, (v, v, 3), np.uint8) for k in VIEWS})
        chw: spaces.Space[Any] = spaces.Dict({k: spaces.Box(0, 255, (3, v, v), np.uint8) for k in VIEWS})
        ok = model.observation_space in (want, chw)
    else:
        want = feature_obs_space(scene.space.dim, cfg.nav_dim(), cfg.agent.portable)
        ok = model.observation_space == want
    if not ok or model.action_space != cfg.action_space():
        raise InputError(
            f"the policy observes {model.observation_space} and acts in {model.action_space}, but agent {agent!r} "
            f"on these params and features gives {want} and {cfg.action_space()}; pass the --agent it was trained "
            "as, or retrain it (`dvc repro train`)"
        )


def fly(
    model: Any, scene: Scene, cfg: NavConfig, memory: MapMemory | None, row: int, start: Sequence[float],
    decoy: Sequence[float] = (np.nan, np.nan), target_view: np.ndarray | None = None,
) -> Flight:  # fmt: skip
    """Fly ``model`` (deterministic) on target ``row`` of ``scene`` from ``start`` until the episode ends
    (as the evaluation's vector env does), keeping the env's state at every observation.

    ``target_view`` is the target as the observation is built from it (default: a pixel policy's env
    shows the map's crop at the target, a feature policy sees the target photo's embedding)."""
    if cfg.max_steps is None:
        raise ValueError("fly needs cfg.max_steps")
    pixels = wants_pixels(model)
    core = NavCore(scene, 1, cfg, memory)
    core.reset_agents(np.array([0]), np.array([row]), np.asarray(start, float)[None], np.asarray(decoy, float)[None])
    txy = core.targets_xy[row]
    if target_view is None:
        target_view = scene.view(*txy) if pixels else scene.target_photo(row)
    states, path, actions = [_snapshot(core)], [core.pos[0].copy()], []
    space = cfg.action_space()
    while True:
        current = scene.view(*core.pos[0])[None]
        obs = {"target": target_view[None], "current": current} if pixels else core.observe()
        action, _ = model.predict(obs, deterministic=True)
        action = np.asarray(action, space.dtype).reshape(1, *(space.shape or ()))
        _, terminated, truncated = core.step(action)
        actions.append(action[0])
        states.append(_snapshot(core))
        path.append(core.pos[0].copy())
        if terminated[0] or truncated[0]:
            break
    return Flight(core, memory, states, np.stack(path), np.asarray(txy, float), target_view, pixels, actions)


# -- saliency of one step ---------------------------------------------------------------------
@dataclass
class StepSaliency:
    """Coarse actor and critic saliency of the target and current views at one step."""

    step: int
    target_view: np.ndarray
    current_view: np.ndarray
    maps: dict[tuple[str, str], np.ndarray]  # (view, kind) -> (gh, gw) on the mask_centres grid
    stride: int
    distribution: np.ndarray  # the unperturbed action-distribution vector
    value: float
    seconds: float

    def full(self, view: str, kind: str) -> np.ndarray:
        """The (V, V) map of ``view`` ("target" or "current") and ``kind`` ("actor" or "critic")."""
        return upsample(self.maps[view, kind], self.target_view.shape[0], self.stride)


def view_saliency(
    view: np.ndarray, make_obs: Callable[[np.ndarray], dict[str, np.ndarray]],
    encode: Callable[[np.ndarray], np.ndarray], probe: Probe, base: dict[str, np.ndarray], s: SaliencySettings,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Actor and critic saliency (gh, gw) of one view: ``make_obs`` turns the codes of perturbed copies of it
    into observations, ``base`` is the unperturbed observation (a batch of one).

    The unperturbed observation goes through the policy in the same call as each batch of perturbed ones,
    so batch-size-dependent float rounding cannot show up as saliency (a perturbation that leaves the
    policy's input unchanged scores exactly 0); a location whose perturbed view equals the view (a flat
    patch: blurring moves no pixel) scores 0 without a call."""
    ys, xs = mask_centres(view.shape[0], s.stride), mask_centres(view.shape[1], s.stride)
    centres = np.stack(np.meshgrid(ys, xs, indexing="ij"), -1).reshape(-1, 2)
    soft = blurred(view, s.blur)
    actor, critic = np.zeros(len(centres)), np.zeros(len(centres))
    flat = view.reshape(1, -1)
    for i in range(0, len(centres), s.batch):
        idx = np.arange(i, min(i + s.batch, len(centres)))
        views = perturbed_views(view, soft, centres[idx], s.sigma)
        changed = np.any(views.reshape(len(views), -1) != flat, axis=1)
        if not changed.any():
            continue
        obs = make_obs(encode(views[changed]))
        dist, value = probe({k: np.concatenate([base[k], obs[k]]) for k in obs})
        actor[idx[changed]] = 0.5 * np.sum((dist[1:] - dist[0]) ** 2, axis=1)
        critic[idx[changed]] = 0.5 * (value[1:] - value[0]) ** 2
    return actor.reshape(len(ys), len(xs)), critic.reshape(len(ys), len(xs))


def step_saliency(
    observer: Observer, probe: Probe, target_view: np.ndarray, current_view: np.ndarray, s: SaliencySettings,
    step: int = 0,
) -> StepSaliency:  # fmt: skip
    """Saliency of both views at one step (see the module docstring)."""
    t0 = time.perf_counter()
    t_code, c_code = observer.encode(target_view[None]), observer.encode(current_view[None])
    base = observer.observe(t_code, c_code)
    dist, value = probe(base)

    def with_target(codes: np.ndarray) -> dict[str, np.ndarray]:
        return observer.observe(codes, np.repeat(c_code, len(codes), axis=0))

    def with_current(codes: np.ndarray) -> dict[str, np.ndarray]:
        return observer.observe(np.repeat(t_code, len(codes), axis=0), codes)

    maps: dict[tuple[str, str], np.ndarray] = {}
    for name, view, make in (("target", target_view, with_target), ("current", current_view, with_current)):
        maps[name, "actor"], maps[name, "critic"] = view_saliency(view, make, observer.encode, probe, base, s)
    return StepSaliency(
        step, target_view, current_view, maps, s.stride, dist[0], float(value[0]), time.perf_counter() - t0
    )


def episode_saliency(
    flight: Flight, probe: Probe, steps: Sequence[int], s: SaliencySettings, progress: bool = False
) -> dict[int, StepSaliency]:
    """Saliency at each of ``steps`` (observation indices 0..T of the flight)."""
    from tqdm.auto import tqdm

    s.check(flight.core.scene.view_size)
    out = {}
    for t in tqdm(sorted(set(steps)), desc="saliency", unit="step", disable=not progress):
        out[t] = step_saliency(flight.observer(t), probe, flight.target_view, flight.current_view(t), s, t)
    return out


# -- choosing an episode and steps ------------------------------------------------------------
def parse_steps(text: str, n_obs: int, auto: int = 4) -> list[int]:
    """Observation indices from ``all``, ``auto`` (``auto`` evenly spaced, first and last included) or a
    comma-separated list (negative counts from the end: -1 is the last); a bad one is an :class:`InputError`."""
    text = text.strip().lower()
    if text == "all":
        return list(range(n_obs))
    if text == "auto":
        return evenly_spaced(n_obs, auto)
    out = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        try:
            k = int(item)
        except ValueError:
            raise InputError(f"--steps: {item!r} is not a step number (give e.g. 0,5,-1, 'auto' or 'all')") from None
        if not -n_obs <= k < n_obs:
            raise InputError(
                f"--steps: step {k} is outside this episode, which has {n_obs} observations (steps 0..{n_obs - 1}, "
                "or -1 for the last)"
            )
        out.append(k % n_obs)
    if not out:
        raise InputError("--steps is empty; give e.g. 0,5,-1, 'auto' or 'all'")
    return sorted(set(out))


def evenly_spaced(n_obs: int, k: int) -> list[int]:
    """Up to ``k`` observation indices of 0..n_obs-1, evenly spaced, the first and the last included."""
    if k <= 0:
        return []
    return sorted({int(i) for i in np.linspace(0, n_obs - 1, min(k, n_obs)).round()})


@dataclass
class EpisodeSpec:
    """Which episode to fly: a target row of the scene, a start and a decoy (NaN: none)."""

    row: int
    start: tuple[float, float]
    decoy: tuple[float, float] = (np.nan, np.nan)
    label: str = ""


def evaluation_episode(params: Params, scene: Scene, split: str, index: int) -> EpisodeSpec:
    """Episode ``index`` of ``split`` exactly as the evaluate stage draws it (``test_decoy``: the decoy test)."""
    from maprl.eval.episodes import DECOY_SPLIT, make_decoy_episodes, make_split_episodes

    p, seed = params.evaluate, params.base.seed
    if not 0 <= index < p.episodes:
        raise InputError(f"--episode {index}: the evaluate stage draws episodes 0..{p.episodes - 1} per split")
    if split == DECOY_SPLIT:
        eps = make_decoy_episodes(scene, p.episodes, seed, max(p.decoy_rate, 1e-12), p.success_radius)
    elif split in ("train", "test"):
        eps = make_split_episodes(scene, ["train", "test"], p.episodes, seed)
        eps = eps[eps["split"] == split].reset_index(drop=True)
    else:
        raise InputError(f"--split {split!r}: choose train, test or {DECOY_SPLIT}")
    return episode_from_row(eps.iloc[index], f"{split} episode {index}")


def episode_from_row(row: pd.Series, label: str = "") -> EpisodeSpec:
    """An episode of an evaluation table (columns target_row, start_x, start_y and optionally decoy_x, decoy_y)."""
    decoy = (float(row.get("decoy_x", np.nan)), float(row.get("decoy_y", np.nan)))
    return EpisodeSpec(int(row["target_row"]), (float(row["start_x"]), float(row["start_y"])), decoy, label)


def target_row(scene: Scene, target_id: int) -> int:
    ids = scene.targets["id"].to_numpy()
    hit = np.flatnonzero(ids == target_id)
    if len(hit) == 0:
        raise InputError(f"--target-id {target_id} is not a target of this map; ids run {ids.min()}..{ids.max()}")
    return int(hit[0])


def target_heading(rt: Runtime, scene: Scene, row: int) -> float:
    """The turn (degrees) at which the encode stage embedded the target photo of ``row`` (0 if unknown)."""
    emb = rt.photos.get(scene.domain)
    return float(emb.heading_deg[row]) if emb is not None and row < len(emb.heading_deg) else 0.0


def photo_scene(rt: Runtime, photo: np.ndarray) -> tuple[Scene, np.ndarray]:
    """A scene whose one target is a photo (already at the map's scale) of an unknown place (x, y NaN):
    its central view is embedded at its best heading as ``maprl locate`` does. Returns the scene and the
    view as the policy sees it (turned to that heading)."""
    from maprl.data.photo import square_view

    view, _ = square_view(photo, rt.scene.view_size)
    emb = embed_aligned(rt, view[None], None)
    turned = rotate(view, float(emb.heading_deg[0])) if emb.heading_deg[0] % 360 else view
    targets = pd.DataFrame({"id": [0], "x": [np.nan], "y": [np.nan], "split": ["photo"]})
    return rt.scene.with_targets(targets, view[None], emb.embeddings), turned


# -- outputs ----------------------------------------------------------------------------------
def panels(flight: Flight, sal: StepSaliency, probe: Probe, caption: str = "") -> SaliencyPanels:
    """What the drawing code needs of one step."""
    t = sal.step
    vec = ", ".join(f"{v:.2f}" for v in sal.distribution)
    what = "p(actions)" if probe.kind == "probabilities" else "mean action"
    text = f"step {t}/{flight.steps}: {what} ({vec}), V = {sal.value:.3g}"
    return SaliencyPanels(
        step=t,
        target_view=sal.target_view,
        current_view=sal.current_view,
        maps={k: sal.full(*k) for k in sal.maps},
        caption=f"{caption}: {text}" if caption else text,
    )


@dataclass
class SaliencyRun:
    flight: Flight
    saliency: dict[int, StepSaliency]
    files: list[str]
    notes: list[str]


def write_saliency(
    flight: Flight, probe: Probe, out_dir: str | Path, png_steps: Sequence[int], video_steps: Sequence[int],
    s: SaliencySettings, *, caption: str = "", video_name: str = "episode", png_name: str = "step_{step:03d}.png",
    progress: bool = False, fps: float = 4.0, arrays: bool = True,
) -> SaliencyRun:  # fmt: skip
    """Score the union of ``png_steps`` and ``video_steps``, then write a PNG per ``png_steps`` step, the video
    of ``video_steps`` (GIF, and MP4 where imageio's ffmpeg plugin is installed) and, with ``arrays``,
    ``saliency.npz`` (the coarse maps). Every file is written atomically; returns what was written."""
    out = Path(out_dir)
    sal = episode_saliency(flight, probe, [*png_steps, *video_steps], s, progress)
    drawn = {t: panels(flight, sal[t], probe, caption) for t in sal}
    files: list[str] = []
    notes: list[str] = []
    for t in sorted(set(png_steps)):
        path = out / png_name.format(step=t)
        with atomic_path(path) as tmp:
            plot_saliency_step(drawn[t], str(tmp))
        files.append(str(path))
    if video_steps:
        frames = saliency_frames(
            flight.core.scene.map.rgb, flight.path, flight.target_xy, flight.core.scene.view_size,
            [drawn[t] for t in sorted(set(video_steps))],
        )  # fmt: skip
        written, note = write_video(frames, out / video_name, fps)
        files += [str(p) for p in written]
        if note:
            notes.append(note)
    if arrays:
        path = out / "saliency.npz"
        steps = sorted(sal)
        data: dict[str, Any] = {f"{v}_{k}": np.stack([sal[t].maps[v, k] for t in steps]) for v in VIEWS for k in KINDS}
        with atomic_path(path) as tmp, tmp.open("wb") as f:
            np.savez(f, steps=np.array(steps), stride=np.array(s.stride), sigma=np.array(s.sigma),
                     blur=np.array(s.blur), path=flight.path, **data)  # fmt: skip
        files.append(str(path))
    return SaliencyRun(flight, sal, files, notes)


def summary(run: SaliencyRun, probe: Probe, s: SaliencySettings) -> dict[str, Any]:
    """A JSON-able account of a run: files, steps, time per step and what the scores mean."""
    secs = [v.seconds for v in run.saliency.values()]
    return {
        "files": run.files,
        "notes": run.notes,
        "episode_steps": run.flight.steps,
        "success": bool(run.flight.success()),
        "steps_scored": sorted(run.saliency),
        "seconds_per_step": round(float(np.mean(secs)), 3) if secs else None,
        "stride": s.stride,
        "sigma": s.sigma,
        "blur": s.blur,
        "actor_distance": f"0.5 * squared L2 distance of the action {probe.kind}",
        "max": {
            f"{v}_{k}": float(max((x.maps[v, k].max() for x in run.saliency.values()), default=0.0))
            for v in VIEWS
            for k in KINDS
        },
    }


def load_agent(params: Params, agent: str, policy: str | Path) -> tuple[Params, Any]:
    """The params of ``agent`` (as it was trained and is evaluated) and its policy."""
    ap = agent_variant(params, agent)
    return ap, load_policy(policy, ap.train.algo)


def evaluate_video(
    out: Path, params: Params, rt: Runtime, agent: str, policy: str | Path, episode: EpisodeSpec
) -> list[str]:
    """The evaluate stage's saliency outputs: ``saliency.gif`` (``evaluate.saliency_steps`` frames of the
    episode, coarse ``evaluate.saliency_stride``) and ``saliency.png`` (its middle frame). Returns the files."""
    p = params.evaluate
    if p.saliency_steps <= 0:
        return []
    ap, model = load_agent(params, agent, policy)
    try:
        probe = PolicyProbe(model)
    except InputError as err:  # e.g. an off-policy algo: the stage's other outputs still matter
        print(f"maprl: evaluate: no saliency video ({err})", file=sys.stderr)
        return []
    cfg = nav_config(ap, rt, max_steps=p.max_steps, shaping=0.0)
    check_spaces(model, rt.scene, cfg, agent)
    flight = fly_episode(model, rt, rt.scene, cfg, episode)
    stride = p.saliency_stride
    s = SaliencySettings(stride=stride, sigma=stride / 2, blur=5.0)
    frames = evenly_spaced(flight.steps + 1, p.saliency_steps)
    middle = frames[len(frames) // 2]
    run = write_saliency(
        flight, probe, out, [middle], frames, s, caption=f"{agent}, {episode.label}",
        video_name="saliency", png_name="saliency.png", arrays=False,
    )  # fmt: skip
    return run.files


def fly_episode(model: Any, rt: Runtime, scene: Scene, cfg: NavConfig, ep: EpisodeSpec) -> Flight:
    """:func:`fly` on an episode of ``scene``; a feature policy's target view is its photo turned as it was embedded."""
    view = None
    if not wants_pixels(model):
        heading = target_heading(rt, scene, ep.row)
        photo = scene.target_photo(ep.row)
        view = rotate(photo, heading) if heading % 360 else photo
    return fly(model, scene, cfg, rt.memory, ep.row, ep.start, ep.decoy, view)


def parse_frames(text: str, n_obs: int) -> list[int]:
    """The video's steps: ``all``, or a number of evenly spaced steps (first and last included)."""
    if text.strip().lower() == "all":
        return list(range(n_obs))
    try:
        k = int(text)
    except ValueError:
        raise InputError(f"--frames {text!r}: give a number of frames (e.g. 16) or 'all'") from None
    if k < 1:
        raise InputError(f"--frames {k}: give at least 1 frame, or --no-video")
    return evenly_spaced(n_obs, k)


def run_saliency(
    params_path: str | Path, map_path: str | Path, targets_path: str | Path, features_dir: str | Path,
    agent: str, policy: str | Path, out_dir: str | Path, *, split: str = "test", episode: int = 0,
    target_id: int | None = None, photo: str | Path | None = None, gsd: float | None = None, domain: str = "same",
    steps: str = "auto", frames: str = "16", video: bool = True, settings: SaliencySettings | None = None,
    progress: bool = True,
) -> dict[str, Any]:  # fmt: skip
    """``maprl saliency``: fly one episode of ``agent`` and write its saliency PNGs, video and maps."""
    from maprl.config import load_params
    from maprl.data.photo import read_photo, to_map_gsd
    from maprl.features.nets import configure_torch
    from maprl.nav.runtime import load_runtime

    s = settings or SaliencySettings()
    params = load_params(params_path)
    configure_torch(params.encoder.torch_threads)
    ap, model = load_agent(params, agent, policy)  # a missing or damaged policy fails before the slow loading
    probe = PolicyProbe(model)
    image = read_photo(photo) if photo is not None else None
    rt = load_runtime(params, map_path, targets_path, features_dir)
    s.check(rt.scene.view_size)
    scene = rt.scene if domain == "same" else rt.domain_scene(domain)
    cfg = nav_config(ap, rt, max_steps=params.evaluate.max_steps, shaping=0.0)
    check_spaces(model, scene, cfg, agent)
    ep = evaluation_episode(params, scene, split, episode)
    if image is not None:
        rgb = image.rgb
        if gsd is not None:
            mpp = float(scene.map.metres_per_pixel)
            if not np.isfinite(mpp):
                raise InputError("--gsd: the map has no coordinate reference system, so its pixel size is unknown")
            rgb = to_map_gsd(rgb, gsd, mpp)
        scene, turned = photo_scene(rt, rgb)
        view = scene.target_photo(0) if wants_pixels(model) else turned
        label = f"photo {Path(str(photo)).name} from the start of {ep.label}"
        flight = fly(model, scene, cfg, rt.memory, 0, ep.start, target_view=view)
    else:
        if target_id is not None:
            ep = EpisodeSpec(
                target_row(scene, target_id), ep.start, label=f"target {target_id} from the start of {ep.label}"
            )
        label = ep.label + ("" if domain == "same" else f", photos of domain {domain}")
        flight = fly_episode(model, rt, scene, cfg, ep)
    n_obs = flight.steps + 1
    png_steps = parse_steps(steps, n_obs)
    video_steps = parse_frames(frames, n_obs) if video else []
    run = write_saliency(flight, probe, out_dir, png_steps, video_steps, s, caption=f"{agent}, {label}",
                         progress=progress)  # fmt: skip
    return {"agent": agent, "policy": str(policy), "episode": label} | summary(run, probe, s)
