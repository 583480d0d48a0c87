"""AuraFlow on its tiny offline model: prompt encoding against diffusers' own pipeline, latents, the
timestep the transformer is fed, the flow objective with the checkpoint's shift, the position-grid
limit, gradient checkpointing, config rules, ``plan-memory``, and real runs through the CLI (LoRA with
validation loaded by ``AuraFlowPipeline.load_lora_weights``, the ComfyUI layout, full training saving
a pipeline diffusers loads, quantized bases)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from simpletuner.cli import main  # noqa: E402
from simpletuner.testing.config import make_config  # noqa: E402
from tests.models.conftest import (  # noqa: E402
    FamilyHarness,
    check_checkpointing_keeps_gradients,
    check_loss_regresses_eps_minus_x0,
    check_trained,
    check_validation_images,
    recorded_flow_loss,
    saved_lora_keys,
)

FAMILY = "auraflow"
PROMPT = "a red circle on a white background"
#: The tiny scheduler's shift, the one the released AuraFlow checkpoints ship.
RELEASED_SHIFT = 1.73


HARNESS = FamilyHarness(FAMILY)
project = HARNESS.project_fixture()
auraflow_model, config_for, error_of, run_cli = HARNESS.model, HARNESS.config, HARNESS.error, HARNESS.run


@pytest.fixture(scope="module")
def model(project):
    return auraflow_model(project / "model")


# --- the tiny model and text encoding ---------------------------------------------------------------


def test_tiny_model_is_an_auraflow_pipeline(project):
    from diffusers import AuraFlowPipeline

    pipeline = AuraFlowPipeline.from_pretrained(project / "model")
    transformer = pipeline.transformer
    assert type(pipeline.text_encoder).__name__ == "UMT5EncoderModel"
    assert len(transformer.joint_transformer_blocks) == 1 and len(transformer.single_transformer_blocks) == 2
    # UMT5 (48 wide) differs from the transformer (32 wide): the caption projection cannot be skipped
    assert pipeline.text_encoder.config.d_model == 48 and transformer.config.caption_projection_dim == 32
    assert pipeline.scheduler.config.shift == RELEASED_SHIFT
    assert json.loads((project / "model" / "simpletuner_tiny_model.json").read_text())["family"] == FAMILY


def test_prompt_embeds_equal_the_pipelines_own_encoding(project, model):
    from diffusers import AuraFlowPipeline

    pipeline = AuraFlowPipeline.from_pretrained(project / "model")
    prompts = [PROMPT, "a blue square"]
    with torch.no_grad():
        embeds, _, negative, _ = pipeline.encode_prompt(prompts, device=torch.device("cpu"),
                                                        max_sequence_length=256)
    ours = model.encode_prompts(prompts)
    assert set(ours) == {"prompt_embeds"} and ours["prompt_embeds"].shape == (2, 256, 48)
    torch.testing.assert_close(ours["prompt_embeds"], embeds)
    torch.testing.assert_close(model.encode_prompts(["", ""])["prompt_embeds"], negative)
    used = int(model.tokenizer(PROMPT).attention_mask.count(1))  # words + </s>; the padding after them is zeroed
    assert 2 < used < 256 and not ours["prompt_embeds"][0, used:].any() and ours["prompt_embeds"][0, :used].abs().min() > 0


def test_tokenizer_max_length_sets_the_caption_length_and_the_cache_key(project, model):
    short = auraflow_model(project / "model", tokenizer_max_length=32)
    cut = short.encode_prompts([PROMPT])["prompt_embeds"]
    assert cut.shape == (1, 32, 48)
    torch.testing.assert_close(cut, model.encode_prompts([PROMPT])["prompt_embeds"][:, :32])
    assert short.pipeline_call_arguments() == {"max_sequence_length": 32}  # validation reads the same length
    assert model.fingerprint_parts()["max_tokens"] == "256" and short.fingerprint_parts()["max_tokens"] == "32"


# --- latents, the model call and the objective --------------------------------------------------------


def test_latents_are_scaled_without_a_shift(model):
    mean = torch.randn(2, 4, 16, 16)
    latents = model.latents_from_cache({"latent_mean": mean, "latent_std": torch.zeros_like(mean)})
    scale = model.vae.config.scaling_factor
    assert model.vae.config.shift_factor is None
    torch.testing.assert_close(latents, mean * scale)  # the pipeline decodes latents / scaling_factor
    assert model.encode_images(torch.zeros(1, 3, 64, 64))["latent_mean"].shape == (1, 4, 16, 16)
    assert model.pixels_per_token() == 8  # the demo VAE's 4 px per latent cell x 2x2 patches


def test_predict_feeds_the_transformer_sigma_like_the_pipeline(model):
    """The pipeline calls the transformer with ``t / 1000`` (0 clean, 1 noise); training passes ``1000 s``."""
    torch.manual_seed(0)
    latents = torch.randn(2, 4, 16, 16)
    text = model.encode_prompts([PROMPT, ""])
    with torch.no_grad():
        ours = model.predict(latents, torch.tensor([300.0, 800.0]), text)
        direct = model.denoiser(latents, encoder_hidden_states=text["prompt_embeds"], timestep=torch.tensor([0.3, 0.8]),
                                return_dict=False)[0]
        other = model.predict(latents, torch.tensor([301.0, 800.0]), text)
    assert ours.shape == latents.shape
    torch.testing.assert_close(ours, direct)
    assert not torch.equal(ours[0], other[0]) and torch.equal(ours[1], other[1])


def test_images_beyond_the_position_grid_are_refused_with_the_largest_edge(model):
    # the tiny grid is 16x16 patches of 2x2 latent cells at 4 px: 128 px at most
    model.predict(torch.randn(1, 4, 32, 24), torch.tensor([500.0]), model.encode_prompts([PROMPT]))
    with pytest.raises(ValueError, match=r"edge of 160 px needs 20 patches.* grid has 16 per side.* at most 128 px"):
        model.predict(torch.randn(1, 4, 40, 16), torch.tensor([500.0]), model.encode_prompts([PROMPT]))


@pytest.mark.parametrize("shift, median", [(None, RELEASED_SHIFT * 0.5 / (1 + (RELEASED_SHIFT - 1) * 0.5)),
                                           (1.0, 0.5)])
def test_flow_objective_uses_the_checkpoints_shift(project, model, monkeypatch, shift, median):
    """x_s = (1 - s) x0 + s eps regressing eps - x0; the logit-normal sigmas (median 0.5) are shifted by
    the checkpoint scheduler's 1.73 unless --flow_schedule_shift says otherwise."""
    config = config_for(project, **({"flow_schedule_shift": shift} if shift else {}))
    loss, sigmas, noisy, mean = recorded_flow_loss(model, config, PROMPT, (4, 2, 2), monkeypatch)
    assert abs(float(sigmas.median()) - median) < 0.05
    x0 = mean * model.vae.config.scaling_factor
    check_loss_regresses_eps_minus_x0(loss, sigmas, noisy, x0)


def test_default_shift_is_read_from_the_checkpoints_scheduler(project, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(project / "model", folder)
    scheduler_file = folder / "scheduler" / "scheduler_config.json"
    scheduler = json.loads(scheduler_file.read_text())
    scheduler_file.write_text(json.dumps({**scheduler, "shift": 3.0}))
    assert auraflow_model(project / "model").default_flow_shift == RELEASED_SHIFT
    assert auraflow_model(folder).default_flow_shift == 3.0


def test_gradient_checkpointing_every_nth_block_keeps_the_gradients(project):
    # one joint and two single blocks, counted in one sequence: every block, or blocks 0 and 2; the
    # transformer hands every block to the checkpointing function, which recomputes some
    check_checkpointing_keeps_gradients(lambda: auraflow_model(project / "model"), (2, 4, 16, 16), PROMPT,
                                        checkpointed={1: 3, 2: 2}, handed_blocks=3)


def test_block_lists_run_joint_blocks_then_single_blocks(model):
    names = [name for name, _ in model.transformer_blocks()]
    assert names == ["joint_transformer_blocks.0", "single_transformer_blocks.0", "single_transformer_blocks.1"]


# --- config rules ----------------------------------------------------------------------------------


def test_flavours_name_the_released_models():
    from simpletuner.models.auraflow import AuraFlow

    for flavour, hub_id in ((None, "fal/AuraFlow-v0.3"), ("v0.3", "fal/AuraFlow-v0.3"), ("v0.2", "fal/AuraFlow-v0.2"),
                            ("v0.1", "fal/AuraFlow")):
        config = make_config(model_family=FAMILY, model_flavour=flavour)
        model = AuraFlow(config, torch.device("cpu"), torch.float32)
        assert model.model_path == hub_id and model.prediction_type == "flow_matching"


def test_auraflow_options_are_accepted_and_the_others_refused(project):
    config = config_for(project, tokenizer_max_length=77, model_flavour="v0.1", lora_format="comfyui",
                        pretrained_transformer_model_name_or_path=str(project / "model"),
                        pretrained_transformer_subfolder="transformer")
    assert (config.tokenizer_max_length, config.model_flavour, config.lora_format) == (77, "v0.1", "comfyui")
    assert error_of(project, t5_padding="zero").startswith("`--t5_padding` only applies to ")


@pytest.mark.parametrize("overrides, message", [
    ({"train_text_encoder": "true"}, "`--train_text_encoder` is not supported for auraflow"),
    ({"prediction_type": "epsilon"}, "`--prediction_type epsilon` is not supported for auraflow; use one of: "
                                     "flow_matching"),
    ({"model_flavour": "v9"}, "`--model_flavour v9` is not a flavour of auraflow; choose one of: v0.3, v0.2, v0.1"),
    ({"tokenizer_max_length": 600}, "`--tokenizer_max_length` = 600 must be between 1 and 512"),
    ({"text_encoder_2_precision": "int8-quanto"}, "auraflow has 1 text encoder"),
    ({"snr_gamma": 5}, "`--snr_gamma` is defined on a DDPM noise schedule"),
])
def test_config_mistakes_for_auraflow_are_named(project, overrides, message):
    assert message in error_of(project, **overrides)


def test_plan_memory_prints_a_plan_for_auraflow(project, capsys):
    argv = HARNESS.plan_args(project, lora_rank=4)
    assert main(["plan-memory", *argv]) == 0
    out = capsys.readouterr().out
    assert "memory plan for auraflow" in out and "transformer 0.162M" in out and "training peak" in out
    assert main(["plan-memory", *argv, "--memory_budget", "1GiB"]) == 0
    assert "fits in 1.00 GiB as configured" in capsys.readouterr().out


# --- real runs -----------------------------------------------------------------------------------------


lora_run = HARNESS.lora_run_fixture(PROMPT)


slow = pytest.mark.slow


@slow
def test_lora_run_trains_saves_and_validates(lora_run):
    trainer, start, out = lora_run
    check_trained(trainer, start)
    assert trainer.model.denoiser.gradient_checkpointing  # --gradient_checkpointing reached the transformer
    keys, metadata = saved_lora_keys(out)
    assert keys and all(re.fullmatch(r"transformer\.(joint|single)_transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0)"
                                     r"\.lora_[AB]\.weight", key) for key in keys), keys
    assert {key.split(".")[1] for key in keys} == {"joint_transformer_blocks", "single_transformer_blocks"}
    assert json.loads(metadata["lora_adapter_metadata"])["transformer.r"] == 16
    assert metadata["model_family"] == FAMILY and metadata["global_step"] == "3"
    check_validation_images(out)


@slow
def test_saved_lora_loads_in_diffusers_and_reproduces_training(project, lora_run):
    from diffusers import AuraFlowPipeline

    trainer, _, out = lora_run
    pipeline = AuraFlowPipeline.from_pretrained(project / "model")
    pipeline.set_progress_bar_config(disable=True)
    kwargs = dict(prompt=PROMPT, num_inference_steps=2, height=64, width=64, output_type="latent")
    with torch.no_grad():
        before = pipeline(generator=torch.Generator().manual_seed(0), **kwargs).images
        pipeline.load_lora_weights(out)
        after = pipeline(generator=torch.Generator().manual_seed(0), **kwargs).images
        live = trainer.model.build_pipeline(trainer._unwrapped_denoiser().eval())
        live.set_progress_bar_config(disable=True)
        trained = live(generator=torch.Generator().manual_seed(0), **kwargs).images
    assert (before - after).abs().max() > 1e-6, "loading the trained LoRA must change the output"
    torch.testing.assert_close(after, trained, rtol=0, atol=1e-5)


#: ComfyUI's AuraFlow key map (comfy/utils.py ``auraflow_to_diffusers``, read through the code index on
#: 2026-12-07, used by comfy/lora.py ``model_lora_keys_unet`` as ``transformer.<diffusers path>``): the
#: diffusers module paths of each block kind it maps to native weights.
COMFYUI_AURAFLOW_MODULES = {
    "joint_transformer_blocks": {"attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj",
                                 "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out", "ff.linear_1", "ff.linear_2",
                                 "ff.out_projection", "ff_context.linear_1", "ff_context.linear_2",
                                 "ff_context.out_projection", "norm1.linear", "norm1_context.linear"},
    "single_transformer_blocks": {"attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "norm1.linear",
                                  "ff.linear_1", "ff.linear_2", "ff.out_projection"},
}


@slow
def test_comfyui_layout_names_only_modules_comfyui_maps(project, lora_run):
    from safetensors import safe_open

    from simpletuner.models import lora_formats as formats

    assert formats.default_lora_format(FAMILY) == "diffusers"  # diffusers' loader reads no `.alpha` tensors
    trainer, start = run_cli(project, "comfy", lora_format="comfyui", lora_alpha=8)
    check_trained(trainer, start)
    with safe_open(str(project / "comfy" / "pytorch_lora_weights.safetensors"), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    modules = {key.rsplit(".", 2)[0] if key.endswith(".weight") else key.rsplit(".", 1)[0] for key in tensors}
    assert modules and all(f"{module}.alpha" in tensors and float(tensors[f"{module}.alpha"]) == 8.0
                           for module in modules)
    for module in modules:
        prefix, blocks, _, path = module.split(".", 3)
        assert prefix == "transformer" and path in COMFYUI_AURAFLOW_MODULES[blocks], module
    # the same modules as the diffusers-layout file of the other run, so ComfyUI applies all of it
    with safe_open(str(project / "lora" / "pytorch_lora_weights.safetensors"), framework="pt") as handle:
        assert {key.rsplit(".", 2)[0] for key in handle.keys()} == modules


@slow
def test_full_run_reuses_the_text_cache_and_saves_a_pipeline_diffusers_loads(project, lora_run, caplog):
    import logging

    from diffusers import AuraFlowPipeline

    from simpletuner.models.auraflow import AuraFlow

    caplog.set_level(logging.INFO, logger="simpletuner")
    calls = []
    original = AuraFlow.encode_prompts
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(AuraFlow, "encode_prompts", lambda self, prompts: calls.append(prompts) or original(self, prompts))
        trainer, start = run_cli(project, "full", model_type="full")
    assert calls == [], "the LoRA run cached every caption; a second run must not encode them again"
    check_trained(trainer, start)
    saved = AuraFlowPipeline.from_pretrained(project / "full" / "pipeline")
    base = AuraFlowPipeline.from_pretrained(project / "model")
    assert type(saved.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert saved.scheduler.config.shift == RELEASED_SHIFT
    trained = trainer._unwrapped_denoiser().state_dict()
    loaded = saved.transformer.state_dict()
    assert loaded.keys() == trained.keys() and all(torch.equal(loaded[name], value) for name, value in trained.items())
    assert any(not torch.equal(base.transformer.state_dict()[name], value) for name, value in loaded.items())


@slow
def test_fused_qkv_lora_is_saved_per_projection_and_reproduces_training(project, lora_run):
    """``--fuse_qkv_projections``: diffusers fuses both streams' q/k/v of AuraFlow's attention; the LoRA
    trained on the fused matrices is saved as plain per-projection LoRAs that the unfused pipeline loads."""
    from diffusers import AuraFlowPipeline

    trainer, start = run_cli(project, "fused", fuse_qkv_projections="true")
    check_trained(trainer, start)
    denoiser = trainer._unwrapped_denoiser().eval()
    fused = {name.rsplit(".", 1)[1] for name, _ in denoiser.named_modules() if name.endswith(("to_qkv", "to_added_qkv"))}
    assert fused == {"to_qkv", "to_added_qkv"} and not hasattr(denoiser.single_transformer_blocks[0].attn, "to_q")
    pipeline = AuraFlowPipeline.from_pretrained(project / "model")
    pipeline.load_lora_weights(project / "fused")
    kwargs = dict(prompt=PROMPT, num_inference_steps=2, height=64, width=64, output_type="latent")
    live = trainer.model.build_pipeline(denoiser)
    for each in (pipeline, live):
        each.set_progress_bar_config(disable=True)
    with torch.no_grad():
        loaded = pipeline(generator=torch.Generator().manual_seed(0), **kwargs).images
        trained = live(generator=torch.Generator().manual_seed(0), **kwargs).images
    torch.testing.assert_close(loaded, trained, rtol=0, atol=1e-5)


#: preset -> (layer type, weight type) of a quantized transformer linear (the PEFT base layer)
QUANTIZED_LAYERS = {"int8-quanto": ("QLinear", "WeightQBytesTensor"), "int8-torchao": ("Linear", "Int8Tensor")}


@slow
@pytest.mark.parametrize("preset, route", [("int8-quanto", "cpu"), ("int8-torchao", "cpu"), ("int8-quanto", "pipeline")])
def test_lora_trains_on_a_quantized_transformer(project, lora_run, preset, route):
    """``--quantize_via pipeline`` quantizes while loading, UMT5 too when ``--text_encoder_1_precision`` asks."""
    encoder = {"text_encoder_1_precision": preset} if route == "pipeline" else {}
    trainer, start = run_cli(project, f"quantized-{preset}-{route}", base_model_precision=preset, quantize_via=route,
                             **encoder)
    check_trained(trainer, start)
    denoiser = trainer._unwrapped_denoiser()
    trainable = {name for name, p in denoiser.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    layer = denoiser.single_transformer_blocks[0].attn.to_q.base_layer
    assert (type(layer).__name__, type(layer.weight).__name__) == QUANTIZED_LAYERS[preset]
    expected = {"transformer": f"{preset} ({route})"}
    if encoder:
        expected["text_encoder"] = f"{preset} ({route})"
        assert type(trainer.model.text_encoder.encoder.block[0].layer[0].SelfAttention.q).__name__ == "QLinear"
    assert trainer.model.quantization == expected


@slow
def test_validation_previews_decode_with_a_tiny_autoencoder(project, lora_run, tmp_path):
    from simpletuner.testing.tiny_vision import make_tiny_autoencoder_tiny

    tae = make_tiny_autoencoder_tiny(tmp_path / "tae", latent_channels=4)
    run_cli(project, "preview", validation_prompt=PROMPT, validation_step_interval=3, validation_num_inference_steps=2,
            validation_preview="true", tiny_autoencoder_path=str(tae))
    previews = sorted(path.name for path in (project / "preview" / "validation" / "step_3" / "previews").iterdir())
    assert previews == ["64x64_00_step001.png", "64x64_00_step002.png"]
