"""The shared objective math of diffusion training, used by every method and family: noise and its
tricks (noise.py), prediction targets and scheduler setup (targets.py), timestep sampling
(timesteps.py), flow-matching sigmas and weighting (flow.py) and losses with their weightings
(losses.py). Nothing here imports the trainer, the methods or the regularizers."""
