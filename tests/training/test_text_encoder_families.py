"""``--train_text_encoder`` beyond the UNet families: SD3 trains its two CLIPs, FLUX.1 its CLIP-L, and T5
stays frozen in both (as diffusers' and kohya's SD3 / FLUX trainers do). The LoRA file loads in the
family's diffusers pipeline and reproduces the trained encoders; FLUX's default (ComfyUI) layout names
CLIP-L the way ComfyUI's key map does. Kolors, DeepFloyd IF and PixArt Sigma refuse the option, each
with its own reason.
"""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from simpletuner.options import ConfigError  # noqa: E402
from simpletuner.options.resolve import resolve_run  # noqa: E402
from simpletuner.training.trainer import Trainer, train  # noqa: E402
from tests.training.conftest import run_args  # noqa: E402

PROMPT = "a red circle on a white background"

#: Which encoders each family trains and which stay frozen, by pipeline component name.
ENCODERS = {
    "sd3": {"trained": ("text_encoder", "text_encoder_2"), "frozen": ("text_encoder_3",)},
    "flux": {"trained": ("text_encoder",), "frozen": ("text_encoder_2",)},
}


@pytest.fixture(scope="module")
def project_of(tmp_path_factory):
    """A tiny project per family, made on first use and shared by this module's tests."""
    from simpletuner.testing.projects import make_family_project

    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            made[family] = make_family_project(tmp_path_factory.mktemp(f"te-{family}"), family, images=4)
        return made[family]

    return get


def config_of(root: Path, family: str, output: str, **overrides):
    args = run_args(root, output, model_family=family, optimizer="optimi-adamw", train_text_encoder="true",
                    **overrides)
    return resolve_run(args).config


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().float().clone() for name, p in module.named_parameters()}


def changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> set[str]:
    return {name for name, p in module.named_parameters()
            if name not in before or not torch.equal(before[name], p.detach().float())}


def train_with_snapshots(config, monkeypatch) -> tuple[Trainer, dict[str, dict[str, torch.Tensor]]]:
    """Train; returns the trainer and every text encoder's weights as they were after setup."""
    seen: dict[str, dict[str, torch.Tensor]] = {}
    original_setup = Trainer.setup

    def setup_and_snapshot(self):
        original_setup(self)
        seen.update({name: snapshot(module) for name, module in self.model.text_encoder_modules().items()})

    monkeypatch.setattr(Trainer, "setup", setup_and_snapshot)
    return train(config, show_progress=False), seen


def tokens_for(pipeline, name: str) -> torch.Tensor:
    tokenizer = {"text_encoder": pipeline.tokenizer, "text_encoder_2": pipeline.tokenizer_2,
                 "text_encoder_3": getattr(pipeline, "tokenizer_3", None)}[name]
    return tokenizer([PROMPT], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def encoder_output(encoder: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """What the family reads from an encoder, flattened: the penultimate hidden states (SD3's CLIP
    tokens), the last ones, and the pooled / projected embedding where the encoder has one."""
    encoder.eval()  # LoRA dropout off
    with torch.no_grad():
        output = encoder(ids, output_hidden_states=True)
    parts = [output.hidden_states[-2], output.last_hidden_state]
    pooled = getattr(output, "text_embeds", None)
    if pooled is None:
        pooled = getattr(output, "pooler_output", None)
    if pooled is not None:
        parts.append(pooled)
    return torch.cat([part.flatten() for part in parts])


def diffusers_pipeline(family: str, folder: Path):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    return {"sd3": StableDiffusion3Pipeline, "flux": FluxPipeline}[family].from_pretrained(folder)


# --- LoRA: only the CLIP adapters move, and the file reproduces them in diffusers ---------------------------


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(ENCODERS))
def test_lora_trains_the_clip_adapters_only_and_loads_in_the_diffusers_pipeline(family, project_of, monkeypatch):
    from safetensors import safe_open

    root = project_of(family)
    config = config_of(root, family, "te-lora", text_encoder_lr=5e-4, save_text_encoder="true")
    trainer, before = train_with_snapshots(config, monkeypatch)
    encoders = trainer.model.text_encoder_modules()
    assert sorted(trainer.text_encoders.encoders) == sorted(ENCODERS[family]["trained"])
    for name in ENCODERS[family]["trained"]:
        moved = changed(before[name], encoders[name])
        assert moved and all("lora_" in key for key in moved), (name, sorted(moved)[:5])
    for name in ENCODERS[family]["frozen"]:  # T5: no adapter, no change
        assert not changed(before[name], encoders[name])
        assert not any("lora_" in key for key, _ in encoders[name].named_parameters())
    assert [group["lr"] for group in trainer.optimizer.param_groups] == [1e-3, 5e-4]

    file = root / "te-lora" / "pytorch_lora_weights.safetensors"
    with safe_open(str(file), framework="pt") as handle:
        keys = list(handle.keys())
    prefixes = {key.split(".")[0] for key in keys}
    assert prefixes == {"transformer", *ENCODERS[family]["trained"]}
    if family == "flux":  # its default layout is ComfyUI's: CLIP-L under text_model, with alphas
        clip_keys = [key for key in keys if key.startswith("text_encoder.")]
        assert all(key.startswith("text_encoder.text_model.encoder.layers.") for key in clip_keys)
        assert any(key.endswith(".alpha") for key in clip_keys)

    pipeline = diffusers_pipeline(family, root / "model")
    names = [*ENCODERS[family]["trained"], *ENCODERS[family]["frozen"]]
    ids = {name: tokens_for(pipeline, name) for name in names}
    base = {name: encoder_output(getattr(pipeline, name), ids[name]) for name in names}
    pipeline.load_lora_weights(str(file))
    for name in ENCODERS[family]["trained"]:
        trained = encoder_output(encoders[name], ids[name])
        loaded = encoder_output(getattr(pipeline, name), ids[name])
        assert not torch.allclose(base[name], trained), name
        torch.testing.assert_close(loaded, trained, atol=1e-5, rtol=1e-5)
    for name in ENCODERS[family]["frozen"]:
        torch.testing.assert_close(encoder_output(getattr(pipeline, name), ids[name]), base[name])
    for name in ENCODERS[family]["trained"]:  # --save_text_encoder: the LoRA merged into a plain model folder
        saved = type(encoders[name]).from_pretrained(root / "te-lora" / name)
        torch.testing.assert_close(encoder_output(saved, ids[name]), encoder_output(encoders[name], ids[name]),
                                   atol=1e-5, rtol=1e-5)
    assert not any((root / "te-lora" / name).exists() for name in ENCODERS[family]["frozen"])


def comfyui_clip_l_keys(layers: int) -> set[str]:
    """The CLIP-L module keys ComfyUI's ``model_lora_keys_clip`` (comfy/lora.py) accepts when a model's
    CLIP holds ``clip_l`` (FLUX.1: clip_l + t5xxl): ``lora_te_`` / ``lora_te1_`` kohya names and the
    ``text_encoder.text_model.encoder.layers.N.<part>`` diffusers names, for each layer part of its map."""
    from tests.adapters.test_load_everywhere import RECORDED

    keys = set()
    for layer in range(layers):
        for dotted, underscored in RECORDED["clip_layer_parts"].items():
            keys.update({f"lora_te_text_model_encoder_layers_{layer}_{underscored}",
                         f"lora_te1_text_model_encoder_layers_{layer}_{underscored}",
                         f"text_encoder.text_model.encoder.layers.{layer}.{dotted}"})
    return keys


def test_flux_comfyui_layout_maps_clip_l_completely_on_the_full_size_model():
    """Every key of a FLUX.1 [dev] file with a CLIP-L LoRA on every layer Linear maps in ComfyUI, at the
    trained strength, and reads back to the same PEFT names."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from simpletuner.models import lora_formats as formats
    from tests.adapters.test_load_everywhere import (ALPHA, comfy_load, comfy_module_keys, fake_peft_states,
                                                     flux_dev_modules)

    modules = flux_dev_modules()
    with torch.device("meta"):
        modules["text_encoder"] = CLIPTextModel(CLIPTextConfig())  # FLUX.1's CLIP-L: 12 layers
    states = fake_peft_states(modules)
    naming = formats.COMFYUI_NAMING["flux"]
    tensors = formats.peft_to_comfyui(states, {c: ALPHA for c in states}, naming, modules)
    clip_keys = sorted(k for k in tensors if k.startswith("text_encoder."))
    assert clip_keys and all(k.startswith("text_encoder.text_model.encoder.layers.") for k in clip_keys)
    accepted = comfy_module_keys("flux", modules) | comfyui_clip_l_keys(12)
    loaded, unloaded = comfy_load(tensors, accepted)
    assert unloaded == []
    assert len(loaded) == sum(len(state) for state in states.values()) // 2
    assert set(loaded.values()) == {ALPHA}
    back, _ = formats.comfyui_to_peft(tensors, naming, modules)
    assert back["text_encoder"].keys() == states["text_encoder"].keys()


# --- live encoding: gradients reach CLIP only; SD3's dropped captions keep their unconditional embeds -------


@pytest.mark.parametrize("family", sorted(ENCODERS))
def test_live_conditioning_sends_gradients_to_clip_and_none_to_t5(family, project_of):
    from tests.models.conftest import loaded_family

    model = loaded_family(family, {"pretrained_model_name_or_path": str(project_of(family) / "model")})
    encoders = model.text_encoder_modules()
    for name in ENCODERS[family]["trained"]:
        encoders[name].requires_grad_(True)
    text = model.text_conditioning([PROMPT, "a blue square"])
    sum(value.float().sum() for key, value in text.items() if key != "attention_mask").backward()
    for name in ENCODERS[family]["trained"]:
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in encoders[name].parameters()), name
    for name in ENCODERS[family]["frozen"]:
        assert all(p.grad is None for p in encoders[name].parameters()), name
    cached = model.encode_prompts([PROMPT, "a blue square"])  # what the text cache holds: the same values
    for key, value in cached.items():
        torch.testing.assert_close(text[key].detach(), value)


def test_sd3_live_dropped_captions_get_the_zeroed_clip_part(project_of):
    from tests.models.conftest import loaded_family

    model = loaded_family("sd3", {"pretrained_model_name_or_path": str(project_of("sd3") / "model"),
                                  "sd3_clip_uncond_behaviour": "zero", "sd3_t5_uncond_behaviour": "empty_string"})
    with torch.no_grad():
        text = model.text_conditioning([PROMPT, ""])
        empty = model.unconditional_text(model.encode_prompts([""]))
        prompt = model.encode_prompts([PROMPT])
    for key in ("prompt_embeds", "pooled_prompt_embeds"):
        torch.testing.assert_close(text[key][1:], empty[key])  # as caption dropout from the cache gives it
        torch.testing.assert_close(text[key][:1], prompt[key])
    assert text["pooled_prompt_embeds"][1].abs().sum() == 0 and text["prompt_embeds"][1, :77].abs().sum() == 0
    assert text["prompt_embeds"][1, 77:].abs().sum() > 0  # T5's part of the empty prompt stays


# --- full training: the saved pipeline folder holds the trained CLIP and the untouched T5 ----------------------


@pytest.mark.slow
def test_flux_full_training_saves_the_trained_clip_and_leaves_t5_alone(project_of, monkeypatch):
    from transformers import CLIPTextModel, T5EncoderModel

    root = project_of("flux")
    config = config_of(root, "flux", "te-full", model_type="full", learning_rate=1e-4, max_train_steps=2)
    trainer, before = train_with_snapshots(config, monkeypatch)
    clip, t5 = trainer.model.text_encoder, trainer.model.text_encoder_2
    assert changed(before["text_encoder"], clip) and not changed(before["text_encoder_2"], t5)
    pipeline = diffusers_pipeline("flux", root / "model")
    ids = tokens_for(pipeline, "text_encoder")
    trained = encoder_output(clip, ids)
    assert not torch.allclose(trained, encoder_output(pipeline.text_encoder, ids))
    in_pipeline = CLIPTextModel.from_pretrained(root / "te-full" / "pipeline", subfolder="text_encoder")
    torch.testing.assert_close(encoder_output(in_pipeline, ids), trained)
    t5_ids = pipeline.tokenizer_2([PROMPT], return_tensors="pt").input_ids
    saved_t5 = T5EncoderModel.from_pretrained(root / "te-full" / "pipeline", subfolder="text_encoder_2")
    with torch.no_grad():
        torch.testing.assert_close(saved_t5(t5_ids)[0], pipeline.text_encoder_2(t5_ids)[0])


# --- the families that keep refusing, each with its reason ---------------------------------------------------


@pytest.mark.parametrize("family, reason", [
    ("kolors", "Kolors' ChatGLM3-6B encoder stays frozen: no reference trainer trains it"),
    ("deepfloyd", "DeepFloyd IF's T5-XXL encoder (4.7B parameters) stays frozen"),
    ("pixart_sigma", "PixArt Sigma's T5-XXL encoder stays frozen: PixArt was trained on precomputed T5 embeddings"),
])
def test_families_with_frozen_encoders_refuse_with_their_reason(family, reason, tmp_path):
    (tmp_path / "multidatabackend.json").write_text("[]")
    args = run_args(tmp_path, "out", model_family=family, pretrained_model_name_or_path=str(tmp_path / "model"),
                    train_text_encoder="true")
    with pytest.raises(ConfigError) as error:
        resolve_run(args)
    message = str(error.value)
    assert message.startswith(f"`--train_text_encoder` is not supported for {family}: {reason}"), message
    assert message.endswith("remove `--train_text_encoder`"), message


# --- the memory planner counts only the trained encoders -----------------------------------------------------


@pytest.mark.parametrize("family", sorted(ENCODERS))
def test_memory_plan_trains_only_the_clips_in_full_training(family, project_of):
    """Full text-encoder training adds the CLIPs' weights to what trains (gradients, optimizer state);
    T5, which stays frozen, must not be counted."""
    from dataclasses import replace

    from simpletuner.memory.planner import PlanSettings, estimate, read_inventory

    root = project_of(family)
    config = config_of(root, family, "plan", model_type="full", learning_rate=1e-4)
    inventory = read_inventory(config)
    with_encoders = PlanSettings.from_config(config)
    without = replace(with_encoders, train_text_encoder=False)
    extra = estimate(inventory, with_encoders).parts["gradients"] - estimate(inventory, without).parts["gradients"]
    encoders = inventory.text_encoders()
    clip_parameters = sum(encoders[name].parameters for name in ENCODERS[family]["trained"])
    assert extra == clip_parameters * 4  # fp32 gradients of the CLIPs alone


@pytest.mark.slow
def test_flux_text_encoder_lora_resumes_with_the_same_losses(project_of):
    """The checkpoint's adapter file (FLUX's ComfyUI layout, CLIP-L under ``text_encoder.text_model.``)
    restores the text-encoder LoRA exactly: an interrupted run resumed continues the same losses."""
    from tests.training.conftest import Interrupted, crash_after_step

    root = project_of("flux")
    overrides = dict(max_train_steps=4, checkpoint_step_interval=2)
    reference = train(config_of(root, "flux", "te-ref", **overrides), show_progress=False)
    with crash_after_step(3), pytest.raises(Interrupted):
        train(config_of(root, "flux", "te-cut", **overrides), show_progress=False)
    resumed = train(config_of(root, "flux", "te-cut", resume_from_checkpoint="latest", **overrides),
                    show_progress=False)
    assert resumed.state.losses == reference.state.losses[2:]
