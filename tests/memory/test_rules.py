"""Memory options at config validation: conflicts name both flags, GPU-only options say so, before any
model loads (torch-free)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from simpletuner.options import ConfigError
from simpletuner.options import memory_rules
from simpletuner.options.resolve import resolve_run
from tests.conftest import write_minimal_dataset_list


def resolve(tmp_path: Path, family: str = "flux", **flags):
    dataset_list = write_minimal_dataset_list(tmp_path)
    values = {"model_family": family, "pretrained_model_name_or_path": str(tmp_path), "model_type": "lora",
              "output_dir": str(tmp_path / "out"), "data_backend_config": str(dataset_list), "max_train_steps": 3,
              **flags}
    values = {key: value for key, value in values.items() if value is not None}
    argv = [t for k, v in values.items() for t in (f"--{k}", v if isinstance(v, str) else json.dumps(v))]
    return resolve_run(argv, environ={}, root=tmp_path)


@pytest.fixture
def gpu(monkeypatch):
    """Pretend a CUDA GPU is visible (the rules only read the driver's files)."""
    monkeypatch.setattr(memory_rules, "accelerator_visible", lambda: True)


CONFLICTS = [
    ({"enable_group_offload": "true", "enable_model_cpu_offload": "true"},
     ("--enable_group_offload", "--enable_model_cpu_offload")),
    ({"enable_group_offload": "true", "ramtorch": "true"}, ("--enable_group_offload", "--ramtorch")),
    ({"enable_group_offload": "true", "offload_during_startup": "true"},
     ("--enable_group_offload", "--offload_during_startup")),
    ({"enable_model_cpu_offload": "true", "offload_during_startup": "true"},
     ("--enable_model_cpu_offload", "--offload_during_startup")),
    ({"musubi_blocks_to_swap": 2, "ramtorch": "true"}, ("--musubi_blocks_to_swap", "--ramtorch")),
    ({"enable_model_cpu_offload": "true", "ramtorch": "true", "ramtorch_text_encoder": "true"},
     ("--enable_model_cpu_offload", "--ramtorch_text_encoder")),
    ({"gradient_checkpointing_backend": "unsloth"}, ("--gradient_checkpointing_backend unsloth", "--gradient_checkpointing")),
    ({"group_offload_type": "leaf_level"}, ("--group_offload_type", "--enable_group_offload")),
    ({"group_offload_to_disk_path": "/tmp/x"}, ("--group_offload_to_disk_path", "--enable_group_offload")),
    ({"enable_group_offload": "true", "group_offload_type": "leaf_level", "group_offload_blocks_per_group": 2},
     ("--group_offload_blocks_per_group", "leaf_level")),
    ({"enable_group_offload": "true", "group_offload_blocks_per_group": 0}, ("--group_offload_blocks_per_group", "at least 1")),
    ({"musubi_block_swap_device": "cuda:1"}, ("--musubi_block_swap_device", "--musubi_blocks_to_swap")),
    ({"musubi_blocks_to_swap": -1}, ("--musubi_blocks_to_swap", "negative")),
    ({"musubi_blocks_to_swap": 2, "musubi_block_swap_device": "floppy"}, ("--musubi_block_swap_device floppy",)),
    ({"musubi_blocks_to_swap": 2, "model_type": "full", "lora_rank": None}, ("--musubi_blocks_to_swap", "--model_type full")),
    ({"musubi_blocks_to_swap": 2, "base_model_precision": "int8-quanto"},
     ("--musubi_blocks_to_swap", "--base_model_precision int8-quanto")),
    ({"ramtorch_text_encoder": "true"}, ("--ramtorch_text_encoder", "--ramtorch true")),
    ({"memory_budget": "lots"}, ("--memory_budget", "24GiB")),
]


@pytest.mark.parametrize("flags,expected", CONFLICTS, ids=[", ".join(f) for f, _ in CONFLICTS])
def test_conflicting_memory_options_fail_naming_both_flags(tmp_path, gpu, flags, expected):
    with pytest.raises(ConfigError) as caught:
        resolve(tmp_path, **flags)
    message = str(caught.value).replace("`", "")
    for fragment in expected:
        assert fragment.replace("`", "") in message, message


def test_block_swap_needs_a_transformer_family(tmp_path):
    with pytest.raises(ConfigError, match="UNet"):
        resolve(tmp_path, family="sd1x", musubi_blocks_to_swap=2)
    with pytest.raises(ConfigError, match="sana's denoiser has blocks that block swap has not been tested on"):
        resolve(tmp_path, family="sana", musubi_blocks_to_swap=2)  # a transformer, but not one block swap knows


def test_gpu_only_options_are_refused_where_no_gpu_is_visible(tmp_path, monkeypatch):
    monkeypatch.setattr(memory_rules, "accelerator_visible", lambda: False)
    with pytest.raises(ConfigError, match="needs CUDA"):
        resolve(tmp_path, gradient_checkpointing="true", gradient_checkpointing_backend="unsloth")
    with pytest.raises(ConfigError, match="needs CUDA"):
        resolve(tmp_path, ramtorch="true")


def test_gpu_only_options_validate_where_a_gpu_is_visible(tmp_path, gpu):
    run = resolve(tmp_path, gradient_checkpointing="true", gradient_checkpointing_backend="unsloth", ramtorch="true",
                  ramtorch_target_modules="transformer_blocks.*", ramtorch_transformer_percent=50)
    assert run.config.ramtorch and run.config.ramtorch_transformer_percent == 50


def test_offloading_on_a_cpu_only_machine_warns_that_it_saves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(memory_rules, "accelerator_visible", lambda: False)
    run = resolve(tmp_path, musubi_blocks_to_swap=1, offload_during_save="true")
    assert any("--musubi_blocks_to_swap" in w and "saves no memory here" in w for w in run.warnings)


def test_delete_model_after_load_warns_for_a_local_folder(tmp_path):
    run = resolve(tmp_path, delete_model_after_load="true")
    assert any("never deleted" in w for w in run.warnings)


def test_still_unsupported_memory_options_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="not supported yet"):
        resolve(tmp_path, vae_enable_patch_conv="true")
    with pytest.raises(ConfigError, match="RamTorch keeps only frozen weights in CPU memory"):
        resolve(tmp_path, ramtorch_controlnet="true")  # every ControlNet weight trains


@pytest.mark.parametrize("family,flags,words", [
    ("sd3", {}, ("not available for sd3", "query/key normalisation")),
    ("deepfloyd", {}, ("not available for deepfloyd", "added key/value")),
    ("flux", {"lora_type": "lycoris"}, ("--lora_type lycoris", "cannot be split back")),
    ("sdxl", {"peft_lora_mode": "singlora"}, ("--peft_lora_mode singlora",)),
    ("sdxl", {"unet_attention_slice": "true"}, ("--unet_attention_slice", "separately")),
    ("flux", {"base_model_precision": "int8-quanto", "quantize_via": "pipeline"},
     ("--quantize_via pipeline", "cannot be concatenated", "`--quantize_via cpu`")),
])
def test_qkv_fusion_is_refused_where_it_cannot_be_honoured(tmp_path, family, flags, words):
    if flags.get("lora_type") == "lycoris":
        config_file = tmp_path / "lycoris.json"
        config_file.write_text(json.dumps({"algo": "lora", "linear_dim": 4, "linear_alpha": 4}))
        flags = {**flags, "lycoris_config": str(config_file)}
    with pytest.raises(ConfigError) as error:
        resolve(tmp_path, family, fuse_qkv_projections="true", **flags)
    assert all(word in str(error.value) for word in words), str(error.value)


@pytest.mark.parametrize("family", ["sd1x", "sd2x", "sdxl", "kolors", "pixart_sigma", "flux"])
def test_qkv_fusion_validates_for_the_families_that_have_it(tmp_path, family):
    assert resolve(tmp_path, family, fuse_qkv_projections="true").config.fuse_qkv_projections is True
