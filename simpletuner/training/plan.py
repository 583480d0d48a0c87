"""``--dry-run``: show what a run would do without loading a model.

Prints the resolved config (what differs from the defaults, and where it came from), the launcher
settings, and for each dataset how many images were found, skipped and in which buckets. Only the
image headers are read, so this is fast and needs no torch.
"""

from __future__ import annotations

import json

from pathlib import Path

from simpletuner.data.backends import open_dataset
from simpletuner.data.buckets import bucket_alignment, bucket_label, pixel_edge
from simpletuner.data.config import load_dataset_plan
from simpletuner.data.geometry import buckets_of
from simpletuner.data.settings import resolve_dataset
from simpletuner.data.metadata import scan_image_dataset
from simpletuner.data.video import placement_function
from simpletuner.models.registry import family_info


def vae_scale_factor_of(model_path: str | None) -> int:
    """Pixels per latent cell, read from a local model folder's VAE config (8, as for every SD
    VAE, when the model is not a local folder); reading JSON keeps the dry run torch-free."""
    config_file = Path(model_path or "") / "vae" / "config.json"
    if model_path and config_file.is_file():
        vae = json.loads(config_file.read_text(encoding="utf-8"))
        if "scale_factor_spatial" in vae:  # video VAEs (Wan) state it; 16 for Wan 2.2's 5B VAE
            return int(vae["scale_factor_spatial"])
        if "temperal_downsample" in vae:  # Qwen-Image's 3-D VAE halves space once per entry (diffusers' spelling)
            return 2 ** len(vae["temperal_downsample"])
        stages = vae.get("block_out_channels") or vae["encoder_block_out_channels"]  # AutoencoderDC (Sana)
        return 2 ** (len(stages) - 1)
    return 8


def describe_datasets(config, plan=None) -> list[str]:
    """The datasets' buckets as training will make them (``plan``: the run's checked list, else read here)."""
    plan = plan if plan is not None else load_dataset_plan(config.data_backend_config)
    info = family_info(config.model_family)
    cell = 1 if info.pixel_space else vae_scale_factor_of(config.pretrained_model_name_or_path)
    scale = cell * info.latent_patch_size
    lines = [f"datasets ({config.data_backend_config}):"]
    for dataset in plan.enabled_images:
        dataset = resolve_dataset(dataset, config)  # the global data flags, as training applies them
        source = open_dataset(dataset)
        scan = scan_image_dataset(dataset, source)
        edge = pixel_edge(dataset.resolution, dataset.resolution_type)
        alignment = bucket_alignment(config.aspect_bucket_alignment, scale, edge)
        place = placement_function(dataset)  # videos: (width, height, frames) buckets and length rules
        placed, excluded = place(scan.records, dataset, alignment, rounding=config.aspect_bucket_rounding)
        buckets = buckets_of(placed)
        skipped = list(scan.skipped) + excluded
        sizes = ", ".join(f"{bucket_label(size)}: {len(records)}" for size, records in buckets.items()) or "none"
        lines.append(f"  {dataset.id}: {len(placed)} images used in {source.description}, "
                     f"{len(skipped)} skipped, repeats {dataset.repeats}; buckets {sizes}")
        for path, reason in skipped[:5]:
            lines.append(f"    skipped {path}: {reason}")
    lines.append(f"  text embeds cache: {plan.text_embeds.cache_dir}")
    return lines


def describe_launcher(launcher) -> str:
    """One line: processes, machines, compiler, extra accelerate arguments, and where they came from."""
    text = f"launcher: {launcher.num_processes} process(es), dynamo {launcher.dynamo_backend or 'off'}"
    if launcher.num_machines > 1:
        text += (f", {launcher.num_machines} machines (this one rank {launcher.machine_rank}, main "
                 f"{launcher.main_process_ip}:{launcher.main_process_port})")
    if launcher.accelerate_extra_args:
        text += f", accelerate args {' '.join(launcher.accelerate_extra_args)}"
    return text + (f", from {launcher.source}" if launcher.source else "")


def describe_plan(run) -> str:
    """The text ``--dry-run`` prints; secret values are redacted (simpletuner/options/secrets.py)."""
    from simpletuner.options.secrets import redacted_config

    config = run.config
    lines = [
        "=== resolved config (values that differ from the defaults) ===",
        json.dumps(redacted_config(config.non_default()), indent=2, default=str),
        f"config file: {run.config_file or 'none (flags only)'}",
        describe_launcher(run.launcher),
    ]
    lines += describe_datasets(config, run.dataset_plan)
    from simpletuner.memory.planner import describe as describe_memory

    lines.append(describe_memory(config, dataset_plan=run.dataset_plan))  # weights, optimizer, activations; a proposal with --memory_budget
    return "\n".join(lines)
