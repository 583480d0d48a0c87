"""The lumina2 family on a tiny offline Lumina-Image 2.0-shaped model (Gemma 2, Next-DiT with refiners,
FLUX.1-shaped VAE): prompt encoding against diffusers' own pipeline (system prompt, second to last
layer), the reversed time convention, latents, the flow objective, gradient checkpointing, config
rules, the memory plan, and real runs through the CLI (LoRA loading in ``Lumina2Pipeline``, full,
quantized)."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from simpletuner.cli import main  # noqa: E402
from tests.models.conftest import (  # noqa: E402
    FamilyHarness,
    assert_finite_losses,
    check_checkpointing_keeps_gradients,
    check_lora_loads_like_training,
    check_saved_transformer_is_trained,
    check_validation_images,
    family_args,
    recorded_flow_loss,
    saved_lora_keys,
    tiny_pipeline,
)

PROMPT = "A red circle on a white background"


HARNESS = FamilyHarness("lumina2")
project = HARNESS.project_fixture()
lumina_config, error_of, run_cli = HARNESS.config, HARNESS.error, HARNESS.run


def lumina_model(project: Path, **options):
    return HARNESS.model(project / "model", **options)


@pytest.fixture(scope="module")
def model(project):
    return lumina_model(project)


@pytest.fixture(scope="module")
def pipeline(project):
    from diffusers import Lumina2Pipeline

    return tiny_pipeline(Lumina2Pipeline, project / "model")


# --- prompt encoding -------------------------------------------------------------------------------


def test_prompt_embeds_equal_the_pipelines_own_encoding(model, pipeline):
    prompts = [PROMPT, "a blue square"]
    embeds, mask, negative, negative_mask = pipeline.encode_prompt(prompts, max_sequence_length=256)
    ours = model.encode_prompts(prompts)
    assert ours["prompt_embeds"].shape == (2, 256, 24) and model.system_prompt == pipeline.system_prompt
    torch.testing.assert_close(ours["prompt_embeds"], embeds)
    assert torch.equal(ours["prompt_attention_mask"], mask)
    empty = model.encode_prompts(["", ""])  # caption dropout trains the pipeline's negative prompt
    torch.testing.assert_close(empty["prompt_embeds"], negative)
    assert torch.equal(empty["prompt_attention_mask"], negative_mask)
    # the second to last layer, not the last
    last = model.text_encoder(model.tokenizer([""], padding="max_length", max_length=256,
                                              return_tensors="pt").input_ids)[0]
    assert not torch.allclose(last, empty["prompt_embeds"][:1])


def test_length_shapes_the_text_tokens_and_the_cache_key(project, model):
    short = lumina_model(project, tokenizer_max_length=200)
    assert short.encode_prompts([PROMPT])["prompt_embeds"].shape == (1, 200, 24)
    assert short.fingerprint_parts() != model.fingerprint_parts()


# --- latents and the objective ---------------------------------------------------------------------


def test_latents_are_shifted_scaled_and_patched(model):
    mean = torch.randn(2, 16, 8, 8)
    latents = model.latents_from_cache({"latent_mean": mean, "latent_std": torch.zeros_like(mean)})
    torch.testing.assert_close(latents, (mean - 0.1159) * 0.3611)
    assert model.encode_images(torch.zeros(1, 3, 64, 64))["latent_mean"].shape == (1, 16, 8, 8)
    assert model.vae_scale_factor() == 8 and model.pixels_per_token() == 16


def test_predict_speaks_the_pipelines_reversed_time(model, monkeypatch):
    """The pipeline steps with ``-transformer(x, 1 - t / 1000)``; predict must give the same number."""
    seen = {}
    original = model.denoiser.forward

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return original(*args, **kwargs)

    text = model.encode_prompts([PROMPT, ""])
    noisy = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        raw = model.denoiser(hidden_states=noisy, timestep=torch.tensor([0.75, 0.1]),
                             encoder_hidden_states=text["prompt_embeds"],
                             encoder_attention_mask=text["prompt_attention_mask"], return_dict=False)[0]
        monkeypatch.setattr(model.denoiser, "forward", spy)
        ours = model.predict(noisy, torch.tensor([250.0, 900.0]), text)
    torch.testing.assert_close(seen["timestep"], torch.tensor([0.75, 0.1]))
    torch.testing.assert_close(ours, -raw)


def test_flow_objective_uses_the_shipped_shift(project, model, monkeypatch):
    assert model.prediction_type == "flow_matching" and model.default_flow_shift == 6.0  # the tiny scheduler's
    sigmas = recorded_flow_loss(model, lumina_config(project), PROMPT, (16, 2, 2), monkeypatch)[1]
    # logit-normal sigmas have median 0.5; shift 6 moves it to 6 * 0.5 / (1 + 5 * 0.5) = 0.857
    assert abs(float(sigmas.median()) - 6 / 7) < 0.05


def test_gradient_checkpointing_every_nth_block_keeps_the_gradients(project):
    plain = check_checkpointing_keeps_gradients(lambda: lumina_model(project), (2, 16, 8, 8), PROMPT,
                                                checkpointed={1: 2, 2: 1})
    assert any(name.startswith("noise_refiner.") for name in plain)
    assert any(name.startswith("layers.") for name in plain)


# --- config rules --------------------------------------------------------------------------------


def test_lumina2_options_are_accepted_and_the_flavour_maps_to_its_hub_id(project):
    from simpletuner.models.registry import FAMILIES

    config = lumina_config(project, pretrained_gemma_model_name_or_path=str(project / "model"), model_flavour="2.0",
                           tokenizer_max_length=200)
    assert config.tokenizer_max_length == 200
    assert FAMILIES["lumina2"].flavours == {"2.0": "Alpha-VLLM/Lumina-Image-2.0"}
    assert "sana" in error_of(project, "lumina2", sana_complex_human_instruction='["a"]')


@pytest.mark.parametrize("overrides, message", [
    ({"train_text_encoder": "true"},
     "`--train_text_encoder` is not supported for lumina2: Lumina 2's Gemma 2 encoder stays frozen"),
    ({"lora_format": "comfyui"}, "`--lora_format comfyui` is not available for `--model_family lumina2`: ComfyUI maps "
                                 "Lumina 2 LoRAs through its Z-Image key table"),
    ({"prediction_type": "v_prediction"}, "is not supported for lumina2; use one of: flow_matching"),
    ({"fuse_qkv_projections": "true"}, "`--fuse_qkv_projections` is not available for lumina2: Lumina 2's attention"),
])
def test_config_mistakes_for_lumina2_are_named(project, overrides, message):
    assert message in error_of(project, **overrides)


def test_plan_memory_covers_lumina2(project, capsys):
    assert main(["plan-memory", *family_args(project, "lumina2", "plan")]) == 0
    out = capsys.readouterr().out
    assert "memory plan for lumina2" in out and "training peak" in out


# --- real runs -----------------------------------------------------------------------------------------

def generate(pipeline) -> torch.Tensor:
    return pipeline(prompt=PROMPT, num_inference_steps=2, height=64, width=64, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).images


def test_lora_run_validates_and_loads_in_the_lumina2_pipeline(project, pipeline):
    trainer, _ = run_cli(project, "lora", validation_prompt=PROMPT, validation_num_inference_steps=2,
                         validation_step_interval=3, caption_dropout_probability=0.5, gradient_checkpointing="true",
                         disable_benchmark=None)
    assert_finite_losses(trainer)
    out = project / "lora"
    keys, metadata = saved_lora_keys(out)
    assert keys and all(k.startswith("transformer.") and (".lora_A." in k or ".lora_B." in k) for k in keys)
    assert any(".layers.0.attn.to_q." in k for k in keys) and any(".noise_refiner.0.attn.to_out.0." in k for k in keys)
    assert metadata["model_family"] == "lumina2" and metadata["global_step"] == "3"
    check_validation_images(out)
    check_lora_loads_like_training(pipeline, project / "model", out, trainer._unwrapped_denoiser(), generate)


def test_full_run_saves_a_pipeline_diffusers_loads(project):
    from diffusers import Lumina2Pipeline

    trainer, _ = run_cli(project, "full", model_type="full")
    saved = Lumina2Pipeline.from_pretrained(project / "full" / "pipeline")
    base = Lumina2Pipeline.from_pretrained(project / "model")
    assert type(saved.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler" and saved.scheduler.config.shift == 6.0
    check_saved_transformer_is_trained(saved, base, trainer._unwrapped_denoiser().state_dict())


@pytest.mark.parametrize("preset", ["int8-quanto", "int8-torchao"])
def test_lora_trains_on_a_quantized_base(project, preset):
    from simpletuner.models.quantize import quantized_layers

    trainer, _ = run_cli(project, f"quant-{preset}", base_model_precision=preset, gradient_checkpointing="true")
    assert_finite_losses(trainer)
    assert quantized_layers(trainer._unwrapped_denoiser()) > 0  # the base's linears really are quantized
    assert (project / f"quant-{preset}" / "pytorch_lora_weights.safetensors").is_file()
