"""The demo: teach a tiny Stable Diffusion model coloured shapes on a CPU and measure it.

1. build the tiny sd1x model (real diffusers classes, shipped demo VAE) and the shapes dataset;
2. score the untrained model: generate one image per prompt and check its colour and shape;
3. train with the ordinary ``simpletuner train`` entry point and the example config
   ``config/examples/demo``; it checkpoints along the way;
4. score every checkpoint and the final pipeline, and print the curve.

Chance is 1/6 for colour and 1/3 for shape.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

logger = logging.getLogger(__name__)

EXAMPLE_DIR = Path(__file__).resolve().parents[2] / "config" / "examples" / "demo"
DEMO_IMAGES = 2400
DEMO_SCORE_SAMPLES = 96


def score_prompts(count: int) -> list[str]:
    """Balanced prompts: every colour x shape, repeated up to ``count``."""
    from simpletuner.testing.shapes import all_specs

    specs = all_specs()
    return [specs[i % len(specs)].caption for i in range(count)]


def score_pipeline(pipeline, count: int, steps: int, guidance: float, size: int, seed: int = 4321):
    """Generate one image per balanced prompt and score colour/shape prompt-match."""
    import torch

    from simpletuner.testing.shapes import score_samples
    from simpletuner.validation.runner import ValidationSettings, generate_images

    prompts = score_prompts(count)
    settings = ValidationSettings(prompts=prompts, negative_prompt=None, num_images=1, num_inference_steps=steps,
                                  guidance=guidance, seed=seed, resolutions=[(size, size)])
    pipeline.set_progress_bar_config(disable=True)
    with torch.no_grad():
        images = generate_images(pipeline, prompts, settings, "cpu", (size, size), batch_size=48)
    return score_samples(images, prompts), images


def write_demo_config(out: Path, model_dir: Path, data_dir: Path, steps: int | None) -> Path:
    """Copy the example demo config, pointing it at this run's folders."""
    config = json.loads((EXAMPLE_DIR / "config.json").read_text(encoding="utf-8"))
    datasets = json.loads((EXAMPLE_DIR / "multidatabackend.json").read_text(encoding="utf-8"))
    for entry in datasets:
        if entry.get("dataset_type", "image") == "image":
            entry["instance_data_dir"] = str(data_dir)
        else:
            entry["cache_dir"] = str(out / "cache" / "text")
    (out / "multidatabackend.json").write_text(json.dumps(datasets, indent=2) + "\n", encoding="utf-8")
    config.update(
        pretrained_model_name_or_path=str(model_dir),
        output_dir=str(out / "run"),
        data_backend_config=str(out / "multidatabackend.json"),
        cache_dir=str(out / "cache"),
        overwrite_output_dir=True,  # the demo measures a run from scratch: an earlier demo run is moved aside
    )
    if steps:
        config["max_train_steps"] = steps
        config["checkpoint_step_interval"] = max(1, steps // 4)
    path = out / "config.json"
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return path


def run_demo(out: Path, steps: int | None = None, samples: int | None = None) -> dict:
    """Run the whole demo; returns the score curve {step: (colour, shape)}."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_model

    from simpletuner.cli import main as cli_main
    from simpletuner.testing.shapes import make_demo_dataset
    from simpletuner.testing.tiny_models import make_tiny_model
    from simpletuner.training.checkpoint import list_checkpoints

    samples = samples or DEMO_SCORE_SAMPLES
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    model_dir, data_dir = out / "model", out / "data"
    report = make_tiny_model("sd1x", model_dir, seed=0)
    print(f"[demo] tiny sd1x model: {report.parameters}; VAE {report.vae_source}, PSNR {report.vae_psnr_db:.1f} dB")
    if not any(data_dir.glob("*.png")):
        make_demo_dataset(data_dir, DEMO_IMAGES, size=64, seed=0)
    config_path = write_demo_config(out, model_dir, data_dir, steps)
    config = json.loads(config_path.read_text(encoding="utf-8"))
    score_args = dict(count=samples, steps=config["validation_num_inference_steps"],
                      guidance=config["validation_guidance"], size=64)

    base = StableDiffusionPipeline.from_pretrained(model_dir)
    curve = {0: score_pipeline(base, **score_args)[0]}
    print(f"[demo] before training: colour match {curve[0].colour:.2f}, shape match {curve[0].shape:.2f} "
          f"(chance 0.17 / 0.33) on {samples} samples")

    train_started = time.perf_counter()
    code = cli_main(["train", "--config", str(config_path)])
    if code != 0:
        raise SystemExit(code)
    train_seconds = time.perf_counter() - train_started

    run_dir = Path(config["output_dir"])
    for info in list_checkpoints(run_dir):
        if info.step == config["max_train_steps"]:
            continue
        load_model(base.unet, str(info.path / "denoiser.safetensors"))
        curve[info.step] = score_pipeline(base, **score_args)[0]
    final = StableDiffusionPipeline.from_pretrained(run_dir / ("ema/pipeline" if config.get("use_ema") else "pipeline"))
    result, images = score_pipeline(final, **score_args)
    curve[config["max_train_steps"]] = result
    from simpletuner.validation.runner import make_grid

    make_grid(images[:36], columns=6).save(out / "final_samples.png")

    print("[demo] prompt-match curve (step: colour / shape):")
    for step in sorted(curve):
        print(f"[demo]   {step:>5}: {curve[step].colour:.2f} / {curve[step].shape:.2f}")
    print(f"[demo] colour match {curve[0].colour:.2f} -> {result.colour:.2f}, shape match "
          f"{curve[0].shape:.2f} -> {result.shape:.2f}; training took {train_seconds / 60:.1f} min, "
          f"whole demo {(time.perf_counter() - started) / 60:.1f} min; samples in {out / 'final_samples.png'}")
    return {step: (match.colour, match.shape) for step, match in curve.items()}
