"""The model card: ``README.md`` next to the run's product, written at the end of every run.

The YAML front matter uses the keys the Hugging Face Hub reads (``base_model``, ``tags``,
``library_name``, ``pipeline_tag``, ``inference``); the body says what was trained and how, shows the
final validation grids and how to load the result with diffusers. Also here: the
``modelspec.comment`` entry ``--modelspec_comment`` adds to saved LoRA files.

Both are published with the weights, so neither may carry a secret: a token or password of the config,
or the value of a secret-named environment variable (``HF_TOKEN``...) that reached a note or comment
through ``{env:NAME}``, is replaced by ``<redacted>`` (simpletuner/options/secrets.py).
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from simpletuner.options.secrets import environment_secrets, mask_url_credentials, scrub_text, secret_values

logger = logging.getLogger(__name__)

CARD_FILE = "README.md"
MODELSPEC_COMMENT_KEY = "modelspec.comment"
NSFW_TAG = "not-for-all-audiences"
_ENV = re.compile(r"\{env:([A-Za-z_][A-Za-z0-9_]*)\}")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def known_secrets(config) -> set[str]:
    """The secrets of a config (webhook URLs, keys, tokens) and of the environment, to scrub from text
    that is published."""
    return secret_values(config.as_dict()) | environment_secrets()


def modelspec_comment(config) -> str | None:
    """``--modelspec_comment`` as stored in the file: lines joined, ``{env:NAME}`` filled in from the
    environment (a placeholder whose variable is unset stays as written), known secrets redacted. Read
    at every save, so each checkpoint carries the value the config has then."""
    value = config.modelspec_comment
    if value in (None, "", []):
        return None
    if isinstance(value, (list, tuple)):
        value = "\n".join(str(line) for line in value)
    text = _ENV.sub(lambda match: os.environ.get(match.group(1), match.group(0)), str(value))
    return scrub_text(text, known_secrets(config))


def modelspec_metadata(config) -> dict[str, str]:
    """Extra safetensors metadata for a saved LoRA file (empty without ``--modelspec_comment``)."""
    comment = modelspec_comment(config)
    return {MODELSPEC_COMMENT_KEY: comment} if comment else {}


def is_hub_id(path: str | None) -> bool:
    """``owner/name`` that is not a folder on this machine: something the Hub can link to."""
    return bool(path) and bool(_HUB_ID.match(str(path))) and not Path(str(path)).exists()


@dataclass
class CardFacts:
    """Everything the card says; filled from a finished trainer by :func:`facts_from_trainer`."""

    family: str
    base_model: str
    model_type: str  # "lora", "full" or "controlnet" (--controlnet: the product is a controlnet/ folder)
    weights: str  # path of the product relative to the output dir ("pytorch_lora_weights.safetensors", "pipeline")
    steps: int
    images_seen: int
    resolution: str
    optimizer: str
    learning_rate: float
    mixed_precision: str
    lora_rank: int | None = None
    lora_alpha: float | None = None
    lora_type: str = "standard"
    #: ``--control``: the pipeline takes a control image (channel-concatenated control, FluxControlPipeline)
    control: bool = False
    batch: str = ""
    prompts: list[str] = field(default_factory=list)
    grids: list[str] = field(default_factory=list)  # relative to the output dir
    note: str | None = None
    safe_for_work: bool = False
    repo_id: str | None = None
    #: a distilled few-step student: its method and how to sample it (steps, guidance, scheduler, timesteps)
    distilled: dict | None = None


def front_matter(facts: CardFacts) -> dict:
    kind = facts.model_type if facts.model_type in ("lora", "controlnet") else "full"
    tags = ["diffusers", "simpletuner", kind, facts.family,
            "text-to-image"]
    if not facts.safe_for_work:
        tags.append(NSFW_TAG)
    meta: dict = {}
    if is_hub_id(facts.base_model):  # the Hub rejects a base_model that is not a model id (e.g. a local folder)
        meta["base_model"] = facts.base_model
    meta.update({"library_name": "diffusers", "pipeline_tag": "text-to-image", "tags": tags,
                 "inference": "base_model" in meta})
    return meta


def _yaml(meta: dict) -> str:
    """Block-style YAML; scalars are JSON-quoted where that matters (JSON strings are valid YAML)."""
    lines = []
    for key, value in meta.items():
        if isinstance(value, list):
            lines.append(f"{key}:")
            lines.extend(f"- {json.dumps(item)}" for item in value)
        elif isinstance(value, bool):
            lines.append(f"{key}: {'true' if value else 'false'}")
        else:
            lines.append(f"{key}: {json.dumps(value)}")
    return "\n".join(lines)


def _family_lora_usage(family: str, base: str, source: str, weights: str) -> list[str]:
    """The family table's LoRA-loading lines (``FamilyInfo.lora_usage``) for families whose pipeline has
    no ``load_lora_weights``, filled in; empty for the others (and for a family not in the table)."""
    from simpletuner.models.registry import FAMILIES

    info = FAMILIES.get(family)
    lines = info.lora_usage if info is not None else ()
    return ["import torch", *(line.format(base=base, source=source, weights=weights) for line in lines)] if lines else []


def _usage(facts: CardFacts) -> str:
    source = json.dumps(facts.repo_id or "path/to/output_dir")
    base = json.dumps(facts.base_model)
    if facts.model_type == "controlnet":
        return ("The ControlNet is in `controlnet/`: load it with the family's diffusers ControlNet class "
                "(`ControlNetModel`, `SD3ControlNetModel`) and pass it, with the base model, to the family's "
                "ControlNet pipeline (`StableDiffusionControlNetPipeline`, `StableDiffusionXLControlNetPipeline`, "
                "`StableDiffusion3ControlNetPipeline`) "
                "together with a control image. See documentation/CONTROLNET.md.")
    if facts.model_type == "lora":
        code = ["import torch", "from diffusers import DiffusionPipeline", "",
                f"pipeline = DiffusionPipeline.from_pretrained({base}, torch_dtype=torch.bfloat16).to(\"cuda\")",
                f"pipeline.load_lora_weights({source}, weight_name={json.dumps(facts.weights)})"]
        code = _family_lora_usage(facts.family, base, source, json.dumps(facts.weights)) or code
    elif facts.repo_id:
        code = ["import torch", "from diffusers import DiffusionPipeline",
                "from huggingface_hub import snapshot_download", "",
                f"folder = snapshot_download({source}, allow_patterns=[\"pipeline/*\"])",
                "pipeline = DiffusionPipeline.from_pretrained(folder + \"/pipeline\", "
                "torch_dtype=torch.bfloat16).to(\"cuda\")"]
    else:
        code = ["import torch", "from diffusers import DiffusionPipeline", "",
                "pipeline = DiffusionPipeline.from_pretrained(\"path/to/output_dir/pipeline\", "
                "torch_dtype=torch.bfloat16).to(\"cuda\")"]
    prompt = json.dumps(facts.prompts[0] if facts.prompts else "a photo of ...")
    sampling = _student_sampling(facts.distilled)
    if facts.distilled and facts.distilled.get("scheduler"):
        code[1] = code[1] + f", {facts.distilled['scheduler']}"
        code.append(f"pipeline.scheduler = {facts.distilled['scheduler']}.from_config(pipeline.scheduler.config)")
    if facts.control:  # the trained input layer expects the control image's latents beside the noise
        code[1:1] = ["from diffusers.utils import load_image"]
        code.append(f"image = pipeline({prompt}, control_image=load_image(\"control.png\")).images[0]")
    else:
        code.append(f"image = pipeline({prompt}{sampling}).images[0]")
    code.append("image.save(\"output.png\")")
    text = "```python\n" + "\n".join(code) + "\n```"
    if facts.lora_type == "lycoris":
        text += ("\n\nThis is a LyCORIS adapter: diffusers' `load_lora_weights` cannot read it; load it with "
                 "the `lycoris` package (`create_lycoris_from_weights`) or a UI that supports LyCORIS.")
    return text


def _student_sampling(distilled: dict | None) -> str:
    """The pipeline keyword arguments a distilled student samples with (empty for an ordinary model)."""
    if not distilled:
        return ""
    arguments = f", num_inference_steps={distilled['steps']}, guidance_scale={distilled['guidance']:g}"
    if distilled.get("timesteps"):
        arguments += f", timesteps={list(distilled['timesteps'])}"
    return arguments


def _distillation_section(distilled: dict) -> list[str]:
    lines = ["## Sampling", "",
             f"This is a few-step student distilled with {distilled['method']}: sample it with "
             f"**{distilled['steps']} step{'s' if distilled['steps'] != 1 else ''}** and guidance scale "
             f"**{distilled['guidance']:g}** (the teacher's classifier-free guidance is part of the student)."]
    if distilled.get("scheduler"):
        timesteps = f" at timesteps {list(distilled['timesteps'])}" if distilled.get("timesteps") else ""
        lines.append(f"Use `{distilled['scheduler']}`{timesteps}, the path it was trained on.")
    return lines + [""]


def render_model_card(facts: CardFacts) -> str:
    what = (f"a {'LyCORIS' if facts.lora_type == 'lycoris' else 'LoRA'} adapter" if facts.model_type == "lora"
            else "a ControlNet" if facts.model_type == "controlnet" else "a full fine-tune")
    parts = ["---", _yaml(front_matter(facts)), "---", ""]
    title = facts.repo_id.split("/")[-1] if facts.repo_id else f"{facts.family} {facts.model_type}"
    parts += [f"# {title}", ""]
    if facts.note:
        parts += [facts.note.strip(), ""]
    parts += [f"This is {what} for the **{facts.family}** model family, trained from `{facts.base_model}` "
              "with simpletuner.", ""]
    if not facts.safe_for_work:
        parts += ["> The training data was not reviewed for this card; outputs may not be suitable for all "
                  "audiences.", ""]
    rows = [("Base model", f"`{facts.base_model}`"), ("Model family", facts.family)]
    if facts.model_type == "lora":
        rows.append(("Training type", f"{facts.lora_type} LoRA, rank {facts.lora_rank}, alpha {facts.lora_alpha}"))
    elif facts.model_type == "controlnet":
        rows.append(("Training type", "ControlNet (all ControlNet weights; the base model stays frozen)"))
    else:
        rows.append(("Training type", "full (all denoiser weights)"))
    rows += [("Optimizer steps", str(facts.steps)), ("Images seen", str(facts.images_seen)),
             ("Resolution", facts.resolution), ("Optimizer", facts.optimizer),
             ("Learning rate", f"{facts.learning_rate:g}"), ("Mixed precision", facts.mixed_precision)]
    if facts.batch:
        rows.append(("Batch", facts.batch))
    parts += ["## Training settings", "", "| Setting | Value |", "| --- | --- |"]
    parts += [f"| {name} | {value} |" for name, value in rows]
    parts.append("")
    if facts.prompts:
        parts += ["## Validation", "", "Prompts used for the validation images:", ""]
        parts += [f"- `{prompt}`" for prompt in facts.prompts]
        parts.append("")
        for grid in facts.grids:
            parts += [f"![validation grid]({grid})", ""]
    if facts.distilled:
        parts += _distillation_section(facts.distilled)
    parts += ["## How to use", "", _usage(facts), ""]
    return "\n".join(parts)


def facts_from_trainer(trainer, result) -> CardFacts:
    """Read what the card needs from a finished :class:`~simpletuner.training.trainer.Trainer`."""
    config = trainer.config
    output_dir = Path(trainer.output_dir)
    step = trainer.state.global_step
    grids = []
    for label in (f"step_{step}", f"step_{step}_ema"):
        folder = output_dir / "validation" / label
        grids += [path.relative_to(output_dir).as_posix() for path in sorted(folder.glob("grid_*.png"))]
    validator = getattr(trainer, "validator", None)
    prompts = list(validator.settings.prompts) if validator is not None and validator.enabled else []
    try:
        weights = Path(result).relative_to(output_dir).as_posix()
    except (TypeError, ValueError):
        weights = Path(str(result)).name
    processes = trainer.accelerator.num_processes if hasattr(trainer, "accelerator") else 1
    return CardFacts(
        family=config.model_family, base_model=mask_url_credentials(str(trainer.model.model_path)),
        model_type="controlnet" if config.controlnet else config.model_type,
        weights=weights, steps=step, images_seen=trainer.state.num_images_seen,
        resolution=f"{config.resolution:g} ({config.resolution_type})", optimizer=config.optimizer,
        learning_rate=float(config.learning_rate), mixed_precision=config.mixed_precision,
        lora_rank=config.lora_rank, lora_alpha=config.lora_alpha if config.lora_alpha is not None else config.lora_rank,
        lora_type=config.lora_type or "standard", control=bool(config.control),
        batch=f"{config.train_batch_size} x {config.gradient_accumulation_steps} accumulation x {processes} processes",
        prompts=prompts, grids=grids, note=config.model_card_note,
        safe_for_work=bool(config.model_card_safe_for_work), repo_id=config.hub_model_id if config.push_to_hub else None,
        distilled=_distilled(trainer),
    )


def _distilled(trainer) -> dict | None:
    """How a distilled student samples, from its method's validation defaults (None for other methods)."""
    from simpletuner.methods.registry import method_of

    method = getattr(trainer, "method", None)
    defaults = method.validation_defaults() if hasattr(method, "validation_defaults") else None
    if not defaults:
        return None
    return {"method": method_of(trainer.config), "steps": defaults["validation_num_inference_steps"],
            "guidance": float(defaults.get("validation_guidance", trainer.config.validation_guidance)),
            "scheduler": defaults.get("sampling_scheduler"),
            "timesteps": defaults.get("sampling_timesteps")}


def write_model_card(trainer, result) -> Path:
    """Write ``README.md`` into the output dir, with any known secret redacted; returns its path."""
    path = Path(trainer.output_dir) / CARD_FILE
    text = render_model_card(facts_from_trainer(trainer, result))
    path.write_text(scrub_text(text, known_secrets(trainer.config)), encoding="utf-8")
    logger.info("wrote the model card %s", path)
    return path
