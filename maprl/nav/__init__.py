"""Navigation: the scene, the reward (the one place it is defined), the batched dynamics, the
Gymnasium env and the SB3 vector env.
"""
