"""Evaluation: fixed episodes, the no-learning baselines, trained agents as controllers, metrics
and the evaluate stage.
"""
