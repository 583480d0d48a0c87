"""One LoRA file per family that both diffusers' ``load_lora_weights`` and ComfyUI load completely, at the
trained strength: the default layout for sd1x / sd2x / sdxl / flux.

ComfyUI's side is checked against its key map recorded in ``comfyui_lora_keys.json`` (next to this file,
with how it was obtained), expanded over full-size SD1.5, SDXL and Flux-dev module trees built on the
meta device, so the names are the ones a real checkpoint has. diffusers' side loads a trained tiny model's
file and must reproduce the trained outputs exactly (SDXL and Flux: tests/models/test_sdxl.py and
test_flux.py, whose comfyui files are what these families now write by default).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from simpletuner.models import lora_formats as formats  # noqa: E402

RECORDED = json.loads((Path(__file__).with_name("comfyui_lora_keys.json")).read_text(encoding="utf-8"))
ALPHA, RANK = 8.0, 16


# --- full-size module trees (meta device: names and shapes, no memory) -----------------------------------


def sd15_modules() -> dict[str, torch.nn.Module]:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768)
        text = CLIPTextModel(CLIPTextConfig())  # ViT-L/14's text tower: 12 layers
    return {"unet": unet, "text_encoder": text}


def sdxl_modules() -> dict[str, torch.nn.Module]:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        unet = UNet2DConditionModel(
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
            attention_head_dim=(5, 10, 20), use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
        first = CLIPTextModel(CLIPTextConfig())
        second = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120,
                                                            num_attention_heads=20, num_hidden_layers=32))
    return {"unet": unet, "text_encoder": first, "text_encoder_2": second}


def flux_dev_modules() -> dict[str, torch.nn.Module]:
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        return {"transformer": FluxTransformer2DModel(guidance_embeds=True)}  # 19 double, 38 single blocks


def linear_and_conv_paths(module: torch.nn.Module) -> list[str]:
    return [name for name, layer in module.named_modules()
            if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d))]


def fake_peft_states(modules: dict[str, torch.nn.Module]) -> dict[str, dict[str, torch.Tensor]]:
    """A LoRA on every Linear and Conv2d of the denoiser and every Linear of the text encoders' layers:
    supersets of every target preset (text encoders: training/text_encoder.py's TEXT_ENCODER_LORA_TARGETS),
    so every name a file can hold is checked."""
    states = {}
    for component, module in modules.items():
        paths = linear_and_conv_paths(module)
        if component.startswith("text_encoder"):
            paths = [path for path in paths if "encoder.layers." in path]
        states[component] = {f"{path}.{suffix}": torch.zeros(1) for path in paths for suffix in formats.PEFT_SUFFIXES}
    return states


# --- ComfyUI's key map, from the recorded patterns ---------------------------------------------------------


def comfy_module_keys(family: str, modules: dict[str, torch.nn.Module]) -> set[str]:
    """Every module key ComfyUI's map accepts for this model (recorded patterns expanded)."""
    recorded = RECORDED["families"][family]
    accepted: set[str] = set()
    for encoder in recorded["clip"]:
        for layer in range(encoder["layers"]):
            for part in RECORDED["clip_layer_parts"].values():
                accepted.add(encoder["prefix"].format(layer=layer, part=part))
    for component in ("unet", "transformer"):
        if component not in modules:
            continue
        for name, _ in modules[component].named_parameters():
            if not name.endswith(".weight"):
                continue
            path = name[: -len(".weight")]
            if component == "unet":
                accepted.add("lora_unet_" + path.replace(".", "_"))
                processor = path.replace(".to_", ".processor.to_")
                processor = processor[:-2] if processor.endswith(".to_out.0") else processor
                accepted.update({processor, "unet." + processor})
            else:
                accepted.update({"transformer." + path, "lycoris_" + path.replace(".", "_"),
                                 "lora_transformer_" + path.replace(".", "_")})
    return accepted


def comfy_load(tensors: dict[str, torch.Tensor], accepted: set[str]) -> tuple[dict[str, float | None], list[str]]:
    """What ComfyUI's loader would do with the file: module key -> its alpha (None: no alpha, so scale
    1.0), and the tensor names it would leave unloaded (it warns "lora key not loaded" for those)."""
    names = RECORDED["weight_names"]
    loaded, used = {}, set()
    for module in accepted:
        for style in ("kohya", "diffusers2"):
            up, down = (names[style][role].format(module=module) for role in ("up", "down"))
            if up in tensors and down in tensors:
                alpha = names["alpha"].format(module=module)
                loaded[module] = float(tensors[alpha]) if alpha in tensors else None
                used.update({up, down} | ({alpha} if alpha in tensors else set()))
    return loaded, sorted(set(tensors) - used)


# --- the tests ---------------------------------------------------------------------------------------------

FULL_SIZE = {"sd1x": sd15_modules, "sdxl": sdxl_modules, "flux": flux_dev_modules}


@pytest.mark.parametrize("family", sorted(FULL_SIZE))
def test_default_layout_maps_completely_in_comfyui_with_alpha_on_full_size_models(family):
    assert formats.default_lora_format(family) == "comfyui"
    modules = FULL_SIZE[family]()
    states = fake_peft_states(modules)
    tensors = formats.peft_to_comfyui(states, {c: ALPHA for c in states}, formats.COMFYUI_NAMING[family], modules)
    loaded, unloaded = comfy_load(tensors, comfy_module_keys(family, modules))
    assert unloaded == []
    expected_layers = sum(len(s) for s in states.values()) // 2
    assert len(loaded) == expected_layers
    assert set(loaded.values()) == {ALPHA}  # the trained strength, never ComfyUI's fallback scale 1.0


@pytest.mark.parametrize("family", ["sd1x", "sdxl"])
def test_clip_text_encoder_keys_carry_text_model_level(family):
    """transformers 5's CLIPTextModel has no ``text_model`` level; ComfyUI's names do."""
    modules = FULL_SIZE[family]()
    assert not hasattr(modules["text_encoder"], "text_model")
    states = {"text_encoder": {"encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(1),
                               "encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(1)}}
    tensors = formats.peft_to_comfyui(states, {"text_encoder": 4.0}, formats.COMFYUI_NAMING[family], modules)
    prefix = formats.COMFYUI_NAMING[family].prefixes["text_encoder"]
    assert f"{prefix}_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in tensors
    # read back, and files written before the fix (no text_model level) still read
    back, _ = formats.comfyui_to_peft(tensors, formats.COMFYUI_NAMING[family], modules)
    assert back["text_encoder"].keys() == states["text_encoder"].keys()
    legacy = {k.replace("_text_model_", "_"): v for k, v in tensors.items()}
    back, _ = formats.comfyui_to_peft(legacy, formats.COMFYUI_NAMING[family], modules)
    assert back["text_encoder"].keys() == states["text_encoder"].keys()


def test_peft_names_map_nothing_in_comfyui_so_they_are_not_the_default():
    """Why sd1x / sdxl no longer default to the diffusers layout: ComfyUI loads none of the attention
    projections (the default targets; it expects ``.processor.to_q``), and nothing there carries alpha."""
    modules = sd15_modules()
    attention = [path for path in linear_and_conv_paths(modules["unet"])
                 if path.endswith(("to_q", "to_k", "to_v", "to_out.0"))]
    peft_file = {f"unet.{path}.lora_{part}.weight": torch.zeros(1) for path in attention for part in "AB"}
    loaded, unloaded = comfy_load(peft_file, comfy_module_keys("sd1x", modules))
    assert len(attention) == 128 and loaded == {} and len(unloaded) == len(peft_file)


@pytest.mark.parametrize("family,overrides,expected", [
    ("sd1x", {}, "comfyui"), ("sd2x", {}, "comfyui"), ("sdxl", {}, "comfyui"), ("flux", {}, "comfyui"),
    ("sd1x", {"use_dora": True}, "diffusers"), ("sdxl", {"lora_type": "lycoris"}, "diffusers"),
    ("wan", {}, "diffusers"), ("sd3", {}, "diffusers"), ("flux", {"lora_format": "diffusers"}, "diffusers"),
])
def test_unset_lora_format_resolves_per_family(family, overrides, expected):
    from types import SimpleNamespace

    config = SimpleNamespace(model_family=family, lora_format=None, lora_type="standard", use_dora=False)
    for key, value in overrides.items():
        setattr(config, key, value)
    assert formats.resolved_lora_format(config) == expected


@pytest.mark.slow
def test_default_sd1x_file_with_text_encoder_loads_exactly_in_diffusers_at_trained_strength(project):
    """No --lora_format: kohya names (UNet and CLIP with ``text_model``), alpha != rank, and diffusers'
    StableDiffusionPipeline reproduces the trained UNet and text encoder bit for bit."""
    from diffusers import StableDiffusionPipeline

    from simpletuner.training.trainer import train
    from tests.adapters.conftest import adapter_config

    config = adapter_config(project, "everywhere", train_text_encoder="true", lora_alpha=2, max_train_steps=2)
    assert config.lora_format is None
    trainer = train(config, show_progress=False)
    file = project / "everywhere" / "pytorch_lora_weights.safetensors"
    keys, metadata = formats.read_safetensors_header(file)
    assert metadata[formats.META_FORMAT] == "comfyui"
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_") for k in keys)
    assert all(k.startswith(("lora_unet_", "lora_te_text_model_")) for k in keys)
    tensors = formats.LoraFile.read(file).tensors
    assert {float(v) for k, v in tensors.items() if k.endswith(".alpha")} == {2.0}

    pipeline = StableDiffusionPipeline.from_pretrained(project / "model", safety_checker=None)
    pipeline.load_lora_weights(str(file))
    g = torch.Generator().manual_seed(1)
    latents, text, t = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 64, generator=g), torch.tensor([300])
    networks = (pipeline.unet, trainer.model.unet, pipeline.text_encoder, trainer.model.text_encoder)
    for network in networks:
        network.eval()
    with torch.no_grad():
        assert torch.equal(pipeline.unet(latents, t, encoder_hidden_states=text).sample,
                           trainer.model.unet(latents, t, encoder_hidden_states=text).sample)
        tokens = pipeline.tokenizer(["a red circle"], padding="max_length", return_tensors="pt",
                                    max_length=pipeline.tokenizer.model_max_length).input_ids
        assert torch.equal(pipeline.text_encoder(tokens)[0], trainer.model.text_encoder(tokens)[0])
