"""The wan family on tiny offline Wan models of every checkpoint shape (2.1 text-to-video, 2.1
image-to-video with CLIP, 2.2 TI2V 5B, 2.2 A14B two experts): prompt encoding and image-to-video
conditioning against diffusers' own pipelines, latents, the clean first frame, expert routing and
windows, LoRA targets, the ComfyUI names, config rules, and real runs through the CLI on generated
clips whose LoRA loads in WanPipeline / WanImageToVideoPipeline and changes the frames."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("av")

from simpletuner.cli import main  # noqa: E402
from simpletuner.options import ConfigError  # noqa: E402
from simpletuner.options.resolve import resolve_run  # noqa: E402
from simpletuner.testing.clips import write_video_project  # noqa: E402
from simpletuner.testing.tiny.wan import FLAVOUR_OF, make_tiny_wan  # noqa: E402
from tests.models.conftest import family_args, keep_trainer, loaded_family  # noqa: E402

PROMPT = "a red square moving right"
TOKENS = 16  # short UMT5 prompts keep the tiny steps cheap


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("wan")


def edge_of(variant: str) -> int:
    """Clip size: the 5B model's tokens are 32 px, so its smallest bucket is 64 px."""
    return 64 if variant == "ti2v-2.2" else 32


def project(root: Path, variant: str) -> Path:
    """``root/<variant>``: the tiny model, four 9-frame clips and two stills (built once per module)."""
    folder = root / variant
    if not (folder / "model").exists():
        make_tiny_wan(folder / "model", variant)
        write_video_project(folder, clips=4, frames=9, size=edge_of(variant), images=2)
    return folder


def wan_model(folder: Path, variant: str, **options):
    return loaded_family("wan", dict(pretrained_model_name_or_path=str(folder / "model"), tokenizer_max_length=TOKENS,
                                     model_flavour=FLAVOUR_OF[variant]), **options)


def record_predict_timesteps(monkeypatch) -> list[torch.Tensor]:
    """The timesteps of every ``Wan.predict`` call from now on (copies, in call order), for tests that
    check which noise levels a training method hands the model."""
    from simpletuner.models.wan import Wan

    seen: list[torch.Tensor] = []
    original = Wan.predict
    monkeypatch.setattr(Wan, "predict", lambda self, noisy, timesteps, *a, **k: seen.append(timesteps.clone())
                        or original(self, noisy, timesteps, *a, **k))
    return seen


def wan_args(folder: Path, variant: str, output: str, **overrides) -> list[str]:
    values = dict(model_flavour=FLAVOUR_OF[variant], resolution=edge_of(variant), tokenizer_max_length=TOKENS)
    return family_args(folder, "wan", output, **{**values, **overrides})


def clip_pixels(frames: int = 9, edge: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(2, 3, frames, edge, edge, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# --- encoders -------------------------------------------------------------------------------------


def test_prompt_embeds_equal_the_pipelines_own_encoding(root):
    from diffusers import WanPipeline

    folder = project(root, "t2v-2.1")
    model = wan_model(folder, "t2v-2.1")
    pipeline = WanPipeline.from_pretrained(folder / "model")
    with torch.no_grad():
        expected = pipeline._get_t5_prompt_embeds([PROMPT, ""], max_sequence_length=TOKENS)
    embeds = model.encode_prompts([PROMPT, ""])["prompt_embeds"]
    assert embeds.shape == (2, TOKENS, 32)
    torch.testing.assert_close(embeds, expected)
    assert float(embeds[1, 1:].abs().max()) == 0  # the empty prompt: one token, the padding zeroed


def test_latents_are_normalised_per_channel_and_an_image_is_a_one_frame_clip(root):
    model = wan_model(project(root, "t2v-2.1"), "t2v-2.1")
    pixels = clip_pixels()
    clip = model.encode_images(pixels)
    assert clip["latent_mean"].shape == (2, 16, 3, 4, 4)  # 9 frames -> 3 latent frames, 32 px -> 4 cells
    still = model.encode_images(pixels[:, :, 0])  # (N, C, H, W): encoded as one-frame clips
    assert still["latent_mean"].shape == (2, 16, 1, 4, 4)
    # the VAE is causal: an image's latent is the clip's first latent frame
    torch.testing.assert_close(still["latent_mean"][:, :, 0], clip["latent_mean"][:, :, 0], atol=1e-5, rtol=1e-4)
    config = model.vae.config
    latents = model.latents_from_cache({"latent_mean": clip["latent_mean"], "latent_std": torch.zeros_like(
        clip["latent_std"])})
    mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(config.latents_std).view(1, -1, 1, 1, 1)
    torch.testing.assert_close(latents, (clip["latent_mean"] - mean) / std)
    assert (model.vae_scale_factor(), model.temporal_compression(), model.pixels_per_token()) == (8, 4, 16)
    assert [model.accepted_frame_count(n) for n in (81, 80, 4)] == [81, 77, 1]


def test_image_to_video_conditioning_matches_the_pipeline(root):
    """2.1 I2V: the cached first-frame latents, the mask channels and the CLIP features are exactly what
    WanImageToVideoPipeline builds from that frame."""
    from diffusers import WanImageToVideoPipeline
    from PIL import Image

    folder = project(root, "i2v-2.1")
    model = wan_model(folder, "i2v-2.1")
    assert model.shape.channel_conditioning and model.shape.image_embeds
    pixels = clip_pixels()
    cached = model.encode_images(pixels)
    assert set(cached) == {"latent_mean", "latent_std", "condition_latents", "image_embeds"}
    like = torch.zeros(2, 16, 3, 4, 4)
    channels = model.condition_channels({"condition_latents": cached["condition_latents"]}, like)
    pipeline = WanImageToVideoPipeline.from_pretrained(folder / "model")
    with torch.no_grad():  # the pipeline conditions one image at a time
        expected = torch.cat([pipeline.prepare_latents(pixels[index:index + 1, :, 0], 1, 16, 32, 32, 9, torch.float32,
                                                       torch.device("cpu"))[1] for index in range(2)])
    assert channels.shape == expected.shape == (2, 20, 3, 4, 4)
    torch.testing.assert_close(channels, expected, atol=1e-5, rtol=1e-4)
    frame = ((pixels[0, :, 0] + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    with torch.no_grad():
        features = pipeline.encode_image(Image.fromarray(frame), torch.device("cpu"))
    torch.testing.assert_close(cached["image_embeds"][:1], features, atol=1e-5, rtol=1e-4)
    assert "add_k_proj" in " ".join(model.lora_target_modules())


def test_ti2v_keeps_the_first_frame_clean_and_tells_its_tokens_timestep_zero(root):
    folder = project(root, "ti2v-2.2")
    model = wan_model(folder, "ti2v-2.2")
    assert (model.vae_scale_factor(), model.pixels_per_token(), model.default_flow_shift) == (16, 32, 5.0)
    latents = torch.zeros(2, 48, 3, 4, 4)
    condition = model.first_frame_conditioning({}, latents)
    assert condition.conditioned.tolist() == [True, True] and condition.noise_level == 0
    assert model.first_frame_conditioning({}, latents[:, :, :1]) is None  # a still: nothing left to learn
    seen = {}
    original = model.denoiser.forward
    model.denoiser.forward = lambda **kwargs: seen.update(kwargs) or original(**kwargs)
    frame_timesteps = torch.tensor([[0.0, 700.0, 700.0], [0.0, 300.0, 300.0]])
    with torch.no_grad():
        model.predict(latents, frame_timesteps, {"prompt_embeds": torch.zeros(2, TOKENS, 32)})
    tokens = seen["timestep"]
    assert tokens.shape == (2, 3 * 2 * 2)  # 3 frames of 2x2 tokens
    assert tokens[0, :4].tolist() == [0.0] * 4 and tokens[0, 4:].tolist() == [700.0] * 8
    assert tokens[1, 4:].tolist() == [300.0] * 8
    text_only = wan_model(folder, "ti2v-2.2", model_flavour="t2v-5b-2.2")
    assert text_only.first_frame_conditioning({}, latents) is None and not text_only.shape.image_to_video


def test_two_experts_route_each_sample_by_its_noise_level(root):
    model = wan_model(project(root, "a14b-2.2"), "a14b-2.2")
    pair = model.denoiser
    assert set(model.experts) == {"transformer", "transformer_2"} and pair.boundary_timestep == 875.0
    assert model.default_flow_shift == 12.0 and model.training_sigma_window() is None
    g = torch.Generator().manual_seed(0)
    hidden, text = torch.randn(2, 16, 3, 4, 4, generator=g), torch.randn(2, TOKENS, 32, generator=g)
    timesteps = torch.tensor([100.0, 900.0])
    with torch.no_grad():
        routed = pair(hidden_states=hidden, timestep=timesteps, encoder_hidden_states=text)[0]
        low = pair.transformer_2(hidden[:1], timesteps[:1], text[:1], return_dict=False)[0]
        high = pair.transformer(hidden[1:], timesteps[1:], text[1:], return_dict=False)[0]
    torch.testing.assert_close(routed, torch.cat([low, high]))
    names = [name for name, _ in model.transformer_blocks()]
    assert names == ["transformer.blocks.0", "transformer.blocks.1", "transformer_2.blocks.0", "transformer_2.blocks.1"]


def test_refiner_training_trains_one_expert_on_its_noise_levels(root):
    folder = project(root, "a14b-2.2")
    low = wan_model(folder, "a14b-2.2", refiner_training=True)
    assert list(low.experts) == ["transformer_2"] and low.denoiser is low.experts["transformer_2"]
    assert low.training_sigma_window() == (0.0, 0.875)
    high = wan_model(folder, "a14b-2.2", refiner_training=True, refiner_training_invert_schedule=True)
    assert list(high.experts) == ["transformer"] and high.training_sigma_window() == (0.875, 1.0)
    moved = wan_model(folder, "a14b-2.2", refiner_training=True, refiner_training_strength=0.8)
    assert moved.training_sigma_window() == (0.0, 0.8)
    with pytest.raises(RuntimeError, match="has a single transformer"):
        wan_model(project(root, "t2v-2.1"), "t2v-2.1", model_flavour=None, refiner_training=True)


def test_lora_targets_exist_and_gradient_checkpointing_keeps_the_gradients(root):
    model = wan_model(project(root, "t2v-2.1"), "t2v-2.1")
    names = [name for name, _ in model.denoiser.named_modules()]
    for target in model.lora_target_modules():
        assert sum(name.endswith("." + target) for name in names) == 2, target  # once per block
    g = torch.Generator().manual_seed(0)
    hidden, text = torch.randn(1, 16, 3, 4, 4, generator=g), torch.randn(1, TOKENS, 32, generator=g)

    def gradients():
        model.denoiser.zero_grad()
        model.denoiser.requires_grad_(True)
        model.predict(hidden, torch.tensor([500.0]), {"prompt_embeds": text}).square().mean().backward()
        return [p.grad.clone() for p in model.denoiser.parameters()]

    plain = gradients()
    assert model.enable_gradient_checkpointing() == 2
    for a, b in zip(plain, gradients()):
        torch.testing.assert_close(a, b)


def test_comfyui_names_are_the_native_wan_names():
    from simpletuner.models.lora_formats import COMFYUI_NAMING

    naming = COMFYUI_NAMING["wan"]
    assert naming.module_key("transformer", "blocks.3.attn1.to_out.0") == "diffusion_model.blocks.3.self_attn.o"
    assert naming.module_key("transformer", "blocks.0.attn2.add_k_proj") == "diffusion_model.blocks.0.cross_attn.k_img"
    assert naming.module_key("transformer", "blocks.1.ffn.net.0.proj") == "diffusion_model.blocks.1.ffn.0"


# --- config rules ----------------------------------------------------------------------------------------


def error_of(folder: Path, variant: str, **overrides) -> str:
    with pytest.raises(ConfigError) as error:
        resolve_run(wan_args(folder, variant, "out", **overrides), environ={}, root=folder)
    return str(error.value)


def test_wan_is_accepted_with_its_options(root):
    folder = project(root, "a14b-2.2")
    config = resolve_run(wan_args(folder, "a14b-2.2", "out", refiner_training="true", refiner_training_strength=0.8,
                                  refiner_training_invert_schedule="true", lora_format="comfyui"),
                         environ={}, root=folder).config
    assert (config.model_family, config.model_flavour, config.refiner_training_strength) == ("wan", "t2v-a14b-2.2", 0.8)


@pytest.mark.parametrize("overrides, message", [
    ({"refiner_training": "true", "model_flavour": "t2v-1.3b-2.1"},
     "`--model_flavour t2v-1.3b-2.1` has a single transformer; use t2v-a14b-2.2 or i2v-a14b-2.2"),
    ({"refiner_training_invert_schedule": "true"}, "add `--refiner_training` or remove it"),
    ({"refiner_training_strength": 0.5}, "add `--refiner_training` or remove it"),
    ({"lora_format": "comfyui"}, "this run trains both Wan 2.2 experts"),
    ({"base_model_precision": "int8-quanto", "quantize_via": "pipeline"}, "use `--quantize_via cpu` (or accelerator)"),
    ({"text_encoder_2_precision": "int8-quanto"}, "wan has 1 text encoder"),
    ({"num_processes": 2}, "which DDP does not allow; train one expert per run"),
    ({"model_flavour": "a14b"}, "choose one of: t2v-1.3b-2.1"),
    ({"flux_guidance_value": 3.0}, "`--flux_guidance_value` only applies to flux, not to wan"),
])
def test_config_mistakes_for_wan_are_named(root, overrides, message):
    assert message in error_of(project(root, "a14b-2.2"), "a14b-2.2", **overrides)


# --- real runs (each a few seconds on the tiny models: not marked slow) -------------------------------

def generate(pipeline, seed: int = 0, **extra):
    """Five decoded frames (32 px unless ``extra`` says otherwise) from ``pipeline`` (fixed seed), as a tensor."""
    pipeline.set_progress_bar_config(disable=True)
    arguments = {"height": 32, "width": 32, **extra}
    with torch.no_grad():
        frames = pipeline(num_frames=5, num_inference_steps=2, output_type="np",
                          generator=torch.Generator().manual_seed(seed), **arguments).frames
    return torch.as_tensor(frames)


def prompt_arguments(pipeline) -> dict:
    """Prompt embeds computed up front: diffusers 0.42's image-to-video pipeline cleans prompt text
    with ftfy without checking that it is installed."""
    from diffusers import WanPipeline

    with torch.no_grad():
        embeds = WanPipeline._get_t5_prompt_embeds(pipeline, [PROMPT], max_sequence_length=TOKENS)
        negative = WanPipeline._get_t5_prompt_embeds(pipeline, [""], max_sequence_length=TOKENS)
    return {"prompt_embeds": embeds, "negative_prompt_embeds": negative}


def run(folder: Path, variant: str, output: str, monkeypatch, steps_run: int = 3, **overrides):
    """A 3-step run through the CLI (``steps_run``: the steps this process takes, fewer on a resume)."""
    seen = keep_trainer(monkeypatch)
    assert main(["train", *wan_args(folder, variant, output, **overrides)]) == 0
    trainer = seen["trainer"]
    assert len(trainer.state.losses) == steps_run and all(math.isfinite(loss) for loss in trainer.state.losses)
    return trainer


def trained_and_loaded(trainer, pipeline_class, folder: Path, file: Path, extra: dict, load=None):
    """Frames of the trained model, of the base model, and of the base model with ``file`` loaded."""
    denoiser = trainer._unwrapped_denoiser().eval()
    components = trainer.model._components(denoiser, image_to_video=pipeline_class.__name__ != "WanPipeline")
    trained = generate(pipeline_class(**components), **extra)
    pipeline = pipeline_class.from_pretrained(folder / "model")
    before = generate(pipeline, **extra)
    (load or (lambda p: p.load_lora_weights(str(file))))(pipeline)
    return trained, before, generate(pipeline, **extra)


def test_text_to_video_lora_with_stills_loads_in_wan_pipeline(root, monkeypatch):
    from diffusers import WanPipeline
    from safetensors import safe_open

    folder = project(root, "t2v-2.1")
    trainer = run(folder, "t2v-2.1", "lora", monkeypatch)
    summaries = {summary.id: summary for summary in trainer.data.summaries}
    assert summaries["clips"].buckets == {(32, 32, 9): 4} and summaries["stills"].buckets == {(32, 32): 2}
    file = folder / "lora" / "pytorch_lora_weights.safetensors"
    with safe_open(str(file), framework="pt") as handle:
        keys = list(handle.keys())
    assert keys and all(re.match(r"transformer\.blocks\.\d\.(attn[12]|ffn)\..*lora_[AB]\.weight$", k) for k in keys)
    assert any(".ffn.net.2." in k for k in keys)
    trained, before, after = trained_and_loaded(trainer, WanPipeline, folder, file, {"prompt": PROMPT,
                                                                                      "max_sequence_length": TOKENS})
    assert after.shape == (1, 5, 32, 32, 3)
    torch.testing.assert_close(after, trained, atol=1e-5, rtol=1e-4)  # the file is the trained adapter
    assert (before - after).abs().max() > 1e-3, "loading the trained LoRA must change the frames"


def test_image_to_video_lora_loads_in_the_image_to_video_pipeline(root, monkeypatch):
    from diffusers import WanImageToVideoPipeline
    from PIL import Image

    folder = project(root, "i2v-2.1")
    trainer = run(folder, "i2v-2.1", "lora", monkeypatch)
    file = folder / "lora" / "pytorch_lora_weights.safetensors"
    extra = {"image": Image.open(folder / "stills" / sorted(p.name for p in (folder / "stills").glob("*.png"))[0]),
             **prompt_arguments(WanImageToVideoPipeline.from_pretrained(folder / "model"))}
    trained, before, after = trained_and_loaded(trainer, WanImageToVideoPipeline, folder, file, extra)
    torch.testing.assert_close(after, trained, atol=1e-5, rtol=1e-4)
    assert (before - after).abs().max() > 1e-3


def test_ti2v_lora_trains_on_clips_with_a_clean_first_frame(root, monkeypatch):
    from diffusers import WanPipeline

    folder = project(root, "ti2v-2.2")
    captured = record_predict_timesteps(monkeypatch)
    trainer = run(folder, "ti2v-2.2", "lora", monkeypatch)
    clips = [t for t in captured if t.dim() == 2]
    assert clips and all(t[:, 0].eq(0).all() and t[:, 1:].gt(0).all() for t in clips)  # frame 0 at timestep 0
    file = folder / "lora" / "pytorch_lora_weights.safetensors"
    extra = {"prompt": PROMPT, "max_sequence_length": TOKENS, "height": 64, "width": 64}
    pipeline = WanPipeline.from_pretrained(folder / "model")
    assert pipeline.config.expand_timesteps
    before = generate(pipeline, **extra)
    pipeline.load_lora_weights(str(file))
    after = generate(pipeline, **extra)
    assert (before - after).abs().max() > 1e-3
    del trainer


def test_two_expert_lora_holds_both_experts_and_resumes(root, monkeypatch):
    from diffusers import WanPipeline
    from safetensors import safe_open

    folder = project(root, "a14b-2.2")
    trainer = run(folder, "a14b-2.2", "both", monkeypatch, checkpointing_steps=2, caption_dropout_probability=0)
    file = folder / "both" / "pytorch_lora_weights.safetensors"
    with safe_open(str(file), framework="pt") as handle:
        prefixes = {key.split(".")[0] for key in handle.keys()}
    assert prefixes == {"transformer", "transformer_2"}

    def load_both(pipeline):
        pipeline.load_lora_weights(str(file))  # the high-noise expert
        pipeline.transformer_2.load_lora_adapter(str(file), prefix="transformer_2")

    extra = {"prompt": PROMPT, "max_sequence_length": TOKENS}
    trained, before, after = trained_and_loaded(trainer, WanPipeline, folder, file, extra, load=load_both)
    torch.testing.assert_close(after, trained, atol=1e-5, rtol=1e-4)
    assert (before - after).abs().max() > 1e-3
    # resuming the step-2 checkpoint reads both experts' adapters back and ends where the run ended
    resumed = run(folder, "a14b-2.2", "both", monkeypatch, steps_run=1, checkpointing_steps=2,
                  caption_dropout_probability=0, resume_from_checkpoint="checkpoint-2")
    assert resumed.resumed_from.name == "checkpoint-2"
    assert resumed.state.losses[-1] == pytest.approx(trainer.state.losses[-1], rel=1e-5)


def test_one_expert_lora_loads_into_its_slot(root, monkeypatch):
    from diffusers import WanPipeline

    folder = project(root, "a14b-2.2")
    trainer = run(folder, "a14b-2.2", "low", monkeypatch, refiner_training="true")
    assert list(trainer.model.experts) == ["transformer_2"]
    file = folder / "low" / "pytorch_lora_weights.safetensors"
    pipeline = WanPipeline.from_pretrained(folder / "model")
    extra = {"prompt": PROMPT, "max_sequence_length": TOKENS}
    before = generate(pipeline, **extra)
    high_before = {n: p.clone() for n, p in pipeline.transformer.named_parameters()}
    pipeline.load_lora_weights(str(file), load_into_transformer_2=True)
    after = generate(pipeline, **extra)
    assert not any("lora" in n for n, _ in pipeline.transformer.named_parameters())
    assert all(torch.equal(p, high_before[n]) for n, p in pipeline.transformer.named_parameters())
    assert (before - after).abs().max() > 1e-3


def test_comfyui_layout_uses_native_names_and_loads_in_diffusers(root, monkeypatch):
    from diffusers import WanPipeline

    from simpletuner.models import lora_formats

    folder = project(root, "t2v-2.1")
    trainer = run(folder, "t2v-2.1", "comfy", monkeypatch, lora_format="comfyui", lora_rank=4, lora_alpha=2)
    file = folder / "comfy" / "pytorch_lora_weights.safetensors"
    lora_file = lora_formats.LoraFile.read(file)
    keys = list(lora_file.tensors)
    assert all(re.match(r"diffusion_model\.blocks\.\d\.(self_attn\.[qkvo]|cross_attn\.[qkvo]|ffn\.[02])\."
                        r"(lora_[AB]\.weight|alpha)$", k) for k in keys)
    assert {float(lora_file.tensors[k]) for k in keys if k.endswith(".alpha")} == {2.0}
    extra = {"prompt": PROMPT, "max_sequence_length": TOKENS}
    trained, _, after = trained_and_loaded(trainer, WanPipeline, folder, file, extra)
    torch.testing.assert_close(after, trained, atol=1e-5, rtol=1e-4)


def test_full_run_of_one_expert_saves_a_whole_two_expert_pipeline(root, monkeypatch):
    from diffusers import WanPipeline

    folder = project(root, "a14b-2.2")
    trainer = run(folder, "a14b-2.2", "full", monkeypatch, model_type="full", refiner_training="true",
                  refiner_training_invert_schedule="true", learning_rate=1e-4)
    saved = WanPipeline.from_pretrained(folder / "full" / "pipeline")
    base = WanPipeline.from_pretrained(folder / "model")
    trained = trainer._unwrapped_denoiser().state_dict()
    assert all(torch.equal(saved.transformer.state_dict()[n], v) for n, v in trained.items())
    assert any(not torch.equal(base.transformer.state_dict()[n], v) for n, v in trained.items())
    assert all(torch.equal(base.transformer_2.state_dict()[n], v) for n, v in saved.transformer_2.state_dict().items())
    assert saved.config.boundary_ratio == 0.875


@pytest.mark.parametrize("memory", [{"base_model_precision": "int8-quanto"}, {"musubi_blocks_to_swap": 1}])
def test_quantized_and_block_swapped_runs_train(root, monkeypatch, memory):
    folder = project(root, "t2v-2.1")
    trainer = run(folder, "t2v-2.1", "memory-" + next(iter(memory)), monkeypatch, **memory)
    assert trainer.state.losses[-1] < 10


def test_causal_sft_gives_every_latent_frame_its_own_timestep(root, monkeypatch):
    folder = project(root, "t2v-2.1")
    seen = record_predict_timesteps(monkeypatch)
    run(folder, "t2v-2.1", "causal", monkeypatch, training_method="causal_sft", causal_chunk_frames=1)
    clips = [t for t in seen if t.shape[-1] == 3]  # 9 frames -> 3 latent frames, one timestep each
    assert clips and any(len(set(row.tolist())) > 1 for t in clips for row in t)


def test_make_tiny_model_writes_a_wan_pipeline_folder(tmp_path):
    from simpletuner.testing.tiny_models import make_tiny_model

    report = make_tiny_model("wan", tmp_path / "tiny")
    assert report.family == "wan" and report.vae_psnr_db is None and set(report.parameters) == {
        "vae", "text_encoder", "transformer"}
    model = wan_model(tmp_path, "t2v-2.1", pretrained_model_name_or_path=str(tmp_path / "tiny"))
    assert not model.shape.image_to_video and not model.shape.two_experts


@pytest.mark.parametrize("variant, flavour, refiner", [
    ("ti2v-2.2", "t2v-5b-2.2", None),  # the 5B weights trained text-to-video
    ("i2v-a14b-2.2", "i2v-a14b-2.2", None),  # both image-to-video experts
    ("i2v-a14b-2.2", "i2v-a14b-2.2", "true"),  # its low-noise expert alone
])
def test_the_other_flavours_train_through_the_cli(root, monkeypatch, variant, flavour, refiner):
    from safetensors import safe_open

    folder = project(root, variant)
    output = f"run-{flavour}-{refiner or 'both'}"
    trainer = run(folder, variant, output, monkeypatch, model_flavour=flavour, refiner_training=refiner)
    with safe_open(str(folder / output / "pytorch_lora_weights.safetensors"), framework="pt") as handle:
        prefixes = {key.split(".")[0] for key in handle.keys()}
    two = trainer.model.shape.two_experts and refiner is None
    assert prefixes == ({"transformer", "transformer_2"} if two else {"transformer"})
    assert trainer.model.shape.clean_first_frame is False
    assert trainer.model.shape.channel_conditioning == variant.startswith("i2v")


def test_two_experts_on_several_processes_are_refused_when_the_count_comes_from_the_launcher(monkeypatch):
    """config.env's TRAINING_NUM_PROCESSES never reaches the config rule; the family refuses at load."""
    import torch.distributed as dist

    from simpletuner.models.wan import refuse_two_experts_on_several_processes

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 1)
    refuse_two_experts_on_several_processes()  # one process: fine
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    with pytest.raises(RuntimeError, match="both Wan 2.2 experts on 2 processes.*`--refiner_training`"):
        refuse_two_experts_on_several_processes()
