"""Offline tiny models, the procedural shapes dataset and its scorer: what tests and the demo use."""
