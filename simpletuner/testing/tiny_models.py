"""Tiny Stable Diffusion pipelines built offline from the real diffusers/transformers classes.

The folders written here are ordinary diffusers pipeline folders: the trainer loads them with the
same code that loads a real checkpoint, so tests exercise the real loading path without a hub.

The demo model is shaped so that colour is learnable in minutes on two CPU cores (see
``documentation/DEMO.md``): a pooled text embedding is added to the time embedding
(``addition_embed_type="text"``, a stock UNet2DConditionModel option that the stock pipeline feeds
from ``encoder_hidden_states``), cross-attention only at the lowest resolution, and a VAE that was
trained on the shapes dataset so that decoding keeps colours.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

ASSET_DIR = Path(__file__).with_name("assets")
#: VAE weights the project trained itself on the shapes dataset (``make-tiny-model --train-vae-steps``).
DEMO_VAE_ASSET = ASSET_DIR / "demo_vae.safetensors"

#: The Stable Diffusion 1.x/2.x families whose demo recipe is built here (their ``tiny/<family>.py`` calls it).
DEMO_FAMILIES = ("sd1x", "sd2x")


def tiny_families() -> tuple[str, ...]:
    """Families with a tiny offline model: those the family table gives a ``tiny_builder`` module (a
    ``build_tiny_pipeline(seed)`` returning ``(pipeline, vae_source)``)."""
    from simpletuner.models.registry import FAMILIES

    return tuple(name for name, info in FAMILIES.items() if info.tiny_builder)


#: Snapshot of :func:`tiny_families` at import (the CLI's ``--family`` choices).
SUPPORTED_TINY_FAMILIES = tiny_families()

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=64,
    mid_block_add_attention=False,
)

TEXT_ENCODER_CONFIG = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    projection_dim=64,
)

UNET_CONFIG = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=64,
    attention_head_dim=4,
    norm_num_groups=16,
    addition_embed_type="text",
    addition_embed_type_num_heads=4,
)


@dataclass(frozen=True)
class TinyModelReport:
    """What the builder made, for the CLI to print."""

    path: Path
    family: str
    parameters: dict[str, int]
    vae_psnr_db: float | None
    vae_source: str


def scheduler_config(family: str) -> dict:
    """The noise schedule of SD 1.x (epsilon) or SD 2.x (v-prediction), as their hub folders ship it."""
    return dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=_default_prediction_type(family),
    )


def _default_prediction_type(family: str) -> str:
    """The family's default training target (the first of its prediction types in the family table)."""
    from simpletuner.models.registry import family_info

    return family_info(family).prediction_types[0]


def build_tiny_pipeline(family: str, seed: int = 0, vae_train_steps: int = 0):
    """Build the pipeline in memory. ``vae_train_steps`` > 0 trains the VAE from scratch instead of
    loading the shipped demo VAE weights."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from simpletuner.testing.tokenizers import build_clip_tokenizer

    if family not in DEMO_FAMILIES:
        raise ValueError(f"the demo recipe builds {' and '.join(DEMO_FAMILIES)}, not {family!r}; other families have "
                         "their own recipe in simpletuner/testing/tiny/")
    tokenizer = build_clip_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                       **TEXT_ENCODER_CONFIG)
    )
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    vae, vae_source = _demo_vae(seed, vae_train_steps)
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(**scheduler_config(family)),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return pipeline, vae_source


def _demo_vae(seed: int, train_steps: int):
    import torch
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(**VAE_CONFIG)
    if train_steps > 0:
        from simpletuner.testing.vae_training import train_demo_vae

        train_demo_vae(vae, steps=train_steps, seed=seed)
        return vae, f"trained here for {train_steps} steps"
    if DEMO_VAE_ASSET.exists():
        state = load_file(DEMO_VAE_ASSET)
        scaling = float(state.pop("__scaling_factor__").item()) if "__scaling_factor__" in state else None
        vae.load_state_dict({k: v.float() for k, v in state.items()})
        if scaling:
            vae.register_to_config(scaling_factor=scaling)
        return vae, f"loaded from {DEMO_VAE_ASSET.name}"
    return vae, "random (no trained weights shipped)"


def measure_vae_psnr(vae, count: int = 32, seed: int = 1234) -> float:
    """PSNR (dB) of decode(encode(x)) on freshly drawn demo images, using the posterior mean."""
    import numpy as np
    import torch

    from simpletuner.testing.vae_training import demo_image_batch

    images = demo_image_batch(count, size=VAE_CONFIG["sample_size"], seed=seed)
    with torch.no_grad():
        recon = vae.decode(vae.encode(images).latent_dist.mode()).sample.clamp(-1, 1)
    mse = float(((recon - images) / 2).pow(2).mean())
    return float(10 * np.log10(1.0 / max(mse, 1e-12)))


def _build_with_family_recipe(family: str, seed: int, vae_train_steps: int):
    """Run the tiny builder the family table names for ``family``; only a recipe with a VAE of its own
    to train accepts ``vae_train_steps``, elsewhere asking for it is an error rather than ignored."""
    import importlib
    import inspect

    if family not in tiny_families():
        raise ValueError(f"make-tiny-model: no tiny {family!r} model; choose one of {', '.join(tiny_families())}")
    from simpletuner.models.registry import family_info

    build = importlib.import_module(family_info(family).tiny_builder).build_tiny_pipeline
    if not vae_train_steps:
        return build(seed)
    if "vae_train_steps" not in inspect.signature(build).parameters:
        raise ValueError(f"make-tiny-model: --train-vae-steps trains the demo VAE of "
                         f"{' and '.join(DEMO_FAMILIES)}; the tiny {family} model has no such VAE, remove it")
    return build(seed, vae_train_steps=vae_train_steps)


def make_tiny_model(family: str, out: str | Path, seed: int = 0, vae_train_steps: int = 0) -> TinyModelReport:
    """Write a tiny pipeline folder for ``family`` and report its size and VAE quality."""
    pipeline, vae_source = _build_with_family_recipe(family, seed, vae_train_steps)
    out = Path(out)
    pipeline.save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer", "tokenizer_2"):
        tokenizer = getattr(pipeline, name, None)
        if tokenizer is not None and type(tokenizer).__name__.startswith("CLIP"):
            _write_tokenizer_legacy_files(tokenizer, out / name)
    (out / "simpletuner_tiny_model.json").write_text(
        json.dumps({"family": family, "seed": seed, "vae": vae_source}, indent=2) + "\n", encoding="utf-8"
    )
    import torch

    parameters = {name: sum(p.numel() for p in component.parameters())
                  for name, component in pipeline.components.items() if isinstance(component, torch.nn.Module)}
    vae = getattr(pipeline, "vae", None)
    psnr = measure_vae_psnr(vae) if vae is not None and vae_source.startswith(("loaded", "trained")) \
        and vae.config.get("latent_channels") == VAE_CONFIG["latent_channels"] else None
    return TinyModelReport(out, family, parameters, psnr, vae_source)


def _write_tokenizer_legacy_files(tokenizer, folder: Path) -> None:
    """transformers 5 saves only tokenizer.json; other loaders (and older transformers) want
    vocab.json and merges.txt too."""
    vocab = tokenizer.get_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges = getattr(tokenizer, "_merges", None) or getattr(tokenizer, "bpe_ranks", None)
    if merges is None:
        tokenizer_json = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        merges = tokenizer_json["model"]["merges"]
    lines = ["#version: 0.2"] + [" ".join(m) if not isinstance(m, str) else m for m in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
