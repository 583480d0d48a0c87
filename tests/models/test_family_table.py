"""The family table (simpletuner/models/registry.py FAMILIES) is the one home of a family's static facts.

Two kinds of check: every registered family states every fact (no family is half-registered), and
the readers that used to keep their own per-family tables -- validation rules, memory and
quantization rules, the memory planner, LoRA layouts, the tiny builders -- take their answer from
the table, so a family registered here (a fake one, via monkeypatch) is seen by all of them.
"""

from __future__ import annotations

import dataclasses
import importlib
from types import SimpleNamespace

import pytest

# Imported before any test registers a fake family, so their import-time snapshots see the real table.
from simpletuner.memory.planner import TEXT_TOKENS
from simpletuner.models.lora_formats import COMFYUI_NAMING, LOADS_EVERYWHERE
from simpletuner.models.lora_naming import ComfyNaming
from simpletuner.models.registry import FAMILIES, FamilyInfo, PlannerShape, ValidationCapabilities, load_family_class
from simpletuner.options import ConfigError, options_by_name
from simpletuner.options.quantization_rules import GGUF_DENOISERS, TEXT_ENCODER_COUNTS
from simpletuner.validation.dataset_inputs import I2V_FAMILIES, IMG2IMG_FAMILIES

PREDICTION_TYPES = {"epsilon", "v_prediction", "sample", "flow_matching"}
ACTIVATION_KINDS = {"unet", "flux", "sd3", "pixart", "transformer"}


@pytest.fixture(params=sorted(FAMILIES))
def info(request) -> FamilyInfo:
    return FAMILIES[request.param]


# --- every family has every fact -----------------------------------------------------------------


def test_identity_and_implementation_class(info: FamilyInfo) -> None:
    family_class = load_family_class(info.name)
    assert family_class.__name__ == info.class_name
    assert family_class.family == info.name


def test_flavours_map_to_hub_ids(info: FamilyInfo) -> None:
    assert info.flavours, f"{info.name} has no flavours"
    assert all(isinstance(hub_id, str) and hub_id.strip() for hub_id in info.flavours.values()), info.flavours
    assert info.default_flavour in info.flavours
    assert set(info.flavour_resolutions) <= set(info.flavours)
    assert set(info.expert_flavours) <= set(info.flavours)


def test_training_facts(info: FamilyInfo) -> None:
    assert info.prediction_types and set(info.prediction_types) <= PREDICTION_TYPES
    assert info.model_types and set(info.model_types) <= {"full", "lora"}
    assert info.latent_patch_size >= 1 and info.native_resolution > 0
    assert info.block_classes and all(name.isidentifier() for name in info.block_classes)


def test_every_named_option_exists_in_the_options_table(info: FamilyInfo) -> None:
    known = options_by_name()
    assert [name for name in info.options if name not in known] == []


def test_planner_shape_is_complete(info: FamilyInfo) -> None:
    shape = info.planner
    assert isinstance(shape, PlannerShape), f"{info.name} has no planner shape"
    assert shape.denoiser_class and shape.activation_kind in ACTIVATION_KINDS
    assert shape.text_tokens > 0 and shape.fixed_text_tokens >= 0 and shape.text_encoder_count >= 0
    # a family without a text encoder (OmniGen reads token ids itself) says why none can be trained
    assert shape.text_encoder_count >= 1 or (not info.text_encoders and info.text_encoder_refusal), info.name


def test_lora_layout_facts(info: FamilyInfo) -> None:
    assert isinstance(info.validation, ValidationCapabilities)
    if info.comfy_naming is not None:
        assert isinstance(info.comfy_naming, ComfyNaming) and info.comfy_naming.prefixes
    assert not info.comfy_loads_in_diffusers or info.comfy_naming is not None, \
        f"{info.name}: a default ComfyUI layout needs a ComfyUI naming"


def test_tiny_builder_is_importable(info: FamilyInfo) -> None:
    module = importlib.import_module(info.tiny_builder)
    assert callable(module.build_tiny_pipeline)


def test_facts_match_the_tiny_model(info: FamilyInfo) -> None:
    """The class names, encoder count and block classes are read off the real classes the tiny model is
    built from, so a wrong table entry fails here rather than in a planner estimate or an FSDP wrap."""
    pipeline, _ = importlib.import_module(info.tiny_builder).build_tiny_pipeline(0)
    denoiser = getattr(pipeline, "transformer", None) or pipeline.unet
    assert type(denoiser).__name__ == info.planner.denoiser_class
    encoders = [name for name, part in pipeline.components.items() if name.startswith("text_encoder") and part]
    assert len(encoders) == info.planner.text_encoder_count
    module_classes = {type(module).__name__ for module in denoiser.modules()}
    assert set(info.block_classes) <= module_classes, sorted(module_classes)
    assert (getattr(pipeline, "vae", None) is None) == info.pixel_space


# --- the readers take their answer from the table ------------------------------------------------


@pytest.fixture
def fake_family(monkeypatch):
    """Register a family "fakefam" whose facts differ from every real one's; returns a function that
    re-registers it with some facts replaced."""

    base = FamilyInfo(
        name="fakefam", module="simpletuner.models.sd1x", class_name="StableDiffusion1x",
        flavours={"one": "example/fake"}, default_flavour="one", prediction_types=("flow_matching",),
        planner=PlannerShape("FakeTransformer2DModel", "sd3", text_tokens=40, fixed_text_tokens=2,
                             text_encoder_count=1, gguf_single_file=True),
        validation=ValidationCapabilities(guidance_rescale=True, step_preview=True),
        video=True, pixel_space=True, block_classes=("FakeBlock",), qkv_fusion_refusal="fake attention is odd",
        comfy_naming=ComfyNaming({"transformer": "fake"}, style="dotted"), comfy_loads_in_diffusers=True,
        tiny_builder="simpletuner.testing.tiny.sd1x",
    )

    def register(**changes) -> FamilyInfo:
        info = dataclasses.replace(base, **changes)
        monkeypatch.setitem(FAMILIES, "fakefam", info)
        return info

    register()
    return register


def config_of(**values) -> SimpleNamespace:
    defaults = dict(model_family="fakefam", validation_guidance_rescale=None, validation_disable_unconditional=False,
                    validation_preview=False, validation_method="simpletuner-local", vae_dtype=None,
                    fuse_qkv_projections=False, tokenizer_max_length=None,
                    **{f"text_encoder_{index}_precision": None for index in (1, 2, 3, 4)})
    return SimpleNamespace(**{**defaults, **values})


def test_validation_rules_read_capabilities(fake_family) -> None:
    from simpletuner.options import validation_rules

    validation_rules.check_validation_guidance(config_of(validation_guidance_rescale=0.7))  # accepted
    assert "fakefam" in validation_rules.families_that("guidance_rescale")
    assert validation_rules.can("fakefam", "video") and validation_rules.can("fakefam", "step_preview")
    fake_family(validation=ValidationCapabilities())
    assert "fakefam" not in validation_rules.families_that("guidance_rescale")
    works_for = ", ".join(validation_rules.families_that("guidance_rescale"))
    assert works_for.startswith("sd1x, sd2x, sdxl")
    with pytest.raises(ConfigError, match=f"the fakefam pipeline has no guidance rescale; it works for {works_for}. "):
        validation_rules.check_validation_guidance(config_of(validation_guidance_rescale=0.7))
    with pytest.raises(ConfigError, match="fakefam has no Tiny AutoEncoder preview"):
        validation_rules.check_validation_preview(config_of(validation_preview=True))


def test_memory_rules_read_the_qkv_fusion_fact(fake_family) -> None:
    from simpletuner.options.memory_rules import check_qkv_fusion

    with pytest.raises(ConfigError, match="not available for fakefam: fake attention is odd. Remove it"):
        check_qkv_fusion(config_of(fuse_qkv_projections=True))


def test_quantization_rules_read_the_planner_shape(fake_family) -> None:
    from simpletuner.options import quantization_rules

    assert quantization_rules.gguf_denoiser("fakefam") == "FakeTransformer2DModel"
    assert quantization_rules.text_encoder_count("fakefam") == 1
    with pytest.raises(ConfigError, match=r"`--text_encoder_2_precision int8-quanto`: fakefam has 1 text encoder; "):
        quantization_rules.check_text_encoder_slots(config_of(text_encoder_2_precision="int8-quanto"))
    fake_family(planner=dataclasses.replace(FAMILIES["fakefam"].planner, gguf_single_file=False))
    assert quantization_rules.gguf_denoiser("fakefam") is None


def test_planner_reads_text_tokens_and_activation_kind(fake_family) -> None:
    from simpletuner.memory import planner

    assert planner.text_tokens(config_of()) == 42
    assert planner.text_tokens(config_of(tokenizer_max_length=10)) == 12
    inventory = SimpleNamespace(denoiser=SimpleNamespace(config={"_class_name": "FakeTransformer2DModel"}))
    assert planner.architecture(inventory) == "sd3"
    assert planner.planner_shape(inventory) is FAMILIES["fakefam"].planner


def test_planner_counts_blocks_and_tokens_as_the_shape_says(fake_family) -> None:
    from simpletuner.memory import planner

    fake_family(planner=PlannerShape("FakeTransformer2DModel", "flux", text_tokens=8, text_encoder_count=1,
                                     block_count_keys=("num_joint", "num_single"), token_patch=4))
    denoiser = SimpleNamespace(config={"_class_name": "FakeTransformer2DModel", "num_joint": 2, "num_single": 3,
                                       "num_layers": 100, "patch_size": 1, "num_attention_heads": 2,
                                       "attention_head_dim": 4})
    inventory = SimpleNamespace(denoiser=denoiser, components={})  # no VAE: pixels are latents
    settings = SimpleNamespace(width=16, height=16, frames=1, text_tokens=8, model_type="lora")
    shape = planner.activation_shape(inventory, settings)
    tokens, width, depth = (16 // 4) * (16 // 4), 2 * 4, 2 + 3
    assert (shape.image, shape.text, shape.units) == (tokens * width * depth, 8 * width * depth, depth)


def test_lora_layouts_read_the_comfy_facts(fake_family) -> None:
    from simpletuner.models import lora_formats

    assert lora_formats.comfyui_naming("fakefam") is FAMILIES["fakefam"].comfy_naming
    assert lora_formats.default_lora_format("fakefam") == "comfyui"
    fake_family(comfy_loads_in_diffusers=False)
    assert lora_formats.default_lora_format("fakefam") == "diffusers"


def test_precision_rules_read_pixel_space(fake_family) -> None:
    from simpletuner.options.precision_rules import check_vae_dtype

    with pytest.raises(ConfigError, match="the fakefam model works on pixels and has no VAE"):
        check_vae_dtype(config_of(vae_dtype="fp16"))
    fake_family(pixel_space=False)
    check_vae_dtype(config_of(vae_dtype="fp16"))


def test_tiny_builders_come_from_the_table(fake_family) -> None:
    from simpletuner.testing.tiny_models import tiny_families

    assert "fakefam" in tiny_families()
    fake_family(tiny_builder="")
    assert "fakefam" not in tiny_families()


def test_snapshots_equal_the_table() -> None:
    """The module-level lists kept for callers are the table's answer, not a second copy."""
    assert TEXT_TOKENS == {name: info.planner.text_tokens + info.planner.fixed_text_tokens
                           for name, info in FAMILIES.items()}
    assert TEXT_TOKENS["sd3"] == 77 + 154 and TEXT_TOKENS["flux"] == 512
    assert COMFYUI_NAMING == {name: info.comfy_naming for name, info in FAMILIES.items() if info.comfy_naming}
    assert LOADS_EVERYWHERE == {name for name, info in FAMILIES.items() if info.comfy_loads_in_diffusers}
    assert {"sd1x", "sd2x", "sdxl", "flux"} <= LOADS_EVERYWHERE
    assert TEXT_ENCODER_COUNTS == {name: info.planner.text_encoder_count for name, info in FAMILIES.items()}
    assert set(GGUF_DENOISERS) == {name for name, info in FAMILIES.items() if info.planner.gguf_single_file}
    assert IMG2IMG_FAMILIES == tuple(name for name, info in FAMILIES.items() if info.validation.img2img)
    assert {"sd1x", "sd2x", "sdxl", "kolors", "sd3", "flux"} <= set(IMG2IMG_FAMILIES)
    assert I2V_FAMILIES == tuple(name for name, info in FAMILIES.items() if info.validation.image_to_video)
    assert {"ltxvideo", "wan"} <= set(I2V_FAMILIES)


def test_vae_training_is_refused_for_a_recipe_without_a_demo_vae(tmp_path) -> None:
    from simpletuner.testing.tiny_models import make_tiny_model

    with pytest.raises(ValueError, match="--train-vae-steps trains the demo VAE of sd1x and sd2x; the tiny sdxl model "
                                         "has no such VAE, remove it"):
        make_tiny_model("sdxl", tmp_path / "tiny", vae_train_steps=1)
    assert not (tmp_path / "tiny").exists()
