"""Adapter options at config validation: conflicts name both flags, before any model loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from simpletuner.options import ConfigError
from simpletuner.options.resolve import resolve_run
from tests.conftest import write_minimal_dataset_list

LOKR = {"algo": "lokr", "linear_dim": 4, "factor": 4}


def resolve(tmp_path: Path, **flags):
    dataset_list = write_minimal_dataset_list(tmp_path)
    values = {"model_family": "sd1x", "pretrained_model_name_or_path": str(tmp_path), "model_type": "lora",
              "output_dir": str(tmp_path / "out"), "data_backend_config": str(dataset_list), "max_train_steps": 3,
              **flags}
    argv = [t for k, v in values.items() for t in (f"--{k}", v if isinstance(v, str) else json.dumps(v))]
    return resolve_run(argv, environ={}, root=tmp_path).config


CONFLICTS = [
    ({"model_type": "full", "use_dora": "true"}, ("--use_dora", "--model_type full")),
    ({"lora_type": "lycoris"}, ("--lora_type lycoris", "--lycoris_config")),
    ({"lycoris_config": LOKR}, ("--lycoris_config", "--lora_type lycoris")),
    ({"lora_type": "lycoris", "lycoris_config": LOKR, "lora_rank": 8}, ("--lora_rank", "--lora_type lycoris", "linear_dim")),
    ({"lora_type": "lycoris", "lycoris_config": LOKR, "use_dora": "true"}, ("--use_dora", "--lora_type lycoris")),
    ({"lora_type": "lycoris", "lycoris_config": {"algo": "loha"}, "init_lokr_norm": 1e-3}, ("--init_lokr_norm", "lokr")),
    ({"lora_type": "lycoris", "lycoris_config": {"algo": "oft"}}, ("--lycoris_config", "algo 'oft'")),
    ({"lora_type": "lycoris", "lycoris_config": {"algo": "lokr", "linear_dims": 4}}, ("--lycoris_config", "'linear_dim'")),
    ({"lora_type": "lycoris", "lycoris_config": LOKR, "train_text_encoder": "true"},
     ("--train_text_encoder", "--lora_type lycoris")),
    ({"validation_lycoris_strength": 0.5}, ("--validation_lycoris_strength", "--lora_type lycoris")),
    ({"lora_init_type": "pissa", "use_dora": "true"}, ("--lora_init_type pissa", "--use_dora")),
    ({"lora_init_type": "olora", "slider_lora_target": "true"}, ("--lora_init_type olora", "--slider_lora_target")),
    ({"peft_lora_mode": "singlora", "use_dora": "true"}, ("--peft_lora_mode singlora", "--use_dora")),
    ({"peft_lora_mode": "singlora", "singlora_ramp_up_steps": 0}, ("--singlora_ramp_up_steps", "at least 1")),
    ({"singlora_ramp_up_steps": 10}, ("--singlora_ramp_up_steps", "--peft_lora_mode singlora")),
    ({"peft_lora_target_modules": ["to_q"], "slider_lora_target": "true"},
     ("--peft_lora_target_modules", "--slider_lora_target")),
    ({"peft_lora_target_modules": "[]"}, ("--peft_lora_target_modules", "non-empty")),
    ({"lora_format": "comfyui", "use_dora": "true"}, ("--lora_format comfyui", "--use_dora")),
    ({"init_lora": "/no/such/file.safetensors"}, ("--init_lora", "not a file")),
]


@pytest.mark.parametrize("flags,expected", CONFLICTS, ids=[", ".join(f) for f, _ in CONFLICTS])
def test_incompatible_adapter_options_fail_naming_the_flags(tmp_path, flags, expected):
    with pytest.raises(ConfigError) as caught:
        resolve(tmp_path, **flags)
    message = str(caught.value).replace("`", "")
    for fragment in expected:
        assert fragment.replace("`", "") in message, message


def test_loftq_is_refused_where_no_gpu_is_visible(tmp_path, monkeypatch):
    import simpletuner.options.adapter_rules as rules

    monkeypatch.setattr(rules, "cuda_visible", lambda: False)
    with pytest.raises(ConfigError, match="loftq.*no GPU"):
        resolve(tmp_path, lora_init_type="loftq")


@pytest.mark.parametrize("init", ["pissa", "olora", "loftq"])
def test_weight_rewriting_inits_refuse_a_quantized_base(tmp_path, init):
    """Checked on the rule itself: `--base_model_precision` is another part of the options table."""
    from simpletuner.options.adapter_rules import check_peft_options

    config = resolve(tmp_path).replace(lora_init_type=init, base_model_precision="int8-quanto")
    with pytest.raises(ConfigError, match=f"--lora_init_type {init}.*--base_model_precision int8-quanto"):
        check_peft_options(config)


def test_init_lora_kind_must_match_lora_type(tmp_path):
    from safetensors.torch import save_file
    import torch

    lycoris_file, peft_file = tmp_path / "lyco.safetensors", tmp_path / "peft.safetensors"
    save_file({"lycoris_a.lokr_w1": torch.zeros(1)}, str(lycoris_file))
    save_file({"unet.a.lora_A.weight": torch.zeros(1)}, str(peft_file))
    with pytest.raises(ConfigError, match="LyCORIS file.*--lora_type standard"):
        resolve(tmp_path, init_lora=str(lycoris_file))
    with pytest.raises(ConfigError, match="PEFT/diffusers LoRA.*--lora_type lycoris"):
        resolve(tmp_path, init_lora=str(peft_file), lora_type="lycoris", lycoris_config=LOKR)
    assert resolve(tmp_path, init_lora=str(peft_file)).init_lora == str(peft_file)


def test_valid_adapter_configs_pass(tmp_path):
    targets = tmp_path / "targets.json"
    targets.write_text(json.dumps(["to_q", "to_v"]))
    config = resolve(tmp_path, peft_lora_target_modules=str(targets), use_dora="true", lora_init_type="default")
    # a JSON option given as a file is read once at start-up: the run sees its content, not the path
    assert config.use_dora and config.peft_lora_target_modules == ["to_q", "to_v"]
    assert resolve(tmp_path, lora_format="comfyui", slider_lora_target="true").lora_format == "comfyui"
    config = resolve(tmp_path, lora_type="lycoris", lycoris_config=dict(LOKR, apply_preset={"target_module": ["Attention"]}),
                     init_lokr_norm=1e-3, validation_lycoris_strength=0.5)
    assert config.lycoris_config["algo"] == "lokr"
    assert resolve(tmp_path, peft_lora_mode="singlora", singlora_ramp_up_steps=10).singlora_ramp_up_steps == 10
