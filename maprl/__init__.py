"""maprl: locate a photo on a map with a reinforcement-learning agent."""

from gymnasium.envs.registration import register, registry

__version__ = "0.1.0"

ENV_ID = "maprl/SatelliteNav-v0"

if ENV_ID not in registry:
    register(id=ENV_ID, entry_point="maprl.nav.env:SatelliteNavEnv", max_episode_steps=1000)
