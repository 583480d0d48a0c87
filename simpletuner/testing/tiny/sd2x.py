"""Tiny sd2x pipeline: the demo Stable Diffusion recipe of :mod:`simpletuner.testing.tiny_models`.

It lives there because the demo (``simpletuner demo``) and its shipped VAE weights are built around it;
this file gives it the same entry point as every other family's recipe, so the family table can name it.
"""

from __future__ import annotations


def build_tiny_pipeline(seed: int = 0, vae_train_steps: int = 0):
    """The tiny sd2x pipeline and where its VAE weights came from; ``vae_train_steps`` > 0 trains the
    VAE from scratch instead of loading the shipped demo weights."""
    from simpletuner.testing.tiny_models import build_tiny_pipeline as build_demo_pipeline

    return build_demo_pipeline("sd2x", seed=seed, vae_train_steps=vae_train_steps)
