"""Env steps/s and PPO timesteps/s: the original pixel design against the feature-cache design.

Usage: python benchmarks/bench_speed.py [--size 2048] [--ppo-pixel-steps 64]

Rows:
  (a) Gymnasium env, pixel obs, plus the MobileNetV2 forward pass on both 224 px views that
      the original design pays every step;
  (b) Gymnasium env, feature obs (a cache lookup per step);
  (c) the batched NavVecEnv, 256 agents (agent-steps/s).
Then PPO timesteps/s with MobileNetV2 trained end to end on pixels (original design) against
the feature policy on the batched env, in the same run. Prints two small tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import pandas as pd
import torch
from rasterio.transform import from_origin
from stable_baselines3 import PPO
from stable_baselines3.common.vec_env import DummyVecEnv

from maprl.config import TileParams
from maprl.data.geo import MapData
from maprl.data.tile import build_targets
from maprl.data.world import synthesize_world
from maprl.learn.policies import MapRLPolicy, PixelTrunk
from maprl.nav.core import NavConfig
from maprl.nav.env import SatelliteNavEnv
from maprl.nav.runtime import pooled_memory
from maprl.nav.scene import Scene
from maprl.nav.vecenv import NavVecEnv


def scene_for(size: int) -> Scene:
    w = synthesize_world(size, 42)
    m = MapData(w.rgb, w.elevation, np.ones(w.elevation.shape, bool), from_origin(0, size, 1, 1), None)
    return Scene.build(m, build_targets(m, TileParams(n_targets=100, mode="random"), 0, None), 224)


def rate(fn: object, n: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    fn()  # type: ignore[operator]
    sec = time.perf_counter() - t0
    return sec, n / sec


def pixel_env_rate(scene: Scene, steps: int) -> tuple[float, float]:
    env = SatelliteNavEnv(scene=scene, obs="pixels")
    trunk = PixelTrunk(224).eval()
    env.reset(seed=0)
    acts = np.random.default_rng(0).uniform(-1, 1, (steps, 2)).astype(np.float32)

    def loop() -> None:
        for a in acts:
            obs, *_ = env.step(a)
            views = np.stack([obs["target"], obs["current"]]).astype(np.float32) / 255
            with torch.no_grad():
                trunk(torch.from_numpy(views).permute(0, 3, 1, 2))

    return rate(loop, steps)


def feature_env_rate(scene: Scene, cfg: NavConfig, steps: int) -> tuple[float, float]:
    env = SatelliteNavEnv(scene=scene, obs="features", config=dataclasses.replace(cfg, max_steps=None))
    env.reset(seed=0)
    acts = np.random.default_rng(0).uniform(-1, 1, (steps, 2)).astype(np.float32)
    return rate(lambda: [env.step(a) for a in acts], steps)


def vec_env_rate(scene: Scene, cfg: NavConfig, n_envs: int, steps: int) -> tuple[float, float]:
    venv = NavVecEnv(scene, n_envs, cfg)
    venv.reset()
    acts = np.random.default_rng(0).uniform(-1, 1, (steps, n_envs, 2)).astype(np.float32)
    return rate(lambda: [venv.step(a) for a in acts], steps * n_envs)


def ppo_rate(model: PPO, steps: int) -> tuple[float, float]:
    return rate(lambda: model.learn(steps), steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--pixel-steps", type=int, default=100)
    ap.add_argument("--ppo-pixel-steps", type=int, default=64)
    ap.add_argument("--ppo-feature-steps", type=int, default=65536)
    args = ap.parse_args()
    torch.set_num_threads(2)
    scene = scene_for(args.size)
    memory = pooled_memory(scene, 16, 112)
    cfg = NavConfig.of(memory="retrieval", max_steps=100, stop_threshold=0.98)
    no_memory = NavConfig.of(memory="none", max_steps=100, stop_threshold=0.98)
    rows = []
    for name, (sec, r) in {
        "(a) pixel env + MobileNetV2 on both views": pixel_env_rate(scene, args.pixel_steps),
        "(b) feature env (cache lookup)": feature_env_rate(scene, no_memory, 5000),
        "(c) batched NavVecEnv, 256 agents": vec_env_rate(scene, no_memory, 256, 400),
    }.items():
        rows.append({"env": name, "seconds": round(sec, 2), "steps/s": round(r, 1)})
    env_table = pd.DataFrame(rows)
    env_table["x vs (a)"] = (env_table["steps/s"] / env_table["steps/s"].iloc[0]).round(0)
    print(env_table.to_string(index=False))

    pix_env = DummyVecEnv([lambda: SatelliteNavEnv(scene=scene, obs="pixels")])
    pix = PPO(MapRLPolicy, pix_env, n_steps=32, batch_size=32, n_epochs=1, seed=0, device="cpu")
    feat_env = NavVecEnv(scene, 32, cfg, memory=memory)
    feat = PPO(MapRLPolicy, feat_env, n_steps=128, batch_size=512, n_epochs=5, seed=0, device="cpu")
    torch.set_num_threads(2)
    ps, pr = ppo_rate(pix, args.ppo_pixel_steps)
    torch.set_num_threads(1)
    fs, fr = ppo_rate(feat, args.ppo_feature_steps)
    ppo = pd.DataFrame(
        [
            {"PPO policy": "pixels, MobileNetV2 end to end (original)", "timesteps": args.ppo_pixel_steps,
             "seconds": round(ps, 1), "timesteps/s": round(pr, 2)},
            {"PPO policy": "features on NavVecEnv (32 envs)", "timesteps": args.ppo_feature_steps,
             "seconds": round(fs, 1), "timesteps/s": round(fr, 1)},
        ]
    )  # fmt: skip
    ppo["x vs pixels"] = (ppo["timesteps/s"] / ppo["timesteps/s"].iloc[0]).round(0)
    print()
    print(ppo.to_string(index=False))


if __name__ == "__main__":
    main()
