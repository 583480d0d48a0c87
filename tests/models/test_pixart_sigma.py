"""PixArt-Sigma on its tiny offline model: text encoding (mask, --t5_padding, --tokenizer_max_length),
the noise half of the learned-sigma output, the loader options, the PEFT injection path for a
transformer without ``add_adapter``, 3-step LoRA and full runs through the CLI, validation images,
the text cache reused by a second run, and the saved LoRA loaded by ``load_lora`` into a fresh
pipeline reproducing the trained model exactly."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from simpletuner.cli import main  # noqa: E402
from simpletuner.options import ConfigError  # noqa: E402
from simpletuner.options.resolve import resolve_run  # noqa: E402
from tests.models.conftest import family_args, make_family_project  # noqa: E402

FAMILY = "pixart_sigma"
PROMPT = "a red circle on a white background"


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    return make_family_project(tmp_path_factory.mktemp("pixart"), FAMILY)


@pytest.fixture(scope="module")
def other_model(tmp_path_factory) -> Path:
    """A second tiny model with other random weights, written by the real CLI command."""
    folder = tmp_path_factory.mktemp("pixart-other") / "model"
    assert main(["make-tiny-model", "--family", FAMILY, "--out", str(folder), "--seed", "1"]) == 0
    return folder


def config_for(project: Path, **overrides):
    return resolve_run(family_args(project, FAMILY, "unit", **overrides)).config


def load_family(project: Path, **overrides):
    from simpletuner.models.registry import load_family_class

    model = load_family_class(FAMILY)(config_for(project, **overrides), torch.device("cpu"), torch.float32)
    model.load()
    return model


@pytest.fixture(scope="module")
def family(project):
    return load_family(project)


# --- the tiny model and text encoding ---------------------------------------------------------------


def test_tiny_model_is_a_pixart_sigma_pipeline_with_learned_sigma(other_model):
    index = json.loads((other_model / "model_index.json").read_text())
    assert index["_class_name"] == "PixArtSigmaPipeline"
    transformer = json.loads((other_model / "transformer" / "config.json").read_text())
    assert transformer["out_channels"] == 2 * transformer["in_channels"] == 8
    assert json.loads((other_model / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == \
        "DPMSolverMultistepScheduler"


def test_prompts_encode_with_mask_at_the_default_length(family):
    text = family.encode_prompts([PROMPT, ""])
    assert text["prompt_embeds"].shape == (2, 300, 48)
    mask = text["prompt_attention_mask"]
    assert mask.shape == (2, 300) and mask[0].sum() > mask[1].sum() >= 1  # "" still has its </s> token
    padded = text["prompt_embeds"][0][mask[0] == 0]
    assert padded.abs().sum() > 0, "unmodified padding keeps what T5 produced"


def test_t5_padding_zero_and_tokenizer_max_length(project, family):
    zeroed = load_family(project, t5_padding="zero", tokenizer_max_length=24)
    text = zeroed.encode_prompts([PROMPT])
    embeds, mask = text["prompt_embeds"], text["prompt_attention_mask"]
    assert embeds.shape == (1, 24, 48)
    assert torch.all(embeds[0][mask[0] == 0] == 0) and embeds[0][mask[0] == 1].abs().sum() > 0
    unmodified = family.encode_prompts([PROMPT])
    kept = mask[0] == 1
    assert torch.allclose(embeds[0][kept], unmodified["prompt_embeds"][0][:24][kept], atol=1e-6)
    assert zeroed.pipeline_call_arguments()["max_sequence_length"] == 24
    # both settings change the cached tensors, so both are part of the cache key
    assert zeroed.fingerprint_parts() != family.fingerprint_parts()
    assert load_family(project, t5_padding="zero").fingerprint_parts() != family.fingerprint_parts()


def test_predict_returns_the_noise_half_and_masks_padding(family):
    torch.manual_seed(0)
    text = family.encode_prompts([PROMPT, "a blue square"])
    latents = torch.randn(2, 4, 16, 16)
    timesteps = torch.tensor([10, 900])
    float_text = {key: value.float() for key, value in text.items()}  # as the trainer casts them
    with torch.no_grad():
        prediction = family.predict(latents, timesteps, float_text)
        full = family.denoiser(latents, encoder_hidden_states=text["prompt_embeds"],
                               encoder_attention_mask=text["prompt_attention_mask"], timestep=timesteps,
                               added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
        noisy_padding = dict(float_text)
        padding = (text["prompt_attention_mask"] == 0).unsqueeze(-1)
        noisy_padding["prompt_embeds"] = torch.where(padding, torch.randn_like(text["prompt_embeds"]),
                                                     text["prompt_embeds"])
        masked = family.predict(latents, timesteps, noisy_padding)
    assert full.shape == (2, 8, 16, 16) and prediction.shape == latents.shape
    assert torch.equal(prediction, full[:, :4])
    assert torch.allclose(masked, prediction, atol=1e-5), "padded tokens must not reach the transformer"


def test_gradient_checkpointing_every_nth_block_keeps_gradients(project):
    torch.manual_seed(0)
    latents, timesteps = torch.randn(2, 4, 16, 16), torch.tensor([10, 900])
    gradients = []
    for interval in (None, 2):
        model = load_family(project)
        text = {key: value.float() for key, value in model.encode_prompts([PROMPT, ""]).items()}
        model.denoiser.train().requires_grad_(True)
        if interval:
            assert model.enable_gradient_checkpointing(interval) == 1  # blocks 0 of 2
        model.predict(latents, timesteps, text).square().mean().backward()
        gradients.append(model.denoiser.proj_out.weight.grad.clone())
    assert torch.allclose(gradients[0], gradients[1], atol=1e-6)


def test_validation_pipeline_settings(family):
    arguments = family.pipeline_call_arguments()
    assert arguments["use_resolution_binning"] is False and arguments["max_sequence_length"] == 300
    pipeline = family.build_pipeline()
    assert type(pipeline).__name__ == "PixArtSigmaPipeline" and pipeline.transformer is family.denoiser
    assert type(pipeline.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert pipeline.scheduler.config.prediction_type == "epsilon"
    assert type(family.noise_scheduler()).__name__ == "DDPMScheduler"
    assert family.noise_scheduler().config.beta_schedule == "linear"


# --- loading ---------------------------------------------------------------------------------------------


def test_component_loader_options(project, family, other_model, tmp_path):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(other_model / "vae")
    with torch.no_grad():
        vae.encoder.conv_in.weight.mul_(0.5)
    vae.save_pretrained(tmp_path / "plain-vae")  # a component folder, no vae/ subfolder
    model = load_family(project, pretrained_transformer_model_name_or_path=str(other_model),
                        pretrained_t5_model_name_or_path=str(other_model),
                        pretrained_vae_model_name_or_path=str(tmp_path / "plain-vae"))
    other = load_family(project, pretrained_model_name_or_path=str(other_model))

    def same(a, b):
        return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))

    assert same(model.transformer, other.transformer) and not same(model.transformer, family.transformer)
    assert same(model.text_encoder, other.text_encoder) and not same(model.text_encoder, family.text_encoder)
    assert torch.equal(model.vae.encoder.conv_in.weight, vae.encoder.conv_in.weight)
    assert model.fingerprint_parts()["t5"] == str(other_model)
    # an explicit subfolder inside another source
    explicit = load_family(project, pretrained_transformer_model_name_or_path=str(other_model.parent),
                           pretrained_transformer_subfolder="model/transformer")
    assert same(explicit.transformer, other.transformer)
    at_root = load_family(project, pretrained_transformer_model_name_or_path=str(other_model / "transformer"),
                          pretrained_transformer_subfolder="none")
    assert same(at_root.transformer, other.transformer)


def test_single_file_is_refused_with_a_clear_error(project, tmp_path):
    from simpletuner.models.registry import load_family_class

    file = tmp_path / "pixart.safetensors"
    file.write_bytes(b"")
    config = config_for(project, pretrained_model_name_or_path=str(file))
    with pytest.raises(RuntimeError, match="single file"):
        load_family_class(FAMILY)(config, torch.device("cpu"), torch.float32).load()


def test_family_options_are_validated(project):
    assert config_for(project, model_flavour="600M-512").model_flavour == "600M-512"
    with pytest.raises(ConfigError, match="not a flavour of pixart_sigma"):
        config_for(project, model_flavour="1.5")
    with pytest.raises(ConfigError, match="prediction_type v_prediction"):
        config_for(project, prediction_type="v_prediction")
    for option, value in (("t5_padding", "zero"), ("pretrained_transformer_model_name_or_path", "x"),
                          ("pretrained_transformer_subfolder", "transformer")):
        with pytest.raises(ConfigError, match=f"`--{option}` only applies to .*pixart_sigma"):
            resolve_run(family_args(project, "sd1x", "unit", **{option: value}))


# --- LoRA without add_adapter ----------------------------------------------------------------------------


def test_peft_injection_saves_resumes_and_loads_in_both_formats(project, tmp_path):
    from diffusers import PixArtSigmaPipeline
    from safetensors.torch import save_file

    from simpletuner.models import lora_formats
    from simpletuner.models.adapters import add_lora, load_lora_weights_into, lora_state_dict
    from simpletuner.models.pixart_sigma import load_lora

    first = load_family(project)
    assert not hasattr(first.transformer, "add_adapter")
    lora_config = add_lora(first.transformer, first.lora_target_modules(), rank=4, alpha=2.0, dropout=0.0)
    trainable = [name for name, p in first.transformer.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    with torch.no_grad():
        for name, parameter in first.transformer.named_parameters():
            if ".lora_B." in name:
                parameter.normal_()
    state = lora_state_dict(first.transformer)
    file = first.save_lora(tmp_path / "diffusers", state, {"lora_config": lora_config})

    # resume: the trainer's loader restores the same adapter into a freshly injected transformer
    second = load_family(project)
    add_lora(second.transformer, second.lora_target_modules(), rank=4, alpha=2.0, dropout=0.0)
    load_lora_weights_into(second.transformer, file, prefix="transformer")
    restored = lora_state_dict(second.transformer)
    assert restored.keys() == state.keys() and all(torch.equal(restored[k], state[k]) for k in state)

    # --lora_format comfyui: the same names plus `.alpha` tensors
    comfy = lora_formats.peft_to_comfyui({"transformer": state}, {"transformer": 2.0},
                                         lora_formats.COMFYUI_NAMING[FAMILY], {"transformer": first.transformer})
    assert all(k.startswith("transformer.transformer_blocks.") for k in comfy)
    assert float(comfy["transformer.transformer_blocks.0.attn1.to_q.alpha"]) == 2.0
    save_file(comfy, str(tmp_path / "comfy.safetensors"))

    torch.manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 4, 16, 16), encoder_hidden_states=torch.randn(1, 7, 48),
                  timestep=torch.tensor([500]), added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                  return_dict=False)
    first.transformer.eval()
    with torch.no_grad():
        expected = first.transformer(**inputs)[0]
        for source in (tmp_path / "diffusers", tmp_path / "comfy.safetensors"):
            pipeline = PixArtSigmaPipeline.from_pretrained(project / "model")
            base = pipeline.transformer(**inputs)[0]
            load_lora(pipeline, source)
            assert torch.equal(pipeline.transformer(**inputs)[0], expected), source  # alpha 2 at rank 4 kept
            assert not torch.allclose(base, expected)


def test_load_lora_reads_dora_adapters(project, tmp_path):
    from diffusers import PixArtSigmaPipeline

    from simpletuner.models.adapters import add_lora, lora_state_dict
    from simpletuner.models.pixart_sigma import load_lora

    trained = load_family(project)
    config = add_lora(trained.transformer, trained.lora_target_modules(), rank=4, alpha=8.0, dropout=0.0, use_dora=True)
    with torch.no_grad():
        for name, parameter in trained.transformer.named_parameters():
            if ".lora_B." in name or "lora_magnitude_vector" in name:
                parameter.add_(0.1 * torch.randn_like(parameter))
    state = lora_state_dict(trained.transformer)
    assert any("lora_magnitude_vector" in key for key in state)
    file = trained.save_lora(tmp_path, state, {"lora_config": config})
    pipeline = PixArtSigmaPipeline.from_pretrained(project / "model")
    load_lora(pipeline, file)
    inputs = dict(hidden_states=torch.randn(1, 4, 16, 16), encoder_hidden_states=torch.randn(1, 7, 48),
                  timestep=torch.tensor([500]), added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                  return_dict=False)
    with torch.no_grad():
        assert torch.equal(pipeline.transformer(**inputs)[0], trained.transformer.eval()(**inputs)[0])


# --- end to end ------------------------------------------------------------------------------------------


def run_cli(project: Path, output: str, **overrides):
    """``simpletuner train`` in-process; returns the finished trainer."""
    import simpletuner.training.trainer as trainer_module

    finished = []
    original = trainer_module.train

    def recording_train(*args, **kwargs):
        finished.append(original(*args, **kwargs))
        return finished[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer_module, "train", recording_train)
        assert main(["train", *family_args(project, FAMILY, output, **overrides)]) == 0
    return finished[0]


@pytest.fixture(scope="module")
def lora_run(project):
    trainer = run_cli(project, "lora", validation_prompt=PROMPT, validation_step_interval=2,
                      validation_num_inference_steps=2)
    return trainer, project / "lora"


@pytest.mark.slow
def test_lora_run_trains_saves_and_validates(lora_run):
    from PIL import Image
    from safetensors import safe_open

    trainer, out = lora_run
    assert len(trainer.state.losses) == 3 and all(math.isfinite(loss) for loss in trainer.state.losses)
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), framework="pt") as handle:
        keys = list(handle.keys())
        metadata = handle.metadata()
        lora_b = [handle.get_tensor(k) for k in keys if ".lora_B." in k]
    assert keys and all(k.startswith("transformer.transformer_blocks.") and (".lora_A." in k or ".lora_B." in k)
                        for k in keys)
    assert any(".attn2.to_q." in k for k in keys) and any(".attn1.to_out.0." in k for k in keys)
    assert any(b.abs().sum() > 0 for b in lora_b), "lora_B starts at zero: training must have changed it"
    assert json.loads(metadata["lora_adapter_metadata"])["transformer.r"] == 16
    assert metadata["model_family"] == FAMILY and metadata["global_step"] == "3"
    for step in ("step_2", "step_3"):
        images = sorted((out / "validation" / step).glob("64x64_*.png"))
        assert images and all(Image.open(image).size == (64, 64) for image in images), step


@pytest.mark.slow
def test_saved_lora_loads_into_a_fresh_pipeline_and_reproduces_training(project, lora_run):
    from diffusers import PixArtSigmaPipeline

    from simpletuner.models.pixart_sigma import load_lora

    trainer, out = lora_run
    denoiser = trainer._unwrapped_denoiser().eval()
    trained_pipeline = trainer.model.build_pipeline(denoiser)
    fresh = PixArtSigmaPipeline.from_pretrained(project / "model")
    for pipeline in (trained_pipeline, fresh):
        pipeline.set_progress_bar_config(disable=True)

    def sample(pipeline):
        return pipeline(PROMPT, num_inference_steps=2, height=64, width=64, output_type="np",
                        generator=torch.Generator().manual_seed(0), **trainer.model.pipeline_call_arguments()).images

    with torch.no_grad():
        trained = sample(trained_pipeline)
        base = sample(fresh)
        load_lora(fresh, out)  # the output folder; the .safetensors file works too
        loaded = sample(fresh)
    assert (trained == loaded).all(), "the saved LoRA must reproduce the trained model exactly"
    assert abs(base - loaded).max() > 1e-4, "the LoRA must change the base model's output"


@pytest.mark.slow
def test_full_run_reuses_cached_prompts_and_saves_a_pipeline(project, lora_run, caplog):
    import logging

    from diffusers import PixArtSigmaPipeline

    from simpletuner.models.pixart_sigma import PixArtSigma

    caplog.set_level(logging.INFO, logger="simpletuner")
    calls = []
    original = PixArtSigma.encode_prompts
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(PixArtSigma, "encode_prompts", lambda self, prompts: calls.append(prompts) or original(self, prompts))
        trainer = run_cli(project, "full", model_type="full")
    assert calls == [], "the LoRA run cached every caption; a second run must not encode them again"
    assert any("text embeds: 9 reused, 0 built" in record.getMessage() for record in caplog.records)
    assert len(trainer.state.losses) == 3 and all(math.isfinite(loss) for loss in trainer.state.losses)
    saved = PixArtSigmaPipeline.from_pretrained(project / "full" / "pipeline")
    base = PixArtSigmaPipeline.from_pretrained(project / "model")
    trained = dict(saved.transformer.named_parameters())
    changed = [name for name, p in base.transformer.named_parameters() if not torch.equal(p, trained[name])]
    assert changed, "full training must change the transformer's weights"
