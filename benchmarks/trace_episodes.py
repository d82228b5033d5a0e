"""Where did an agent go wrong? Traces chosen episodes of the evaluate stage against their retrieval candidates.

Usage (after `dvc repro`, from the repository root):
    python benchmarks/trace_episodes.py --split test_autumn --episodes 28,33,34
    python benchmarks/trace_episodes.py --agent search --split test_autumn --lost-to retrieve_then_fly
    python benchmarks/trace_episodes.py --policy /tmp/bench_search/seed2/policy.zip --lost-to retrieve_then_fly

``--lost-to METHOD`` picks the episodes of ``data/eval/episodes.csv`` that METHOD won and the agent
lost. Each episode is flown again with the pipeline's policy (``models/<agent>/policy.zip``, or
``--policy``: another training seed's, as ``bench_search.py --out`` keeps them) on the evaluate
stage's own fixed episodes; with ``--policy`` the agent's outcomes are not in episodes.csv, so
``--lost-to`` flies every episode METHOD won and keeps those the policy lost. The table gives, per
episode: the rank of the retrieval candidate that lies within the success radius of the target
(``-`` if none does); whether the agent's path came within the radius, and the best similarity of
its view to the photo there; and where it ended: the candidate it stopped at (``-`` if none), that
view's similarity and its distance to the target. Similarities are the cosine of the embeddings, as
the agent and the stop rule see them.
"""

from __future__ import annotations

import argparse
import functools

import numpy as np
import pandas as pd

from maprl.config import AGENTS, Params, agent_variant, load_params
from maprl.eval.agents import AgentController, load_policy
from maprl.eval.episodes import evaluate_methods, make_decoy_episodes, make_split_episodes
from maprl.nav.runtime import Runtime, load_runtime, nav_config


def split_episodes(rt: Runtime, params: Params, split: str) -> pd.DataFrame:
    """The evaluate stage's fixed episodes of ``split`` (train, test, test_decoy or test_<domain>)."""
    p, seed = params.evaluate, params.base.seed
    eps = make_split_episodes(rt.scene, ["train", "test"], p.episodes, seed)
    if split == "test_decoy":
        return make_decoy_episodes(rt.scene, p.episodes, seed, p.decoy_rate, p.success_radius)
    if split.startswith("test_"):
        return eps[eps["split"] == "test"].assign(split=split)
    return eps[eps["split"] == split]


def trace(
    rt: Runtime, params: Params, agent: str, split: str, episodes: list[int], policy: str | None = None
) -> pd.DataFrame:
    """One row per episode: the truth's candidate rank, the closest pass, and the stop. ``policy``
    (default: the pipeline's ``models/<agent>/policy.zip``) is the policy flown."""
    eps = split_episodes(rt, params, split)
    eps = eps[eps["episode"].isin(episodes)]
    if len(eps) != len(set(episodes)):
        missing = sorted(set(episodes) - set(eps["episode"]))
        raise SystemExit(f"episodes {missing} are not in split {split}")
    domain = split.removeprefix("test_") if split.startswith("test_") and split != "test_decoy" else "same"
    scene = rt.scene if domain == "same" else rt.domain_scene(domain)
    ap = agent_variant(params, agent)
    cfg = nav_config(ap, rt, max_steps=ap.evaluate.max_steps, shaping=0.0)
    model = load_policy(policy or f"models/{agent}/policy.zip", ap.train.algo)
    df, paths = evaluate_methods(scene, rt.memory, cfg, {agent: functools.partial(AgentController, model)}, eps)
    if rt.memory is None:
        raise SystemExit("no map memory to draw candidates from (agent.memory: none)")
    target_embs = scene.target_embeddings()
    radius = ap.evaluate.success_radius
    rows = []
    for i, (_, ep) in enumerate(eps.iterrows()):
        row = int(ep["target_row"])
        target = scene.targets_xy[row]
        photo = target_embs[row]
        cands, _ = rt.memory.query(photo[None], ap.agent.n_candidates)
        cands = cands[0]
        if "decoy_x" in ep and not np.isnan(ep["decoy_x"]):
            cands = np.concatenate([[[ep["decoy_x"], ep["decoy_y"]]], cands[:-1]])
        path = np.asarray(paths[agent][i], float)
        sims = np.sum(scene.space.embed_at(path[:, 0], path[:, 1]) * photo, axis=1)
        dist = np.hypot(*(path - target).T)
        near = dist <= radius
        truth = np.flatnonzero(np.hypot(*(cands - target).T) <= radius)
        stop_at = np.flatnonzero(np.hypot(*(cands - path[-1]).T) <= 0.5 * radius)
        result = df.iloc[i]
        rows.append({
            "episode": int(ep["episode"]),
            "success": bool(result["success"]),
            "steps": int(result["steps"]),
            "truth_rank": str(truth[0] + 1) if len(truth) else "-",
            "passed_target": bool(near.any()),
            "best_sim_near_target": round(float(sims[near].max()), 3) if near.any() else float("nan"),
            "stopped_at_rank": str(stop_at[0] + 1) if len(stop_at) else "-",
            "final_sim": round(float(sims[-1]), 3),
            "final_distance_px": round(float(dist[-1]), 1),
        })  # fmt: skip
    return pd.DataFrame(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--agent", default="search", choices=AGENTS, help="default: search")
    ap.add_argument("--split", default="test_autumn", help="train | test | test_decoy | test_<domain> (default)")
    ap.add_argument("--episodes", default=None, help="comma-separated episode numbers")
    ap.add_argument("--lost-to", default=None, help="the episodes this method won and the agent lost")
    ap.add_argument("--policy", default=None, help="policy.zip to fly (default: models/<agent>/policy.zip)")
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args()
    if (args.episodes is None) == (args.lost_to is None):
        raise SystemExit("give --episodes or --lost-to")
    if args.episodes is not None:
        episodes = [int(e) for e in args.episodes.split(",")]
    else:
        done = pd.read_csv("data/eval/episodes.csv")
        done = done[done["split"] == args.split]
        won = done.pivot_table(index="episode", columns="method", values="success")
        row = f"agent_{args.agent}" if args.agent != "memory" else "agent"
        agent_lost = won[row] == 0 if args.policy is None else True
        episodes = won.index[(won[args.lost_to] == 1) & agent_lost].tolist()
        if args.policy is None:
            print(f"{len(episodes)} episodes of {args.split} that {args.lost_to} won and {row} lost: {episodes}")
        if not episodes:
            return
    params = load_params(args.params)
    rt = load_runtime(params, "data/map/map.tif", "data/targets/targets.csv", "data/features")
    rows = trace(rt, params, args.agent, args.split, episodes, args.policy)
    if args.policy is not None and args.lost_to is not None:
        rows = rows[~rows["success"]]
        print(f"{len(rows)} episodes of {args.split} that {args.lost_to} won and {args.policy} lost")
    print(rows.to_markdown(index=False))


if __name__ == "__main__":
    main()
