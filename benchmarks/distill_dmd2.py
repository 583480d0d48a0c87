"""Learning evidence for distillation: DMD2 turns the demo's trained model into a 1-step and a 4-step student.

Why: a distillation method earns trust only if the few-step student keeps what the teacher knows. On the
procedural shapes task (documentation/DEMO.md) that is *measured* with the demo's scorer:

1. the teacher is the demo's trained model (``simpletuner demo --out DIR`` first, or ``--train-teacher``),
   scored at its usual sampling (20 DDIM steps, guidance 3);
2. for each student step count, ``simpletuner train`` runs ``--training_method dmd2`` on the demo dataset,
   the student initialised from the teacher, the teacher's guidance distilled in;
3. each student is scored at its own step count with guidance 1, sampled the way its model card says
   (Euler at the student's timesteps), beside the teacher sampled the same way at that step count;
4. the table is printed and written as JSON; the exit code is 1 when the 1-step student keeps less than
   90% of the teacher's colour prompt-match.

    python benchmarks/distill_dmd2.py --teacher demo-output [--students 1 4] [--steps 3000] [--samples 96]
        [--update-freq 5] [--lr 1e-4] [--fake-lr 1e-3] [--fake-rank 64] [--gan-weight 0]
        [--model-type full|lora] [--work DIR]

The defaults are the settings measured in documentation/DISTILLATION.md.

A plumbing check: ``--steps 6 --samples 12`` (the target is then expected to fail).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TEACHER_STEPS, TEACHER_GUIDANCE = 20, 3.0
TARGET_COLOUR_KEPT = 0.9


def student_config(teacher: Path, work: Path, student_steps: int, args) -> Path:
    """A demo-style config that distils ``teacher/run/pipeline`` into a ``student_steps`` student."""
    datasets = json.loads((teacher / "multidatabackend.json").read_text())
    for entry in datasets:
        if entry.get("dataset_type") == "text_embeds":
            entry["cache_dir"] = str(work / "cache" / "text")
    out = work / f"student-{student_steps}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "multidatabackend.json").write_text(json.dumps(datasets, indent=2))
    settings = {"student_sample_steps": student_steps, "student_update_freq": args.update_freq,
                "guidance_scale": TEACHER_GUIDANCE, "gan_loss_weight_gen": args.gan_weight,
                "fake_score_lr": args.fake_lr, "fake_score_rank": args.fake_rank}
    config = {
        "model_family": "sd1x", "pretrained_model_name_or_path": str(teacher / "run" / "pipeline"),
        "model_type": args.model_type, "training_method": "dmd2",
        "distillation_config": settings, "output_dir": str(out / "run"),
        "data_backend_config": str(out / "multidatabackend.json"), "cache_dir": str(work / "cache"),
        "resolution": 64, "resolution_type": "pixel", "aspect_bucket_alignment": 8, "seed": 0,
        "mixed_precision": "no", "optimizer": "optimi-adamw", "learning_rate": args.lr, "adam_weight_decay": 0.0,
        "lr_scheduler": "constant", "lr_warmup_steps": 0, "max_grad_norm": 1.0, "train_batch_size": args.batch,
        "max_train_steps": args.steps, "checkpoint_step_interval": args.steps, "validation_disable": True,
        "report_to": "none", "torch_num_threads": 2, "overwrite_output_dir": True,
    }
    if args.model_type == "lora":
        config["lora_rank"] = args.rank
    path = out / "config.json"
    path.write_text(json.dumps(config, indent=2))
    return path


def student_pipeline(teacher: Path, run: Path, model_type: str):
    from diffusers import StableDiffusionPipeline

    if model_type == "full":
        return StableDiffusionPipeline.from_pretrained(run / "pipeline", safety_checker=None)
    pipeline = StableDiffusionPipeline.from_pretrained(teacher / "run" / "pipeline", safety_checker=None)
    pipeline.load_lora_weights(run, weight_name="pytorch_lora_weights.safetensors")
    return pipeline


def score(pipeline, samples: int, steps: int, guidance: float, timesteps: list[int] | None = None):
    """Colour / shape prompt-match of one image per balanced prompt (the demo's scorer and seed)."""
    import torch

    from simpletuner.testing.demo import score_prompts
    from simpletuner.testing.shapes import score_samples
    from simpletuner.validation.runner import ValidationSettings, generate_images, use_sampling_scheduler

    prompts = score_prompts(samples)
    settings = ValidationSettings(prompts=prompts, negative_prompt=None, num_images=1, num_inference_steps=steps,
                                  guidance=guidance, seed=4321, resolutions=[(64, 64)],
                                  sampling_scheduler="EulerDiscreteScheduler" if timesteps else None,
                                  sampling_timesteps=timesteps)
    use_sampling_scheduler(pipeline, settings, flow_matching=False)
    pipeline.set_progress_bar_config(disable=True)
    started = time.perf_counter()
    with torch.no_grad():
        images = generate_images(pipeline, prompts, settings, "cpu", (64, 64), batch_size=48,
                                 extra_arguments=settings.call_arguments())
    return score_samples(images, prompts), time.perf_counter() - started, images


def weight_memory(teacher: Path, work: Path, args) -> list[dict]:
    """Weights the three networks hold for a LoRA and a full student, against three full copies (measured on
    the loaded tensors: every distinct storage counted once)."""
    from simpletuner.options.resolve import resolve_run
    from simpletuner.training.trainer import Trainer

    rows = []
    for model_type in ("lora", "full"):
        options = argparse.Namespace(**{**vars(args), "model_type": model_type, "steps": 1})
        config = student_config(teacher, work / f"memory-{model_type}", 1, options)
        trainer = Trainer(resolve_run(["--config", str(config)]).config, show_progress=False)
        trainer.setup()
        held, base = trainer.method.networks.held_weight_bytes()
        rows.append({"student": model_type, "held_mb": held / 2**20, "three_copies_mb": 3 * base / 2**20})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", type=Path, required=True, help="a finished `simpletuner demo --out` folder")
    parser.add_argument("--work", type=Path, default=None, help="where the students go (default: TEACHER/distil)")
    parser.add_argument("--students", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--fake-lr", type=float, default=1e-3)
    parser.add_argument("--fake-rank", type=int, default=64)
    parser.add_argument("--update-freq", type=int, default=5)
    parser.add_argument("--gan-weight", type=float, default=0.0)
    parser.add_argument("--model-type", choices=("full", "lora"), default="full")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--samples", type=int, default=96)
    args = parser.parse_args()
    from diffusers import StableDiffusionPipeline

    from simpletuner.cli import main as cli_main
    from simpletuner.methods.distillation.levels import trailing_timesteps
    from simpletuner.validation.runner import make_grid

    teacher, work = args.teacher.resolve(), (args.work or args.teacher / "distil").resolve()
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    base = StableDiffusionPipeline.from_pretrained(teacher / "run" / "pipeline", safety_checker=None)
    result, seconds, _ = score(base, args.samples, TEACHER_STEPS, TEACHER_GUIDANCE)
    rows.append({"model": "teacher", "steps": TEACHER_STEPS, "guidance": TEACHER_GUIDANCE, "colour": result.colour,
                 "shape": result.shape, "train_minutes": None, "sample_seconds": seconds})
    print(f"[distil] teacher ({TEACHER_STEPS} steps, guidance {TEACHER_GUIDANCE}): colour {result.colour:.2f}, "
          f"shape {result.shape:.2f}", flush=True)
    for steps in args.students:  # what the teacher itself does at the student's step count (the baseline)
        base = StableDiffusionPipeline.from_pretrained(teacher / "run" / "pipeline", safety_checker=None)
        result, seconds, _ = score(base, args.samples, steps, TEACHER_GUIDANCE, trailing_timesteps(steps, 1000))
        rows.append({"model": f"teacher at {steps} step(s)", "steps": steps, "guidance": TEACHER_GUIDANCE,
                     "colour": result.colour, "shape": result.shape, "train_minutes": None, "sample_seconds": seconds})
        print(f"[distil] teacher at {steps} step(s): colour {result.colour:.2f}, shape {result.shape:.2f}", flush=True)
    for steps in args.students:
        config = student_config(teacher, work, steps, args)
        started = time.perf_counter()
        if cli_main(["train", "--config", str(config)]) != 0:
            return 2
        minutes = (time.perf_counter() - started) / 60
        pipeline = student_pipeline(teacher, Path(json.loads(config.read_text())["output_dir"]), args.model_type)
        result, seconds, images = score(pipeline, args.samples, steps, 1.0, trailing_timesteps(steps, 1000))
        make_grid(images[:36], columns=6).save(work / f"student-{steps}-samples.png")
        rows.append({"model": f"{steps}-step student", "steps": steps, "guidance": 1.0, "colour": result.colour,
                     "shape": result.shape, "train_minutes": minutes, "sample_seconds": seconds})
        print(f"[distil] {steps}-step student after {args.steps} DMD2 steps ({minutes:.1f} min): colour "
              f"{result.colour:.2f}, shape {result.shape:.2f}", flush=True)
    memory = weight_memory(teacher, work, args)
    (work / "results.json").write_text(json.dumps({"settings": vars(args) | {"teacher": str(teacher), "work": str(work)},
                                                   "rows": rows, "memory": memory}, indent=2, default=str))
    print("\n| student | weights held (MB) | three full copies (MB) |\n| --- | ---: | ---: |")
    for row in memory:
        print(f"| {row['student']} | {row['held_mb']:.2f} | {row['three_copies_mb']:.2f} |")
    print("\n| model | sampling steps | guidance | colour match | shape match | DMD2 training (min) | sampling 96 (s) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        train = "" if row["train_minutes"] is None else f"{row['train_minutes']:.1f}"
        print(f"| {row['model']} | {row['steps']} | {row['guidance']:g} | {row['colour']:.2f} | {row['shape']:.2f} | "
              f"{train} | {row['sample_seconds']:.1f} |")
    one_step = next((row for row in rows if row["model"] == "1-step student"), None)
    if one_step is None:
        return 0
    kept = one_step["colour"] / max(rows[0]["colour"], 1e-9)
    print(f"\n1-step student keeps {kept:.0%} of the teacher's colour prompt-match (target {TARGET_COLOUR_KEPT:.0%})")
    return 0 if kept >= TARGET_COLOUR_KEPT else 1


if __name__ == "__main__":
    raise SystemExit(main())
