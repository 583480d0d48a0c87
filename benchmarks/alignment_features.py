"""Step time of SFT + CREPA with the teacher's features cached at data-caching time, against plain SFT and
against CREPA computing them live, measured in one run on the tiny flux.

Three trainers are built in this process from the same tiny flux, dataset, LoRA, optimizer and batch:

* ``sft``: no regularizer;
* ``cached``: ``--crepa_enabled`` with the default ``--alignment_teacher_features cached``: the DINOv2
  patch tokens come with the batch, so a step adds the projector and the alignment term only;
* ``live``: ``--alignment_teacher_features live``: every step decodes the cached latents with the VAE
  and runs DINOv2 on them as well.

Rounds alternate between the three so background load affects each alike; the report gives median step
times and the ratios cached / sft (target <= 1.15) and live / sft.

The teacher's size decides both costs: ``--teacher-hidden``, ``--teacher-layers`` and
``--teacher-image-size`` set the DINOv2 built for the run. Real pairings put a teacher no wider than the
denoiser (FLUX's tokens are 3072 wide, DINOv2-B's 768, DINOv2-g's 1536), and the projector's cost scales
with the teacher's width, so the default keeps that proportion for the tiny FLUX (32-wide tokens): a
16-wide, 4-layer DINOv2 at 224 pixels (256 patch tokens per image). ``--teacher-hidden 384`` (ViT-S's
width, twelve times the tiny denoiser's) is the stress case, where the projector alone outweighs much of
the tiny denoiser.

    python benchmarks/alignment_features.py [--steps 5] [--rounds 8] [--batch-size 4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODES = ("sft", "cached", "live")


def make_teacher(folder: Path, hidden: int, layers: int, image_size: int) -> Path:
    """A randomly initialised DINOv2 of the given width and depth, saved like a downloaded one."""
    import torch
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                          intermediate_size=4 * hidden, patch_size=14, image_size=image_size)
    Dinov2Model(config).save_pretrained(folder)
    return folder


def build_trainer(project: Path, mode: str, teacher: Path, image_size: int, batch_size: int):
    from simpletuner.options.resolve import resolve_run
    from simpletuner.training.trainer import Trainer

    argv = ["--model_family", "flux", "--pretrained_model_name_or_path", str(project / "model"),
            "--model_type", "lora", "--lora_rank", "4", "--output_dir", str(project / f"out-{mode}"),
            "--data_backend_config", str(project / "multidatabackend.json"), "--cache_dir", str(project / "cache"),
            "--resolution", "64", "--resolution_type", "pixel", "--aspect_bucket_alignment", "8",
            "--mixed_precision", "no", "--train_batch_size", str(batch_size), "--max_train_steps", "100000",
            "--optimizer", "optimi-adamw", "--learning_rate", "1e-4", "--seed", "0", "--report_to", "none",
            "--disable_benchmark", "true"]
    if mode != "sft":
        argv += ["--crepa_enabled", "true", "--crepa_block_index", "0", "--crepa_model", str(teacher),
                 "--crepa_encoder_image_size", str(image_size), "--alignment_teacher_features", mode]
    trainer = Trainer(resolve_run(argv).config, show_progress=False)
    trainer.setup()
    return trainer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5, help="steps per round and mode")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--teacher-hidden", type=int, default=16)
    parser.add_argument("--teacher-layers", type=int, default=4)
    parser.add_argument("--teacher-image-size", type=int, default=224)
    args = parser.parse_args()
    import torch

    from simpletuner.testing.projects import make_family_project

    print(f"load average before: {open('/proc/loadavg').read().split()[:3]}")
    with tempfile.TemporaryDirectory() as folder:
        project = make_family_project(Path(folder) / "flux", "flux", images=args.images)
        teacher = make_teacher(Path(folder) / "dinov2", args.teacher_hidden, args.teacher_layers,
                               args.teacher_image_size)
        trainers = {mode: build_trainer(project, mode, teacher, args.teacher_image_size, args.batch_size)
                    for mode in MODES}
        progress = {mode: trainer.progress_bar() for mode, trainer in trainers.items()}
        times: dict[str, list[float]] = {mode: [] for mode in MODES}
        for mode, trainer in trainers.items():  # warm-up
            for _ in range(3):
                trainer.run_one_step(progress[mode])
        for _ in range(args.rounds):
            for mode, trainer in trainers.items():
                trainer._last_step_end = None
                start = len(trainer.state.step_seconds)
                for _ in range(args.steps + 1):
                    trainer.run_one_step(progress[mode])
                times[mode] += trainer.state.step_seconds[start + 1:]  # the first one is only optimizer work
        for bar in progress.values():
            bar.close()
        crepa = next(item for item in trainers["cached"].regularizers.items if item.name == "crepa")
        loaded = crepa.teacher._encoder is not None
    medians = {mode: statistics.median(values) for mode, values in times.items()}
    print(f"\ntorch threads {torch.get_num_threads()}, batch {args.batch_size}, {len(times['sft'])} steps per mode, "
          f"teacher width {args.teacher_hidden} x {args.teacher_layers} layers at {args.teacher_image_size} px")
    for mode in MODES:
        print(f"{mode:>6} median step: {medians[mode] * 1000:.2f} ms")
    print(f"ratio cached / sft: {medians['cached'] / medians['sft']:.3f} (target <= 1.15)")
    print(f"ratio live / sft:   {medians['live'] / medians['sft']:.3f}")
    print(f"ratio live / cached: {medians['live'] / medians['cached']:.3f}")
    print(f"the cached run loaded the teacher's weights while training: {loaded}")
    print(f"load average after: {open('/proc/loadavg').read().split()[:3]}")
    return 0 if medians["cached"] / medians["sft"] <= 1.15 else 1


if __name__ == "__main__":
    sys.exit(main())
