"""Which questions apply to a setup, which of them are essential, and the defaults that fit it.

The wizard asks about an option only when the answer can matter for the chosen family, model type
and machine. The facts are read where they are declared, not restated: the family table
(``FamilyInfo.options``, ``latent_patch_size``, ``pixel_space``, the native resolution), the
validation rules' own lists of options that only work together (group offload, RamTorch, the
PEFT-only adapter options, text encoders per family, options that exclude each other), the
quantization presets and the machine. An option that does not apply is simply not asked; its key
keeps the value the file has (a new setup: the table default), which validation accepts.

Essential questions are the few a first run needs; the others are asked once the user switches the
advanced questions on (a key shown under every question).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

from simpletuner.configure.draft import Draft
from simpletuner.configure.machine import Machine
from simpletuner.models.registry import FAMILIES, FamilyInfo
from simpletuner.options import all_options, options_by_name
from simpletuner.options.adapter_rules import ADAPTER_OPTIONS, PEFT_ONLY
from simpletuner.options.memory_rules import DEVICE_MOVING, EXCLUSIVE, GROUP_OFFLOAD_OPTIONS, RAMTORCH_OPTIONS
from simpletuner.options.quantization_rules import PRESETS, has_package, preset_of
from simpletuner.options.validation import LORA_ONLY_OPTIONS

#: The questions of a first run (with Enter on each, an SD1.x LoRA takes about 15 answers). Dataset
#: keys are named ``dataset.<key>`` and config.env variables ``env.<NAME>``, as ``--set`` names them.
ESSENTIAL = frozenset({
    "model_family", "model_flavour", "model_type", "lora_rank", "flux_lora_target",
    "mixed_precision",
    "output_dir", "max_train_steps", "num_train_epochs", "learning_rate",
    "resolution", "dataset.instance_data_dir", "dataset.caption_strategy", "dataset.instance_prompt",
    "validation_prompt", "validation_step_interval",
    "checkpoint_step_interval",
})
#: Essential only where they change something big: memory on an accelerator, processes on several GPUs.
ESSENTIAL_WITH_ACCELERATOR = frozenset({"gradient_checkpointing"})
ESSENTIAL_WITH_SEVERAL_GPUS = frozenset({"env.TRAINING_NUM_PROCESSES"})

#: Adapter options that only a LyCORIS network reads (the rules refuse them with ``lora_type standard``).
LYCORIS_ONLY = ("lycoris_config", "init_lokr_norm")
#: Options and the values of them that run only on CUDA (the rules refuse them elsewhere).
CUDA_ONLY_OPTIONS = ("ramtorch", *RAMTORCH_OPTIONS, "group_offload_use_stream", "disable_tf32")
CUDA_ONLY_VALUES = {"lora_init_type": ("loftq",), "gradient_checkpointing_backend": ("unsloth",)}
#: Options about accelerator memory: without an accelerator there is none to save or plan.
ACCELERATOR_ONLY_OPTIONS = (*DEVICE_MOVING, "memory_budget")
#: Options about the autoencoder, which pixel-space families do not have.
VAE_OPTIONS = ("vae_enable_slicing", "vae_enable_tiling", "ramtorch_vae")
PRECISION_PRESET_OPTIONS = ("base_model_precision", *(f"text_encoder_{i}_precision" for i in range(1, 5)))


@dataclass(frozen=True)
class Setup:
    """The answers so far (in the draft) and the machine: what relevance is judged on. The machine
    is looked up only by the rules that need it (detecting it imports torch)."""

    draft: Draft
    machine_of: Callable[[], Machine]

    @property
    def machine(self) -> Machine:
        return self.machine_of()

    @property
    def family(self) -> FamilyInfo | None:
        return FAMILIES.get(str(self.draft.typed("model_family")))

    def value(self, name: str) -> Any:
        return self.draft.typed(name)

    def is_on(self, name: str) -> bool:
        return self.value(name) not in (None, False, 0, "", [], "none")


# --- why a question does not apply (None: it does) ---------------------------------------------------


def _family_specific(name: str, setup: Setup) -> str | None:
    owners = [info.name for info in FAMILIES.values() if name in info.options]
    family = setup.family
    if owners and family is not None and name not in family.options:
        return f"only {', '.join(owners)} read it"
    return None


def _text_encoder_slot(name: str, setup: Setup) -> str | None:
    match = re.fullmatch(r"text_encoder_(\d)_precision", name)
    family = setup.family
    if match and family is not None:
        count = family.planner.text_encoder_count if family.planner is not None else None
        if count is not None and int(match.group(1)) > count:
            return f"{family.name} has {count} text encoder(s)"
    return None


def _adapter_kind(name: str, setup: Setup) -> str | None:
    if name in (*LORA_ONLY_OPTIONS, *ADAPTER_OPTIONS) and setup.value("model_type") != "lora":
        return "only LoRA training reads it"
    lycoris = setup.value("lora_type") == "lycoris"
    if lycoris and name in PEFT_ONLY:
        return "PEFT LoRA only; a LyCORIS network takes its settings from lycoris_config"
    if not lycoris and name in LYCORIS_ONLY:
        return "only with lora_type lycoris"
    singlora = setup.value("peft_lora_mode") == "singlora"
    if name == "singlora_ramp_up_steps" and not singlora:
        return "only with peft_lora_mode singlora"
    if name == "use_dora" and singlora:
        return "SingLoRA has no DoRA variant"
    return None


def _quantization(name: str, setup: Setup) -> str | None:
    base = preset_of(setup.value("base_model_precision"))
    if name in ("base_model_default_dtype", "quantize_activations") and base is None:
        return "only with a quantized base model (base_model_precision)"
    if name == "quantize_activations" and base is not None and (base.backend != "torchao" or base.bits < 8):
        return "only the 8-bit torchao presets quantize activations"
    if name == "quantize_via" and not any(preset_of(setup.value(option)) for option in PRECISION_PRESET_OPTIONS):
        return "nothing is quantized"
    if name == "quantization_config" and setup.value("quantize_via") != "pipeline":
        return "only with quantize_via pipeline"
    return None


def _switched_off(name: str, setup: Setup) -> str | None:
    """Options that refine another option while it is on (``x_*`` after a yes/no ``x``, and the rules' lists)."""
    parents = {**{option: "enable_group_offload" for option in GROUP_OFFLOAD_OPTIONS},
               **{option: "ramtorch" for option in RAMTORCH_OPTIONS},
               "musubi_block_swap_device": "musubi_blocks_to_swap"}
    table = options_by_name()
    parent = parents.get(name) or next((option.name for option in all_options() if option.kind == "bool"
                                        and name.startswith(option.name + "_") and name in table), None)
    if parent is not None and not setup.is_on(parent):
        return f"only with {parent} on"
    if name == "group_offload_blocks_per_group" and setup.value("group_offload_type") != "block_level":
        return "only with group_offload_type block_level"
    if name == "num_train_epochs" and setup.is_on("max_train_steps"):
        return "max_train_steps decides the length"
    return None


def _exclusive(name: str, setup: Setup) -> str | None:
    for first, second, why in EXCLUSIVE:
        if name == second and setup.is_on(first):
            return f"{first} is on ({why})"
    return None


def _machine_and_model(name: str, setup: Setup) -> str | None:
    family = setup.family
    if name in CUDA_ONLY_OPTIONS and not setup.machine.cuda:
        return "needs CUDA"
    if name in ACCELERATOR_ONLY_OPTIONS and setup.machine.accelerator is None:
        return "saves accelerator memory, and this machine has none"
    if name in ("musubi_blocks_to_swap", "ramtorch") and setup.value("model_type") != "lora":
        return "only for LoRA training (every weight trains in full training)"
    if family is not None:
        if name == "musubi_blocks_to_swap" and family.latent_patch_size <= 1:
            return f"{family.name}'s denoiser is a UNet, not a stack of transformer blocks"
        if name in VAE_OPTIONS and family.pixel_space:
            return f"{family.name} works on pixels and has no autoencoder"
    return None


RULES: tuple[Callable[[str, Setup], str | None], ...] = (
    _family_specific, _text_encoder_slot, _adapter_kind, _quantization, _switched_off, _exclusive,
    _machine_and_model,
)


def skip_reason(name: str, setup: Setup) -> str | None:
    """Why option ``name`` does not apply to ``setup`` (None when it does)."""
    for rule in RULES:
        reason = rule(name, setup)
        if reason:
            return reason
    return None


def is_essential(key: str, setup: Setup) -> bool:
    if key in ESSENTIAL:
        return True
    if key in ESSENTIAL_WITH_ACCELERATOR:
        return setup.machine.accelerator is not None
    return key in ESSENTIAL_WITH_SEVERAL_GPUS and setup.machine.gpu_count > 1


# --- values offered and defaults that fit ------------------------------------------------------------


def value_applies(name: str, value: str, setup: Setup) -> bool:
    """Whether ``value`` of option ``name`` can work in ``setup``: this machine can run it (a CUDA-only
    initialisation, a quantization preset whose package or device is missing), and the family has
    what it needs (ComfyUI file names are declared for some families only)."""
    if value in CUDA_ONLY_VALUES.get(name, ()):
        return setup.machine.cuda
    if name in PRECISION_PRESET_OPTIONS and value in PRESETS:
        preset = PRESETS[value]
        if not has_package(preset.package):
            return False
        if value == "int4-torchao":
            return setup.machine.cuda and has_package("mslk")
        if setup.machine.accelerator == "mps":
            return preset.backend != "bnb" and "fp8" not in value
    if name == "lora_format" and value == "comfyui" and setup.family is not None:
        return setup.family.comfy_naming is not None
    return True


#: Options whose default in a new setup is :func:`fitted_default`'s rather than the table's.
FITTED = ("mixed_precision", "resolution", "resolution_type", "resume_from_checkpoint")


def fitted_default(name: str, setup: Setup) -> Any:
    """The value a new setup starts from for ``name`` (one of :data:`FITTED`).

    The family's native resolution in pixels (as documentation/QUICKSTART.md writes it), mixed
    precision only with an accelerator, and ``resume_from_checkpoint latest``, so that running the
    same command again continues the run instead of starting over.
    """
    if name == "mixed_precision":
        return "bf16" if setup.machine.accelerator else "no"
    if name == "resolution":
        family = setup.family
        return family.resolution_for(setup.value("model_flavour")) if family else setup.value(name)
    return {"resolution_type": "pixel", "resume_from_checkpoint": "latest"}[name]
