"""OmniGen on its tiny offline model: prompt "encoding" (token ids in OmniGen's template), the model inputs
against diffusers' own ``OmniGenCollator``, the flow convention on OmniGen's inverted clock (training and
the pipeline agree with an exact oracle), gradient checkpointing, config rules, ``plan-memory``, the
validation pipeline, and real runs through the CLI (LoRA with validation loaded by our ``load_lora``,
full training saving a pipeline folder diffusers loads, quantized bases)."""

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
    check_trained,
    check_validation_images,
    saved_lora_keys,
)

FAMILY = "omnigen"
PROMPT = "a red circle on a white background"


HARNESS = FamilyHarness(FAMILY)
project = HARNESS.project_fixture()
omnigen_model, config_for, error_of, run_cli = HARNESS.model, HARNESS.config, HARNESS.error, HARNESS.run


@pytest.fixture(scope="module")
def model(project):
    return omnigen_model(project / "model")


def collated(model, prompts: list[str], size: int = 64):
    """What diffusers' own ``OmniGenCollator`` makes of ``prompts`` (token ids from OmniGen's template)
    for an image of ``size`` pixels: (input_ids, position_ids, attention_mask)."""
    from diffusers.pipelines.omnigen.processor_omnigen import OmniGenCollator

    from simpletuner.models.omnigen import templated

    inputs = [{"input_ids": model.tokenizer(templated(p)).input_ids, "pixel_values": None, "image_sizes": None}
              for p in prompts]
    ids, positions, mask, *_ = OmniGenCollator().process_mllm_input(inputs, [[size, size]] * len(prompts))
    return ids, positions, mask


# --- the tiny model and the text path -----------------------------------------------------------------


def test_tiny_model_is_an_omnigen_pipeline_folder(project):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, OmniGenTransformer2DModel
    from transformers import AutoTokenizer

    folder = project / "model"
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "OmniGenPipeline"
    assert {key for key in index if not key.startswith("_")} == {"transformer", "vae", "tokenizer", "scheduler"}
    transformer = OmniGenTransformer2DModel.from_pretrained(folder, subfolder="transformer")
    assert len(transformer.layers) == 2 and transformer.config.rope_scaling["short_factor"] != \
        transformer.config.rope_scaling["long_factor"]
    tokenizer = AutoTokenizer.from_pretrained(folder, subfolder="tokenizer")
    assert type(tokenizer).__name__ == "LlamaTokenizer" and len(tokenizer) == transformer.config.vocab_size
    assert tokenizer.convert_ids_to_tokens(tokenizer("<|user|>").input_ids) == ["<s>", "<|user|>"]
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")
    assert scheduler.config.invert_sigmas and scheduler.config.num_train_timesteps == 1
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    assert 2 ** (len(vae.config.block_out_channels) - 1) == 8  # the processor counts 16 px per image token


def test_prompts_are_token_ids_in_the_template_left_padded_as_digits(model):
    from simpletuner.models.omnigen import joined_ids, templated

    text = model.encode_prompts([PROMPT, ""])
    assert set(text) == {"token_ids_high", "token_ids_low", "attention_mask"}
    assert all(value.shape == (2, 512) for value in text.values())
    assert int(text["token_ids_high"].max()) < 256 and int(text["token_ids_low"].max()) < 256
    ids = joined_ids({key: value.to(torch.bfloat16) for key, value in text.items()})  # the trainer's cast
    for row, prompt in enumerate([PROMPT, ""]):
        expected = model.tokenizer(templated(prompt)).input_ids
        real = text["attention_mask"][row].bool()
        assert int(real.sum()) == len(expected) and bool(real[-len(expected):].all())  # padding on the left
        assert ids[row][real].tolist() == expected
    # the empty caption (caption dropout) is still the whole template, as OmniGen was trained
    assert len(model.tokenizer(templated("")).input_ids) > 10


def test_long_captions_keep_the_templates_closing_tokens(project, model):
    from simpletuner.models.omnigen import TEMPLATE_SUFFIX, prompt_token_ids, templated

    short = omnigen_model(project / "model", tokenizer_max_length=40)
    caption = " ".join(["red circle"] * 40)
    ids = prompt_token_ids(short.tokenizer, caption, 40)
    closing = model.tokenizer(TEMPLATE_SUFFIX, add_special_tokens=False).input_ids
    full = model.tokenizer(templated(caption)).input_ids
    assert len(ids) == 40 and ids[-len(closing):] == closing and ids[:40 - len(closing)] == full[:40 - len(closing)]
    assert short.encode_prompts([caption])["attention_mask"].shape == (1, 40)
    assert model.fingerprint_parts()["max_tokens"] == "512" and short.fingerprint_parts()["max_tokens"] == "40"
    with pytest.raises(ValueError, match="cannot hold OmniGen's prompt template"):
        prompt_token_ids(model.tokenizer, caption, 8)


def test_edit_prompts_are_refused_clearly(model):
    with pytest.raises(ValueError, match=r"references an input image .* only text-to-image"):
        model.encode_prompts(["<img><|image_1|></img> make it blue"])


def test_batches_with_reference_images_are_refused(model):
    text = model.encode_prompts([PROMPT])
    batch = {"conditioning_pixels": torch.zeros(1, 3, 64, 64)}
    with pytest.raises(ValueError, match=r"paired with conditioning images .* only text-to-image"):
        model.predict(torch.zeros(1, 4, 8, 8), torch.tensor([500.0]), text, batch=batch)
    model.predict(torch.zeros(1, 4, 8, 8), torch.tensor([500.0]), text, batch={"mask": torch.ones(1, 1, 64, 64)})


def test_model_inputs_equal_diffusers_collator(model):
    """Ids, position ids and the causal / bidirectional mask, for prompts of different lengths; the
    padding every row has is dropped, as the pipeline pads to its longest prompt."""
    prompts = [PROMPT, "a blue square"]
    text = {key: value.to(torch.bfloat16) for key, value in model.encode_prompts(prompts).items()}
    ours = model.model_inputs(text, torch.zeros(2, 4, 8, 8))  # 64 px: 4x4 patches of 2x2 latent cells
    ids, positions, mask = collated(model, prompts)
    assert ours["input_ids"].shape == ids.shape
    lengths = model.encode_prompts(prompts)["attention_mask"].sum(1).tolist()
    assert lengths[0] == ids.shape[1] > lengths[1]  # the longer prompt sets the width, the other is padded
    for row, length in enumerate(lengths):  # real tokens equal; the padding id differs and is never attended to
        assert torch.equal(ours["input_ids"][row, -length:], ids[row, -length:])
    assert torch.equal(ours["position_ids"], positions)
    assert torch.equal(ours["attention_mask"].long(), mask.long())


class _ExactVelocity(torch.nn.Module):
    """Stands in for the transformer: the exact OmniGen output ``x0 - eps`` for latents on the straight
    path from noise (clock 0) to ``x0`` (clock 1), i.e. ``(x0 - z) / (1 - t)``."""

    def __init__(self, x0: torch.Tensor, config):
        super().__init__()
        self.x0, self.config, self.dtype, self.device = x0, config, torch.float32, torch.device("cpu")

    def forward(self, hidden_states, timestep, return_dict=False, **inputs):
        assert inputs["input_ids"].dtype == torch.long and inputs["position_ids"].shape[1] == \
            inputs["attention_mask"].shape[-1]
        t = timestep.float().view(-1, 1, 1, 1)
        return ((self.x0 - hidden_states) / (1 - t),)


def test_training_and_the_pipeline_share_omnigens_inverted_clock(model, monkeypatch):
    """With the exact velocity, predict() returns the flow target ``eps - x0`` at every noise level, and
    the pipeline's shipped scheduler (inverted sigmas on a [0, 1] clock) walks from noise to ``x0``."""
    torch.manual_seed(0)
    x0, eps = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    oracle = _ExactVelocity(x0, model.denoiser.config)
    monkeypatch.setattr(model, "denoiser", oracle)
    text = model.encode_prompts([PROMPT])
    for sigma in (0.1, 0.5, 0.9):
        noisy = (1 - sigma) * x0 + sigma * eps
        torch.testing.assert_close(model.predict(noisy, torch.tensor([1000 * sigma]), text), eps - x0)
    pipeline = model.build_pipeline(oracle)
    pipeline.set_progress_bar_config(disable=True)
    latents = pipeline(PROMPT, height=64, width=64, num_inference_steps=4, latents=eps, output_type="latent").images
    torch.testing.assert_close(latents, x0, rtol=1e-4, atol=1e-4)


def test_predict_runs_the_transformer_on_omnigens_clock(model):
    torch.manual_seed(0)
    latents = torch.randn(2, 4, 8, 8)
    text = model.encode_prompts([PROMPT, ""])
    with torch.no_grad():
        ours = model.predict(latents, torch.tensor([300.0, 800.0]), text)
        direct = model.denoiser(hidden_states=latents, timestep=torch.tensor([0.7, 0.2]), input_img_latents=[],
                                input_image_sizes={}, return_dict=False, **model.model_inputs(text, latents))[0]
        other = model.predict(latents, torch.tensor([301.0, 800.0]), text)
    torch.testing.assert_close(ours, -direct)
    assert not torch.equal(ours[0], other[0])


def test_default_shift_is_read_from_the_checkpoints_scheduler(project, model, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(project / "model", folder)
    scheduler_file = folder / "scheduler" / "scheduler_config.json"
    scheduler_file.write_text(json.dumps({**json.loads(scheduler_file.read_text()), "shift": 3.0}))
    assert model.default_flow_shift == 1.0 and model.noise_scheduler().config.num_train_timesteps == 1000
    assert omnigen_model(folder).default_flow_shift == 3.0


def test_gradient_checkpointing_every_nth_block_keeps_the_gradients(project):
    check_checkpointing_keeps_gradients(lambda: omnigen_model(project / "model"), (2, 4, 8, 8), PROMPT,
                                        checkpointed={1: 2, 2: 1}, handed_blocks=2)


def test_block_list_is_the_layers(model):
    assert [name for name, _ in model.transformer_blocks()] == ["layers.0", "layers.1"]


# --- the validation pipeline ---------------------------------------------------------------------------


def test_validation_pipeline_takes_a_negative_prompt_and_refuses_input_images(model):
    from simpletuner.models.omnigen import TextPromptProcessor

    pipeline = model.build_pipeline()
    pipeline.set_progress_bar_config(disable=True)
    kwargs = dict(height=64, width=64, num_inference_steps=2, output_type="latent")

    def sample(**extra):
        with torch.no_grad():
            return pipeline(PROMPT, generator=torch.Generator().manual_seed(0), **kwargs, **extra).images

    default = sample()
    torch.testing.assert_close(sample(negative_prompt=[TextPromptProcessor.default_negative_prompt()]), default)
    assert not torch.equal(sample(negative_prompt=["blurry"]), default)
    assert "low quality" in TextPromptProcessor.default_negative_prompt()  # diffusers' own default
    with pytest.raises(ValueError, match="text only"):
        pipeline(PROMPT, input_images=["edit.png"], **kwargs)


# --- config rules ----------------------------------------------------------------------------------


def test_flavour_names_the_released_model():
    from simpletuner.models.omnigen import OmniGen

    for flavour in (None, "v1"):
        model = OmniGen(make_config(model_family=FAMILY, model_flavour=flavour), torch.device("cpu"), torch.float32)
        assert model.model_path == "Shitao/OmniGen-v1-diffusers" and model.prediction_type == "flow_matching"


def test_omnigen_options_are_accepted_and_the_others_refused(project):
    config = config_for(project, tokenizer_max_length=77, model_flavour="v1",
                        pretrained_transformer_model_name_or_path=str(project / "model"),
                        pretrained_transformer_subfolder="transformer")
    assert (config.tokenizer_max_length, config.model_flavour) == (77, "v1")
    assert error_of(project, t5_padding="zero").startswith("`--t5_padding` only applies to ")


@pytest.mark.parametrize("overrides, message", [
    ({"train_text_encoder": "true"}, "`--train_text_encoder` is not supported for omnigen: OmniGen has no text "
                                     "encoder"),
    ({"lora_format": "comfyui"}, "ComfyUI has no OmniGen (v1) model"),
    ({"prediction_type": "epsilon"}, "`--prediction_type epsilon` is not supported for omnigen"),
    ({"model_flavour": "v2"}, "`--model_flavour v2` is not a flavour of omnigen; choose one of: v1"),
    ({"text_encoder_1_precision": "int8-quanto"}, "omnigen has 0 text encoders; remove it"),
    ({"fuse_qkv_projections": "true"}, "OmniGenAttnProcessor2_0"),
    ({"pretrained_gemma_model_name_or_path": "x"}, "`--pretrained_gemma_model_name_or_path` only applies to"),
])
def test_config_mistakes_for_omnigen_are_named(project, overrides, message):
    assert message in error_of(project, **overrides)


def test_a_single_file_checkpoint_is_refused(project, tmp_path):
    file = tmp_path / "omnigen.safetensors"
    file.write_bytes(b"")
    with pytest.raises(RuntimeError, match="cannot load OmniGen from a single file"):
        omnigen_model(project / "model", pretrained_transformer_model_name_or_path=str(file))


def test_plan_memory_prints_a_plan_for_omnigen(project, capsys):
    argv = HARNESS.plan_args(project, lora_rank=4)
    assert main(["plan-memory", *argv]) == 0
    out = capsys.readouterr().out
    assert "memory plan for omnigen" in out and "transformer 0.077M" in out and "training peak" in out
    assert "text encoder" not in out.split("training peak")[0].split("\n", 2)[2]


# --- real runs -----------------------------------------------------------------------------------------


lora_run = HARNESS.lora_run_fixture(PROMPT)


slow = pytest.mark.slow


@slow
def test_lora_run_trains_saves_and_validates(lora_run):
    trainer, start, out = lora_run
    check_trained(trainer, start)
    assert trainer.model.denoiser.gradient_checkpointing
    keys, metadata = saved_lora_keys(out)
    assert keys and all(re.fullmatch(r"transformer\.layers\.[01]\.self_attn\.(to_q|to_k|to_v|to_out\.0)"
                                     r"\.lora_[AB]\.weight", key) for key in keys), keys
    assert len(keys) == 2 * 4 * 2
    assert json.loads(metadata["lora_adapter_metadata"])["transformer.r"] == 16
    assert metadata["model_family"] == FAMILY and metadata["global_step"] == "3"
    check_validation_images(out)


def _sample(pipeline) -> torch.Tensor:
    pipeline.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipeline(PROMPT, num_inference_steps=2, height=64, width=64, output_type="latent",
                        generator=torch.Generator().manual_seed(0)).images


@slow
def test_saved_lora_loads_with_load_lora_and_reproduces_training(project, lora_run):
    from simpletuner.models.omnigen import OmniGenTextPipeline, load_lora

    trainer, _, out = lora_run
    pipeline = OmniGenTextPipeline.from_pretrained(project / "model")
    before = _sample(pipeline)
    load_lora(pipeline, out)
    after = _sample(pipeline)
    trained = _sample(trainer.model.build_pipeline(trainer._unwrapped_denoiser().eval()))
    assert (before - after).abs().max() > 1e-6, "loading the trained LoRA must change the output"
    torch.testing.assert_close(after, trained, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="no `transformer.\\*` adapter weights"):
        from safetensors.torch import save_file

        save_file({"unet.x.lora_A.weight": torch.zeros(1, 1)}, str(project / "not-omnigen.safetensors"))
        load_lora(OmniGenTextPipeline.from_pretrained(project / "model"), project / "not-omnigen.safetensors")


@slow
def test_model_card_shows_code_that_loads_the_lora(lora_run, tmp_path, monkeypatch):
    """The card's snippet uses our ``load_lora`` (diffusers has no OmniGen LoRA loader); run on the CPU
    with our pipeline class standing in for diffusers' (which needs torchvision), it loads the adapter."""
    _, _, out = lora_run
    card = (out / "README.md").read_text()
    code = card.split("```python\n", 1)[1].split("\n```", 1)[0]
    assert "load_lora_weights" not in code and "load_lora(pipeline, " in code
    setup = "\n".join(line for line in code.splitlines() if not line.startswith("image")).replace('"cuda"', '"cpu"')
    setup = setup.replace('"path/to/output_dir"', json.dumps(str(out)))
    setup = setup.replace("from diffusers import OmniGenPipeline",
                          "from simpletuner.models.omnigen import OmniGenTextPipeline as OmniGenPipeline")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(setup, "model card", "exec"), namespace)  # noqa: S102 - the card's own code, on local files
    assert list(namespace["pipeline"].transformer.peft_config) == ["default"]


@slow
def test_saved_lora_loads_into_diffusers_omnigen_pipeline(project, lora_run):
    """diffusers' own pipeline needs torchvision (its processor); where it is installed, ours loads into it."""
    pytest.importorskip("torchvision")
    from diffusers import OmniGenPipeline

    from simpletuner.models.omnigen import load_lora

    _, _, out = lora_run
    pipeline = OmniGenPipeline.from_pretrained(project / "model")
    before = _sample(pipeline)
    load_lora(pipeline, out)
    assert (before - _sample(pipeline)).abs().max() > 1e-6


@slow
def test_full_run_reuses_the_text_cache_and_saves_a_pipeline_diffusers_loads(project, lora_run):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, OmniGenTransformer2DModel

    from simpletuner.models.omnigen import OmniGen, OmniGenTextPipeline

    calls = []
    original = OmniGen.encode_prompts
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(OmniGen, "encode_prompts", lambda self, prompts: calls.append(prompts) or original(self, prompts))
        trainer, start = run_cli(project, "full", model_type="full")
    assert calls == [], "the LoRA run cached every caption; a second run must not encode them again"
    check_trained(trainer, start)
    folder = project / "full" / "pipeline"
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "OmniGenPipeline"
    loaded = OmniGenTransformer2DModel.from_pretrained(folder, subfolder="transformer").state_dict()
    trained = trainer._unwrapped_denoiser().state_dict()
    assert loaded.keys() == trained.keys() and all(torch.equal(loaded[k], v) for k, v in trained.items())
    base = OmniGenTransformer2DModel.from_pretrained(project / "model", subfolder="transformer").state_dict()
    assert not torch.equal(base["embed_tokens.weight"], loaded["embed_tokens.weight"])  # the prompt embedding trains
    assert FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler").config.invert_sigmas
    AutoencoderKL.from_pretrained(folder, subfolder="vae")
    assert _sample(OmniGenTextPipeline.from_pretrained(folder)).shape == (1, 4, 8, 8)


@slow
def test_full_run_folder_loads_in_diffusers_omnigen_pipeline(project):
    pytest.importorskip("torchvision")
    from diffusers import OmniGenPipeline

    if not (project / "full" / "pipeline").is_dir():
        run_cli(project, "full", model_type="full")
    assert _sample(OmniGenPipeline.from_pretrained(project / "full" / "pipeline")).shape == (1, 4, 8, 8)


#: preset -> (layer type, weight type) of a quantized transformer linear (the PEFT base layer)
QUANTIZED_LAYERS = {"int8-quanto": ("QLinear", "WeightQBytesTensor"), "int8-torchao": ("Linear", "Int8Tensor")}


@slow
@pytest.mark.parametrize("preset, route", [("int8-quanto", "cpu"), ("int8-torchao", "cpu"), ("int8-quanto", "pipeline")])
def test_lora_trains_on_a_quantized_transformer(project, lora_run, preset, route):
    """``--quantize_via pipeline`` quantizes while loading; there is no text encoder to quantize."""
    trainer, start = run_cli(project, f"quantized-{preset}-{route}", base_model_precision=preset, quantize_via=route)
    check_trained(trainer, start)
    denoiser = trainer._unwrapped_denoiser()
    trainable = {name for name, p in denoiser.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    layer = denoiser.layers[0].self_attn.to_q.base_layer
    assert (type(layer).__name__, type(layer.weight).__name__) == QUANTIZED_LAYERS[preset]
    assert trainer.model.quantization == {"transformer": f"{preset} ({route})"}


@slow
def test_validation_previews_decode_with_a_tiny_autoencoder(project, lora_run, tmp_path):
    from simpletuner.testing.tiny_vision import make_tiny_autoencoder_tiny

    tae = make_tiny_autoencoder_tiny(tmp_path / "tae", latent_channels=4)
    run_cli(project, "preview", validation_prompt=PROMPT, validation_step_interval=3, validation_num_inference_steps=2,
            validation_preview="true", tiny_autoencoder_path=str(tae))
    previews = sorted(path.name for path in (project / "preview" / "validation" / "step_3" / "previews").iterdir())
    assert previews == ["64x64_00_step001.png", "64x64_00_step002.png"]
