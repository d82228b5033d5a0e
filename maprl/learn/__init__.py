"""Learning: the policy network, PPO training with its callbacks, and Optuna tuning."""
