"""The flux family on a tiny offline FLUX.1 [dev]-shaped model: prompt encoding against diffusers' own
pipeline, T5 length / padding / attention masking, latent packing, the guidance the transformer
receives, LoRA target presets, the few-step schedule, the validation pipeline's real CFG, loaders,
config rules, and real runs through the CLI (LoRA reproduced exactly by FluxPipeline.load_lora_weights,
full)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from simpletuner.cli import main  # noqa: E402
from simpletuner.options import ConfigError  # noqa: E402
from simpletuner.options.resolve import resolve_run  # noqa: E402
from simpletuner.testing.config import make_config  # noqa: E402
from simpletuner.training.trainer import Trainer  # noqa: E402
from tests.models.conftest import family_args, keep_trainer, loaded_family, make_family_project  # noqa: E402

PROMPT = "a red circle on a white background"
#: Short T5 prompts keep the tiny model's steps cheap; the default (512) is tested on its own.
SHORT = 32


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    return make_family_project(tmp_path_factory.mktemp("flux"), "flux")


def flux_model(project: Path, **options):
    return loaded_family("flux", dict(pretrained_model_name_or_path=str(project / "model"), resolution=64,
                                      resolution_type="pixel"), **options)


@pytest.fixture(scope="module")
def model(project):
    return flux_model(project)


@pytest.fixture(scope="module")
def short_model(project):
    return flux_model(project, tokenizer_max_length=SHORT)


@pytest.fixture(scope="module")
def masked_model(project):
    return flux_model(project, tokenizer_max_length=SHORT, flux_attention_masked_training=True)


def flux_config(project: Path, output: str = "out", **overrides):
    return resolve_run(family_args(project, "flux", output, **overrides), environ={}, root=project).config


# --- prompt encoding -------------------------------------------------------------------------------


def test_prompt_embeds_equal_the_pipelines_own_encoding(project, model):
    from diffusers import FluxPipeline

    pipeline = FluxPipeline.from_pretrained(project / "model")
    prompts = [PROMPT, ""]
    embeds, pooled, text_ids = pipeline.encode_prompt(prompts, None, device=torch.device("cpu"))
    ours = model.encode_prompts(prompts)
    # 512 T5 tokens (width 48) by default, CLIP's pooled output (width 32), T5's mask
    assert ours["prompt_embeds"].shape == (2, 512, 48) and ours["pooled_prompt_embeds"].shape == (2, 32)
    torch.testing.assert_close(ours["prompt_embeds"], embeds)
    torch.testing.assert_close(ours["pooled_prompt_embeds"], pooled)
    used = ours["attention_mask"].sum(dim=1).tolist()
    assert 2 < used[0] < 20 and used[1] == 1  # words + </s>; the empty prompt is just </s>


def test_t5_length_and_padding_shape_the_cached_embeds(project, model, short_model):
    from simpletuner.models.flux import flux_text_settings

    zeroed = flux_model(project, t5_padding="zero", tokenizer_max_length=SHORT)
    kept = short_model.encode_prompts([PROMPT])
    cut = zeroed.encode_prompts([PROMPT])
    used = int(cut["attention_mask"].sum())
    assert cut["prompt_embeds"].shape == (1, SHORT, 48)
    torch.testing.assert_close(cut["prompt_embeds"][:, :used], kept["prompt_embeds"][:, :used])
    assert not cut["prompt_embeds"][:, used:].any() and kept["prompt_embeds"][:, used:].abs().sum() > 0
    # the pipeline's T5 sees the padding too, so the length changes even the real tokens' embeds
    assert not torch.allclose(model.encode_prompts([PROMPT])["prompt_embeds"][:, :used], kept["prompt_embeds"][:, :used])
    fingerprints = {tuple(sorted(m.fingerprint_parts().items())) for m in (model, short_model, zeroed)}
    assert len(fingerprints) == 3  # the text cache is keyed on length and padding
    # models without a guidance embedding ([schnell]) default to 256 T5 tokens
    assert flux_text_settings(make_config(), has_guidance_embedding=False)["t5_tokens"] == 256


# --- latents, packing and the model call -------------------------------------------------------------


def test_latents_are_shifted_scaled_and_packed_for_the_transformer(short_model):
    from diffusers import FluxPipeline

    mean = torch.randn(2, 16, 8, 8)
    model = short_model
    latents = model.latents_from_cache({"latent_mean": mean, "latent_std": torch.zeros_like(mean)})
    config = model.vae.config
    assert (config.shift_factor, config.scaling_factor) == (0.1159, 0.3611)
    torch.testing.assert_close(latents, (mean - 0.1159) * 0.3611)
    assert model.encode_images(torch.zeros(1, 3, 64, 64))["latent_mean"].shape == (1, 16, 8, 8)
    assert model.pixels_per_token() == 16
    # predict = unpack(transformer(pack(x))) with the pipeline's own packing and ids; sigma is the timestep
    text = model.encode_prompts([PROMPT, PROMPT])
    x = torch.randn(2, 16, 8, 6)  # not square: rows and columns must not be swapped
    with torch.no_grad():
        ours = model.predict(x, torch.tensor([250.0, 750.0]), text)
        tokens = FluxPipeline._pack_latents(x, 2, 16, 8, 6)
        raw = model.transformer(
            hidden_states=tokens, timestep=torch.tensor([0.25, 0.75]), guidance=torch.tensor([1.0, 1.0]),
            pooled_projections=text["pooled_prompt_embeds"], encoder_hidden_states=text["prompt_embeds"],
            txt_ids=torch.zeros(SHORT, 3), img_ids=FluxPipeline._prepare_latent_image_ids(2, 4, 3, "cpu", torch.float32),
            return_dict=False)[0]
    assert tokens.shape == (2, 12, 64) and ours.shape == x.shape
    torch.testing.assert_close(ours, FluxPipeline._unpack_latents(raw, 64, 48, 8))


def capture_guidance(model, text, count: int = 24):
    seen = []
    handle = model.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["guidance"]), with_kwargs=True)
    try:
        with torch.no_grad():
            model.predict(torch.randn(count, 16, 2, 2), torch.full((count,), 500.0),
                          {k: v.expand(count, *v.shape[1:]) for k, v in text.items()})
    finally:
        handle.remove()
    return seen[0]


def test_guidance_values_reach_the_transformer(project, short_model):
    from simpletuner.models.flux import GuidanceSettings

    text = short_model.encode_prompts([PROMPT])
    assert torch.equal(capture_guidance(short_model, text), torch.ones(24))  # constant 1.0 by default
    torch.manual_seed(0)
    for settings, check in (
        (GuidanceSettings(value=3.5), lambda g: torch.equal(g, torch.full((24,), 3.5))),
        (GuidanceSettings(mode="random-range", low=2.0, high=4.0),
         lambda g: 2.0 <= float(g.min()) < 2.5 and 3.5 < float(g.max()) <= 4.0),
    ):
        short_model.guidance = settings
        assert check(capture_guidance(short_model, text))
    short_model.guidance = GuidanceSettings.from_config(make_config(flux_guidance_value=3.5))
    assert short_model.guidance.value == 3.5
    short_model.guidance = GuidanceSettings()
    # and the transformer uses it: another guidance gives another prediction
    x = torch.randn(1, 16, 4, 4)
    with torch.no_grad():
        base = short_model.predict(x, torch.tensor([500.0]), text)
        short_model.guidance = GuidanceSettings(value=4.0)
        guided = short_model.predict(x, torch.tensor([500.0]), text)
    short_model.guidance = GuidanceSettings()
    assert (base - guided).abs().max() > 1e-6


def test_masked_attention_hides_the_padded_text_tokens(masked_model, short_model):
    masked = masked_model
    text = masked.encode_prompts([PROMPT])
    used = int(text["attention_mask"].sum())
    changed = dict(text, prompt_embeds=text["prompt_embeds"].clone())
    changed["prompt_embeds"][:, used:] += 5.0  # only padded positions differ
    x, t = torch.randn(1, 16, 4, 4), torch.tensor([600.0])
    float_mask = {k: v.float() for k, v in changed.items()}  # the trainer casts the mask to the weight dtype
    with torch.no_grad():
        torch.testing.assert_close(masked.predict(x, t, text), masked.predict(x, t, float_mask))
        unmasked = short_model.predict(x, t, text) - short_model.predict(x, t, changed)
    assert unmasked.abs().max() > 1e-4


# --- LoRA targets ------------------------------------------------------------------------------------

PRESETS = ("mmdit", "context", "context+ffs", "all", "all+ffs", "all+ffs+embedder", "ai-toolkit", "tiny", "nano")


def matches(name: str, target: str) -> bool:
    """PEFT's rule for a list of target modules."""
    return name == target or name.endswith("." + target)


@pytest.fixture(scope="module")
def full_size_transformer():
    """FLUX.1 [dev]'s real architecture on the meta device (no memory)."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        return FluxTransformer2DModel(guidance_embeds=True)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_lora_preset_names_existing_modules(short_model, preset, full_size_transformer, monkeypatch):
    import copy

    from simpletuner.models.adapters import add_lora
    from simpletuner.models.flux import lora_target_preset

    monkeypatch.setattr(short_model, "config", short_model.config.replace(flux_lora_target=preset))
    tiny = copy.deepcopy(short_model.transformer)
    for transformer in (tiny, full_size_transformer):
        names = [n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)]
        targets = lora_target_preset(preset, len(transformer.single_transformer_blocks))
        for target in targets:
            assert any(matches(n, target) for n in names), f"{preset}: {target} matches no Linear"
        adapted = {n for n in names if any(matches(n, t) for t in targets)}
        assert "proj_out" not in adapted  # the final output projection is never adapted
        if preset in ("mmdit", "tiny", "nano"):
            assert not any(".add_" in n or "ff_context" in n for n in adapted)
        if preset.startswith("context"):
            assert all(".add_" in n or "to_add_out" in n or "ff_context" in n for n in adapted)
    full = lora_target_preset(preset, 38)
    if preset == "tiny":
        assert full == ["single_transformer_blocks.7.proj_out", "single_transformer_blocks.20.proj_out"]
    targets = short_model.lora_target_modules()  # the family reads the preset from --flux_lora_target
    assert targets == lora_target_preset(preset, 2)
    expected = {n for n, m in tiny.named_modules() if isinstance(m, torch.nn.Linear)
                and any(matches(n, t) for t in targets)}
    add_lora(tiny, targets, rank=2, alpha=2, dropout=0.0)
    wrapped = {n.rsplit(".lora_A", 1)[0] for n, _ in tiny.named_modules() if n.endswith(".lora_A")}
    assert wrapped == expected  # PEFT adapts exactly the modules the preset names


def test_gradient_checkpointing_every_nth_block_keeps_the_gradients(short_model):
    import copy

    from simpletuner.models.adapters import add_lora

    model = copy.copy(short_model)
    model.transformer = model.denoiser = copy.deepcopy(short_model.transformer)
    torch.manual_seed(1)
    add_lora(model.denoiser, model.lora_target_modules(), rank=4, alpha=4, dropout=0.0)
    text = model.encode_prompts([PROMPT, ""])
    x = torch.randn(2, 16, 4, 4)

    def gradients():
        model.denoiser.zero_grad(set_to_none=True)
        model.predict(x, torch.tensor([300.0, 800.0]), text).square().mean().backward()
        return {n: p.grad.clone() for n, p in model.denoiser.named_parameters() if p.requires_grad}

    plain = gradients()
    for interval, recomputed in ((2, 2), (1, 4)):  # 2 double + 2 single blocks counted in one sequence
        assert model.enable_gradient_checkpointing(interval) == recomputed
        for name, grad in gradients().items():
            torch.testing.assert_close(grad, plain[name], msg=name)


# --- schedules -----------------------------------------------------------------------------------------


def test_default_shift_follows_the_checkpoint_sampler_at_the_training_resolution(model, monkeypatch):
    # 64 px = 16 tokens: mu = 0.5 + 0.65 * (16 - 256) / 3840; 1024 px = 4096 tokens: mu = 1.15
    assert math.isclose(model.default_flow_shift, math.exp(0.5 + 0.65 * (16 - 256) / 3840), rel_tol=1e-9)
    monkeypatch.setattr(model, "config", model.config.replace(resolution=1024))
    assert math.isclose(model._resolution_shift(), math.exp(1.15), rel_tol=1e-9)
    monkeypatch.setattr(model, "config", model.config.replace(resolution=1.048576, resolution_type="area"))  # megapixels
    assert math.isclose(model._resolution_shift(), math.exp(1.15), rel_tol=1e-9)
    # a fixed-shift scheduler ([schnell]: shift 1, no dynamic shifting) keeps its own shift
    monkeypatch.setattr(model, "_scheduler", model._scheduler.__class__(shift=1.0, use_dynamic_shifting=False))
    assert model._resolution_shift() == 1.0
    assert model.flow_patch_size == 2


def test_fast_schedule_trains_on_the_few_step_levels(project, short_model, monkeypatch):
    from simpletuner.methods.sft import SupervisedFineTuning

    config = flux_config(project, flux_fast_schedule="true", model_flavour="schnell", tokenizer_max_length=SHORT)
    method = SupervisedFineTuning(short_model, 0.0, config=config)
    seen = {}
    monkeypatch.setattr(short_model, "predict", lambda noisy, t, text, batch=None: seen.update(t=t) or noisy * 0)
    count = 2000
    mean = torch.zeros(count, 16, 2, 2)
    text = {k: v.expand(count, *v.shape[1:]) for k, v in short_model.encode_prompts([PROMPT]).items()}
    torch.manual_seed(0)
    method.compute_loss({"latent_mean": mean, "latent_std": mean, **text, "empty_prompt": text}, torch.device("cpu"))
    levels, counts = torch.unique(seen["t"], return_counts=True)
    assert levels.tolist() == [250.0, 500.0, 750.0, 1000.0]
    assert abs(counts[-1].item() / count - 0.7) < 0.04 and all(abs(c / count - 0.1) < 0.03 for c in counts[:3].tolist())


# --- validation pipeline ----------------------------------------------------------------------------


def sample(pipeline, **kwargs):
    arguments = dict(prompt=[PROMPT], num_inference_steps=2, height=64, width=64, output_type="latent",
                     generator=torch.Generator().manual_seed(0), guidance_scale=3.5)
    arguments.update(kwargs)
    return pipeline(**arguments).images


def test_validation_real_cfg_and_its_delay(project, monkeypatch):
    from simpletuner.models.flux import Flux

    model = flux_model(project, tokenizer_max_length=SHORT, validation_no_cfg_until_timestep=None)
    pipeline = model.build_pipeline()
    pipeline.set_progress_bar_config(disable=True)
    encoded = []
    original = Flux.encode_prompts
    monkeypatch.setattr(model, "encode_prompts", lambda prompts: encoded.append(list(prompts)) or original(model, prompts))
    passes = []
    hook = model.transformer.x_embedder.register_forward_hook(lambda *args: passes.append(1))

    plain = sample(pipeline)
    assert len(passes) == 2  # one pass per step without real CFG
    real = sample(pipeline, true_cfg_scale=4.0)
    assert len(passes) == 6 and (real - plain).abs().max() > 1e-5  # the empty prompt is the negative
    torch.testing.assert_close(real, sample(pipeline, true_cfg_scale=4.0, negative_prompt=[""]))
    assert encoded == [[PROMPT], [""]]  # each validation prompt encoded once, then reused

    # no CFG in either step: the negative pass is skipped
    model.config = model.config.replace(validation_no_cfg_until_timestep=2)
    passes.clear()
    torch.testing.assert_close(sample(pipeline, true_cfg_scale=4.0), plain, rtol=0, atol=0)
    assert len(passes) == 2
    model.config = model.config.replace(validation_no_cfg_until_timestep=1)  # CFG from the second step on
    delayed = sample(pipeline, true_cfg_scale=4.0)
    assert len(passes) == 5 and (delayed - plain).abs().max() > 1e-5 and (delayed - real).abs().max() > 1e-5
    hook.remove()
    assert "forward" not in model.transformer.__dict__  # the routing is undone after each call
    # the runner's extra argument
    assert flux_model(project, validation_guidance_real=3.0).pipeline_call_arguments() == {"true_cfg_scale": 3.0}


def test_masked_training_masks_validation_too(masked_model):
    model = masked_model
    pipeline = model.build_pipeline()
    pipeline.set_progress_bar_config(disable=True)
    masks = []
    hook = model.transformer.transformer_blocks[0].attn.register_forward_pre_hook(
        lambda module, args, kwargs: masks.append(kwargs.get("attention_mask")), with_kwargs=True)
    sample(pipeline, true_cfg_scale=2.0)
    hook.remove()
    assert len(masks) == 4 and all(m is not None and m.shape == (1, SHORT + 16) for m in masks)
    assert masks[0][0, :SHORT].sum() > masks[1][0, :SHORT].sum() == 1  # the prompt, then the empty prompt


# --- loaders --------------------------------------------------------------------------------------------


def test_single_file_transformer_and_component_overrides(project, model, tmp_path):
    from safetensors.torch import save_file

    file = tmp_path / "flux-finetune.safetensors"
    state = {k: v + 0.01 for k, v in model.transformer.state_dict().items()}
    save_file(state, str(file))
    loaded = flux_model(project, pretrained_transformer_model_name_or_path=str(file),
                        pretrained_t5_model_name_or_path=str(project / "model"),
                        pretrained_vae_model_name_or_path=str(project / "model" / "vae"))
    assert all(torch.equal(loaded.transformer.state_dict()[k], v) for k, v in state.items())
    assert loaded.text_encoder_2.config.d_model == 48 and loaded.vae.config.latent_channels == 16
    assert loaded.fingerprint_parts()["t5"] == str(project / "model")
    # a single file as the model: everything else comes from the flavour's repository (offline: a clear error)
    with pytest.raises(RuntimeError, match="needs the diffusers config of black-forest-labs/FLUX.1-schnell"):
        flux_model(project, pretrained_model_name_or_path=str(file), model_flavour="schnell")


# --- config rules ----------------------------------------------------------------------------------------


def error_of(project: Path, family: str = "flux", **overrides) -> str:
    with pytest.raises(ConfigError) as error:
        resolve_run(family_args(project, family, "out", **overrides), environ={}, root=project)
    return str(error.value)


def test_flux_options_are_accepted_for_flux_and_refused_elsewhere(project):
    config = flux_config(project, flux_guidance_mode="random-range", flux_guidance_min=1.0, flux_guidance_max=4.0,
                         flux_lora_target="all+ffs", flux_attention_masked_training="true", t5_padding="zero",
                         tokenizer_max_length=256, validation_guidance_real=2.0, validation_no_cfg_until_timestep=1,
                         model_flavour="krea")
    assert (config.flux_guidance_mode, config.flux_lora_target, config.validation_guidance_real) == \
        ("random-range", "all+ffs", 2.0)
    for name, value in (("flux_guidance_value", 3.5), ("validation_guidance_real", 2.0),
                        ("flux_lora_target", "all"), ("flux_fast_schedule", "true")):
        assert error_of(project, "sd1x", **{name: value}) == f"`--{name}` only applies to flux, not to sd1x; remove it"


@pytest.mark.parametrize("overrides, message", [
    ({"flux_guidance_mode": "random-range", "flux_guidance_min": 1.0}, "set both (e.g. 1.0 and 4.0)"),
    ({"flux_guidance_mode": "random-range", "flux_guidance_min": 4.0, "flux_guidance_max": 1.0},
     "must satisfy 0 <= min <= max"),
    ({"flux_guidance_min": 1.0, "flux_guidance_max": 2.0}, "add `--flux_guidance_mode random-range`"),
    ({"flux_lora_target": "controlnet"}, "ControlNet training is not available"),
    ({"flux_lora_target": "all", "model_type": "full"}, "trains the whole transformer; remove it"),
    ({"flux_fast_schedule": "true", "flow_schedule_shift": 2.0}, "`--flow_schedule_shift` would have no effect"),
    ({"validation_no_cfg_until_timestep": 2}, "set `--validation_guidance_real` above 1.0"),
    ({"validation_guidance_real": 0.5}, "must be at least 1.0"),
    ({"tokenizer_max_length": 600}, "must be between 1 and 512"),
    ({"model_flavour": "pro"}, "choose one of: dev, schnell, krea"),
])
def test_config_mistakes_for_flux_are_named(project, overrides, message):
    assert message in error_of(project, **overrides)


def test_flux_warnings(project):
    from simpletuner.options.validation import collect_warnings

    warnings = collect_warnings(flux_config(project, model_flavour="schnell", validation_negative_prompt="ugly"))
    assert any("--flux_fast_schedule true" in w for w in warnings)
    assert any("negative prompt is ignored" in w for w in warnings)


# --- real runs -----------------------------------------------------------------------------------------

slow = pytest.mark.slow


@slow
def test_lora_run_validates_and_loads_exactly_in_diffusers(project, monkeypatch):
    from diffusers import FluxPipeline
    from PIL import Image
    from safetensors import safe_open

    from simpletuner.models.flux import Flux

    seen = keep_trainer(monkeypatch)
    encoded = []
    original = Flux.encode_prompts
    monkeypatch.setattr(Flux, "encode_prompts", lambda self, prompts: encoded.append(list(prompts)) or original(self, prompts))
    args = family_args(project, "flux", "lora", tokenizer_max_length=SHORT, validation_prompt=PROMPT,
                       validation_num_inference_steps=2, validation_step_interval=3, validation_resolution="96x64",
                       validation_guidance_real=2.0, caption_dropout_probability=0.5, flux_lora_target="all+ffs",
                       flux_attention_masked_training="true", flux_guidance_mode="random-range",
                       flux_guidance_min=1.0, flux_guidance_max=4.0, disable_benchmark=None)
    assert main(["train", *args]) == 0
    trainer = seen["trainer"]
    assert len(trainer.state.losses) == 3 and all(math.isfinite(loss) for loss in trainer.state.losses)
    assert sum(p == [PROMPT] for p in encoded) == 1  # 2 validations, the prompt encoded once
    out = project / "lora"
    for step in ("step_0_base_model", "step_3"):
        assert Image.open(out / "validation" / step / "96x64_00.png").size == (96, 64)
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), framework="pt") as handle:
        keys, metadata = list(handle.keys()), handle.metadata()
        lora_b = [handle.get_tensor(k) for k in keys if ".lora_B." in k]
    # the default layout loads in diffusers and ComfyUI alike: transformer.<path>, with each layer's alpha
    assert keys and all(re.match(r"transformer\..*\.(lora_[AB]\.weight|alpha)$", k) for k in keys)
    assert sum(k.endswith(".alpha") for k in keys) == len(lora_b)
    assert any(".ff_context." in k for k in keys) and any("single_transformer_blocks.1.proj_out" in k for k in keys)
    assert not any(k.startswith("transformer.proj_out") for k in keys)
    assert all(b.abs().sum() > 0 for b in lora_b)  # every adapter moved off its zero initialisation
    assert metadata["model_family"] == "flux" and metadata["global_step"] == "3"

    # the trained model's own output, then a fresh pipeline with the saved LoRA loaded
    kwargs = dict(prompt=PROMPT, num_inference_steps=2, height=64, width=64, output_type="latent",
                  max_sequence_length=SHORT, guidance_scale=3.5)
    denoiser = trainer._unwrapped_denoiser().eval()
    trained_pipeline = FluxPipeline(**trainer.model._components(denoiser))
    trained_pipeline.set_progress_bar_config(disable=True)
    with torch.no_grad():
        trained = trained_pipeline(generator=torch.Generator().manual_seed(0), **kwargs).images
    pipeline = FluxPipeline.from_pretrained(project / "model")
    pipeline.set_progress_bar_config(disable=True)
    before = pipeline(generator=torch.Generator().manual_seed(0), **kwargs).images
    pipeline.load_lora_weights(out)
    after = pipeline(generator=torch.Generator().manual_seed(0), **kwargs).images
    assert torch.equal(after, trained)  # exact: the saved file carries no inference-time dropout
    assert (before - after).abs().max() > 1e-4, "loading the trained LoRA must change the output"


@slow
def test_comfyui_lora_is_written_in_transformer_names_and_loads_exactly_in_diffusers(project, monkeypatch):
    """--lora_format comfyui for Flux: ``transformer.<diffusers path>.lora_A/lora_B`` plus ``.alpha``
    (the layout ComfyUI maps, STACK.md), reproduced by FluxPipeline.load_lora_weights with alpha != rank,
    and read back by --init_lora."""
    from diffusers import FluxPipeline

    from simpletuner.models import lora_formats

    seen = keep_trainer(monkeypatch)
    args = family_args(project, "flux", "comfy", tokenizer_max_length=SHORT, lora_format="comfyui", lora_rank=4,
                       lora_alpha=2, flux_lora_target="all")
    assert main(["train", *args]) == 0
    trainer = seen["trainer"]
    file = project / "comfy" / "pytorch_lora_weights.safetensors"
    lora_file = lora_formats.LoraFile.read(file)
    assert lora_file.format == "comfyui"
    keys = list(lora_file.tensors)
    assert all(re.match(r"transformer\.[\w.]+\.(lora_[AB]\.weight|alpha)$", k) for k in keys)
    assert any(k.endswith(".add_q_proj.alpha") for k in keys)
    assert {float(lora_file.tensors[k]) for k in keys if k.endswith(".alpha")} == {2.0}
    denoiser = trainer._unwrapped_denoiser().eval()
    pipeline = FluxPipeline.from_pretrained(project / "model")
    pipeline.load_lora_weights(str(file))
    g = torch.Generator().manual_seed(0)
    tokens, text = torch.randn(1, 16, 64, generator=g), torch.randn(1, SHORT, 48, generator=g)
    inputs = dict(hidden_states=tokens, encoder_hidden_states=text, pooled_projections=torch.randn(1, 32, generator=g),
                  timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]), img_ids=torch.rand(16, 3, generator=g),
                  txt_ids=torch.zeros(SHORT, 3))
    with torch.no_grad():
        torch.testing.assert_close(pipeline.transformer(**inputs).sample, denoiser(**inputs).sample, atol=1e-5,
                                   rtol=1e-4)
    monkeypatch.undo()
    config = flux_config(project, "comfy-init", tokenizer_max_length=SHORT, lora_rank=4, lora_alpha=2,
                         flux_lora_target="all", init_lora=str(file))
    started_trainer = Trainer(config, show_progress=False)
    started_trainer.setup()
    started_trainer.data.close()
    started = {n: p for n, p in started_trainer._unwrapped_denoiser().named_parameters() if "lora_" in n}
    trained = {n: p for n, p in denoiser.named_parameters() if "lora_" in n}
    assert started.keys() == trained.keys()
    assert all(torch.allclose(started[n], trained[n], atol=1e-6) for n in trained)


@slow
def test_full_run_reuses_the_text_cache_and_saves_the_trained_transformer(project, monkeypatch, caplog):
    import logging

    from diffusers import FluxPipeline

    from simpletuner.models.flux import Flux

    if not (project / "lora").exists():  # run alone: a first run fills the text cache
        assert main(["train", *family_args(project, "flux", "warm", tokenizer_max_length=SHORT,
                                           max_train_steps=1)]) == 0
    seen = keep_trainer(monkeypatch)
    encoded = []
    monkeypatch.setattr(Flux, "encode_prompts", lambda self, prompts: encoded.append(prompts))
    caplog.set_level(logging.INFO, logger="simpletuner")
    assert main(["train", *family_args(project, "flux", "full", model_type="full", tokenizer_max_length=SHORT)]) == 0
    assert encoded == [] and any(re.search(r"text embeds: \d+ reused, 0 built", r.getMessage())
                                 for r in caplog.records)
    trainer = seen["trainer"]
    assert all(math.isfinite(loss) for loss in trainer.state.losses)
    trained = trainer._unwrapped_denoiser().state_dict()
    saved = FluxPipeline.from_pretrained(project / "full" / "pipeline")
    base = FluxPipeline.from_pretrained(project / "model")
    assert type(saved.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert saved.scheduler.config.use_dynamic_shifting and json.loads(
        (project / "full" / "pipeline" / "model_index.json").read_text())["_class_name"] == "FluxPipeline"
    loaded = saved.transformer.state_dict()
    assert all(torch.equal(loaded[name], value) for name, value in trained.items())
    assert any(not torch.equal(base.transformer.state_dict()[name], value) for name, value in loaded.items())
