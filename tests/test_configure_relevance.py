"""Which questions the wizard asks (simpletuner/configure/relevance.py), judged without a terminal.

The relevance facts come from the family table and the validation rules; the first test checks
that every question the wizard leaves out really is one validation refuses (or ignores) for that
setup, so the wizard and ``simpletuner train`` cannot drift apart. The others walk the wizard with
scripted answers on a CPU and on a two-GPU CUDA machine (the machine is given, not detected).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from simpletuner.cli import main
from simpletuner.configure.draft import load_draft
from simpletuner.configure.machine import Machine
from simpletuner.configure.navigation import WizardSession
from simpletuner.configure.relevance import Setup, fitted_default, skip_reason, value_applies
from simpletuner.configure.settings import apply_setting
from simpletuner.configure.wizard import SECTIONS, run_wizard
from simpletuner.options import ConfigError
from simpletuner.options.adapter_rules import cuda_visible
from simpletuner.options.resolve import resolve_run
from tests.conftest import write_minimal_dataset_list
from tests.scripted_ui import ScriptedUI

CPU = Machine()
TWO_GPUS = Machine("cuda", 2)
LOKR = '{"algo": "lokr", "linear_dim": 8}'


def walk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, answers: dict[str, Any], machine: Machine = CPU,
         advanced: bool = True) -> tuple[ScriptedUI, Any]:
    """Run the wizard on a new setup with ``answers``; return the UI (what was asked) and the draft."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "images").mkdir(exist_ok=True)
    ui = ScriptedUI({"output_dir": "out", "dataset.instance_data_dir": "images", **answers})
    session = WizardSession(machine_override=machine,
                            advanced_sections={title for title, _ in SECTIONS} if advanced else set())
    draft = load_draft(None)
    run_wizard(ui, draft, session)
    return ui, draft


def setup_of(settings: dict[str, Any], machine: Machine = CPU) -> Setup:
    draft = load_draft(None)
    for name, value in settings.items():
        apply_setting(draft, f"{name}={value}")
    return Setup(draft, lambda: machine)


# --- left out = refused (or ignored) by validation ------------------------------------------------------


@pytest.mark.parametrize("settings, name, value, refusal", [
    ({}, "flux_lora_target", "all", "only applies to flux"),
    ({}, "text_encoder_2_precision", "int8-quanto", "text_encoder_2"),
    ({}, "lycoris_config", LOKR, "only applies to `--lora_type lycoris`"),
    ({}, "init_lokr_norm", "0.001", "only applies to `--lora_type lycoris`"),
    ({"lora_type": "lycoris", "lycoris_config": LOKR}, "lora_dropout", "0.2", "applies to PEFT LoRA"),
    ({}, "singlora_ramp_up_steps", "100", "only applies with `--peft_lora_mode singlora`"),
    ({"peft_lora_mode": "singlora"}, "use_dora", "true", "SingLoRA has no DoRA variant"),
    ({"model_type": "full"}, "lora_dropout", "0.2", "only applies to `--model_type lora`"),
    ({"base_model_precision": "int8-quanto"}, "quantization_config", '{"unet": {"weights_dtype": "int8"}}',
     "`--quantize_via cpu` is set"),
    ({}, "quantize_via", "pipeline", None),  # nothing is quantized: the value changes nothing
    ({}, "quantize_activations", "true", "quantizes the activations of a quantized base model"),
    ({"base_model_precision": "int8-quanto"}, "quantize_activations", "true", "optimum-quanto"),
    ({}, "base_model_default_dtype", "fp32", "the base model is not quantized"),
    ({}, "group_offload_type", "leaf_level", "only applies with `--enable_group_offload true`"),
    ({"enable_group_offload": "true", "group_offload_type": "leaf_level"}, "group_offload_blocks_per_group", "2",
     "leaf_level moves each layer on its own"),
    ({"enable_group_offload": "true"}, "enable_model_cpu_offload", "true", "cannot be combined"),
    ({}, "musubi_blocks_to_swap", "2", "is a UNet"),
    ({}, "musubi_block_swap_device", "cuda:1", "only applies with `--musubi_blocks_to_swap` > 0"),
    ({}, "ramtorch_vae", "true", "only applies with `--ramtorch true`"),
    ({"model_family": "deepfloyd"}, "vae_enable_tiling", "true", "has no VAE"),
    ({"model_family": "sdxl"}, "text_encoder_3_precision", "int8-quanto", "text_encoder_3"),
    ({"max_train_steps": "100"}, "num_train_epochs", "3", None),  # max_train_steps decides the length
])
def test_every_question_left_out_is_one_validation_refuses(tmp_path: Path, settings: dict[str, Any], name: str,
                                                           value: str, refusal: str | None) -> None:
    setup = setup_of({"model_family": "sd1x", **settings})
    assert skip_reason(name, setup) is not None
    if refusal is None:
        return
    config = {"model_family": "sd1x", "output_dir": str(tmp_path / "out"),
              "data_backend_config": str(write_minimal_dataset_list(tmp_path)), **settings, name: value}
    argv = [item for key, raw in config.items() for item in (f"--{key}", str(raw))]
    with pytest.raises(ConfigError) as error:
        resolve_run(argv, environ={}, root=tmp_path)
    assert refusal in str(error.value)


@pytest.mark.skipif(cuda_visible(), reason="checks what a machine without CUDA is not asked")
@pytest.mark.parametrize("name, value, refusal", [
    ("ramtorch", "true", "needs CUDA"),
    ("lora_init_type", "loftq", "runs on CUDA only"),
    ("gradient_checkpointing_backend", "unsloth", "needs CUDA"),
    ("base_model_precision", "int4-torchao", "no NVIDIA GPU"),
])
def test_what_a_cpu_cannot_run_is_not_offered(tmp_path: Path, name: str, value: str, refusal: str) -> None:
    setup = setup_of({"model_family": "sd1x", "gradient_checkpointing": "true"})
    assert skip_reason(name, setup) is not None or not value_applies(name, value, setup)
    argv = ["--model_family", "sd1x", "--output_dir", str(tmp_path / "out"), "--gradient_checkpointing", "true",
            "--data_backend_config", str(write_minimal_dataset_list(tmp_path)), f"--{name}", value]
    with pytest.raises(ConfigError) as error:
        resolve_run(argv, environ={}, root=tmp_path)
    assert refusal in str(error.value)


# --- the questions follow the answers -------------------------------------------------------------------


def test_a_flux_lora_on_two_gpus_gets_its_own_questions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ui, draft = walk(tmp_path, monkeypatch, {"model_family": "flux"}, machine=TWO_GPUS)
    asked = set(ui.keys)
    assert {"flux_lora_target", "text_encoder_2_precision", "musubi_blocks_to_swap", "ramtorch", "disable_tf32",
            "enable_group_offload", "memory_budget"} <= asked
    assert not asked & {"text_encoder_3_precision", "unet_attention_slice", "group_offload_type", "quantize_via",
                        "ramtorch_vae", "musubi_block_swap_device"}
    processes = next(q for q in ui.questions if q.key == "env.TRAINING_NUM_PROCESSES")
    assert processes.default == "2"  # one process per GPU
    assert draft.typed("resolution") == 1024 and not draft.has("mixed_precision")  # bf16, the table's default


def test_switching_an_option_on_brings_its_details(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ui, _ = walk(tmp_path, monkeypatch, {"model_family": "flux", "enable_group_offload": True,
                                         "base_model_precision": "int8-quanto", "quantize_via": "pipeline",
                                         "musubi_blocks_to_swap": "4"}, machine=TWO_GPUS)
    asked = set(ui.keys)
    assert {"group_offload_type", "group_offload_blocks_per_group", "group_offload_use_stream", "quantize_via",
            "quantization_config", "base_model_default_dtype", "musubi_block_swap_device"} <= asked
    assert not asked & {"enable_model_cpu_offload", "ramtorch", "offload_during_startup", "quantize_activations"}


def test_lycoris_asks_for_its_config_instead_of_the_peft_options(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    ui, draft = walk(tmp_path, monkeypatch, {"lora_type": "lycoris", "lycoris_config": LOKR})
    asked = set(ui.keys)
    assert {"lycoris_config", "init_lokr_norm"} <= asked
    assert not asked & {"lora_rank", "lora_alpha", "lora_dropout", "use_dora", "peft_lora_mode", "lora_init_type",
                        "slider_lora_target"}
    assert draft.typed("lycoris_config") == json.loads(LOKR)


def test_full_training_asks_no_adapter_question(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ui, draft = walk(tmp_path, monkeypatch, {"model_type": "full"})
    assert not {q.key for q in ui.questions} & {"lora_rank", "lora_type", "use_dora", "ramtorch"}
    assert draft.typed("model_type") == "full"


def test_an_accelerator_makes_gradient_checkpointing_essential(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "gpu").mkdir()
    (tmp_path / "cpu").mkdir()
    on_gpus, _ = walk(tmp_path / "gpu", monkeypatch, {}, machine=TWO_GPUS, advanced=False)
    on_cpu, _ = walk(tmp_path / "cpu", monkeypatch, {}, machine=CPU, advanced=False)
    assert "gradient_checkpointing" in on_gpus.keys and "env.TRAINING_NUM_PROCESSES" in on_gpus.keys
    assert "gradient_checkpointing" not in on_cpu.keys and "env.TRAINING_NUM_PROCESSES" not in on_cpu.keys
    assert next(q for q in on_gpus.questions if q.key == "mixed_precision").default == "bf16"
    assert next(q for q in on_cpu.questions if q.key == "mixed_precision").default == "no"


# --- defaults that fit the family -----------------------------------------------------------------------


@pytest.mark.parametrize("family, flavour, edge", [
    ("sd1x", None, 512), ("sd2x", None, 768), ("sd2x", "2.1-base", 512), ("sdxl", None, 1024), ("flux", None, 1024),
    ("deepfloyd", None, 64), ("deepfloyd", "ii-medium-450m", 256), ("pixart_sigma", "600M-512", 512),
])
def test_resolution_default_is_the_family_native_size(family: str, flavour: str | None, edge: int) -> None:
    settings = {"model_family": family, **({"model_flavour": flavour} if flavour else {})}
    assert fitted_default("resolution", setup_of(settings)) == edge


def test_non_interactive_new_setup_gets_the_same_defaults_and_answers_win(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "images").mkdir()
    common = ["--non-interactive", "--set", "output_dir=out", "--set", "dataset.instance_data_dir=images",
              "--set", "mixed_precision=no"]
    assert main(["configure", "a.json", *common, "--set", "model_family=sd2x", "--set", "model_flavour=2.1-base"]) == 0
    config = json.loads((tmp_path / "a.json").read_text())
    assert (config["resolution"], config["resolution_type"], config["resume_from_checkpoint"]) == (512, "pixel", "latest")
    # an answer wins over the fitted default, even one equal to the table's default (left out as usual)
    assert main(["configure", "b.json", *common, "--set", "model_family=sdxl", "--set", "resolution_type=pixel_area"]) == 0
    config = json.loads((tmp_path / "b.json").read_text())
    assert not {"resolution_type", "resolution"} & set(config)  # 1024: sdxl's size
    assert config["resume_from_checkpoint"] == "latest"
    # editing an existing setup adds nothing
    before = (tmp_path / "a.json").read_bytes()
    assert main(["configure", "a.json", "--non-interactive", "--set", "learning_rate=0.0002"]) == 0
    assert json.loads((tmp_path / "a.json").read_text()) == {**json.loads(before), "learning_rate": 0.0002}
