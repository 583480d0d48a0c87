"""The training loop and the pieces it is assembled from (objectives, optimizers, schedules, EMA, checkpoints)."""
