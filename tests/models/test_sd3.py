"""The sd3 family on a tiny offline SD 3.5-shaped model: prompt encoding against diffusers' own pipeline,
the T5 and unconditional-embed options, latents, the flow objective with SD3's shift, gradient
checkpointing, config rules, and real runs through the CLI (LoRA, full, exact resume)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from simpletuner.cli import main  # noqa: E402
from simpletuner.options import ConfigError  # noqa: E402
from simpletuner.options.resolve import resolve_run  # noqa: E402
from simpletuner.testing.config import make_config  # noqa: E402
from simpletuner.training.trainer import Trainer, train  # noqa: E402
from tests.models.conftest import family_args, keep_trainer, make_family_project  # noqa: E402

PROMPT = "a red circle on a white background"
#: 88 px wide images: with --aspect_bucket_alignment 8 they would get 11 latent cells, which SD3's 2x2
#: patches cannot split; buckets must round to 16 px instead.
WIDE = (88, 64)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    from PIL import Image

    root = make_family_project(tmp_path_factory.mktemp("sd3"), "sd3")
    for index, colour in enumerate(("blue", "green")):
        Image.new("RGB", WIDE, colour).save(root / "data" / f"wide_{index}.png")
        (root / "data" / f"wide_{index}.txt").write_text(f"a {colour} square on a white background")
    return root


def sd3_model(project: Path, **options):
    from simpletuner.models.sd3 import StableDiffusion3

    config = make_config(**{"model_family": "sd3", "pretrained_model_name_or_path": str(project / "model"), **options})
    model = StableDiffusion3(config, torch.device("cpu"), torch.float32)
    model.load()
    return model


@pytest.fixture(scope="module")
def model(project):
    return sd3_model(project)


def sd3_config(project: Path, output: str = "out", **overrides):
    return resolve_run(family_args(project, "sd3", output, **overrides), environ={}, root=project).config


# --- prompt encoding -------------------------------------------------------------------------------


def test_prompt_embeds_equal_the_pipelines_own_encoding(project, model):
    from diffusers import StableDiffusion3Pipeline

    pipeline = StableDiffusion3Pipeline.from_pretrained(project / "model")
    prompts = [PROMPT, "a blue square"]
    embeds, negative, pooled, negative_pooled = pipeline.encode_prompt(
        prompts, None, None, device=torch.device("cpu"), max_sequence_length=154)
    ours = model.encode_prompts(prompts)
    empty = model.encode_prompts(["", ""])
    # 77 CLIP tokens (CLIP-L 32 + CLIP-G 48 channels, zero-padded to T5's 96) then 154 T5 tokens
    assert ours["prompt_embeds"].shape == (2, 77 + 154, 96) and ours["pooled_prompt_embeds"].shape == (2, 80)
    torch.testing.assert_close(ours["prompt_embeds"], embeds)
    torch.testing.assert_close(ours["pooled_prompt_embeds"], pooled)
    torch.testing.assert_close(empty["prompt_embeds"], negative)
    torch.testing.assert_close(empty["pooled_prompt_embeds"], negative_pooled)
    assert not ours["prompt_embeds"][:, :77, 80:].any()  # the padding of the CLIP channels


def test_t5_padding_and_length_shape_the_t5_tokens(project, model):
    short = sd3_model(project, tokenizer_max_length=32)
    zeroed = sd3_model(project, t5_padding="zero", tokenizer_max_length=32)
    kept = short.encode_prompts([PROMPT])["prompt_embeds"]
    cut = zeroed.encode_prompts([PROMPT])["prompt_embeds"]
    assert cut.shape == (1, 77 + 32, 96)
    torch.testing.assert_close(cut[:, :77], model.encode_prompts([PROMPT])["prompt_embeds"][:, :77])  # CLIP: 77 always
    used = int(zeroed.tokenizer_3(PROMPT, return_tensors="pt").attention_mask.sum())  # words + </s>
    assert 2 < used < 32
    torch.testing.assert_close(cut[:, :77 + used], kept[:, :77 + used])  # the real T5 tokens agree
    assert not cut[:, 77 + used:].any() and kept[:, 77 + used:].abs().min() > 0  # padding zeroed vs kept
    # the text cache is keyed on both settings
    fingerprints = {tuple(sorted(m.fingerprint_parts().items())) for m in (model, short, zeroed)}
    assert len(fingerprints) == 3


@pytest.mark.parametrize("clip, t5, zero_clip, zero_t5", [
    (None, None, False, False), ("zero", None, True, True), ("zero", "empty_string", True, False),
    (None, "zero", False, True),
])
def test_unconditional_embeds_follow_the_uncond_options(project, clip, t5, zero_clip, zero_t5):
    model = sd3_model(project, sd3_clip_uncond_behaviour=clip, sd3_t5_uncond_behaviour=t5)
    empty = model.encode_prompts(["", ""])
    uncond = model.unconditional_text(empty)
    for part, zeroed in ((uncond["prompt_embeds"][:, :77], zero_clip), (uncond["pooled_prompt_embeds"], zero_clip),
                         (uncond["prompt_embeds"][:, 77:], zero_t5)):
        assert not part.any() if zeroed else part.abs().sum() > 0
    if not zero_t5:
        assert torch.equal(uncond["prompt_embeds"][:, 77:], empty["prompt_embeds"][:, 77:])
    # validation samples with the same unconditional embeds as the negative prompt
    pipeline = model.build_pipeline()
    embeds, negative, _, negative_pooled = pipeline.encode_prompt(
        prompt=[PROMPT, PROMPT], prompt_2=None, prompt_3=None, num_images_per_prompt=1)
    torch.testing.assert_close(negative, uncond["prompt_embeds"])
    torch.testing.assert_close(negative_pooled, uncond["pooled_prompt_embeds"])
    torch.testing.assert_close(embeds, model.encode_prompts([PROMPT, PROMPT])["prompt_embeds"])


# --- latents and the objective ---------------------------------------------------------------------


def test_latents_are_shifted_and_scaled_like_the_pipeline_expects(model):
    mean = torch.randn(2, 16, 8, 8)
    latents = model.latents_from_cache({"latent_mean": mean, "latent_std": torch.zeros_like(mean)})
    config = model.vae.config
    assert (config.shift_factor, config.scaling_factor) == (0.0609, 1.5305)
    torch.testing.assert_close(latents, (mean - 0.0609) * 1.5305)
    # the pipeline decodes latents / scaling_factor + shift_factor: the exact inverse
    torch.testing.assert_close(latents / config.scaling_factor + config.shift_factor, mean)
    encoded = model.encode_images(torch.zeros(1, 3, 64, 64))
    assert encoded["latent_mean"].shape == (1, 16, 8, 8) and model.pixels_per_token() == 16


def test_vae_override_is_loaded_from_its_folder(project, tmp_path, model):
    from diffusers import AutoencoderKL

    other = AutoencoderKL.from_pretrained(project / "model", subfolder="vae")
    with torch.no_grad():
        for parameter in other.parameters():
            parameter.add_(1.0)
    other.save_pretrained(tmp_path / "vae")  # a folder with a vae/ subfolder, like a pipeline
    replaced = sd3_model(project, pretrained_vae_model_name_or_path=str(tmp_path))
    weight = "encoder.conv_in.weight"
    torch.testing.assert_close(replaced.vae.state_dict()[weight], model.vae.state_dict()[weight] + 1)


@pytest.mark.parametrize("shift, median", [(None, 0.75), (1.0, 0.5)])
def test_flow_objective_uses_sd3s_shift(project, model, monkeypatch, shift, median):
    """x_s = (1 - s) x0 + s eps at timestep 1000 s, regressing eps - x0; the logit-normal sigmas have
    median 0.5, which SD3's default shift 3 moves to 3 * 0.5 / (1 + 2 * 0.5) = 0.75."""
    from simpletuner.methods.sft import SupervisedFineTuning

    config = sd3_config(project, **({"flow_schedule_shift": shift} if shift else {}))
    method = SupervisedFineTuning(model, 0.0, config=config)
    seen = {}

    def record(noisy, timesteps, text, batch=None):
        seen.update(noisy=noisy, timesteps=timesteps, text=text)
        return torch.zeros_like(noisy)

    monkeypatch.setattr(model, "predict", record)
    count = 512
    mean = torch.randn(count, 16, 2, 2)
    text = model.encode_prompts([PROMPT])
    batch = {"latent_mean": mean, "latent_std": torch.zeros_like(mean),
             **{k: v.expand(count, *v.shape[1:]) for k, v in text.items()},
             "empty_prompt": {k: v.expand(count, *v.shape[1:]) for k, v in text.items()}}
    torch.manual_seed(0)
    loss = method.compute_loss(batch, torch.device("cpu")).loss
    sigmas = seen["timesteps"] / 1000
    assert abs(float(sigmas.median()) - median) < 0.05
    x0 = (mean - 0.0609) * 1.5305
    s = sigmas.view(-1, 1, 1, 1)
    noise = (seen["noisy"] - (1 - s) * x0) / s
    torch.testing.assert_close(loss, (noise - x0).pow(2).mean(), rtol=1e-4, atol=1e-5)
    assert set(seen["text"]) == {"prompt_embeds", "pooled_prompt_embeds"}


def test_gradient_checkpointing_every_nth_block_keeps_the_gradients(project):
    from simpletuner.models.adapters import add_lora

    def gradients(interval):
        model = sd3_model(project)
        torch.manual_seed(1)  # the same adapter initialisation every time
        add_lora(model.denoiser, model.lora_target_modules(), rank=4, alpha=4, dropout=0.0)
        calls = []
        if interval is not None:
            assert model.enable_gradient_checkpointing(interval) == {1: 2, 2: 1}[interval]
            inner = model.denoiser._gradient_checkpointing_func
            model.denoiser._gradient_checkpointing_func = lambda block, *a: calls.append(block) or inner(block, *a)
        torch.manual_seed(0)
        text = model.encode_prompts([PROMPT, ""])
        model.predict(torch.randn(2, 16, 8, 8), torch.tensor([300.0, 800.0]), text).square().mean().backward()
        named = {n: p.grad.clone() for n, p in model.denoiser.named_parameters() if p.requires_grad}
        return named, len(calls)

    plain, _ = gradients(None)
    for interval in (1, 2):
        checkpointed, calls = gradients(interval)
        assert calls == 2  # the transformer hands every block to the function; it recomputes 2 or 1
        for name, grad in plain.items():
            torch.testing.assert_close(checkpointed[name], grad, msg=name)


def test_single_file_without_its_flavours_configs_names_the_flavour(tmp_path):
    from safetensors.torch import save_file

    from simpletuner.models.sd3 import StableDiffusion3

    file = tmp_path / "sd3.5_medium.safetensors"
    save_file({"model.diffusion_model.pos_embed": torch.zeros(1, 4, 8)}, str(file))
    config = make_config(model_family="sd3", pretrained_model_name_or_path=str(file), model_flavour="large")
    model = StableDiffusion3(config, torch.device("cpu"), torch.float32)
    assert model.is_single_file()
    with pytest.raises(RuntimeError, match="stabilityai/stable-diffusion-3.5-large .pick another with --model_flavour"):
        model.load()


# --- config rules --------------------------------------------------------------------------------


def error_of(project: Path, family: str = "sd3", **overrides) -> str:
    with pytest.raises(ConfigError) as error:
        resolve_run(family_args(project, family, "out", **overrides), environ={}, root=project)
    return str(error.value)


def test_sd3_options_are_accepted_for_sd3_and_refused_elsewhere(project):
    config = sd3_config(project, t5_padding="zero", tokenizer_max_length=77, sd3_clip_uncond_behaviour="zero",
                        sd3_t5_uncond_behaviour="empty_string", model_flavour="large-turbo", flow_schedule_shift=1.0,
                        flow_use_uniform_schedule="true")
    assert (config.t5_padding, config.tokenizer_max_length, config.sd3_clip_uncond_behaviour) == ("zero", 77, "zero")
    assert error_of(project, "sd1x", sd3_clip_uncond_behaviour="zero") == (
        "`--sd3_clip_uncond_behaviour` only applies to sd3, not to sd1x; remove it")
    for name, value in (("t5_padding", "zero"), ("tokenizer_max_length", 77), ("sd3_t5_uncond_behaviour", "zero")):
        message = error_of(project, "sd1x", **{name: value})
        assert message.startswith(f"`--{name}` only applies to ") and "sd3" in message, message


@pytest.mark.parametrize("overrides, message", [
    ({"tokenizer_max_length": 600}, "`--tokenizer_max_length` = 600 must be between 1 and 512"),
    ({"timestep_bias_strategy": "later", "timestep_bias_multiplier": 2},
     "`--timestep_bias_strategy` shapes a DDPM noise schedule; sd3 trains flow matching"),
    ({"rescale_betas_zero_snr": "true"}, "`--rescale_betas_zero_snr` shapes a DDPM noise schedule"),
    ({"prediction_type": "epsilon"}, "`--prediction_type epsilon` is not supported for sd3; use one of: flow_matching"),
    ({"model_flavour": "xl"}, "choose one of: medium, large, large-turbo, 3.0-medium"),
    ({"snr_gamma": 5}, "`--snr_gamma` is defined on a DDPM noise schedule"),
])
def test_config_mistakes_for_sd3_are_named(project, overrides, message):
    assert message in error_of(project, **overrides)


def test_dry_run_buckets_round_to_whole_patches(project):
    from simpletuner.training.plan import describe_datasets

    lines = "\n".join(describe_datasets(sd3_config(project, aspect_bucket_alignment=8)))
    assert "buckets 64x64: 8, 96x64: 2" in lines or "buckets 64x64: 8, 80x64: 2" in lines, lines


# --- real runs -----------------------------------------------------------------------------------------

slow = pytest.mark.slow


@slow
def test_lora_run_loads_in_diffusers(project, monkeypatch):
    from diffusers import StableDiffusion3Pipeline
    from PIL import Image
    from safetensors import safe_open

    seen = keep_trainer(monkeypatch)
    args = family_args(project, "sd3", "lora", validation_prompt=PROMPT, validation_num_inference_steps=2,
                       validation_step_interval=3, caption_dropout_probability=0.5, sd3_clip_uncond_behaviour="zero",
                       disable_benchmark=None)
    assert main(["train", *args]) == 0
    out = project / "lora"
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), framework="pt") as handle:
        keys, metadata = list(handle.keys()), handle.metadata()
    assert keys and all(k.startswith("transformer.") and (".lora_A." in k or ".lora_B." in k) for k in keys)
    assert any(".attn2." in k for k in keys)  # SD 3.5's second (image-only) attention is adapted too
    assert metadata["model_family"] == "sd3" and metadata["global_step"] == "3"
    for step in ("step_0_base_model", "step_3"):  # validation defaults to the largest bucket edge: 96 px
        assert (out / "validation" / step / "grid_96x96.png").is_file()
        assert Image.open(out / "validation" / step / "96x96_00.png").size == (96, 96)

    pipeline = StableDiffusion3Pipeline.from_pretrained(project / "model")
    pipeline.set_progress_bar_config(disable=True)
    kwargs = dict(prompt=PROMPT, num_inference_steps=2, height=64, width=64, output_type="latent",
                  max_sequence_length=154)
    before = pipeline(generator=torch.Generator().manual_seed(0), **kwargs).images
    pipeline.load_lora_weights(out)
    after = pipeline(generator=torch.Generator().manual_seed(0), **kwargs).images
    assert (before - after).abs().max() > 1e-4, "loading the trained LoRA must change the output"
    # ... and it is the trained model: the same sampling through the live trained components
    trainer = seen["trainer"]
    denoiser = trainer._unwrapped_denoiser().eval()
    live = StableDiffusion3Pipeline(**{**pipeline.components, "transformer": denoiser,
                                       "text_encoder": trainer.model.text_encoder,
                                       "text_encoder_2": trainer.model.text_encoder_2,
                                       "text_encoder_3": trainer.model.text_encoder_3})
    live.set_progress_bar_config(disable=True)
    trained = live(generator=torch.Generator().manual_seed(0), **kwargs).images
    torch.testing.assert_close(after, trained, rtol=0, atol=1e-5)


@slow
def test_full_run_writes_a_pipeline_with_the_trained_transformer(project, monkeypatch, caplog):
    import logging

    from diffusers import StableDiffusion3Pipeline

    from simpletuner.models.sd3 import StableDiffusion3

    if not (project / "lora").exists():  # run alone: a first run fills the text cache
        assert main(["train", *family_args(project, "sd3", "warm", max_train_steps=1)]) == 0
    encoded = []
    monkeypatch.setattr(StableDiffusion3, "encode_prompts", lambda self, prompts: encoded.append(prompts))
    caplog.set_level(logging.INFO, logger="simpletuner")

    seen = keep_trainer(monkeypatch)
    assert main(["train", *family_args(project, "sd3", "full", model_type="full")]) == 0
    assert encoded == [], "a second run must reuse the cached prompt embeds"
    assert any("text embeds:" in r.getMessage() and "0 built" in r.getMessage() for r in caplog.records)
    trained = seen["trainer"]._unwrapped_denoiser().state_dict()
    saved = StableDiffusion3Pipeline.from_pretrained(project / "full" / "pipeline")
    base = StableDiffusion3Pipeline.from_pretrained(project / "model")
    assert type(saved.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler" and saved.scheduler.config.shift == 3.0
    loaded = saved.transformer.state_dict()
    assert all(torch.equal(loaded[name], value) for name, value in trained.items())
    assert any(not torch.equal(base.transformer.state_dict()[name], value) for name, value in loaded.items())


class Interrupted(Exception):
    pass


@slow
def test_resume_reproduces_the_uninterrupted_losses(project, monkeypatch):
    overrides = dict(max_train_steps=4, checkpoint_step_interval=2, caption_dropout_probability=0.5,
                     sd3_t5_uncond_behaviour="zero", gradient_checkpointing="true", aspect_bucket_alignment=8)
    reference = train(sd3_config(project, "a", **overrides), show_progress=False)
    assert len(reference.state.losses) == 4 and all(math.isfinite(loss) for loss in reference.state.losses)
    buckets = {tuple(size) for size in reference.data.sampler.bucket_sizes}
    assert all(w % 16 == 0 and h % 16 == 0 for w, h in buckets) and len(buckets) == 2

    original = Trainer._after_step

    def crash_after_step_3(self, *args):
        original(self, *args)
        if self.state.global_step == 3:
            raise Interrupted()

    monkeypatch.setattr(Trainer, "_after_step", crash_after_step_3)
    with pytest.raises(Interrupted):
        train(sd3_config(project, "b", **overrides), show_progress=False)
    monkeypatch.setattr(Trainer, "_after_step", original)
    resumed = train(sd3_config(project, "b", resume_from_checkpoint="latest", **overrides), show_progress=False)
    assert resumed.resumed_from.name == "checkpoint-2"
    assert resumed.state.losses == reference.state.losses[2:]
    written = json.loads((project / "b" / "training_config.json").read_text())
    assert written["sd3_t5_uncond_behaviour"] == "zero"
