"""The video path's overhead: clip-latent caching and the training step of a tiny Wan model, each
against a bare PyTorch loop doing the same work on the same model, measured in one run.

* **Cache.** simpletuner's start-up caching of a video dataset (scan, PyAV decode, per-frame resize
  and crop, VAE encode in batches of ``--vae_batch_size``, content hashes and safetensors entries
  on disk) against a bare loop that decodes the same files with PyAV and encodes them with the same
  VAE in batches of the same size. Rounds alternate; each round starts from an empty latent cache.
* **Step.** ``Trainer.run_one_step`` (sampler batch assembly, accelerate, SFT's flow noising on 5-D
  latents, gradient clipping, LR schedule, TensorBoard scalars, progress bar) against a bare step:
  latents drawn from the same cached posterior and normalised per channel, flow noise at a
  logit-normal sigma, the LoRA'd transformer, MSE on the velocity, backward, clipping, optimizer.

Both print the ratio of medians (target for the step: at most 1.10, as for images).

    python benchmarks/video_step.py [--clips 16] [--frames 9] [--size 32] [--steps 10] [--rounds 10]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# The timing loop and the bare update are step_overhead.py's, so the image and video benchmarks measure
# alike; this folder is the script's own and so on sys.path when it runs as ``python benchmarks/video_step.py``.
from step_overhead import apply_update, time_trainer_and_bare  # noqa: E402


def build_trainer(work: Path, args):
    from simpletuner.options.resolve import resolve_run
    from simpletuner.testing.clips import make_demo_clips
    from simpletuner.testing.tiny.wan import make_tiny_wan
    from simpletuner.training.trainer import Trainer

    make_tiny_wan(work / "model", "t2v-2.1")
    make_demo_clips(work / "clips", args.clips, frames=args.frames, size=args.size)
    datasets = [
        {"id": "clips", "type": "local", "dataset_type": "video", "instance_data_dir": str(work / "clips"),
         "resolution": args.size, "resolution_type": "pixel", "video": {"num_frames": args.frames}},
        {"id": "text", "dataset_type": "text_embeds", "cache_dir": str(work / "cache" / "text")},
    ]
    (work / "datasets.json").write_text(json.dumps(datasets))
    argv = ["--model_family", "wan", "--model_flavour", "t2v-1.3b-2.1", "--pretrained_model_name_or_path",
            str(work / "model"), "--model_type", "lora", "--lora_rank", "4", "--lora_dropout", "0",
            "--output_dir", str(work / "out"), "--data_backend_config", str(work / "datasets.json"),
            "--cache_dir", str(work / "cache"), "--resolution", str(args.size), "--resolution_type", "pixel",
            "--mixed_precision", "no", "--train_batch_size", str(args.batch_size), "--vae_batch_size",
            str(args.vae_batch_size), "--tokenizer_max_length", "16", "--max_train_steps", "100000",
            "--optimizer", "optimi-adamw", "--learning_rate", "1e-4", "--max_grad_norm", "1.0", "--seed", "0",
            "--report_to", "tensorboard"]
    trainer = Trainer(resolve_run(argv).config, show_progress=True)
    trainer.setup()
    return trainer


# --- caching ------------------------------------------------------------------------------------------


def cache_with_simpletuner(trainer) -> float:
    """Seconds to cache every clip's latents through the data path, from an empty latent cache."""
    from simpletuner.data.build import build_training_data

    cache = trainer.data.latent_caches["clips"].cache_dir
    shutil.rmtree(cache, ignore_errors=True)
    started = time.perf_counter()
    data = build_training_data(trainer.config, trainer.model, trainer.dataset_plan, show_progress=False)
    seconds = time.perf_counter() - started
    assert data.summaries[0].latents_built == len(list(Path(trainer.config.data_backend_config).parent.glob(
        "clips/*.mp4")))
    data.close()
    return seconds


def cache_bare(trainer, folder: Path, frames: int, batch: int) -> float:
    """Seconds to decode every clip with PyAV and encode it with the same VAE, in batches of ``batch``."""
    import av
    import numpy as np
    import torch

    files = sorted(folder.glob("*.mp4"))
    started = time.perf_counter()
    for first in range(0, len(files), batch):
        clips = []
        for file in files[first:first + batch]:
            with av.open(str(file)) as container:
                decoded = [frame.to_ndarray(format="rgb24") for _, frame in
                           zip(range(frames), container.decode(video=0))]
            pixels = torch.from_numpy(np.stack(decoded)).float() / 127.5 - 1
            clips.append(pixels.permute(3, 0, 1, 2))
        with torch.no_grad():
            posterior = trainer.model.vae.encode(torch.stack(clips)).latent_dist
            (posterior.mean.clone(), posterior.std.clone())
    return time.perf_counter() - started


# --- the step -----------------------------------------------------------------------------------------


def bare_loop_factory(trainer):
    """A plain PyTorch flow-matching step over the same model, optimizer and a fixed batch of the same tensors."""
    import torch
    import torch.nn.functional as F

    model = trainer.model
    transformer = trainer._unwrapped_denoiser()
    params = trainer.trainable
    optimizer = trainer.optimizer.optimizer  # the same optimi AdamW, unwrapped from accelerate
    batch = trainer.data.next_batch()
    mean, std, embeds = batch["latent_mean"], batch["latent_std"], batch["prompt_embeds"]
    channels = (1, -1, 1, 1, 1)
    latents_mean = torch.tensor(model.vae.config.latents_mean).view(channels)
    latents_std = torch.tensor(model.vae.config.latents_std).view(channels)
    shift = model.default_flow_shift

    def step() -> float:
        latents = (mean + std * torch.randn_like(mean) - latents_mean) / latents_std
        noise = torch.randn_like(latents)
        sigmas = torch.sigmoid(torch.randn(latents.shape[0]))
        sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
        s = sigmas.view(-1, 1, 1, 1, 1)
        noisy = (1 - s) * latents + s * noise
        prediction = transformer(hidden_states=noisy, timestep=sigmas * 1000, encoder_hidden_states=embeds,
                                 return_dict=False)[0]
        return apply_update(F.mse_loss(prediction.float(), (noise - latents).float()), params, optimizer)

    return step


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=16)
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--vae-batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10, help="steps per round and side")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--cache-rounds", type=int, default=3)
    args = parser.parse_args()
    import torch

    print(f"load average before: {open('/proc/loadavg').read().split()[:3]}")
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        trainer = build_trainer(work, args)
        ours, bare = [], []
        for _ in range(args.cache_rounds):
            ours.append(cache_with_simpletuner(trainer))
            bare.append(cache_bare(trainer, work / "clips", args.frames, args.vae_batch_size))
        bare_step = bare_loop_factory(trainer)
        trainer_times, bare_times = time_trainer_and_bare(trainer, bare_step, args.rounds, args.steps)
        trainer.data.close()
    cache_ours, cache_bare_median = statistics.median(ours), statistics.median(bare)
    step_ours, step_bare = statistics.median(trainer_times), statistics.median(bare_times)
    print(f"\ntorch threads {torch.get_num_threads()}; {args.clips} clips of {args.frames} frames at {args.size} px; "
          f"batch {args.batch_size}; {len(trainer_times)} steps per side")
    print(f"cache  simpletuner {cache_ours:.3f} s, bare {cache_bare_median:.3f} s, ratio {cache_ours / cache_bare_median:.3f}")
    print(f"step   trainer {step_ours * 1000:.2f} ms, bare {step_bare * 1000:.2f} ms, ratio "
          f"{step_ours / step_bare:.3f} (target <= 1.10)")
    print(f"load average after: {open('/proc/loadavg').read().split()[:3]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
