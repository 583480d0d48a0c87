"""The sdxl family on a tiny offline SDXL-shaped model: prompt encoding against diffusers' own pipeline,
zeroed unconditional embeds, micro-conditioning reaching the UNet, the refiner (aesthetic score, its
timestep slice), refiner training's timestep range, attention slicing, the loader options, config
rules, and real runs through the CLI (LoRA with both text encoders reproduced exactly by
StableDiffusionXLPipeline.load_lora_weights, full, text embeds reused)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")

from simpletuner.cli import main  # noqa: E402
from simpletuner.options import ConfigError  # noqa: E402
from simpletuner.options.resolve import resolve_run  # noqa: E402
from simpletuner.testing.config import make_config  # noqa: E402
from tests.models.conftest import family_args, keep_trainer, make_family_project  # noqa: E402

PROMPT = "a red circle on a white background"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: the tiny model's ops are too small to split, and on a shared CPU extra
    threads only wait for each other. Restored for the modules that follow."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = make_family_project(tmp_path_factory.mktemp("sdxl"), "sdxl")
    from simpletuner.testing.tiny.sdxl import build_tiny_pipeline

    build_tiny_pipeline(seed=0, refiner=True)[0].save_pretrained(root / "refiner")
    return root


def sdxl_model(path: Path, **options):
    from simpletuner.models.sdxl import StableDiffusionXL

    config = make_config(**{"model_family": "sdxl", "pretrained_model_name_or_path": str(path), **options})
    model = StableDiffusionXL(config, torch.device("cpu"), torch.float32)
    model.load()
    return model


@pytest.fixture(scope="module")
def model(project):
    return sdxl_model(project / "model")


@pytest.fixture(scope="module")
def refiner(project):
    return sdxl_model(project / "refiner", data_aesthetic_score=4.5)


def sdxl_config(project: Path, output: str = "out", **overrides):
    return resolve_run(family_args(project, "sdxl", output, **overrides), environ={}, root=project).config


def error_of(project: Path, family: str = "sdxl", **overrides) -> str:
    with pytest.raises(ConfigError) as error:
        resolve_run(family_args(project, family, "out", **overrides), environ={}, root=project)
    return str(error.value)


# --- text ------------------------------------------------------------------------------------------


def test_prompt_embeds_and_zeroed_uncond_equal_the_pipelines_own(project, model):
    from diffusers import StableDiffusionXLPipeline

    pipeline = StableDiffusionXLPipeline.from_pretrained(project / "model")
    embeds, negative, pooled, negative_pooled = pipeline.encode_prompt([PROMPT, "a blue square"],
                                                                       device=torch.device("cpu"))
    ours = model.encode_prompts([PROMPT, "a blue square"])
    # CLIP-L (32) and CLIP-G (48) penultimate states side by side; CLIP-G's projection pooled
    assert ours["prompt_embeds"].shape == (2, 77, 80) and ours["pooled_prompt_embeds"].shape == (2, 48)
    torch.testing.assert_close(ours["prompt_embeds"], embeds)
    torch.testing.assert_close(ours["pooled_prompt_embeds"], pooled)
    # SDXL base zeroes the empty negative prompt; caption dropout trains with the same zeros
    uncond = model.unconditional_text(model.encode_prompts(["", ""]))
    torch.testing.assert_close(uncond["prompt_embeds"], negative)
    torch.testing.assert_close(uncond["pooled_prompt_embeds"], negative_pooled)
    assert not negative.any() and model.force_zeros


# --- micro-conditioning ----------------------------------------------------------------------------


def time_ids_seen(model, batch=None, latents=None):
    """The ``time_ids`` the UNet receives in one predict call, and its output."""
    seen = {}
    handle = model.unet.add_time_proj.register_forward_hook(lambda module, args, out: seen.update(ids=args[0]))
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)) if latents is None else latents
    text = model.encode_prompts([PROMPT, PROMPT])
    with torch.no_grad():
        output = model.predict(latents, torch.tensor([100, 700]), text, batch=batch)
    handle.remove()
    return seen["ids"].view(2, -1), output


def test_batch_sizes_reach_the_unet_as_sdxl_time_ids(model):
    batch = {"original_size": torch.tensor([[100, 300], [64, 64]]), "crop_top_left": torch.tensor([[0, 64], [0, 0]]),
             "target_size": torch.tensor([[64, 64], [64, 64]])}
    ids, cropped = time_ids_seen(model, batch)
    assert ids.tolist() == [[100, 300, 0, 64, 64, 64], [64, 64, 0, 0, 64, 64]]
    default_ids, plain = time_ids_seen(model)  # no sizes: an uncropped image at its own size (64 px)
    assert default_ids.tolist() == [[64, 64, 0, 0, 64, 64]] * 2
    assert (cropped[0] - plain[0]).abs().max() > 1e-6 and torch.allclose(cropped[1], plain[1], atol=1e-6)


def test_refiner_conditions_on_the_aesthetic_score_and_validates(project, refiner):
    assert refiner.is_refiner and refiner.text_encoder is None and not refiner.force_zeros
    text = refiner.encode_prompts([PROMPT])
    assert text["prompt_embeds"].shape == (1, 77, 48)  # CLIP-G only
    batch = {"original_size": torch.tensor([[80, 120]] * 2), "crop_top_left": torch.tensor([[0, 8]] * 2),
             "target_size": torch.tensor([[64, 64]] * 2)}
    ids, _ = time_ids_seen(refiner, batch)
    assert ids.tolist() == [[80, 120, 0, 8, 4.5]] * 2  # original, crop, --data_aesthetic_score
    assert refiner.pipeline_call_arguments() == {"aesthetic_score": 4.5}
    pipeline = refiner.build_pipeline()
    pipeline.set_progress_bar_config(disable=True)
    image = pipeline(prompt=PROMPT, num_inference_steps=2, width=48, height=32, aesthetic_score=4.5,
                     generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (48, 32)
    # the refiner checkpoint trains on its own low-noise fifth unless told to use the whole schedule
    assert refiner.training_timestep_window() == (0, 200)
    assert sdxl_model(project / "refiner", sdxl_refiner_uses_full_range=True).training_timestep_window() is None


# --- timesteps -------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, low, high", [
    ({}, 0, 1000),
    ({"refiner_training": "true"}, 0, 200),
    ({"refiner_training": "true", "refiner_training_strength": 0.35}, 0, 350),
    ({"refiner_training": "true", "refiner_training_strength": 0.35, "refiner_training_invert_schedule": "true"},
     350, 1000),
])
def test_refiner_training_draws_timesteps_from_its_slice(project, model, monkeypatch, overrides, low, high):
    from simpletuner.methods.sft import SupervisedFineTuning

    config = sdxl_config(project, **overrides)
    monkeypatch.setattr(model, "config", config)
    method = SupervisedFineTuning(model, 0.0, config=config)
    torch.manual_seed(0)
    drawn = torch.cat([method.sample_timesteps(8, torch.device("cpu")) for _ in range(250)])
    assert low <= int(drawn.min()) < low + 10 and high - 10 <= int(drawn.max()) < high  # the slice, all of it


def test_refiner_window_rules_and_the_samplers_bounds_check():
    from simpletuner.models.sdxl import refiner_timestep_window
    from simpletuner.objectives.timesteps import build_timestep_sampler

    assert refiner_timestep_window(1000, False, None, False, False, False) is None  # base model, plain run
    assert refiner_timestep_window(1000, True, 0.25, False, False, False) == (0, 250)
    assert refiner_timestep_window(1000, True, 0.25, True, False, False) == (250, 1000)
    assert refiner_timestep_window(1100, False, None, False, True, False) == (0, 220)  # the refiner's own fifth
    assert refiner_timestep_window(1000, False, 0.3, False, True, True) is None  # --sdxl_refiner_uses_full_range
    scheduler = SimpleNamespace(config=SimpleNamespace(num_train_timesteps=1000))
    with pytest.raises(ValueError, match=r"timestep window \[0, 1200\) must lie inside \[0, 1000\)"):
        build_timestep_sampler(None, scheduler, window=(0, 1200))
    assert int(build_timestep_sampler(None, scheduler, window=(990, 1000))(64, "cpu").min()) >= 990


# --- memory and loading options --------------------------------------------------------------------


def test_attention_slicing_keeps_the_output(project, model):
    from diffusers.models.attention_processor import SlicedAttnProcessor

    sliced = sdxl_model(project / "model", unet_attention_slice=True)
    assert any(isinstance(p, SlicedAttnProcessor) for p in sliced.unet.attn_processors.values())
    assert not any(isinstance(p, SlicedAttnProcessor) for p in model.unet.attn_processors.values())
    torch.testing.assert_close(time_ids_seen(sliced)[1], time_ids_seen(model)[1], rtol=1e-4, atol=1e-5)


def test_unet_and_vae_come_from_their_override_folders(project, tmp_path):
    from simpletuner.testing.tiny.sdxl import build_tiny_pipeline

    other = build_tiny_pipeline(seed=5)[0]
    other.unet.save_pretrained(tmp_path / "weights" / "my_unet")
    other.vae.register_to_config(scaling_factor=0.5)
    other.save_pretrained(tmp_path / "pipeline")
    loaded = sdxl_model(project / "model", pretrained_unet_model_name_or_path=str(tmp_path / "weights"),
                        pretrained_unet_subfolder="my_unet",
                        pretrained_vae_model_name_or_path=str(tmp_path / "pipeline"))
    expected = other.unet.state_dict()
    assert all(torch.equal(value, expected[name]) for name, value in loaded.unet.state_dict().items())
    assert loaded.vae.config.scaling_factor == 0.5
    whole = sdxl_model(project / "model", pretrained_unet_model_name_or_path=str(tmp_path / "pipeline"))
    assert torch.equal(whole.unet.conv_in.weight, other.unet.conv_in.weight)


def test_single_file_without_its_flavours_configs_names_the_flavour(tmp_path):
    from safetensors.torch import save_file

    from simpletuner.models.sdxl import StableDiffusionXL

    file = tmp_path / "sdxl.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, str(file))
    config = make_config(model_family="sdxl", pretrained_model_name_or_path=str(file), model_flavour="refiner-1.0")
    model = StableDiffusionXL(config, torch.device("cpu"), torch.float32)
    with pytest.raises(RuntimeError, match="stabilityai/stable-diffusion-xl-refiner-1.0 .pick another"):
        model.load()


# --- config rules ----------------------------------------------------------------------------------


def test_sdxl_options_are_accepted_for_sdxl_and_refused_elsewhere(project):
    config = sdxl_config(project, refiner_training="true", refiner_training_strength=0.3, unet_attention_slice="true",
                         data_aesthetic_score=6, model_flavour="refiner-1.0", train_text_encoder="true")
    assert (config.refiner_training, config.refiner_training_strength, config.data_aesthetic_score) == (True, 0.3, 6)
    for name, value in (("refiner_training", "true"), ("sdxl_refiner_uses_full_range", "true"),
                        ("data_aesthetic_score", 5), ("unet_attention_slice", "true")):
        message = error_of(project, "sd1x", **{name: value})
        assert message.startswith(f"`--{name}` only applies to ") and "sdxl" in message, message


@pytest.mark.parametrize("overrides, message", [
    ({"refiner_training": "true", "refiner_training_strength": 1.5}, "`--refiner_training_strength` = 1.5 must be"),
    ({"refiner_training_invert_schedule": "true"}, "add `--refiner_training` or remove it"),
    ({"refiner_training": "true", "sdxl_refiner_uses_full_range": "true"}, "remove one of them"),
    ({"data_aesthetic_score": 11}, "`--data_aesthetic_score` = 11.0 must be between 0 and 10"),
    ({"model_flavour": "turbo"}, "base-1.0, refiner-1.0"),
])
def test_config_mistakes_for_sdxl_are_named(project, overrides, message):
    assert message in error_of(project, **overrides)


# --- real runs -------------------------------------------------------------------------------------

slow = pytest.mark.slow


def latents_of(pipeline) -> torch.Tensor:
    pipeline.set_progress_bar_config(disable=True)
    return pipeline(prompt=PROMPT, num_inference_steps=2, width=64, height=64, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).images


@slow
def test_lora_with_both_text_encoders_loads_exactly_in_diffusers(project, monkeypatch):
    from diffusers import StableDiffusionXLPipeline
    from safetensors import safe_open

    seen = keep_trainer(monkeypatch)
    args = family_args(project, "sdxl", "lora", train_text_encoder="true", caption_dropout_probability=0.5,
                       validation_prompt=PROMPT, validation_num_inference_steps=2, validation_step_interval=3,
                       validation_resolution="64x48")
    assert main(["train", *args]) == 0
    out = project / "lora"
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), framework="pt") as handle:
        parts = {key.split("_", 2)[1] for key in handle.keys()}  # the default layout's kohya names
        assert handle.metadata()["model_family"] == "sdxl"
    assert parts == {"unet", "te1", "te2"}
    from PIL import Image

    assert Image.open(out / "validation" / "step_3" / "64x48_00.png").size == (64, 48)

    trainer = seen["trainer"]
    assert all(torch.isfinite(torch.tensor(trainer.state.losses)))
    trained = trainer.model.build_pipeline(trainer._unwrapped_denoiser())
    for network in (trained.unet, trained.text_encoder, trained.text_encoder_2):
        network.eval()
    fresh = StableDiffusionXLPipeline.from_pretrained(project / "model")
    before = latents_of(fresh)
    fresh.load_lora_weights(out)
    trained.scheduler = fresh.scheduler
    after = latents_of(fresh)
    torch.testing.assert_close(after, latents_of(trained), rtol=0, atol=0)
    assert (after - before).abs().max() > 1e-4, "the trained LoRA must change the output"


@slow
def test_full_run_writes_a_pipeline_and_reuses_the_text_cache(project, monkeypatch):
    from diffusers import StableDiffusionXLPipeline

    seen = keep_trainer(monkeypatch)
    assert main(["train", *family_args(project, "sdxl", "full", model_type="full")]) == 0
    trainer = seen["trainer"]
    assert trainer.data.text_report.built == 0 and trainer.data.text_report.reused == 9  # cached by the LoRA run
    saved = StableDiffusionXLPipeline.from_pretrained(project / "full" / "pipeline")
    base = StableDiffusionXLPipeline.from_pretrained(project / "model")
    trained = trainer._unwrapped_denoiser().state_dict()
    loaded = saved.unet.state_dict()
    assert all(torch.equal(loaded[name], value) for name, value in trained.items())
    assert any(not torch.equal(base.unet.state_dict()[name], value) for name, value in loaded.items())
    assert type(saved.scheduler).__name__ == "EulerDiscreteScheduler" and saved.config.force_zeros_for_empty_prompt


@slow
def test_comfyui_layout_uses_kohya_names_that_diffusers_loads_exactly(project, monkeypatch):
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file

    seen = keep_trainer(monkeypatch)
    args = family_args(project, "sdxl", "comfy", train_text_encoder="true", lora_format="comfyui", max_train_steps=1)
    assert main(["train", *args]) == 0
    keys = load_file(str(project / "comfy" / "pytorch_lora_weights.safetensors"))
    assert {key.split("_")[0] + "_" + key.split("_")[1] for key in keys} == {"lora_unet", "lora_te1", "lora_te2"}
    trainer = seen["trainer"]
    trained = trainer.model.build_pipeline(trainer._unwrapped_denoiser())
    for network in (trained.unet, trained.text_encoder, trained.text_encoder_2):
        network.eval()
    fresh = StableDiffusionXLPipeline.from_pretrained(project / "model")
    fresh.load_lora_weights(project / "comfy")
    trained.scheduler = fresh.scheduler
    torch.testing.assert_close(latents_of(fresh), latents_of(trained), rtol=0, atol=0)
