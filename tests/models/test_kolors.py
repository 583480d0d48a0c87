"""The kolors family on a tiny offline Kolors-shaped model (ChatGLM3 with an offline-trained
SentencePiece tokenizer, an SDXL-shaped UNet with a text projection): prompt encoding against
KolorsPipeline's own, the ChatGLM length, micro-conditioning, refiner training's timestep slice,
config rules, and real runs through the CLI (LoRA reproduced exactly by KolorsPipeline.load_lora_weights,
full, text embeds reused)."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sentencepiece")

from simpletuner.cli import main  # noqa: E402
from simpletuner.options import ConfigError  # noqa: E402
from simpletuner.options.resolve import resolve_run  # noqa: E402
from simpletuner.testing.config import make_config  # noqa: E402
from tests.models.conftest import family_args, keep_trainer, make_family_project  # noqa: E402

PROMPT = "a red circle on a white background"
#: Short ChatGLM prompts keep the tiny model's steps cheap; the default (256) is tested on its own.
SHORT = 32


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
    return make_family_project(tmp_path_factory.mktemp("kolors"), "kolors")


def kolors_model(project: Path, **options):
    from simpletuner.models.kolors import Kolors

    config = make_config(**{"model_family": "kolors", "pretrained_model_name_or_path": str(project / "model"),
                            **options})
    model = Kolors(config, torch.device("cpu"), torch.float32)
    model.load()
    return model


@pytest.fixture(scope="module")
def model(project):
    return kolors_model(project, tokenizer_max_length=SHORT)


def kolors_config(project: Path, output: str = "out", **overrides):
    return resolve_run(family_args(project, "kolors", output, **overrides), environ={}, root=project).config


def test_the_offline_tokenizer_is_deterministic_and_reloads(project):
    from diffusers.pipelines.kolors import ChatGLMTokenizer

    from simpletuner.testing.tiny.kolors import sentencepiece_model

    assert sentencepiece_model() == sentencepiece_model()
    tokenizer = ChatGLMTokenizer.from_pretrained(project / "model" / "tokenizer")
    pieces = tokenizer.tokenize(PROMPT)
    assert pieces == ["▁a", "▁red", "▁circle", "▁on", "▁a", "▁white", "▁background"]  # one piece per word
    ids = tokenizer([PROMPT], padding="max_length", max_length=12)["input_ids"][0]
    assert ids[:3] == [tokenizer.pad_token_id] * 3  # ChatGLM pads on the left, behind [gMASK] sop
    assert ids[3:5] == [tokenizer.get_command("[gMASK]"), tokenizer.get_command("sop")]


def test_prompt_embeds_equal_the_pipelines_own(project, model):
    from diffusers import KolorsPipeline

    pipeline = KolorsPipeline.from_pretrained(project / "model")
    embeds, negative, pooled, negative_pooled = pipeline.encode_prompt(
        [PROMPT, "a blue square"], device=torch.device("cpu"), max_sequence_length=SHORT)
    ours = model.encode_prompts([PROMPT, "a blue square"])
    assert ours["prompt_embeds"].shape == (2, SHORT, 32) and ours["pooled_prompt_embeds"].shape == (2, 32)
    torch.testing.assert_close(ours["prompt_embeds"], embeds)
    torch.testing.assert_close(ours["pooled_prompt_embeds"], pooled)
    # Kolors' negative prompt is the encoded empty prompt, and so is what caption dropout trains with
    empty = model.unconditional_text(model.encode_prompts(["", ""]))
    torch.testing.assert_close(empty["prompt_embeds"], negative)
    torch.testing.assert_close(empty["pooled_prompt_embeds"], negative_pooled)
    assert negative.abs().sum() > 0 and not model.force_zeros


def test_default_length_is_the_pipelines_and_keys_the_cache(project, model):
    full = kolors_model(project)
    assert full.encode_prompts([PROMPT])["prompt_embeds"].shape == (1, 256, 32)
    assert full.pipeline_call_arguments() == {"max_sequence_length": 256}
    assert full.fingerprint_parts() != model.fingerprint_parts()


def test_sizes_and_text_projection_reach_the_unet(model):
    seen = {}
    hooks = [model.unet.add_time_proj.register_forward_hook(lambda m, args, out: seen.update(ids=args[0])),
             model.unet.encoder_hid_proj.register_forward_hook(lambda m, args, out: seen.update(projected=out))]
    batch = {"original_size": torch.tensor([[100, 300]] * 2), "crop_top_left": torch.tensor([[0, 64]] * 2),
             "target_size": torch.tensor([[64, 64]] * 2)}
    with torch.no_grad():
        out = model.predict(torch.randn(2, 4, 16, 16), torch.tensor([5, 900]), model.encode_prompts([PROMPT, ""]),
                            batch=batch)
    for hook in hooks:
        hook.remove()
    assert out.shape == (2, 4, 16, 16)
    assert seen["ids"].view(2, -1).tolist() == [[100, 300, 0, 64, 64, 64]] * 2
    assert seen["projected"].shape == (2, SHORT, 48)  # ChatGLM's 32 channels projected to the UNet's 48


@pytest.mark.parametrize("overrides, low, high", [
    ({"refiner_training": "true"}, 0, 220),  # 20% of Kolors' 1100 training timesteps
    ({"refiner_training": "true", "refiner_training_invert_schedule": "true"}, 220, 1100),
])
def test_refiner_training_slices_the_1100_step_schedule(project, model, monkeypatch, overrides, low, high):
    from simpletuner.methods.sft import SupervisedFineTuning

    config = kolors_config(project, **overrides)
    monkeypatch.setattr(model, "config", config)
    method = SupervisedFineTuning(model, 0.0, config=config)
    torch.manual_seed(0)
    drawn = torch.cat([method.sample_timesteps(8, torch.device("cpu")) for _ in range(200)])
    assert low <= int(drawn.min()) < low + 10 and high - 10 <= int(drawn.max()) < high


def error_of(project: Path, family: str = "kolors", **overrides) -> str:
    with pytest.raises(ConfigError) as error:
        resolve_run(family_args(project, family, "out", **overrides), environ={}, root=project)
    return str(error.value)


def test_config_rules_for_kolors(project):
    config = kolors_config(project, tokenizer_max_length=128, unet_attention_slice="true", refiner_training="true")
    assert (config.tokenizer_max_length, config.unet_attention_slice) == (128, True)
    assert "`--train_text_encoder` is not supported for kolors" in error_of(project, train_text_encoder="true")
    assert error_of(project, sdxl_refiner_uses_full_range="true").startswith(
        "`--sdxl_refiner_uses_full_range` only applies to sdxl, not to kolors")
    assert "choose one of: 1.0" in error_of(project, model_flavour="2.0")


def test_single_file_is_refused_with_the_fix(tmp_path):
    from simpletuner.models.kolors import Kolors

    file = tmp_path / "kolors.safetensors"
    file.write_bytes(b"")
    config = make_config(model_family="kolors", pretrained_model_name_or_path=str(file))
    with pytest.raises(RuntimeError, match="cannot load Kolors from a single file"):
        Kolors(config, torch.device("cpu"), torch.float32).load()


# --- real runs -------------------------------------------------------------------------------------

slow = pytest.mark.slow


@slow
def test_lora_run_loads_exactly_in_kolors_pipeline(project, monkeypatch):
    from diffusers import KolorsPipeline
    from PIL import Image
    from safetensors import safe_open

    seen = keep_trainer(monkeypatch)
    args = family_args(project, "kolors", "lora", tokenizer_max_length=SHORT, caption_dropout_probability=0.5,
                       validation_prompt=PROMPT, validation_num_inference_steps=2, validation_step_interval=3,
                       validation_resolution="48x64")
    assert main(["train", *args]) == 0
    out = project / "lora"
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), framework="pt") as handle:
        assert all(key.startswith("unet.") for key in handle.keys())
        assert handle.metadata()["model_family"] == "kolors"
    assert Image.open(out / "validation" / "step_3" / "48x64_00.png").size == (48, 64)

    trained = seen["trainer"].model.build_pipeline(seen["trainer"]._unwrapped_denoiser().eval())
    fresh = KolorsPipeline.from_pretrained(project / "model")
    trained.scheduler = fresh.scheduler

    def latents(pipeline):
        pipeline.set_progress_bar_config(disable=True)
        return pipeline(prompt=PROMPT, num_inference_steps=2, width=64, height=64, output_type="latent",
                        max_sequence_length=SHORT, generator=torch.Generator().manual_seed(0)).images

    before = latents(fresh)
    fresh.load_lora_weights(out)
    after = latents(fresh)
    torch.testing.assert_close(after, latents(trained), rtol=0, atol=0)
    assert (after - before).abs().max() > 1e-4, "the trained LoRA must change the output"


@slow
def test_full_run_writes_a_kolors_pipeline_and_reuses_the_text_cache(project, monkeypatch):
    from diffusers import KolorsPipeline

    seen = keep_trainer(monkeypatch)
    args = family_args(project, "kolors", "full", model_type="full", tokenizer_max_length=SHORT)
    assert main(["train", *args]) == 0
    trainer = seen["trainer"]
    assert trainer.data.text_report.built == 0 and trainer.data.text_report.reused == 9  # cached by the LoRA run
    saved = KolorsPipeline.from_pretrained(project / "full" / "pipeline")
    trained = trainer._unwrapped_denoiser().state_dict()
    assert all(torch.equal(saved.unet.state_dict()[name], value) for name, value in trained.items())
    base = KolorsPipeline.from_pretrained(project / "model")
    assert any(not torch.equal(base.unet.state_dict()[name], value) for name, value in trained.items())
    assert saved.scheduler.config.num_train_timesteps == 1100
