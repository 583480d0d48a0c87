"""The sana family on a tiny offline Sana-shaped model (Gemma 2, AutoencoderDC at 32x, linear-attention
DiT): prompt encoding against diffusers' own pipeline (with and without the complex human
instruction), latents, the flow objective with Sana's shift, gradient checkpointing, config rules,
the memory plan, and real runs through the CLI (LoRA loading in ``SanaPipeline``, full, quantized)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from simpletuner.cli import main  # noqa: E402
from simpletuner.options import ConfigError  # noqa: E402
from simpletuner.testing.config import make_config  # noqa: E402
from tests.models.conftest import (  # noqa: E402
    FamilyHarness,
    assert_finite_losses,
    check_checkpointing_keeps_gradients,
    check_lora_loads_like_training,
    check_loss_regresses_eps_minus_x0,
    check_saved_transformer_is_trained,
    check_validation_images,
    recorded_flow_loss,
    saved_lora_keys,
    tiny_pipeline,
)

PROMPT = "A red circle on a white background"
#: A short caption length keeps the tiny runs fast (the default is 300 tokens).
TOKENS = 24


HARNESS = FamilyHarness("sana", {"tokenizer_max_length": TOKENS})
project = HARNESS.project_fixture()
sana_args, sana_config, error_of, run_cli = HARNESS.args, HARNESS.config, HARNESS.error, HARNESS.run


def sana_model(project: Path, **options):
    return HARNESS.model(project / "model", **options)


@pytest.fixture(scope="module")
def model(project):
    return sana_model(project)


# --- prompt encoding -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipeline(project):
    from diffusers import SanaPipeline

    return tiny_pipeline(SanaPipeline, project / "model")


def test_prompt_embeds_equal_the_pipelines_own_encoding_with_its_instruction(model, pipeline):
    from simpletuner.models.sana import pipeline_instruction

    instruction = pipeline_instruction()
    assert len(instruction) > 3 and model.text_settings.instruction == tuple(instruction)
    prompts = [PROMPT, "a blue square"]
    embeds, mask, negative, negative_mask = pipeline.encode_prompt(
        prompts, complex_human_instruction=instruction, max_sequence_length=300)
    ours = model.encode_prompts(prompts)
    assert ours["prompt_embeds"].shape == (2, 300, 24) and ours["prompt_attention_mask"].shape == (2, 300)
    torch.testing.assert_close(ours["prompt_embeds"], embeds)
    assert torch.equal(ours["prompt_attention_mask"], mask)
    # the empty prompt (caption dropout) is the pipeline's negative prompt: no instruction in front
    empty = model.encode_prompts(["", ""])
    torch.testing.assert_close(empty["prompt_embeds"], negative)
    assert torch.equal(empty["prompt_attention_mask"], negative_mask)
    # the instruction changes what Gemma makes of the caption
    plain = sana_model(Path(model.model_path).parent, sana_complex_human_instruction=[])
    assert not torch.allclose(plain.encode_prompts(prompts)["prompt_embeds"], ours["prompt_embeds"])


@pytest.mark.parametrize("value, lines", [
    ([], ()), (["be vivid:", "User Prompt: "], ("be vivid:", "User Prompt: ")), ("Describe: ", ("Describe: ",)),
])
def test_instruction_option_and_length_match_the_pipeline(project, pipeline, value, lines):
    model = sana_model(project, sana_complex_human_instruction=value, tokenizer_max_length=TOKENS)
    assert model.text_settings.instruction == lines
    embeds, mask, _, _ = pipeline.encode_prompt([PROMPT], complex_human_instruction=list(lines),
                                                max_sequence_length=TOKENS)
    ours = model.encode_prompts([PROMPT])
    assert ours["prompt_embeds"].shape == (1, TOKENS, 24)
    torch.testing.assert_close(ours["prompt_embeds"], embeds)
    assert torch.equal(ours["prompt_attention_mask"], mask)


def test_instruction_files_and_the_text_cache_key(project, tmp_path, model):
    (tmp_path / "chi.json").write_text(json.dumps(["line one", "line two"]))
    (tmp_path / "chi.txt").write_text("first\nsecond\n")
    from_json = sana_model(project, sana_complex_human_instruction=str(tmp_path / "chi.json"))
    from_text = sana_model(project, sana_complex_human_instruction=str(tmp_path / "chi.txt"))
    assert from_json.text_settings.instruction == ("line one", "line two")
    assert from_text.text_settings.instruction == ("first", "second")
    keys = {tuple(sorted(m.fingerprint_parts().items())) for m in (model, from_json, from_text)}
    assert len(keys) == 3  # each instruction has its own text cache


def test_gemma_override_loads_tokenizer_and_encoder_from_another_folder(project, tmp_path, model):
    """``--pretrained_gemma_model_name_or_path`` as a plain Gemma folder: the prompts are encoded by it."""
    from transformers import AutoTokenizer, Gemma2Model

    other = Gemma2Model.from_pretrained(project / "model", subfolder="text_encoder")
    with torch.no_grad():
        other.embed_tokens.weight.mul_(2.0)
    other.save_pretrained(tmp_path / "gemma")
    AutoTokenizer.from_pretrained(project / "model", subfolder="tokenizer").save_pretrained(tmp_path / "gemma")
    replaced = sana_model(project, pretrained_gemma_model_name_or_path=str(tmp_path / "gemma"))
    torch.testing.assert_close(replaced.text_encoder.embed_tokens.weight, model.text_encoder.embed_tokens.weight * 2)
    assert replaced.tokenizer.padding_side == "right"
    original = model.encode_prompts([PROMPT])["prompt_embeds"]
    assert not torch.allclose(replaced.encode_prompts([PROMPT])["prompt_embeds"], original)
    assert replaced.fingerprint_parts()["gemma"] == str(tmp_path / "gemma")  # a new text cache
    # a pipeline folder works too: its tokenizer/ and text_encoder/ are used
    same = sana_model(project, pretrained_gemma_model_name_or_path=str(project / "model"))
    torch.testing.assert_close(same.encode_prompts([PROMPT])["prompt_embeds"], original)


# --- latents and the objective ---------------------------------------------------------------------


def test_latents_are_the_dc_autoencoders_scaled_by_its_factor(model):
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    encoded = model.encode_images(pixels)
    assert encoded["latent_mean"].shape == (2, 8, 2, 2) and not encoded["latent_std"].any()
    assert model.vae_scale_factor() == 32 and model.pixels_per_token() == 32
    latents = model.latents_from_cache(encoded)
    torch.testing.assert_close(latents, encoded["latent_mean"] * 0.41407)
    torch.testing.assert_close(latents, model.latents_from_cache(encoded))  # deterministic: no posterior to sample
    # the pipeline decodes latents / scaling_factor: the exact inverse
    decoded = model.vae.decode(latents / model.vae.config.scaling_factor).sample
    torch.testing.assert_close(decoded, model.vae.decode(encoded["latent_mean"]).sample)


@pytest.mark.parametrize("shift, median", [(None, 0.75), (1.0, 0.5)])
def test_flow_objective_uses_the_shipped_shift(project, model, monkeypatch, shift, median):
    assert model.prediction_type == "flow_matching" and model.default_flow_shift == 3.0
    config = sana_config(project, **({"flow_schedule_shift": shift} if shift else {}))
    loss, sigmas, noisy, mean = recorded_flow_loss(model, config, PROMPT, (8, 2, 2), monkeypatch)
    assert abs(float(sigmas.median()) - median) < 0.05
    x0 = mean * 0.41407
    check_loss_regresses_eps_minus_x0(loss, sigmas, noisy, x0)


def test_predict_feeds_the_pipelines_timestep_and_mask(model, monkeypatch):
    seen = {}
    original = model.denoiser.forward

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(model.denoiser, "forward", spy)
    text = model.encode_prompts([PROMPT, ""])
    out = model.predict(torch.randn(2, 8, 2, 2), torch.tensor([250.0, 900.0]), text)
    assert out.shape == (2, 8, 2, 2)
    assert torch.equal(seen["timestep"], torch.tensor([250.0, 900.0]) * model.denoiser.config.timestep_scale)
    assert torch.equal(seen["encoder_attention_mask"], text["prompt_attention_mask"].float())


def test_gradient_checkpointing_every_nth_block_keeps_the_gradients(project):
    plain = check_checkpointing_keeps_gradients(lambda: sana_model(project, tokenizer_max_length=TOKENS), (2, 8, 2, 2),
                                                PROMPT, checkpointed={1: 2, 2: 1}, handed_blocks=2)
    assert any(".attn1." in name for name in plain) and any(".attn2." in name for name in plain)


# --- config rules --------------------------------------------------------------------------------


def test_sana_options_are_accepted_for_sana_and_refused_elsewhere(project):
    config = sana_config(project, sana_complex_human_instruction='["a", "b"]', model_flavour="600M-512",
                         pretrained_gemma_model_name_or_path=str(project / "model"))
    assert config.sana_complex_human_instruction == ["a", "b"]
    assert error_of(project, "sd1x", sana_complex_human_instruction='["a"]') == (
        "`--sana_complex_human_instruction` only applies to sana, not to sd1x; remove it")
    message = error_of(project, "sd3", pretrained_gemma_model_name_or_path="google/gemma-2-2b-it")
    assert message.startswith("`--pretrained_gemma_model_name_or_path` only applies to ") and "sana" in message


@pytest.mark.parametrize("overrides, message", [
    ({"train_text_encoder": "true"},
     "`--train_text_encoder` is not supported for sana: Sana's Gemma 2 encoder stays frozen"),
    ({"lora_format": "comfyui"}, "`--lora_format comfyui` is not available for `--model_family sana`: ComfyUI's LoRA "
                                 "key map (model_lora_keys_unet in comfy/lora.py) has no entry for Sana"),
    ({"prediction_type": "epsilon"},
     "`--prediction_type epsilon` is not supported for sana; use one of: flow_matching"),
    ({"model_flavour": "2.0"}, "choose one of: 1600M-1024, 1600M-512"),
    ({"snr_gamma": 5}, "`--snr_gamma` is defined on a DDPM noise schedule"),
    ({"fuse_qkv_projections": "true"}, "`--fuse_qkv_projections` is not available for sana: Sana's self-attention is "
                                       "linear attention"),
])
def test_config_mistakes_for_sana_are_named(project, overrides, message):
    assert message in error_of(project, **overrides)


def test_missing_instruction_file_is_named(project):
    from simpletuner.models.sana import instruction_lines

    config = make_config(model_family="sana", sana_complex_human_instruction=str(project / "nope.json"))
    with pytest.raises(ConfigError, match=r"`--sana_complex_human_instruction` = .*nope.json: no such file"):
        instruction_lines(config)
    config = make_config(model_family="sana", sana_complex_human_instruction={"a": 1})
    with pytest.raises(ConfigError, match="must be a list of strings"):
        instruction_lines(config)


def test_flavours_map_to_their_hub_ids_and_buckets_are_whole_tokens(project):
    from simpletuner.models.registry import FAMILIES
    from simpletuner.training.plan import describe_datasets

    info = FAMILIES["sana"]
    assert info.flavours[info.default_flavour] == "Efficient-Large-Model/Sana_1600M_1024px_diffusers"
    assert all(hub.startswith("Efficient-Large-Model/") and hub.endswith("_diffusers")
               for hub in info.flavours.values())
    lines = "\n".join(describe_datasets(sana_config(project)))
    assert "buckets 64x64: 8" in lines, lines  # 64 px is two 32-pixel latent cells per side


def test_plan_memory_covers_sana(project, capsys):
    args = sana_args(project, "plan", train_batch_size=2)
    assert main(["plan-memory", *args]) == 0
    out = capsys.readouterr().out
    assert "memory plan for sana" in out and "training peak" in out


# --- real runs -----------------------------------------------------------------------------------------

def generate(pipeline, seed: int = 0) -> torch.Tensor:
    return pipeline(prompt=PROMPT, num_inference_steps=2, height=64, width=64, output_type="latent",
                    use_resolution_binning=False, max_sequence_length=TOKENS,
                    generator=torch.Generator().manual_seed(seed)).images


def test_lora_run_validates_and_loads_in_the_sana_pipeline(project, pipeline):
    trainer, _ = run_cli(project, "lora", validation_prompt=PROMPT, validation_num_inference_steps=2,
                         validation_step_interval=3, caption_dropout_probability=0.5, gradient_checkpointing="true",
                         disable_benchmark=None)
    assert_finite_losses(trainer)
    out = project / "lora"
    keys, metadata = saved_lora_keys(out)
    assert keys and all(k.startswith("transformer.transformer_blocks.") and (".lora_A." in k or ".lora_B." in k)
                        for k in keys)
    assert any(".attn1.to_q." in k for k in keys) and any(".attn2.to_v." in k for k in keys)
    assert metadata["model_family"] == "sana" and metadata["global_step"] == "3"
    check_validation_images(out)
    check_lora_loads_like_training(pipeline, project / "model", out, trainer._unwrapped_denoiser(), generate)


def test_full_run_saves_a_pipeline_diffusers_loads(project):
    from diffusers import SanaPipeline

    trainer, _ = run_cli(project, "full", model_type="full")
    saved = SanaPipeline.from_pretrained(project / "full" / "pipeline")
    base = SanaPipeline.from_pretrained(project / "model")
    assert type(saved.scheduler).__name__ == "DPMSolverMultistepScheduler" and saved.scheduler.config.flow_shift == 3.0
    check_saved_transformer_is_trained(saved, base, trainer._unwrapped_denoiser().state_dict())


@pytest.mark.parametrize("preset", ["int8-quanto", "int8-torchao"])
def test_lora_trains_on_a_quantized_base(project, preset):
    from simpletuner.models.quantize import quantized_layers

    trainer, _ = run_cli(project, f"quant-{preset}", base_model_precision=preset, gradient_checkpointing="true")
    assert_finite_losses(trainer)
    assert quantized_layers(trainer._unwrapped_denoiser()) > 0  # the base's linears really are quantized
    assert (project / f"quant-{preset}" / "pytorch_lora_weights.safetensors").is_file()


def test_gemma_is_quantized_by_text_encoder_1_precision(project):
    from simpletuner.models.quantize import quantized_layers

    trainer, _ = run_cli(project, "quant-gemma", text_encoder_1_precision="int8-quanto", max_train_steps=1)
    assert quantized_layers(trainer.model.text_encoder) > 0
