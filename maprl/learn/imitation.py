"""A warm start for the searcher: behaviour cloning of the scripted candidate search, before PPO.

Why: with an explicit STOP, PPO from scratch learns never to stop. Early on, random STOPs land
far from the target and cost ``stop_penalty``, so STOP's probability collapses before the agent
has learned to reach a candidate, and the +``success_bonus`` of a good stop is never seen
(measured: 0.000 success on every split after 300,000 steps, README "An agent that searches").
Cloning the scripted search first gives PPO a policy that already stops, and PPO then changes
it where the return says so.

The expert (:func:`expert_actions`) sees what the agent sees, never the ground truth: move on to
the next candidate not yet visited; STOP at a candidate whose view passes the calibrated stop
threshold; when every candidate has been visited, go back to the best-matching one and STOP
there. The cloning is plain supervised learning of the expert's actions (cross-entropy on the
policy's own action distribution); with ``train.imitate_rounds`` > 1 it is DAgger, which also
labels the states the cloned policy itself reaches. The loop is a few lines over our own batched
env; the ``imitation`` package's trainers would need the expert wrapped as an SB3 policy and their
own env wrappers, for no gain here.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from maprl.nav.core import NavCore


def expert_actions(core: NavCore) -> np.ndarray:
    """(n,) the scripted search's actions in the ``candidates`` + STOP action space."""
    cfg = core.cfg
    if cfg.env.actions != "candidates" or not cfg.env.stop_action:
        raise ValueError("the scripted expert acts in env.actions: candidates with env.stop_action: true")
    k, rows = cfg.agent.n_candidates, np.arange(core.n)
    at = core.at_candidates()
    match = at.any(axis=1) & (core.sim >= cfg.stop_threshold)
    back = core.visited.all(axis=1) & at[rows, core.cand_seen.argmax(axis=1)]
    return np.where(match | back, k + 2, k + 1).astype(np.int64)


def _rollout(
    venv: Any, cores: list[NavCore], steps: int, act: Any = None
) -> tuple[list[dict[str, np.ndarray]], list[np.ndarray]]:
    """``steps`` agent-steps of ``venv``: the observations and the expert's action at each; the moves are the
    expert's own, or ``act(obs)``'s (the learner's, for DAgger)."""
    obs = venv.reset()
    observations: list[dict[str, np.ndarray]] = []
    actions: list[np.ndarray] = []
    for _ in range(max(1, steps // venv.num_envs)):
        a = np.concatenate([expert_actions(core) for core in cores])
        observations.append(obs)
        actions.append(a)
        obs, _, _, _ = venv.step(a if act is None else act(obs))
    return observations, actions


def fit_actions(
    policy: Any, obs_t: dict[str, torch.Tensor], target: torch.Tensor, epochs: int, batch: int, gen: Any
) -> None:
    """Maximise the likelihood of ``target`` actions under ``policy`` (cross-entropy), minibatch SGD."""
    policy.set_training_mode(True)
    for _ in range(epochs):
        for idx in torch.randperm(len(target), generator=gen).split(batch):
            _, log_prob, _ = policy.evaluate_actions({k: v[idx] for k, v in obs_t.items()}, target[idx])
            loss = -log_prob.mean()
            policy.optimizer.zero_grad()
            loss.backward()
            policy.optimizer.step()
    policy.set_training_mode(False)


def clone_expert(
    model: Any,
    venv: Any,
    cores: list[NavCore],
    timesteps: int,
    epochs: int = 4,
    batch: int = 256,
    rounds: int = 1,
) -> float:
    """Fit ``model.policy`` to the expert's actions on ``timesteps`` agent-steps of rollouts in ``venv``.

    ``rounds`` 1 is behaviour cloning on the expert's own rollouts. With more, it is DAgger (Ross,
    Gordon and Bagnell 2011): the first round clones ``timesteps / rounds`` expert steps; each further
    round rolls out the cloned policy (deterministic, as it is evaluated), labels the states *it*
    reaches with the expert's actions, and refits on everything gathered so far. So the policy also
    learns what the expert would do in the states its own mistakes lead to, which plain cloning never
    shows it. ``cores`` are the batched states behind ``venv`` (one per world; ``venv`` may be wrapped).
    Returns the share of the expert's actions the cloned policy takes (deterministically) on all the
    collected states.
    """
    policy = model.policy
    gen = torch.Generator().manual_seed(0)
    observations: list[dict[str, np.ndarray]] = []
    actions: list[np.ndarray] = []
    for r in range(rounds):
        learner = None if r == 0 else (lambda o: model.predict(o, deterministic=True)[0])
        more_obs, more_actions = _rollout(venv, cores, timesteps // rounds, learner)
        observations += more_obs
        actions += more_actions
        data = {key: np.concatenate([o[key] for o in observations]) for key in observations[0]}
        target = torch.as_tensor(np.concatenate(actions))
        obs_t, _ = policy.obs_to_tensor(data)
        fit_actions(policy, obs_t, target, epochs, batch, gen)
    with torch.no_grad():
        taken = policy.get_distribution(obs_t).mode()
    return float((taken == target).float().mean())
