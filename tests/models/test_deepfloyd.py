"""DeepFloyd IF on the tiny offline model: pixel "latents", T5 encoding options, the 6-channel UNet
call, stage II's low-res conditioning, config rules, and real CLI runs whose LoRA loads in IF's
pipelines."""

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

PROMPT = "a red circle on a white background"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model gains nothing from a second thread; on a CPU shared with other jobs the second
    thread mostly spin-waits (measured: 30 steps took 8x the CPU time with 2 threads under load)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    return make_family_project(tmp_path_factory.mktemp("deepfloyd"), "deepfloyd")


@pytest.fixture(scope="module")
def stage_ii_model(project) -> Path:
    from simpletuner.testing.tiny.deepfloyd import build_tiny_pipeline

    folder = project / "model-ii"
    if not folder.exists():
        build_tiny_pipeline(seed=0, stage=2)[0].save_pretrained(folder, safe_serialization=True)
    return folder


def family(project: Path, **overrides):
    """A loaded DeepFloydIF family for ``project``'s tiny model."""
    from simpletuner.models.deepfloyd import DeepFloydIF

    config = resolve_run(family_args(project, "deepfloyd", "unused", **overrides), environ={}).config
    model = DeepFloydIF(config, torch.device("cpu"), torch.float32)
    model.load()
    return model


def config_error(project: Path, **overrides) -> str:
    with pytest.raises(ConfigError) as error:
        resolve_run(family_args(project, "deepfloyd", "unused", **overrides), environ={})
    return str(error.value)


def native_pipeline(folder: Path):
    from diffusers import DiffusionPipeline

    pipeline = DiffusionPipeline.from_pretrained(folder)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def sample(pipeline, **extra):
    """Two DDPM steps with CFG at a fixed seed, as a numpy array."""
    return pipeline(prompt=PROMPT, num_inference_steps=2, height=64, width=64, output_type="np", clean_caption=False,
                    generator=torch.Generator().manual_seed(0), **extra).images


# --- the tiny model and the family contract -------------------------------------------------------


def test_make_tiny_model_writes_a_pixel_space_if_pipeline(tmp_path):
    assert main(["make-tiny-model", "--family", "deepfloyd", "--out", str(tmp_path / "m")]) == 0
    index = json.loads((tmp_path / "m" / "model_index.json").read_text())
    assert index["_class_name"] == "IFPipeline" and "vae" not in index
    assert json.loads((tmp_path / "m" / "unet" / "config.json").read_text())["out_channels"] == 6


def test_images_are_cached_as_exact_pixels(project):
    model = family(project)
    pixels = torch.randint(0, 256, (2, 3, 8, 8)).float() / 127.5 - 1.0  # what the image decoder produces
    cached = model.encode_images(pixels)
    assert cached["latent_mean"].dtype == torch.uint8 and float(cached["latent_std"].abs().max()) == 0
    assert torch.equal(model.latents_from_cache(cached), pixels)
    assert model.vae_scale_factor() == 1 and model.pixels_per_token() == 1


def test_predict_returns_the_noise_half_of_the_learned_variance_output(project):
    model = family(project)
    noisy = torch.randn(2, 3, 32, 32)
    text = model.encode_prompts([PROMPT, ""])
    with torch.no_grad():
        full = model.unet(noisy, torch.tensor([10, 900]), encoder_hidden_states=text["prompt_embeds"]).sample
        predicted = model.predict(noisy, torch.tensor([10, 900]), text)
    assert full.shape[1] == 6 and predicted.shape == noisy.shape
    assert torch.equal(predicted, full[:, :3])


def test_soft_min_snr_weights_every_step_of_the_if_schedule(project):
    """The pixel-space loss: soft Min-SNR on IF's cosine schedule, whose last step has almost no signal."""
    from simpletuner.objectives.losses import LossSettings, signal_to_noise, snr_loss_weights

    model = family(project, use_soft_min_snr="true")
    settings = LossSettings.from_config(model.config)
    steps = torch.arange(model.noise_scheduler().config.num_train_timesteps)
    weights = snr_loss_weights(settings, signal_to_noise(model.noise_scheduler(), steps).float(), "epsilon")
    assert settings.soft_min_snr and torch.isfinite(weights).all()
    assert float(weights[0]) < 0.01 and float(weights[-1]) > 0.99  # clean steps weigh little, noisy ones fully
    assert bool((weights[1:] >= weights[:-1]).all())


def test_default_prompt_embeds_equal_the_if_pipelines_own(project):
    model = family(project)
    embeds = model.encode_prompts([PROMPT, ""])["prompt_embeds"]
    native, _ = native_pipeline(project / "model").encode_prompt([PROMPT, ""], do_classifier_free_guidance=False)
    assert embeds.shape == (2, 77, native.shape[-1]) and torch.equal(embeds, native)


def test_t5_padding_zero_blanks_padded_positions_for_training_and_validation(project):
    plain, zeroed = family(project), family(project, t5_padding="zero")
    tokens = plain.tokenizer([PROMPT], padding="max_length", max_length=77, return_tensors="pt")
    real = int(tokens.attention_mask.sum())
    kept, blanked = plain.encode_prompts([PROMPT])["prompt_embeds"], zeroed.encode_prompts([PROMPT])["prompt_embeds"]
    assert kept[0, real:].abs().sum() > 0, "IF keeps what T5 outputs at padded positions by default"
    assert blanked[0, real:].abs().sum() == 0 and torch.equal(blanked[0, :real], kept[0, :real])
    validation, _ = zeroed.build_pipeline().encode_prompt([PROMPT], do_classifier_free_guidance=False)
    assert torch.equal(validation, blanked)
    assert plain.fingerprint_parts() != zeroed.fingerprint_parts(), "a padding change must rebuild the text cache"


def test_tokenizer_max_length_sets_the_token_count_and_is_capped_at_77(project):
    short = family(project, tokenizer_max_length=12)
    assert short.encode_prompts([PROMPT])["prompt_embeds"].shape[1] == 12
    positive, negative = short.build_pipeline().encode_prompt([PROMPT], negative_prompt=["blurry"])
    assert positive.shape[1] == negative.shape[1] == 12
    assert "at most 77 T5 tokens" in config_error(project, tokenizer_max_length=78)


def test_unet_and_t5_can_come_from_other_folders(project, tmp_path):
    from simpletuner.testing.tiny.deepfloyd import build_tiny_pipeline

    other = build_tiny_pipeline(seed=5)[0]
    other.save_pretrained(tmp_path / "other")
    model = family(project, pretrained_unet_model_name_or_path=tmp_path / "other",
                   pretrained_t5_model_name_or_path=tmp_path / "other")
    assert all(torch.equal(a, b) for a, b in zip(model.unet.state_dict().values(), other.unet.state_dict().values()))
    assert all(torch.equal(a, b) for a, b in zip(model.text_encoder.state_dict().values(),
                                                 other.text_encoder.state_dict().values()))
    other.unet.save_pretrained(tmp_path / "bare" / "weights")
    bare = family(project, pretrained_unet_model_name_or_path=tmp_path / "bare", pretrained_unet_subfolder="weights")
    assert torch.equal(bare.unet.conv_in.weight, other.unet.conv_in.weight)
    assert model.fingerprint_parts()["text_encoder"] == str(tmp_path / "other")


# --- config rules ----------------------------------------------------------------------------------


def test_config_rules_name_what_deepfloyd_cannot_do(project, stage_ii_model):
    assert "has no VAE" in config_error(project, pretrained_vae_model_name_or_path=project / "model")
    assert "single file" in config_error(project, pretrained_model_name_or_path=project / "model.safetensors")
    assert "stage II" in config_error(project, pretrained_model_name_or_path=stage_ii_model, validation_prompt=PROMPT)
    assert "stage II" in config_error(project, pretrained_model_name_or_path=None, model_flavour="ii-medium-450m",
                                      validation_prompt=PROMPT)
    resolve_run(family_args(project, "deepfloyd", "o", pretrained_model_name_or_path=stage_ii_model,
                            validation_prompt=PROMPT, validation_disable="true"), environ={})
    warnings = resolve_run(family_args(project, "deepfloyd", "o", resolution=128), environ={}).warnings
    assert any("generates 64 px images" in warning for warning in warnings)
    sd1x = family_args(project, "sd1x", "o", pretrained_t5_model_name_or_path="x")
    with pytest.raises(ConfigError, match="only applies to .*deepfloyd"):
        resolve_run(sd1x, environ={})


@pytest.mark.parametrize("flavour, stage_ii_folder, native", [
    ("i-medium-400m", False, 64), ("ii-large-1.2b", False, 256), ("i-medium-400m", True, 256)])
def test_resolution_warning_names_the_stage_edge(tmp_path, flavour, stage_ii_folder, native):
    from simpletuner.options.deepfloyd_rules import deepfloyd_warnings
    from simpletuner.testing.config import make_config

    model = None
    if stage_ii_folder:  # a local folder's pipeline class decides the stage, whatever the flavour says
        model = tmp_path / "if-ii"
        model.mkdir()
        (model / "model_index.json").write_text(json.dumps({"_class_name": "IFSuperResolutionPipeline"}))
    at = dict(model_family="deepfloyd", model_flavour=flavour, pretrained_model_name_or_path=model,
              resolution_type="pixel")
    assert deepfloyd_warnings(make_config(**at, resolution=native)) == []
    (warning,) = deepfloyd_warnings(make_config(**at, resolution=native * 2))
    assert f"generates {native} px images" in warning and f"`--resolution {native} --resolution_type pixel`" in warning


def test_resolution_warning_reads_the_registry_sizes(monkeypatch):
    """The sizes live in FamilyInfo alone: a registry change moves the warning with it."""
    import dataclasses

    from simpletuner.models import registry
    from simpletuner.options.deepfloyd_rules import deepfloyd_warnings
    from simpletuner.testing.config import make_config

    changed = dataclasses.replace(registry.FAMILIES["deepfloyd"], native_resolution=96,
                                  flavour_resolutions={"ii-medium-450m": 384, "ii-large-1.2b": 384})
    monkeypatch.setitem(registry.FAMILIES, "deepfloyd", changed)
    for flavour, native in (("i-large-900m", 96), ("ii-medium-450m", 384)):
        config = dict(model_family="deepfloyd", model_flavour=flavour, resolution_type="pixel")
        assert deepfloyd_warnings(make_config(**config, resolution=native)) == []
        (warning,) = deepfloyd_warnings(make_config(**config, resolution=64 if native != 64 else 128))
        assert f"generates {native} px images" in warning


def test_dry_run_buckets_pixels(project, capsys):
    assert main(["train", *family_args(project, "deepfloyd", "dry"), "--dry-run"]) == 0
    assert "64x64: 8" in capsys.readouterr().out


# --- stage II ----------------------------------------------------------------------------------------


def test_stage_ii_input_is_built_like_the_super_resolution_pipeline_builds_it(project, stage_ii_model):
    from simpletuner.models.deepfloyd import low_res

    model = family(project, pretrained_model_name_or_path=stage_ii_model)
    assert model.is_stage_ii
    clean = torch.rand(1, 3, 64, 64) * 2 - 1
    seen = {}

    def capture(module, args, kwargs):
        seen["input"], seen["labels"] = args[0].clone(), kwargs["class_labels"].clone()

    pipeline = model.build_pipeline()
    handle = pipeline.unet.register_forward_pre_hook(capture, with_kwargs=True)
    pipeline(prompt=PROMPT, image=low_res(clean), num_inference_steps=1, guidance_scale=1.0, height=64, width=64,
             noise_level=250, generator=torch.Generator().manual_seed(3), output_type="pt", clean_caption=False)
    handle.remove()
    generator = torch.Generator().manual_seed(3)
    torch.randn(1, 3, 64, 64, generator=generator)  # the pipeline draws the starting noise first
    condition, labels = model.stage_ii_condition(clean, torch.tensor([250]), torch.randn(1, 3, 64, 64, generator=generator))
    assert torch.allclose(seen["input"][:, 3:], condition, atol=1e-6) and torch.equal(seen["labels"], labels)
    batch = {"latent_mean": model.encode_images(clean)["latent_mean"]}
    text = model.encode_prompts([PROMPT])
    assert model.predict(torch.randn(1, 3, 64, 64), torch.tensor([500]), text, batch=batch).shape == (1, 3, 64, 64)


@pytest.mark.slow
def test_stage_ii_lora_run_loads_in_the_super_resolution_pipeline(project, stage_ii_model):
    from simpletuner.models.deepfloyd import load_lora, low_res

    trainer = run_cli(family_args(project, "deepfloyd", "out-ii", pretrained_model_name_or_path=stage_ii_model,
                                               max_train_steps=1, validation_disable="true"))
    assert all(math.isfinite(loss) for loss in trainer.state.losses)
    image = low_res(torch.rand(1, 3, 64, 64) * 2 - 1)
    trained = sample(eval_pipeline(trainer), image=image)
    pipeline = native_pipeline(stage_ii_model)
    base = sample(pipeline, image=image)
    load_lora(pipeline, project / "out-ii" / "pytorch_lora_weights.safetensors")
    assert abs(base - trained).max() > 1e-4 and abs(sample(pipeline, image=image) - trained).max() == 0


# --- end to end through the CLI ----------------------------------------------------------------------


def run_cli(args: list[str]):
    """``simpletuner train`` in-process; returns the finished Trainer (for its losses and model)."""
    from accelerate.state import AcceleratorState

    from simpletuner.training import trainer as trainer_module

    finished = []
    original = trainer_module.train

    def keep(*positional, **keywords):
        finished.append(original(*positional, **keywords))
        return finished[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer_module, "train", keep)
        assert main(["train", *args]) == 0
    AcceleratorState._reset_state(True)
    return finished[0]


def eval_pipeline(trainer):
    denoiser = trainer._unwrapped_denoiser().eval()
    pipeline = trainer.model.build_pipeline(denoiser)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def lora_run(project):
    """The first run on ``project``: it fills the text-embed cache that later runs reuse."""
    return run_cli(family_args(project, "deepfloyd", "out-lora", validation_prompt=PROMPT,
                               validation_num_inference_steps=2, validation_resolution="64,48x32",
                               use_soft_min_snr="true"))


@pytest.mark.slow
def test_lora_run_validates_and_its_lora_reproduces_the_trained_model(project, lora_run):
    from PIL import Image

    from simpletuner.models.deepfloyd import load_lora

    trainer = lora_run
    assert len(trainer.state.losses) == 3 and all(math.isfinite(loss) for loss in trainer.state.losses)
    out = project / "out-lora"
    assert Image.open(out / "validation" / "step_3" / "64x64_00.png").size == (64, 64)  # the final validation
    assert Image.open(out / "validation" / "step_3" / "48x32_00.png").size == (48, 32)
    from safetensors import safe_open

    with safe_open(str(out / "pytorch_lora_weights.safetensors"), framework="pt") as handle:
        keys = list(handle.keys())
        assert any(".add_k_proj.lora_B." in key for key in keys) and all(key.startswith("unet.") for key in keys)
        assert any(handle.get_tensor(key).abs().sum() > 0 for key in keys if ".lora_B." in key)
    trained = sample(eval_pipeline(trainer))
    pipeline = native_pipeline(project / "model")
    base = sample(pipeline)
    load_lora(pipeline, out)
    assert abs(base - trained).max() > 1e-4, "the trained LoRA must change the output"
    assert abs(sample(pipeline) - trained).max() == 0, "the saved LoRA must reproduce the trained model exactly"


@pytest.mark.slow
def test_full_run_reuses_the_text_cache_and_writes_an_if_pipeline(project, lora_run):
    trainer = run_cli(family_args(project, "deepfloyd", "out-full", model_type="full"))
    assert all(math.isfinite(loss) for loss in trainer.state.losses)
    assert "text embeds: 9 reused, 0 built" in trainer.data.describe()  # cached by an earlier run, never re-encoded
    saved = native_pipeline(project / "out-full" / "pipeline")
    assert type(saved).__name__ == "IFPipeline" and saved.scheduler.config.variance_type == "learned_range"
    base = native_pipeline(project / "model")
    assert not torch.equal(saved.unet.conv_in.weight, base.unet.conv_in.weight)
