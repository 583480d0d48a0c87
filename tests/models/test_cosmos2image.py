"""Cosmos-Predict2 text-to-image on its tiny offline model: prompt encoding against diffusers' own
pipeline, the Wan latent normalisation, the EDM sampler of the pipeline worked out as flow matching (and
checked numerically against it), the shift read from the checkpoint, the torchvision refusal, gradient
checkpointing, config rules, ``plan-memory``, and real runs through the CLI (LoRA with validation loaded
by the transformer's ``load_lora_adapter``, full training saving a pipeline diffusers loads, quantized
bases)."""

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

FAMILY = "cosmos2image"
PROMPT = "a red circle on a white background"


HARNESS = FamilyHarness(FAMILY)
project = HARNESS.project_fixture()
cosmos_model, config_for, error_of, run_cli = HARNESS.model, HARNESS.config, HARNESS.error, HARNESS.run


@pytest.fixture(scope="module")
def model(project):
    return cosmos_model(project / "model")


def diffusers_pipeline(folder: Path):
    """The saved pipeline as a user loads it: diffusers needs a safety checker object (or the
    ``cosmos_guardrail`` package) to build ``Cosmos2TextToImagePipeline``."""
    from diffusers import Cosmos2TextToImagePipeline

    from simpletuner.models.cosmos2image import PassThroughSafetyChecker

    pipeline = Cosmos2TextToImagePipeline.from_pretrained(folder, safety_checker=PassThroughSafetyChecker())
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


# --- the tiny model and text encoding ---------------------------------------------------------------


def test_tiny_model_is_a_cosmos2_pipeline(project):
    pipeline = diffusers_pipeline(project / "model")
    transformer = pipeline.transformer
    assert type(pipeline.text_encoder).__name__ == "T5EncoderModel"
    assert type(pipeline.vae).__name__ == "AutoencoderKLWan" and len(transformer.transformer_blocks) == 2
    # T5 (48 wide) differs from the transformer (32 wide): the blocks cross-attend to T5 directly
    assert pipeline.text_encoder.config.d_model == 48 and transformer.config.text_embed_dim == 48
    assert transformer.config.concat_padding_mask is False  # the released True needs torchvision
    index = json.loads((project / "model" / "model_index.json").read_text())
    assert index["safety_checker"] == [None, None]  # the stand-in is never saved
    assert json.loads((project / "model" / "simpletuner_tiny_model.json").read_text())["family"] == FAMILY


def test_prompt_embeds_equal_the_pipelines_own_encoding(project, model):
    pipeline = diffusers_pipeline(project / "model")
    prompts = [PROMPT, "a blue square"]
    with torch.no_grad():
        embeds, negative = pipeline.encode_prompt(prompts, negative_prompt=["", ""], device=torch.device("cpu"),
                                                  max_sequence_length=512)
    ours = model.encode_prompts(prompts)
    assert set(ours) == {"prompt_embeds"} and ours["prompt_embeds"].shape == (2, 512, 48)
    torch.testing.assert_close(ours["prompt_embeds"], embeds)
    torch.testing.assert_close(model.encode_prompts(["", ""])["prompt_embeds"], negative)
    used = int(model.tokenizer(PROMPT).attention_mask.count(1))  # words + </s>; the padding after them is zeroed
    assert 2 < used < 512 and not ours["prompt_embeds"][0, used:].any() and ours["prompt_embeds"][0, :used].abs().min() > 0


def test_tokenizer_max_length_sets_the_caption_length_and_the_cache_key(project, model):
    short = cosmos_model(project / "model", tokenizer_max_length=32)
    cut = short.encode_prompts([PROMPT])["prompt_embeds"]
    assert cut.shape == (1, 32, 48)
    torch.testing.assert_close(cut, model.encode_prompts([PROMPT])["prompt_embeds"][:, :32])
    assert short.pipeline_call_arguments() == {"max_sequence_length": 32}  # validation reads the same length
    assert model.fingerprint_parts()["max_tokens"] == "512" and short.fingerprint_parts()["max_tokens"] == "32"


# --- latents, the model call and the objective --------------------------------------------------------


def test_latents_are_normalised_per_channel_as_the_pipeline_undoes(model):
    config = model.vae.config
    mean = torch.randn(2, 16, 4, 4)
    latents = model.latents_from_cache({"latent_mean": mean, "latent_std": torch.zeros_like(mean)})
    channel_mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1)
    channel_std = torch.tensor(config.latents_std).view(1, -1, 1, 1)
    # the pipeline decodes `latents / (1 / std) / sigma_data + mean` with sigma_data 1
    torch.testing.assert_close(latents * channel_std + channel_mean, mean)
    assert model.encode_images(torch.zeros(1, 3, 64, 64))["latent_mean"].shape == (1, 16, 8, 8)
    assert model.pixels_per_token() == 16  # 8 px per latent cell x 2x2 patches


def test_predict_feeds_the_transformer_t_in_zero_one_on_one_frame_clips(model):
    torch.manual_seed(0)
    latents = torch.randn(2, 16, 8, 8)
    text = model.encode_prompts([PROMPT, ""])
    with torch.no_grad():
        ours = model.predict(latents, torch.tensor([300.0, 800.0]), text)
        direct = model.denoiser(latents.unsqueeze(2), timestep=torch.tensor([0.3, 0.8]),
                                encoder_hidden_states=text["prompt_embeds"], return_dict=False)[0][:, :, 0]
        other = model.predict(latents, torch.tensor([301.0, 800.0]), text)
    assert ours.shape == latents.shape
    torch.testing.assert_close(ours, direct)
    assert not torch.equal(ours[0], other[0]) and torch.equal(ours[1], other[1])


def test_pipelines_edm_sampler_is_flow_matching_at_t_equal_sigma_over_one_plus_sigma(project, model):
    """Run diffusers' own sampler (EDM sigmas, c_in / c_skip / c_out, Euler in sigma) and, next to it,
    plain flow-matching Euler steps in ``t = sigma / (1 + sigma)`` with :meth:`Cosmos2Image.predict`:
    the latents agree at every sigma (``x_t = x_sigma / (1 + sigma)``), so a model trained as a
    flow-matching velocity model is sampled correctly by the pipeline."""
    pipeline = diffusers_pipeline(project / "model")
    text = model.encode_prompts([PROMPT])
    start = torch.randn(1, 16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sampled = pipeline(prompt_embeds=text["prompt_embeds"], guidance_scale=1.0, num_inference_steps=6, height=64,
                           width=64, latents=start, output_type="latent").images
        sigmas = pipeline.scheduler.sigmas.double()  # the steps it took, its last one replaced by sigma_min
        x_sigma = start.double() * pipeline.scheduler.config.sigma_max
        x_t = (x_sigma / (1 + sigmas[0]))[:, :, 0].float()
        for sigma, next_sigma in zip(sigmas[:-1], sigmas[1:]):
            t, next_t = sigma / (1 + sigma), next_sigma / (1 + next_sigma)
            velocity = model.predict(x_t, torch.full((1,), float(t) * 1000), text)
            x_t = x_t + float(next_t - t) * velocity
    assert float(sigmas[0]) == pytest.approx(80.0) and len(sigmas) == 7
    assert sampled.shape == x_t.shape  # the pipeline returns the latent frame without its frame axis
    torch.testing.assert_close(x_t, sampled / (1 + float(sigmas[-1])), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shift, median", [(None, 0.5), (3.0, 3 * 0.5 / (1 + 2 * 0.5))])
def test_flow_objective_regresses_eps_minus_x0_with_the_checkpoints_shift(project, model, monkeypatch, shift, median):
    """x_t = (1 - t) x0 + t eps regressing eps - x0; the logit-normal sigmas (median 0.5) are not shifted
    (the releases' scheduler shift is 1.0) unless --flow_schedule_shift says so."""
    config = config_for(project, **({"flow_schedule_shift": shift} if shift else {}))
    loss, sigmas, noisy, mean = recorded_flow_loss(model, config, PROMPT, (16, 2, 2), monkeypatch)
    assert abs(float(sigmas.median()) - median) < 0.05
    x0 = model.latents_from_cache({"latent_mean": mean, "latent_std": torch.zeros_like(mean)})
    check_loss_regresses_eps_minus_x0(loss, sigmas, noisy, x0)


def test_default_shift_is_read_from_the_checkpoints_scheduler(project, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(project / "model", folder)
    scheduler_file = folder / "scheduler" / "scheduler_config.json"
    scheduler = json.loads(scheduler_file.read_text())
    scheduler_file.write_text(json.dumps({**scheduler, "shift": 3.0}))
    assert cosmos_model(project / "model").default_flow_shift == 1.0
    assert cosmos_model(folder).default_flow_shift == 3.0


def test_a_transformer_needing_torchvision_is_refused_at_load_naming_it(project, tmp_path, monkeypatch):
    """The released transformers set ``concat_padding_mask``; their forward then needs torchvision."""
    import diffusers.utils
    from diffusers import CosmosTransformer3DModel

    from simpletuner.testing.tiny.cosmos2image import TRANSFORMER_CONFIG

    folder = tmp_path / "model"
    shutil.copytree(project / "model", folder, ignore=shutil.ignore_patterns("transformer"))
    CosmosTransformer3DModel(**{**TRANSFORMER_CONFIG, "concat_padding_mask": True}).save_pretrained(folder / "transformer")
    monkeypatch.setattr(diffusers.utils, "is_torchvision_available", lambda: False)
    with pytest.raises(RuntimeError, match=r"model: this Cosmos transformer has `concat_padding_mask: true`.*"
                                           r"resizes the padding mask with torchvision, which is not importable "
                                           r"here; install torchvision"):
        cosmos_model(folder)
    monkeypatch.setattr(diffusers.utils, "is_torchvision_available", lambda: True)
    assert cosmos_model(folder).denoiser.config.concat_padding_mask is True  # with torchvision it loads


def test_gradient_checkpointing_every_nth_block_keeps_the_gradients(project):
    # the transformer hands every block to the checkpointing function, which recomputes some
    check_checkpointing_keeps_gradients(lambda: cosmos_model(project / "model"), (2, 16, 8, 8), PROMPT,
                                        checkpointed={1: 2, 2: 1}, handed_blocks=2)


# --- config rules ----------------------------------------------------------------------------------


def test_flavours_name_the_released_models():
    from simpletuner.models.cosmos2image import Cosmos2Image

    for flavour, hub_id in ((None, "nvidia/Cosmos-Predict2-2B-Text2Image"), ("2b", "nvidia/Cosmos-Predict2-2B-Text2Image"),
                            ("14b", "nvidia/Cosmos-Predict2-14B-Text2Image")):
        config = make_config(model_family=FAMILY, model_flavour=flavour)
        model = Cosmos2Image(config, torch.device("cpu"), torch.float32)
        assert model.model_path == hub_id and model.prediction_type == "flow_matching"


def test_cosmos_options_are_accepted_and_the_others_refused(project):
    config = config_for(project, tokenizer_max_length=77, model_flavour="14b",
                        pretrained_t5_model_name_or_path=str(project / "model"),
                        pretrained_transformer_model_name_or_path=str(project / "model"),
                        pretrained_transformer_subfolder="transformer")
    assert (config.tokenizer_max_length, config.model_flavour) == (77, "14b")
    assert error_of(project, t5_padding="zero").startswith("`--t5_padding` only applies to ")


@pytest.mark.parametrize("overrides, message", [
    ({"train_text_encoder": "true"}, "`--train_text_encoder` is not supported for cosmos2image: Cosmos-Predict2's T5 "
                                     "encoder (the encoder of T5-11B) stays frozen"),
    ({"lora_format": "comfyui"}, "`--lora_format comfyui` is not available for `--model_family cosmos2image`: ComfyUI "
                                 "loads Cosmos-Predict2 LoRAs only under its own module names"),
    ({"prediction_type": "epsilon"}, "`--prediction_type epsilon` is not supported for cosmos2image; use one of: "
                                     "flow_matching"),
    ({"model_flavour": "7b"}, "`--model_flavour 7b` is not a flavour of cosmos2image; choose one of: 2b, 14b"),
    ({"text_encoder_2_precision": "int8-quanto"}, "cosmos2image has 1 text encoder"),
    ({"snr_gamma": 5}, "`--snr_gamma` is defined on a DDPM noise schedule"),
    ({"fuse_qkv_projections": "true"}, "`--fuse_qkv_projections` is not available for cosmos2image: Cosmos' attention "
                                       "processor (CosmosAttnProcessor2_0) reads the separate q/k/v projections"),
])
def test_config_mistakes_for_cosmos_are_named(project, overrides, message):
    assert message in error_of(project, **overrides)


def test_plan_memory_prints_a_plan_for_cosmos2image(project, capsys):
    argv = HARNESS.plan_args(project, lora_rank=4)
    assert main(["plan-memory", *argv]) == 0
    out = capsys.readouterr().out
    assert "memory plan for cosmos2image" in out and "transformer 0.042M" in out and "training peak" in out
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
    assert keys and all(re.fullmatch(r"transformer\.transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)"
                                     r"\.lora_[AB]\.weight", key) for key in keys), keys
    assert {key.split(".")[3] for key in keys} == {"attn1", "attn2"}
    assert json.loads(metadata["lora_adapter_metadata"])["transformer.r"] == 16
    assert metadata["model_family"] == FAMILY and metadata["global_step"] == "3"
    check_validation_images(out)


@slow
def test_saved_lora_loads_in_diffusers_and_reproduces_training(project, lora_run):
    from simpletuner.models.cosmos2image import load_lora

    trainer, _, out = lora_run
    kwargs = dict(prompt=PROMPT, num_inference_steps=2, height=64, width=64, output_type="latent")
    pipeline = diffusers_pipeline(project / "model")
    with torch.no_grad():
        before = pipeline(generator=torch.Generator().manual_seed(0), **kwargs).images
        # diffusers' own call, as documented: the transformer's PEFT loader reads the file
        pipeline.transformer.load_lora_adapter(str(out), weight_name="pytorch_lora_weights.safetensors",
                                               prefix="transformer")
        after = pipeline(generator=torch.Generator().manual_seed(0), **kwargs).images
        ours = diffusers_pipeline(project / "model")
        load_lora(ours, out / "pytorch_lora_weights.safetensors")
        shorthand = ours(generator=torch.Generator().manual_seed(0), **kwargs).images
        live = trainer.model.build_pipeline(trainer._unwrapped_denoiser().eval())
        live.set_progress_bar_config(disable=True)
        trained = live(generator=torch.Generator().manual_seed(0), **kwargs).images
    assert (before - after).abs().max() > 1e-6, "loading the trained LoRA must change the output"
    torch.testing.assert_close(after, trained, rtol=0, atol=1e-5)
    torch.testing.assert_close(shorthand, after, rtol=0, atol=0)


@slow
def test_model_card_shows_code_that_loads_the_lora(lora_run, tmp_path, monkeypatch):
    """The card's snippet is the family's own (the pipeline has no ``load_lora_weights`` and needs a safety
    checker object); run up to the sampling call, on the CPU, it loads the adapter."""
    _, _, out = lora_run
    card = (out / "README.md").read_text()
    code = card.split("```python\n", 1)[1].split("\n```", 1)[0]
    assert "load_lora_weights" not in code and "pipeline.transformer.load_lora_adapter(" in code
    setup = "\n".join(line for line in code.splitlines() if not line.startswith("image")).replace('"cuda"', '"cpu"')
    setup = setup.replace('"path/to/output_dir"', json.dumps(str(out)))
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(setup, "model card", "exec"), namespace)  # noqa: S102 - the card's own code, on local files
    assert list(namespace["pipeline"].transformer.peft_config) == ["default_0"]


@slow
def test_full_run_reuses_the_text_cache_and_saves_a_pipeline_diffusers_loads(project, lora_run):
    from simpletuner.models.cosmos2image import Cosmos2Image

    calls = []
    original = Cosmos2Image.encode_prompts
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Cosmos2Image, "encode_prompts", lambda self, prompts: calls.append(prompts) or original(self, prompts))
        trainer, start = run_cli(project, "full", model_type="full")
    assert calls == [], "the LoRA run cached every caption; a second run must not encode them again"
    check_trained(trainer, start)
    folder = project / "full" / "pipeline"
    assert json.loads((folder / "model_index.json").read_text())["safety_checker"] == [None, None]
    saved = diffusers_pipeline(folder)
    base = diffusers_pipeline(project / "model")
    assert type(saved.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    trained = trainer._unwrapped_denoiser().state_dict()
    loaded = saved.transformer.state_dict()
    assert loaded.keys() == trained.keys() and all(torch.equal(loaded[name], value) for name, value in trained.items())
    assert any(not torch.equal(base.transformer.state_dict()[name], value) for name, value in loaded.items())
    image = saved(prompt=PROMPT, num_inference_steps=2, height=64, width=64).images[0]
    assert image.size == (64, 64)


#: preset -> (layer type, weight type) of a quantized transformer linear (the PEFT base layer)
QUANTIZED_LAYERS = {"int8-quanto": ("QLinear", "WeightQBytesTensor"), "int8-torchao": ("Linear", "Int8Tensor")}


@slow
@pytest.mark.parametrize("preset, route", [("int8-quanto", "cpu"), ("int8-torchao", "cpu"), ("int8-quanto", "pipeline")])
def test_lora_trains_on_a_quantized_transformer(project, lora_run, preset, route):
    """``--quantize_via pipeline`` quantizes while loading, T5 too when ``--text_encoder_1_precision`` asks."""
    encoder = {"text_encoder_1_precision": preset} if route == "pipeline" else {}
    trainer, start = run_cli(project, f"quantized-{preset}-{route}", base_model_precision=preset, quantize_via=route,
                             **encoder)
    check_trained(trainer, start)
    denoiser = trainer._unwrapped_denoiser()
    trainable = {name for name, p in denoiser.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    layer = denoiser.transformer_blocks[0].attn1.to_q.base_layer
    assert (type(layer).__name__, type(layer.weight).__name__) == QUANTIZED_LAYERS[preset]
    expected = {"transformer": f"{preset} ({route})"}
    if encoder:
        expected["text_encoder"] = f"{preset} ({route})"
        assert type(trainer.model.text_encoder.encoder.block[0].layer[0].SelfAttention.q).__name__ == "QLinear"
    assert trainer.model.quantization == expected
