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
policy's own action distribution); no library is needed for it.
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


def clone_expert(
    model: Any, venv: Any, cores: list[NavCore], timesteps: int, epochs: int = 4, batch: int = 256
) -> float:
    """Fit ``model.policy`` to the expert's actions on ``timesteps`` of expert rollouts in ``venv``.

    ``cores`` are the batched states behind ``venv`` (one per world; ``venv`` may be wrapped). Returns
    the share of the expert's actions the cloned policy takes (deterministically) on the collected states.
    """
    obs = venv.reset()
    observations: list[dict[str, np.ndarray]] = []
    actions: list[np.ndarray] = []
    for _ in range(max(1, timesteps // venv.num_envs)):
        a = np.concatenate([expert_actions(core) for core in cores])
        observations.append(obs)
        actions.append(a)
        obs, _, _, _ = venv.step(a)
    data = {key: np.concatenate([o[key] for o in observations]) for key in observations[0]}
    target = torch.as_tensor(np.concatenate(actions))
    policy = model.policy
    obs_t, _ = policy.obs_to_tensor(data)
    gen = torch.Generator().manual_seed(0)
    policy.set_training_mode(True)
    for _ in range(epochs):
        for idx in torch.randperm(len(target), generator=gen).split(batch):
            _, log_prob, _ = policy.evaluate_actions({k: v[idx] for k, v in obs_t.items()}, target[idx])
            loss = -log_prob.mean()
            policy.optimizer.zero_grad()
            loss.backward()
            policy.optimizer.step()
    policy.set_training_mode(False)
    with torch.no_grad():
        taken = policy.get_distribution(obs_t).mode()
    return float((taken == target).float().mean())
