"""Train the tiny demo VAE on procedural shapes so that decode(encode(x)) keeps colour and outline.

A random VAE decodes to noise, which would make validation images meaningless. Real VAEs learn on
millions of photos; ours only has to reproduce flat shapes on a white background, which a
0.65M-parameter AutoencoderKL learns in a few minutes on a CPU. Foreground pixels are weighted more
than the background because the shape is what the demo scores.
"""

from __future__ import annotations

import logging
import random
import time

from simpletuner.testing.shapes import all_specs, draw_shape

logger = logging.getLogger(__name__)

FOREGROUND_WEIGHT = 5.0
KL_WEIGHT = 1e-6


def demo_image_batch(count: int, size: int, seed: int):
    """``count`` random shape images as a float tensor in [-1, 1], N x 3 x size x size."""
    import numpy as np
    import torch

    rng = random.Random(seed)
    specs = all_specs()
    arrays = [np.asarray(draw_shape(rng.choice(specs), size, rng), dtype=np.float32) for _ in range(count)]
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return batch / 127.5 - 1.0


def train_demo_vae(vae, steps: int, seed: int = 0, batch_size: int = 16, learning_rate: float = 2e-3) -> None:
    """Train ``vae`` in place, then set its ``scaling_factor`` so cached latents have unit variance."""
    import torch

    size = vae.config.sample_size
    optimizer = torch.optim.AdamW(vae.parameters(), lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, total_steps=steps, pct_start=0.05)
    vae.train()
    started = time.perf_counter()
    for step in range(steps):
        images = demo_image_batch(batch_size, size, seed=seed * 1_000_003 + step)
        posterior = vae.encode(images).latent_dist
        recon = vae.decode(posterior.sample()).sample
        foreground = (images < 0.98).any(dim=1, keepdim=True).float()
        weight = 1.0 + (FOREGROUND_WEIGHT - 1.0) * foreground
        loss = (weight * (recon - images).pow(2)).mean() + KL_WEIGHT * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 200 == 0 or step == steps - 1:
            logger.info("vae step %d/%d loss %.4f (%.0fs)", step + 1, steps, loss.item(), time.perf_counter() - started)
    vae.eval()
    with torch.no_grad():
        latents = vae.encode(demo_image_batch(64, size, seed=seed + 99)).latent_dist.mode()
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
