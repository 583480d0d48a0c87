"""Trainer step time vs a bare PyTorch loop doing the same work, measured in one run.

Both sides train the same tiny sd1x UNet with the same LoRA (rank 4), optimizer, batch size (4) and
cached latents/text embeddings: draw latents from the cached posterior, noise them at random
timesteps, forward, MSE, backward, clip gradients, optimizer step. The trainer additionally does
what a real run does every step: batch assembly from the sampler, accelerate's accumulation context,
the LR schedule, tensorboard scalars and the progress bar. Rounds alternate between the two so
background load affects both equally. Prints the ratio of median step times (target: <= 1.10).

``--load`` measures instead how the trainer's step holds up on a busy CPU: the median trainer step,
quiet and while ``--load-processes`` other torch jobs compete for the cores, once with the OpenMP
settings torch gets by default ("before") and once with simpletuner's CPU runtime defaults
(simpletuner/training/cpu_runtime.py, "after"). Each cell runs in a fresh process, because the
OpenMP runtime reads its settings when torch is imported. Targets: the loaded step far below
before, and the quiet step no slower than before (within noise); with N competing jobs that each want
every core, (N + 1) x the quiet step is the fair share of the CPU, the floor for loaded / quiet.

    python benchmarks/step_overhead.py [--steps 10] [--rounds 20]
    python benchmarks/step_overhead.py --load [--load-steps 40] [--load-processes 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build_trainer(work: Path, batch_size: int):
    from simpletuner.options.resolve import resolve_run
    from simpletuner.testing.shapes import make_demo_dataset
    from simpletuner.testing.tiny_models import make_tiny_model
    from simpletuner.training.trainer import Trainer

    make_tiny_model("sd1x", work / "model")
    make_demo_dataset(work / "data", 64, size=64)
    datasets = [
        {"id": "shapes", "type": "local", "instance_data_dir": str(work / "data"), "resolution": 64,
         "resolution_type": "pixel"},
        {"id": "text", "dataset_type": "text_embeds", "cache_dir": str(work / "cache" / "text")},
    ]
    (work / "datasets.json").write_text(json.dumps(datasets))
    argv = ["--model_family", "sd1x", "--pretrained_model_name_or_path", str(work / "model"),
            "--model_type", "lora", "--lora_rank", "4", "--lora_dropout", "0", "--output_dir", str(work / "out"),
            "--data_backend_config", str(work / "datasets.json"), "--cache_dir", str(work / "cache"),
            "--resolution", "64", "--resolution_type", "pixel", "--mixed_precision", "no",
            "--train_batch_size", str(batch_size), "--max_train_steps", "100000", "--optimizer", "optimi-adamw",
            "--learning_rate", "1e-4", "--max_grad_norm", "1.0", "--seed", "0", "--report_to", "tensorboard"]
    trainer = Trainer(resolve_run(argv).config, show_progress=True)
    trainer.setup()
    return trainer


def bare_loop_factory(trainer):
    """A plain PyTorch step over the same model, optimizer and a fixed batch of the same tensors."""
    import torch
    import torch.nn.functional as F

    model = trainer.model
    unet = trainer._unwrapped_denoiser()
    scheduler = model.noise_scheduler()
    params = trainer.trainable
    optimizer = trainer.optimizer.optimizer  # the same optimi AdamW, unwrapped from accelerate
    batch = trainer.data.next_batch()
    mean, std, embeds = batch["latent_mean"], batch["latent_std"], batch["prompt_embeds"]
    scale = model.vae.config.scaling_factor

    def step() -> float:
        latents = (mean + std * torch.randn_like(mean)) * scale
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],))
        noisy = scheduler.add_noise(latents, noise, timesteps)
        prediction = unet(noisy, timesteps, encoder_hidden_states=embeds, return_dict=False)[0]
        return apply_update(F.mse_loss(prediction.float(), noise.float()), params, optimizer)

    return step


def apply_update(loss, params, optimizer) -> float:
    """The bare step's update, the one the trainer makes (backward, clip to norm 1.0, step, clear);
    shared with ``video_step.py`` so both benchmarks compare the trainer with the same bare work."""
    import torch

    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def time_trainer_and_bare(trainer, bare_step, rounds: int, steps: int) -> tuple[list[float], list[float]]:
    """Seconds per trainer step and per bare step, after 5 warm-up steps of each, measured in ``rounds``
    alternating blocks of ``steps`` so that a change in the machine's load hits both sides alike.

    Each trainer block runs one extra step first and drops its time: after a pause the trainer's first
    step time only covers the optimizer work."""
    progress = trainer.progress_bar()
    trainer_times, bare_times = [], []
    for _ in range(5):  # warm-up both paths
        trainer.run_one_step(progress)
        bare_step()
    for _ in range(rounds):
        trainer._last_step_end = None
        start = len(trainer.state.step_seconds)
        for _ in range(steps + 1):
            trainer.run_one_step(progress)
        trainer_times += trainer.state.step_seconds[start + 1:]
        for _ in range(steps):
            started = time.perf_counter()
            bare_step()
            bare_times.append(time.perf_counter() - started)
    progress.close()
    return trainer_times, bare_times


# --- the loaded-machine comparison (--load) ------------------------------------------------------------

#: A competing job: another process doing torch matmuls on every core, as a second training run would.
COMPETING_JOB = """
import torch
a = torch.randn(384, 384)
while True:
    a = torch.tanh(a @ a) * 0.5
"""


def trainer_step_median(batch_size: int, steps: int) -> float:
    """The median trainer step (seconds) over ``steps`` steps after 5 warm-up steps, in this process."""
    with tempfile.TemporaryDirectory() as folder:
        trainer = build_trainer(Path(folder), batch_size)
        progress = trainer.progress_bar()
        for _ in range(5):
            trainer.run_one_step(progress)
        start = len(trainer.state.step_seconds)
        for _ in range(steps):
            trainer.run_one_step(progress)
        progress.close()
        return statistics.median(trainer.state.step_seconds[start:])


def child_environment(after: bool) -> dict[str, str]:
    """"before": torch's own OpenMP defaults; "after": simpletuner's (what `simpletuner train` sets)."""
    from simpletuner.training.cpu_runtime import USER_CHOICES, apply_cpu_runtime_defaults

    env = {name: value for name, value in os.environ.items() if name not in USER_CHOICES}
    if after:
        apply_cpu_runtime_defaults(env)
    return env


def measure_cell(after: bool, loaded: bool, args) -> float:
    """One cell of the table in a fresh process (optionally beside competing jobs)."""
    import subprocess

    competitors = [subprocess.Popen([sys.executable, "-c", COMPETING_JOB]) for _ in range(args.load_processes if loaded else 0)]
    try:
        time.sleep(2.0 if loaded else 0.0)  # let the competing jobs reach full speed
        result = subprocess.run([sys.executable, __file__, "--one-cell", "--load-steps", str(args.load_steps),
                                 "--batch-size", str(args.batch_size)], env=child_environment(after),
                                capture_output=True, text=True, check=True)
    finally:
        for process in competitors:
            process.kill()
            process.wait()
    return float(json.loads(result.stdout.strip().splitlines()[-1])["median_step"])


def compare_under_load(args) -> int:
    print(f"load average before: {open('/proc/loadavg').read().split()[:3]}")
    cells = {}
    for after in (False, True):
        for loaded in (False, True):
            cells[after, loaded] = measure_cell(after, loaded, args)
            print(f"{'after ' if after else 'before'} {'loaded' if loaded else 'quiet '}: "
                  f"median step {cells[after, loaded] * 1000:.1f} ms", flush=True)
    print(f"\n| settings | quiet | loaded ({args.load_processes} competing torch jobs) | loaded / quiet |")
    print("| --- | ---: | ---: | ---: |")
    for after in (False, True):
        quiet, loaded = cells[after, False], cells[after, True]
        label = "after (simpletuner defaults)" if after else "before (torch defaults)"
        print(f"| {label} | {quiet * 1000:.1f} ms | {loaded * 1000:.1f} ms | {loaded / quiet:.2f} |")
    ratio_after = cells[True, True] / cells[True, False]
    quiet_change = cells[True, False] / cells[False, False]
    fair_share = args.load_processes + 1
    print(f"\nafter: loaded / quiet {ratio_after:.2f} (fair share of the CPU: {fair_share}x); loaded after / loaded "
          f"before {cells[True, True] / cells[False, True]:.2f}; quiet after / quiet before {quiet_change:.2f}")
    print(f"load average after: {open('/proc/loadavg').read().split()[:3]}")
    return 0 if cells[True, True] < cells[False, True] and quiet_change <= 1.15 else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="steps per round and side")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--load", action="store_true", help="quiet vs loaded CPU, before vs after the defaults")
    parser.add_argument("--load-steps", type=int, default=40, help="measured trainer steps per --load cell")
    parser.add_argument("--load-processes", type=int, default=2, help="competing torch jobs in the loaded cells")
    parser.add_argument("--one-cell", action="store_true", help=argparse.SUPPRESS)  # a child of --load
    args = parser.parse_args()
    if args.load:
        return compare_under_load(args)
    if args.one_cell:
        print(json.dumps({"median_step": trainer_step_median(args.batch_size, args.load_steps)}))
        return 0
    import torch

    with tempfile.TemporaryDirectory() as folder:
        trainer = build_trainer(Path(folder), args.batch_size)
        bare_step = bare_loop_factory(trainer)
        trainer_times, bare_times = time_trainer_and_bare(trainer, bare_step, args.rounds, args.steps)
    trainer_median = statistics.median(trainer_times)
    bare_median = statistics.median(bare_times)
    print(f"\ntorch threads {torch.get_num_threads()}, batch {args.batch_size}, {len(trainer_times)} steps per side")
    print(f"trainer median step: {trainer_median * 1000:.2f} ms")
    print(f"bare    median step: {bare_median * 1000:.2f} ms")
    print(f"ratio trainer / bare: {trainer_median / bare_median:.3f} (target <= 1.10)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
