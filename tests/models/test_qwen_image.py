"""The qwen_image family on a tiny offline Qwen-Image-shaped model (Qwen2.5-VL text encoder, double-stream
MMDiT, causal 3-D VAE): prompt encoding against diffusers' own pipeline (template, dropped system prefix,
padding), latent packing, the flow objective and its shift, gradient checkpointing, config rules (edit
flavours, text encoder training), the memory plan, and real runs through the CLI (LoRA loading in
``QwenImagePipeline``, the ComfyUI layout's names, full, quantized)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from simpletuner.cli import main  # noqa: E402
from simpletuner.testing.config import make_config  # noqa: E402
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


HARNESS = FamilyHarness("qwen_image")
project = HARNESS.project_fixture()
qwen_config, error_of, run_cli = HARNESS.config, HARNESS.error, HARNESS.run


def qwen_model(project: Path, **options):
    return HARNESS.model(project / "model", **options)


@pytest.fixture(scope="module")
def model(project):
    return qwen_model(project)


@pytest.fixture(scope="module")
def pipeline(project):
    from diffusers import QwenImagePipeline

    return tiny_pipeline(QwenImagePipeline, project / "model")


# --- prompt encoding -------------------------------------------------------------------------------


def test_tiny_tokenizer_gives_the_template_prefix_the_real_length(pipeline):
    """The pipeline drops 34 tokens (the real vocabulary's system prefix); the tiny vocabulary must
    tokenize that prefix into exactly as many, or captions would lose words."""
    prefix = pipeline.prompt_template_encode.split("{}")[0]
    assert len(pipeline.tokenizer(prefix).input_ids) == pipeline.prompt_template_encode_start_idx == 34


def test_prompt_embeds_equal_the_pipelines_own_encoding_padded(model, pipeline):
    prompts = [PROMPT, "a blue square"]
    embeds, mask = pipeline.encode_prompt(prompts)
    length = embeds.shape[1]
    ours = model.encode_prompts(prompts)
    assert ours["prompt_embeds"].shape == (2, 512, 32) and ours["prompt_embeds_mask"].shape == (2, 512)
    torch.testing.assert_close(ours["prompt_embeds"][:, :length], embeds.detach())
    assert torch.equal(ours["prompt_embeds_mask"][:, :length], mask)
    assert not ours["prompt_embeds_mask"][:, length:].any() and not ours["prompt_embeds"][:, length:].any()
    # the caption and the template's closing turn (5 tokens) are kept
    assert ours["prompt_embeds_mask"].sum(dim=1).tolist() == mask.sum(dim=1).tolist() == [12, 8]
    empty, _ = pipeline.encode_prompt([""])  # caption dropout trains the templated empty prompt
    torch.testing.assert_close(model.encode_prompts([""])["prompt_embeds"][:, :empty.shape[1]], empty.detach())


def test_length_shapes_the_text_tokens_and_the_cache_key(project, model):
    short = qwen_model(project, tokenizer_max_length=6)
    encoded = short.encode_prompts([PROMPT])
    assert encoded["prompt_embeds"].shape == (1, 6, 32) and encoded["prompt_embeds_mask"].sum() == 6  # cut
    assert short.fingerprint_parts() != model.fingerprint_parts()


# --- latents and the objective ---------------------------------------------------------------------


def test_latents_are_normalised_per_channel(model):
    mean = torch.randn(2, 16, 8, 8)
    latents = model.latents_from_cache({"latent_mean": mean, "latent_std": torch.zeros_like(mean)})
    channel_mean = torch.tensor(model.vae.config.latents_mean).view(1, -1, 1, 1)
    channel_std = torch.tensor(model.vae.config.latents_std).view(1, -1, 1, 1)
    torch.testing.assert_close(latents, (mean - channel_mean) / channel_std)
    assert model.encode_images(torch.zeros(1, 3, 64, 64))["latent_mean"].shape == (1, 16, 8, 8)
    assert model.vae_scale_factor() == 8 and model.pixels_per_token() == 16


def test_predict_equals_the_pipelines_transformer_call(model, pipeline):
    """What the pipeline's denoising loop computes for one step: packed tokens at ``t / 1000`` with the
    batch-length caption and its mask, unpacked; padding the captions further changes nothing."""
    from diffusers import QwenImagePipeline

    embeds, mask = pipeline.encode_prompt([PROMPT, "a blue square"])
    noisy = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        tokens = QwenImagePipeline._pack_latents(noisy, 2, 16, 8, 8)
        raw = model.denoiser(hidden_states=tokens, timestep=torch.tensor([0.3, 0.8]), encoder_hidden_states=embeds,
                             encoder_hidden_states_mask=mask, img_shapes=[[(1, 4, 4)]] * 2, return_dict=False)[0]
        expected = QwenImagePipeline._unpack_latents(raw, 64, 64, 8)[:, :, 0]
        ours = model.predict(noisy, torch.tensor([300.0, 800.0]), model.encode_prompts([PROMPT, "a blue square"]))
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)


def test_flow_objective_uses_the_shipped_dynamic_shift(project, model, monkeypatch):
    assert model.prediction_type == "flow_matching"
    # the shipped scheduler's line (256 tokens: mu 0.5, 8192: 0.9) at 1024 px = 4096 tokens of 16 px
    assert model.default_flow_shift == pytest.approx(math.exp(0.5 + (4096 - 256) * 0.4 / (8192 - 256)))
    at_64 = qwen_model(project, resolution=64, resolution_type="pixel")
    assert at_64.default_flow_shift == pytest.approx(math.exp(0.5 + (16 - 256) * 0.4 / (8192 - 256)))
    sigmas = recorded_flow_loss(model, qwen_config(project), PROMPT, (16, 2, 2), monkeypatch)[1]
    shift = model.default_flow_shift  # the loaded model's (1024 px); --flow_schedule_shift is unset
    # logit-normal sigmas have median 0.5; a shift s moves it to s * 0.5 / (1 + (s - 1) * 0.5)
    assert abs(float(sigmas.median()) - shift / (1 + shift)) < 0.05


def test_gradient_checkpointing_every_nth_block_keeps_the_gradients(project):
    # the last block's text-stream output is never read, so its to_add_out adapter gets no gradient
    plain = check_checkpointing_keeps_gradients(lambda: qwen_model(project), (2, 16, 8, 8), PROMPT,
                                                checkpointed={1: 2, 2: 1}, every_adapter_learns=False)
    assert any(".add_q_proj." in name for name in plain) and any("0.attn.to_add_out." in name for name in plain)


# --- config rules --------------------------------------------------------------------------------


def test_qwen_image_options_are_accepted_and_the_flavour_maps_to_its_hub_id(project):
    from simpletuner.models.registry import FAMILIES

    config = qwen_config(project, model_flavour="v1.0", tokenizer_max_length=200,
                         pretrained_transformer_model_name_or_path=str(project / "model"))
    assert config.tokenizer_max_length == 200
    assert FAMILIES["qwen_image"].flavours == {"v1.0": "Qwen/Qwen-Image"}
    assert "sana" in error_of(project, sana_complex_human_instruction='["a"]')


@pytest.mark.parametrize("overrides, message", [
    ({"model_flavour": "edit-v1"}, "`--model_flavour edit-v1` is not supported for qwen_image yet: "
                                   "Qwen/Qwen-Image-Edit reads a reference image through the text encoder's vision"),
    ({"model_flavour": "edit-v2"}, "Qwen/Qwen-Image-Edit-2509 reads up to three reference images"),
    ({"model_flavour": "v2.0"}, "`--model_flavour v2.0` is not a flavour of qwen_image; choose one of: v1.0"),
    ({"train_text_encoder": "true"},
     "`--train_text_encoder` is not supported for qwen_image: Qwen-Image's Qwen2.5-VL encoder stays frozen"),
    ({"prediction_type": "epsilon"}, "is not supported for qwen_image; use one of: flow_matching"),
])
def test_config_mistakes_for_qwen_image_are_named(project, overrides, message):
    assert message in error_of(project, **overrides)


def test_a_local_edit_checkpoint_is_refused_before_loading(project, tmp_path):
    import json
    import shutil

    from simpletuner.models.qwen_image import QwenImage

    edit = tmp_path / "edit"
    shutil.copytree(project / "model", edit)
    index = json.loads((edit / "model_index.json").read_text())
    (edit / "model_index.json").write_text(json.dumps({**index, "_class_name": "QwenImageEditPlusPipeline"}))
    model = QwenImage(make_config(model_family="qwen_image", pretrained_model_name_or_path=str(edit)),
                      torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match=r"edit: this is a Qwen-Image-Edit checkpoint \(QwenImageEditPlusPipeline\)"):
        model.load()
    assert model.denoiser is None


def test_dry_run_reads_the_3d_vaes_scale_without_torch(project):
    """The dry run sizes buckets from the VAE config alone; Qwen-Image's names its stages differently."""
    from simpletuner.training.plan import vae_scale_factor_of

    assert vae_scale_factor_of(str(project / "model")) == 8


def test_plan_memory_covers_qwen_image(project, capsys):
    assert main(["plan-memory", *family_args(project, "qwen_image", "plan")]) == 0
    out = capsys.readouterr().out
    assert "memory plan for qwen_image" in out and "training peak" in out


def test_validation_pipeline_reads_guidance_as_true_cfg(model, monkeypatch):
    """``guidance_scale`` becomes ``true_cfg_scale`` with the empty negative prompt; 1.0 means no CFG."""
    from diffusers import QwenImagePipeline

    seen = []
    monkeypatch.setattr(QwenImagePipeline, "__call__", lambda self, **kwargs: seen.append(kwargs))
    pipeline = model.build_pipeline()
    pipeline(prompt=["a", "b"], guidance_scale=4.0, num_inference_steps=1)
    pipeline(prompt="a", guidance_scale=1.0, negative_prompt=None)
    pipeline(prompt=["a"], guidance_scale=3.0, negative_prompt=["ugly"])
    assert (seen[0]["true_cfg_scale"], seen[0]["negative_prompt"]) == (4.0, ["", ""])
    assert (seen[1]["true_cfg_scale"], seen[1]["negative_prompt"]) == (1.0, None)
    assert (seen[2]["true_cfg_scale"], seen[2]["negative_prompt"]) == (3.0, ["ugly"])
    assert "guidance_scale" not in seen[0]
    assert model.validation_defaults() == {"validation_guidance": 4.0, "validation_negative_prompt": ""}


# --- real runs -----------------------------------------------------------------------------------------

slow = pytest.mark.slow


def generate(pipeline) -> torch.Tensor:
    return pipeline(prompt=PROMPT, num_inference_steps=2, height=64, width=64, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).images


@slow
def test_lora_run_validates_and_loads_in_the_qwen_image_pipeline(project, pipeline):
    trainer, _ = run_cli(project, "lora", validation_prompt=PROMPT, validation_num_inference_steps=2,
                         validation_step_interval=3, caption_dropout_probability=0.5, gradient_checkpointing="true",
                         lora_rank=4, lora_alpha=8, disable_benchmark=None)
    assert_finite_losses(trainer)
    out = project / "lora"
    keys, metadata = saved_lora_keys(out)
    assert keys and all(k.startswith("transformer.") and (".lora_A." in k or ".lora_B." in k) for k in keys)
    assert any(".transformer_blocks.0.attn.add_k_proj." in k for k in keys)
    assert any(".transformer_blocks.1.attn.to_out.0." in k for k in keys)
    assert metadata["model_family"] == "qwen_image" and metadata["global_step"] == "3"
    check_validation_images(out)
    # the same samples as the trained denoiser: the file carries the trained strength, alpha 8 / rank 4
    check_lora_loads_like_training(pipeline, project / "model", out, trainer._unwrapped_denoiser(), generate)


@slow
def test_comfyui_layout_uses_the_names_comfyui_maps_for_qwen_image(project):
    """ComfyUI's model_lora_keys_unet maps ``transformer.<module path>`` for QwenImage, whose module names
    equal diffusers' (checked in comfy/lora.py and comfy/ldm/qwen_image/model.py); every adapted module
    needs its ``.alpha`` or ComfyUI applies it at alpha = rank."""
    from safetensors import safe_open

    trainer, _ = run_cli(project, "lora-comfyui", lora_format="comfyui", lora_rank=4, lora_alpha=8, max_train_steps=1)
    with safe_open(str(project / "lora-comfyui" / "pytorch_lora_weights.safetensors"), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    modules = dict(trainer._unwrapped_denoiser().named_modules())
    weights = [k for k in tensors if not k.endswith(".alpha")]
    paths = {k[len("transformer."):].rsplit(".lora_", 1)[0] for k in weights}
    assert all(k.startswith("transformer.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in weights)
    assert len(paths) == 2 * 8 and all(isinstance(modules[path].base_layer, torch.nn.Linear) for path in paths)
    assert {k for k in tensors if k.endswith(".alpha")} == {f"transformer.{path}.alpha" for path in paths}
    assert {float(tensors[f"transformer.{path}.alpha"]) for path in paths} == {8.0}


@slow
def test_full_run_saves_a_pipeline_diffusers_loads(project):
    from diffusers import QwenImagePipeline

    trainer, _ = run_cli(project, "full", model_type="full")
    saved = QwenImagePipeline.from_pretrained(project / "full" / "pipeline")
    base = QwenImagePipeline.from_pretrained(project / "model")
    assert type(saved).__name__ == "QwenImagePipeline"
    assert saved.scheduler.config.use_dynamic_shifting and saved.scheduler.config.max_shift == 0.9
    check_saved_transformer_is_trained(saved, base, trainer._unwrapped_denoiser().state_dict())


@slow
@pytest.mark.parametrize("preset", ["int8-quanto", "int8-torchao"])
def test_lora_trains_on_a_quantized_base(project, preset):
    from simpletuner.models.quantize import quantized_layers

    trainer, _ = run_cli(project, f"quant-{preset}", base_model_precision=preset, gradient_checkpointing="true")
    assert_finite_losses(trainer)
    assert quantized_layers(trainer._unwrapped_denoiser()) > 0  # the base's linears really are quantized
    assert (project / f"quant-{preset}" / "pytorch_lora_weights.safetensors").is_file()


@slow
def test_pipeline_route_quantizes_the_transformer_and_the_qwen_encoder_while_loading(project):
    """``--quantize_via pipeline``: the transformer and Qwen2.5-VL come back quantized by the library
    loaders (both are loaded through the base class under their component names)."""
    from simpletuner.models.qwen_image import QwenImage
    from simpletuner.models.quantize import load_model, quantized_layers

    config = make_config(model_family="qwen_image", pretrained_model_name_or_path=str(project / "model"),
                         quantize_via="pipeline", base_model_precision="int8-quanto",
                         text_encoder_1_precision="int8-quanto")
    model = QwenImage(config, torch.device("cpu"), torch.float32)
    done = load_model(model, config)
    assert done == {"transformer": "int8-quanto (pipeline)", "text_encoder": "int8-quanto (pipeline)"}
    for module in (model.denoiser, model.text_encoder):
        assert getattr(module, "hf_quantizer", None) is not None and quantized_layers(module) > 0
    assert model.encode_prompts([PROMPT])["prompt_embeds"].isfinite().all()
