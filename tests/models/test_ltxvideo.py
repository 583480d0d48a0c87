"""The ltxvideo family on a tiny offline LTX-Video model: prompt encoding against diffusers' own
pipeline, clip latents (normalisation, 8k+1 frames, the causal first frame), packing and the model
call against the pipelines' own packing, the frame rate in the rotary embedding, per-frame timesteps,
the image-to-video options on values (through the SFT method), the default shift, LoRA targets,
gradient checkpointing, block swap, quantization, the validation pipelines and the saved LoRA, and the
config rules of the ``--ltx_*`` options. Runs through the CLI are in test_ltxvideo_cli.py."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from simpletuner.options import ConfigError  # noqa: E402
from simpletuner.testing.config import make_config  # noqa: E402
from tests.models.conftest import loaded_family  # noqa: E402

PROMPT = "a red circle on a white background"
#: Short prompts keep the tiny model's steps cheap; the default length (128) is tested on its own.
SHORT = 16


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    from simpletuner.testing.tiny_models import make_tiny_model

    folder = tmp_path_factory.mktemp("ltxvideo") / "model"
    make_tiny_model("ltxvideo", folder)
    return folder


def ltx_model(folder: Path, **options):
    return loaded_family("ltxvideo", dict(pretrained_model_name_or_path=str(folder), resolution=32,
                                          resolution_type="pixel", tokenizer_max_length=SHORT), **options)


@pytest.fixture(scope="module")
def model(model_folder):
    return ltx_model(model_folder)


def clip(batch: int = 1, frames: int = 9, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, frames, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# --- text --------------------------------------------------------------------------------------------


def test_prompt_embeds_equal_the_pipelines_own_encoding(model_folder):
    from diffusers import LTXPipeline

    pipeline = LTXPipeline.from_pretrained(model_folder)
    default = ltx_model(model_folder, tokenizer_max_length=None)
    embeds, mask, _, _ = pipeline.encode_prompt([PROMPT, ""], do_classifier_free_guidance=False,
                                                device=torch.device("cpu"))
    ours = default.encode_prompts([PROMPT, ""])
    assert ours["prompt_embeds"].shape == (2, 128, 32)  # 128 T5 tokens by default, as the pipelines
    torch.testing.assert_close(ours["prompt_embeds"], embeds)
    assert torch.equal(ours["attention_mask"].bool(), mask)
    assert ours["attention_mask"].sum(dim=1).tolist()[1] == 1  # the empty prompt is just </s>
    short = ltx_model(model_folder)
    assert short.encode_prompts([PROMPT])["prompt_embeds"].shape == (1, SHORT, 32)
    assert short.fingerprint_parts()["t5_tokens"] == str(SHORT) != default.fingerprint_parts()["t5_tokens"]


# --- latents -------------------------------------------------------------------------------------------


def test_clip_latents_are_normalised_per_channel_and_the_first_frame_is_the_picture(model):
    vae = model.vae
    assert (model.temporal_compression(), model.vae_scale_factor(), model.pixels_per_token()) == (8, 8, 8)
    video = clip(2)
    cached = model.encode_images(video)
    assert cached["latent_mean"].shape == cached["latent_std"].shape == (2, 8, 2, 4, 4)  # 9 frames -> 2, 32 px -> 4
    # std 0: the latent is the mean, normalised per channel as the pipelines do
    latents = model.latents_from_cache({"latent_mean": cached["latent_mean"],
                                        "latent_std": torch.zeros_like(cached["latent_std"])})
    mean, std = vae.latents_mean.view(1, -1, 1, 1, 1), vae.latents_std.view(1, -1, 1, 1, 1)
    assert not torch.allclose(mean, torch.zeros_like(mean))  # the tiny VAE's statistics are not 0 and 1
    torch.testing.assert_close(latents, (cached["latent_mean"] - mean) * vae.config.scaling_factor / std)
    # a picture is a one-frame clip; the causal encoder gives the clip's first latent frame for it
    picture = model.encode_images(video[:, :, 0])
    assert picture["latent_mean"].shape == (2, 8, 1, 4, 4)
    torch.testing.assert_close(picture["latent_mean"][:, :, 0], cached["latent_mean"][:, :, 0], atol=1e-5, rtol=1e-4)


def test_only_clip_lengths_of_8k_plus_1_are_encoded(model):
    from simpletuner.models.ltxvideo import FrameCountError

    assert [model.accepted_frame_count(n) for n in (1, 8, 9, 16, 17, 30)] == [1, 1, 9, 9, 17, 25]
    assert model.latent_frame_count(17) == 3
    with pytest.raises(FrameCountError) as error:
        model.encode_images(clip(frames=10))
    assert str(error.value) == ("LTX-Video's VAE encodes clips of 1, 9, 17, 25, ... (1 + 8k) frames; got 10. Use 9 "
                                "or 17 frames (num_frames in the dataset's \"video\" object)")


# --- packing and the model call ----------------------------------------------------------------------------


def test_packing_round_trips_and_predict_is_the_transformer_on_the_pipelines_tokens(model):
    from diffusers import LTXPipeline

    x = torch.randn(2, 8, 3, 4, 6)  # 3 latent frames, not square: axes must not be swapped
    tokens = LTXPipeline._pack_latents(x, 1, 1)
    assert tokens.shape == (2, 3 * 4 * 6, 8)
    assert torch.equal(tokens[0, 6 * 1 + 2], x[0, :, 0, 1, 2])  # frame, row, column order
    assert torch.equal(LTXPipeline._unpack_latents(tokens, 3, 4, 6, 1, 1), x)
    text = model.encode_prompts([PROMPT, PROMPT])
    timesteps = torch.tensor([250.0, 750.0])
    with torch.no_grad():
        ours = model.predict(x, timesteps, text, batch={"frame_rate": torch.tensor([24.0, 24.0])})
        raw = model.transformer(hidden_states=tokens, encoder_hidden_states=text["prompt_embeds"], timestep=timesteps,
                                encoder_attention_mask=text["attention_mask"], num_frames=3, height=4, width=6,
                                rope_interpolation_scale=(8 / 24, 8, 8), return_dict=False)[0]
    assert ours.shape == x.shape
    torch.testing.assert_close(ours, LTXPipeline._unpack_latents(raw, 3, 4, 6, 1, 1))


def test_the_clips_frame_rate_reaches_the_rotary_embedding(model_folder, model):
    x = torch.randn(2, 8, 3, 4, 4)
    text = model.encode_prompts([PROMPT, PROMPT])
    t = torch.tensor([500.0, 500.0])

    def predict(m, rates=None):
        with torch.no_grad():
            return m.predict(x, t, text, batch=None if rates is None else {"frame_rate": torch.tensor(rates)})

    at_24, at_8 = predict(model, [24.0, 24.0]), predict(model, [8.0, 8.0])
    assert (at_24 - at_8).abs().max() > 1e-4
    assert torch.equal(predict(model), predict(model, [30.0, 30.0]))  # no rate known: the data path's 30 fps
    assert torch.equal(predict(ltx_model(model_folder, framerate=8)), at_8)  # ... or --framerate
    mixed = predict(model, [24.0, 8.0])  # each clip of a mixed batch at its own rate
    torch.testing.assert_close(mixed[0], at_24[0])
    torch.testing.assert_close(mixed[1], at_8[1])


def test_per_frame_timesteps_are_the_image_to_video_pipelines_per_token_ones(model):
    from diffusers import LTXPipeline

    x = torch.randn(2, 8, 2, 4, 4)
    text = model.encode_prompts([PROMPT, PROMPT])
    t = torch.tensor([300.0, 800.0])
    with torch.no_grad():
        per_sample = model.predict(x, t, text)
        torch.testing.assert_close(model.predict(x, t.view(2, 1).repeat(1, 2), text), per_sample)
        frame_timesteps = torch.tensor([[0.0, 300.0], [0.0, 800.0]])
        ours = model.predict(x, frame_timesteps, text)
        # LTXImageToVideoPipeline: t * (1 - conditioning_mask), the mask 1 on the first frame's tokens
        mask = torch.zeros(2, 1, 2, 4, 4)
        mask[:, :, 0] = 1
        token_mask = LTXPipeline._pack_latents(mask, 1, 1).squeeze(-1)
        raw = model.transformer(hidden_states=LTXPipeline._pack_latents(x, 1, 1),
                                encoder_hidden_states=text["prompt_embeds"], timestep=t.unsqueeze(-1) * (1 - token_mask),
                                encoder_attention_mask=text["attention_mask"], num_frames=2, height=4, width=4,
                                rope_interpolation_scale=(8 / 30, 8, 8), return_dict=False)[0]
    torch.testing.assert_close(ours, LTXPipeline._unpack_latents(raw, 2, 4, 4, 1, 1))
    assert (ours - per_sample).abs().max() > 1e-4


# --- image-to-video --------------------------------------------------------------------------------------


def sft_for(model):
    from simpletuner.methods.sft import SupervisedFineTuning

    return SupervisedFineTuning(model, 0.0, config=model.config)


def test_text_to_video_conditions_no_frame(model):
    latents = torch.randn(2, 8, 2, 4, 4)
    assert model.first_frame.image_to_video is False
    assert model.first_frame_conditioning({}, latents) is None
    assert model.build_pipeline().__class__.__name__ == "LTXPipeline"


def test_image_to_video_keeps_the_first_frame_clean_at_timestep_0_and_out_of_the_loss(model_folder):
    i2v = ltx_model(model_folder, ltx_train_mode="i2v")
    method = sft_for(i2v)
    latents = torch.randn(2, 8, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(2, 8, 2, 4, 4, generator=torch.Generator().manual_seed(2))
    sigmas = torch.tensor([0.3, 0.9])
    noised = method.flow_noising(latents, noise, noise, sigmas=sigmas)
    conditioned = method.clean_first_frame(noised, latents, noise, {})
    assert torch.equal(conditioned.noisy[:, :, 0], latents[:, :, 0])  # exactly the clean latent
    assert torch.equal(conditioned.noisy[:, :, 1], noised.noisy[:, :, 1])
    torch.testing.assert_close(conditioned.model_timesteps, torch.tensor([[0.0, 300.0], [0.0, 900.0]]))
    text = i2v.encode_prompts([PROMPT, PROMPT])
    # the loss does not depend on what the model says about the conditioning frame
    original = i2v.predict
    try:
        losses = []
        for offset in (0.0, 100.0):
            def shifted(*args, offset=offset, **kwargs):
                output = original(*args, **kwargs).clone()
                output[:, :, 0] += offset
                return output
            i2v.predict = shifted
            losses.append(float(method.denoising_loss(conditioned, text, {}, lambda: None)))
    finally:
        del i2v.predict
    assert losses[0] == pytest.approx(losses[1])
    assert i2v.validation_takes_image and i2v.build_pipeline().__class__.__name__ == "LTXImageToVideoPipeline"


def test_partial_noise_puts_the_conditioning_frame_at_that_level(model_folder):
    partial = ltx_model(model_folder, ltx_train_mode="i2v", ltx_partial_noise_fraction=0.05)
    method = sft_for(partial)
    latents, noise = torch.randn(2, 8, 2, 4, 4), torch.randn(2, 8, 2, 4, 4)
    noised = method.flow_noising(latents, noise, noise, sigmas=torch.tensor([0.5, 0.7]))
    conditioned = method.clean_first_frame(noised, latents, noise, {})
    torch.testing.assert_close(conditioned.noisy[:, :, 0], 0.95 * latents[:, :, 0] + 0.05 * noise[:, :, 0])
    torch.testing.assert_close(conditioned.model_timesteps, torch.tensor([[50.0, 500.0], [50.0, 700.0]]))
    assert conditioned.frame_mask.flatten(1).tolist() == [[0.0, 1.0], [0.0, 1.0]]


def test_i2v_probability_trains_a_share_of_samples_image_to_video(model_folder):
    half = ltx_model(model_folder, ltx_train_mode="i2v", ltx_i2v_prob=0.5)
    latents = torch.zeros(4000, 8, 2, 1, 1)
    drawn = half.first_frame_conditioning({}, latents, generator=torch.Generator().manual_seed(0))
    assert drawn.noise_level == 0.0 and 0.45 < float(drawn.conditioned.float().mean()) < 0.55
    again = half.first_frame_conditioning({}, latents, generator=torch.Generator().manual_seed(0))
    assert torch.equal(drawn.conditioned, again.conditioned)  # eval batches draw from their own generator
    method = sft_for(half)
    small = torch.randn(4, 8, 2, 4, 4)
    noised = method.flow_noising(small, small, small, sigmas=torch.full((4,), 0.6))
    torch.manual_seed(3)
    expected = torch.rand(4) < 0.5
    torch.manual_seed(3)
    conditioned = method.clean_first_frame(noised, small, small, {})
    assert (conditioned.frame_mask[:, 0, 0, 0, 0] == 0).tolist() == expected.tolist()
    for sample in range(4):  # the text-to-video samples keep their noisy first frame and its loss
        first = conditioned.noisy[sample, :, 0]
        assert torch.equal(first, small[sample, :, 0] if expected[sample] else noised.noisy[sample, :, 0])
    # protect: every sample, clean, whatever else is set; pictures (one frame) are never conditioned
    protected = ltx_model(model_folder, ltx_train_mode="i2v", ltx_protect_first_frame=True)
    assert protected.first_frame_conditioning({}, latents[:8]).conditioned.all()
    assert protected.first_frame_conditioning({}, torch.zeros(2, 8, 1, 4, 4)) is None


# --- schedule ------------------------------------------------------------------------------------------------


def test_default_shift_is_the_checkpoint_samplers_at_the_training_resolution(model):
    from simpletuner.models.ltxvideo import SHIFT_REFERENCE_FRAMES

    tokens = (32 // 8) ** 2 * model.latent_frame_count(SHIFT_REFERENCE_FRAMES)  # 16 cells x 7 latent frames
    mu = 0.95 + (2.05 - 0.95) / (4096 - 1024) * (tokens - 1024)
    assert model.default_flow_shift == pytest.approx(math.exp(mu))
    assert sft_for(model).flow_noising.sampler.shift == pytest.approx(math.exp(mu))


# --- adapters, memory ------------------------------------------------------------------------------------------


def test_lora_targets_name_every_attention_projection(model_folder):
    from simpletuner.models.adapters import add_lora

    adapted = ltx_model(model_folder)
    add_lora(adapted.transformer, adapted.lora_target_modules(), rank=2, alpha=2, dropout=0.0)
    wrapped = sorted(name for name, module in adapted.transformer.named_modules() if hasattr(module, "lora_A"))
    expected = sorted(f"transformer_blocks.{block}.{attention}.{projection}" for block in range(2)
                      for attention in ("attn1", "attn2") for projection in ("to_q", "to_k", "to_v", "to_out.0"))
    assert wrapped == expected


def loss_and_grads(model, x, text) -> tuple[float, dict[str, torch.Tensor]]:
    loss = model.predict(x, torch.tensor([400.0, 600.0]), text).square().mean()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.transformer.named_parameters() if p.grad is not None}
    model.transformer.zero_grad(set_to_none=True)
    return float(loss), grads


def saved_activations(model, x, text) -> int:
    """How many tensors autograd keeps from one forward pass for the backward pass."""
    count = [0]

    def pack(tensor):
        count[0] += 1
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model.predict(x, torch.tensor([400.0, 600.0]), text).square().mean()
    return count[0]


def test_gradient_checkpointing_and_block_swap_keep_loss_and_gradients(model_folder):
    from simpletuner.models.block_swap import install_block_swap

    def trainable():
        fresh = ltx_model(model_folder)
        fresh.transformer.requires_grad_(True)
        return fresh

    x = torch.randn(2, 8, 2, 4, 4)
    reference = trainable()
    text = reference.encode_prompts([PROMPT, ""])
    loss, grads = loss_and_grads(reference, x, text)
    checkpointed = trainable()
    assert checkpointed.enable_gradient_checkpointing(interval=2) == 1  # block 0 of 2
    every_block = trainable()
    assert every_block.enable_gradient_checkpointing() == 2
    kept = [saved_activations(m, x, text) for m in (reference, checkpointed, every_block)]
    assert kept[0] > kept[1] > kept[2]  # each checkpointed block keeps fewer activations for the backward pass
    swapped = trainable()
    assert [name for name, _ in swapped.transformer_blocks()] == ["transformer_blocks.0", "transformer_blocks.1"]
    install_block_swap(swapped, 1, "cpu", "cpu", copy_on_same_device=True)
    for other in (checkpointed, swapped):
        other_loss, other_grads = loss_and_grads(other, x, text)
        assert other_loss == pytest.approx(loss, rel=1e-6)
        assert other_grads.keys() == grads.keys()
        for name in grads:
            torch.testing.assert_close(other_grads[name], grads[name], atol=1e-6, rtol=1e-5)


def test_quantized_transformer_trains_a_lora(model_folder):
    from simpletuner.models.adapters import add_lora
    from simpletuner.models.ltxvideo import LTXVideo
    from simpletuner.models.quantize import load_model

    config = make_config(model_family="ltxvideo", pretrained_model_name_or_path=str(model_folder), resolution=32,
                         resolution_type="pixel", tokenizer_max_length=SHORT, base_model_precision="int8-quanto")
    model = LTXVideo(config, torch.device("cpu"), torch.float32)
    done = load_model(model, config)
    assert list(done) == ["transformer"]
    add_lora(model.transformer, model.lora_target_modules(), rank=2, alpha=2, dropout=0.0, init_lora_weights=True)
    text = model.encode_prompts([PROMPT, ""])
    loss = model.predict(torch.randn(2, 8, 2, 4, 4), torch.tensor([400.0, 600.0]), text).square().mean()
    loss.backward()
    trained = [name for name, p in model.transformer.named_parameters() if p.grad is not None]
    assert trained and all("lora_" in name for name in trained)


# --- validation and outputs ----------------------------------------------------------------------------------


def test_validation_pipelines_sample_clips_with_the_training_settings(model_folder, model):
    arguments = model.pipeline_call_arguments()
    assert arguments == {"max_sequence_length": SHORT, "frame_rate": 30.0, "decode_timestep": 0.05,
                         "decode_noise_scale": 0.025}  # the tiny VAE decodes with a timestep, like 0.9.1+
    assert model.validation_defaults()["validation_guidance"] == 3.0
    pipeline = model.build_pipeline()
    pipeline.set_progress_bar_config(disable=True)
    frames = pipeline(PROMPT, num_frames=9, height=32, width=32, num_inference_steps=2, output_type="pt",
                      generator=torch.Generator().manual_seed(0), **arguments).frames
    assert frames.shape == (1, 9, 3, 32, 32)
    i2v = ltx_model(model_folder, ltx_train_mode="i2v").build_pipeline()
    i2v.set_progress_bar_config(disable=True)
    picture = torch.rand(1, 3, 32, 32)
    frames = i2v(image=picture, prompt=PROMPT, num_frames=9, height=32, width=32, num_inference_steps=2,
                 output_type="pt", generator=torch.Generator().manual_seed(0), **arguments).frames
    assert frames.shape == (1, 9, 3, 32, 32)


def test_saved_lora_loads_in_the_diffusers_pipeline(model_folder, model, tmp_path):
    from diffusers import LTXPipeline

    from simpletuner.models.adapters import add_lora, lora_state_dict

    adapted = ltx_model(model_folder)
    config = add_lora(adapted.transformer, adapted.lora_target_modules(), rank=2, alpha=2, dropout=0.0)
    with torch.no_grad():
        for name, parameter in adapted.transformer.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)
    file = adapted.save_lora(tmp_path, lora_state_dict(adapted.transformer), {"lora_config": config})
    assert file == tmp_path / "pytorch_lora_weights.safetensors"
    pipeline = LTXPipeline.from_pretrained(model_folder)
    pipeline.load_lora_weights(str(file))
    x, text = torch.randn(1, 8, 2, 4, 4), adapted.encode_prompts([PROMPT])
    inputs = dict(hidden_states=LTXPipeline._pack_latents(x, 1, 1), encoder_hidden_states=text["prompt_embeds"],
                  timestep=torch.tensor([500.0]), encoder_attention_mask=text["attention_mask"], num_frames=2,
                  height=4, width=4, rope_interpolation_scale=(8 / 25, 8, 8))
    with torch.no_grad():
        ours = adapted.transformer(**inputs).sample
        torch.testing.assert_close(pipeline.transformer(**inputs).sample, ours, atol=1e-5, rtol=1e-4)
        assert (model.transformer(**inputs).sample - ours).abs().max() > 1e-3
    with pytest.raises(ValueError, match="does not train its text encoder"):
        adapted.save_lora(tmp_path, {}, {}, text_encoder_states={"text_encoder": {}})


# --- config rules ---------------------------------------------------------------------------------------------


def rules(**options):
    from simpletuner.options.ltx_rules import check_ltx
    from simpletuner.options.validation import check_family_options, check_unimplemented

    config = make_config(model_family=options.pop("model_family", "ltxvideo"), **options)
    for rule in (check_unimplemented, check_family_options, check_ltx):
        rule(config)


def test_ltx_options_are_accepted_for_ltxvideo_and_refused_elsewhere():
    rules(ltx_train_mode="i2v", ltx_i2v_prob=0.7, ltx_partial_noise_fraction=0.05)
    rules(ltx_train_mode="i2v", ltx_protect_first_frame=True, ltx_i2v_prob=1.0)
    rules(ltx_train_mode="t2v")
    rules(ltx_train_mode="i2v", validation_prompt="a red square", validation_disable=True)
    with pytest.raises(ConfigError) as error:
        rules(model_family="flux", ltx_train_mode="i2v")
    assert str(error.value) == "`--ltx_train_mode` only applies to ltxvideo, not to flux; remove it"


@pytest.mark.parametrize("options, message", [
    (dict(ltx_i2v_prob=0.5), "`--ltx_i2v_prob` shapes image-to-video training, but `--ltx_train_mode` is t2v; add "
                             "`--ltx_train_mode i2v` or remove `--ltx_i2v_prob`"),
    (dict(ltx_train_mode="t2v", ltx_protect_first_frame=True),
     "`--ltx_protect_first_frame` shapes image-to-video training, but `--ltx_train_mode` is t2v; add "
     "`--ltx_train_mode i2v` or remove `--ltx_protect_first_frame`"),
    (dict(ltx_train_mode="i2v", validation_prompt="a red square"),
     "`--ltx_train_mode i2v` validates with LTXImageToVideoPipeline, which starts every video from a picture, and "
     "`--validation_prompt` gives prompts without one; list the prompts in `--validation_dataset_file` with an "
     "image_path each, or remove it"),
    (dict(ltx_train_mode="i2v", ltx_i2v_prob=0.0),
     "`--ltx_i2v_prob` = 0 trains no sample image-to-video; set it above 0 or use `--ltx_train_mode t2v`"),
    (dict(ltx_train_mode="i2v", ltx_protect_first_frame=True, ltx_i2v_prob=0.5),
     "`--ltx_protect_first_frame` trains every sample from a clean first frame, but `--ltx_i2v_prob` = 0.5 would "
     "train some without one; remove one of them"),
    (dict(ltx_train_mode="i2v", ltx_protect_first_frame=True, ltx_partial_noise_fraction=0.1),
     "`--ltx_protect_first_frame` keeps the first frame exactly clean, but `--ltx_partial_noise_fraction` = 0.1 "
     "would noise it; remove one of them"),
])
def test_contradicting_ltx_options_are_named(options, message):
    with pytest.raises(ConfigError) as error:
        rules(**options)
    assert str(error.value) == message


# --- loading -------------------------------------------------------------------------------------------------


def test_single_file_transformer_and_component_overrides(model_folder, model, tmp_path):
    from safetensors.torch import load_file, save_file

    # Lightricks' own layout: another prefix and names for the patch and timestep embedders and q/k norms
    native_names = (("proj_in", "patchify_proj"), ("time_embed", "adaln_single"), ("norm_q", "q_norm"),
                    ("norm_k", "k_norm"))
    state = load_file(str(model_folder / "transformer" / "diffusion_pytorch_model.safetensors"))
    native = {}
    for key, value in state.items():
        for ours, theirs in native_names:
            key = key.replace(ours, theirs)
        native[f"model.diffusion_model.{key}"] = value
    save_file(native, str(tmp_path / "ltx-native.safetensors"))
    loaded = ltx_model(model_folder, pretrained_transformer_model_name_or_path=str(tmp_path / "ltx-native.safetensors"),
                       pretrained_vae_model_name_or_path=str(model_folder / "vae"),
                       pretrained_t5_model_name_or_path=str(model_folder))
    reference = model.transformer.state_dict()
    assert all(torch.equal(value, reference[name]) for name, value in loaded.transformer.state_dict().items())
    assert loaded.fingerprint_parts()["t5"] == str(model_folder)
    # a single file as the model path takes the rest from the flavour's repository, not reachable offline
    with pytest.raises(RuntimeError, match="needs the diffusers config of Lightricks/LTX-Video-0.9.1"):
        ltx_model(model_folder, pretrained_model_name_or_path=str(tmp_path / "ltx-native.safetensors"),
                  model_flavour="0.9.1")
