"""Quantization options at config validation: what cannot run here stops before a model loads,
naming the option, the value and the reason; nothing here imports torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from simpletuner.options import ConfigError
from simpletuner.options import quantization_rules as rules
from simpletuner.options.resolve import resolve_run
from tests.conftest import write_minimal_dataset_list

CPU_PRESETS = ("int8-quanto", "int4-quanto", "int2-quanto", "fp8-quanto", "fp8uz-quanto", "int8-torchao",
               "fp8-torchao", "nf4-bnb")


def resolve(tmp_path: Path, **flags):
    dataset_list = write_minimal_dataset_list(tmp_path)
    values = {"model_family": "sd1x", "pretrained_model_name_or_path": str(tmp_path), "model_type": "lora",
              "output_dir": str(tmp_path / "out"), "data_backend_config": str(dataset_list), "max_train_steps": 3,
              **flags}
    argv = [t for k, v in values.items() for t in (f"--{k}", v if isinstance(v, str) else json.dumps(v))]
    return resolve_run(argv, environ={}, root=tmp_path)


@pytest.fixture
def on_cpu(monkeypatch):
    monkeypatch.setattr(rules, "machine_device", lambda: "cpu")


@pytest.mark.parametrize("preset", CPU_PRESETS)
def test_every_cpu_preset_validates_for_the_base_and_the_text_encoder(tmp_path, on_cpu, preset):
    run = resolve(tmp_path, base_model_precision=preset, text_encoder_1_precision=preset)
    assert run.config.base_model_precision == preset
    assert rules.component_precisions(run.config) == {"denoiser": preset, "text_encoder": preset}


CONFLICTS = [
    ({"model_type": "full", "base_model_precision": "int8-quanto"},
     ("--base_model_precision int8-quanto", "--model_type full", "--model_type lora")),
    ({"model_type": "full", "train_text_encoder": "true", "text_encoder_1_precision": "int8-torchao",
      "learning_rate": 1e-5}, ("--train_text_encoder", "--text_encoder_1_precision int8-torchao")),
    ({"base_model_precision": "int4-torchao"}, ("--base_model_precision int4-torchao", "mslk", "device: cpu",
                                                "int4-quanto")),
    ({"base_model_precision": "int8-quanto", "quantize_activations": "true"},
     ("--quantize_activations", "int8-quanto", "backward", "int8-torchao")),
    ({"base_model_precision": "nf4-bnb", "quantize_activations": "true"}, ("--quantize_activations", "nf4-bnb")),
    ({"base_model_precision": "fp8-torchao", "quantize_activations": "true"},
     ("--quantize_activations", "fp8-torchao", "8.9", "device: cpu")),
    ({"quantize_activations": "true"}, ("--quantize_activations", "--base_model_precision")),
    ({"base_model_precision": "nf4-bnb", "quantize_via": "pipeline"},
     ("--quantize_via pipeline", "nf4-bnb", "device: cpu", "--quantize_via cpu")),
    ({"base_model_precision": "int8-quanto", "quantization_config": {"unet": {}}},
     ("--quantization_config", "--quantize_via cpu")),
    ({"base_model_precision": "int8-quanto", "quantize_via": "pipeline", "quantization_config": {"vae": {}}},
     ("--quantization_config", "'vae'")),
    ({"base_model_precision": "int8-quanto", "quantize_via": "pipeline",
      "quantization_config": {"unet": {"load_in_4bit": True}}}, ("'load_in_4bit'", "int8-quanto", "weights_dtype")),
    ({"base_model_precision": "int8-quanto", "quantize_via": "pipeline",
      "quantization_config": {"text_encoder": {"weights": "int4"}}}, ("'text_encoder'", "not quantized")),
    ({"base_model_precision": "int8-quanto", "quantize_via": "pipeline",
      "quantization_config": {"unet": {}, "transformer": {}}}, ("\"unet\" and \"transformer\"",)),
    ({"base_model_default_dtype": "bf16", "mixed_precision": "bf16"},
     ("--base_model_default_dtype bf16", "--base_model_precision")),
    ({"base_model_precision": "int8-torchao", "base_model_default_dtype": "bf16", "mixed_precision": "no"},
     ("--base_model_default_dtype bf16", "--mixed_precision no")),
    ({"base_model_precision": "int4-quanto", "base_model_default_dtype": "fp32", "mixed_precision": "bf16"},
     ("--base_model_default_dtype fp32", "int4-quanto", "autocast")),
    ({"base_model_precision": "int8-quanto", "lora_type": "lycoris", "lycoris_config": {"algo": "lokr"}},
     ("--lora_type lycoris", "bypass_mode")),
    ({"base_model_precision": "int8-quanto", "lora_init_type": "pissa"}, ("--lora_init_type pissa",)),
    ({"text_encoder_2_precision": "int8-quanto"}, ("--text_encoder_2_precision int8-quanto", "1 text encoder")),
]


@pytest.mark.parametrize("flags,expected", CONFLICTS, ids=[", ".join(f) for f, _ in CONFLICTS])
def test_combinations_that_cannot_run_fail_at_validation_with_the_reason(tmp_path, on_cpu, flags, expected):
    with pytest.raises(ConfigError) as caught:
        resolve(tmp_path, **flags)
    message = str(caught.value).replace("`", "")
    for fragment in expected:
        assert fragment.replace("`", "") in message, message


def test_accepted_combinations(tmp_path, on_cpu):
    resolve(tmp_path, base_model_precision="int8-torchao", quantize_activations="true")
    resolve(tmp_path, base_model_precision="nf4-bnb", mixed_precision="bf16", base_model_default_dtype="fp32")
    resolve(tmp_path, base_model_precision="int8-quanto", lora_type="lycoris",
            lycoris_config={"algo": "lokr", "bypass_mode": True})
    run = resolve(tmp_path, base_model_precision="int8-torchao", text_encoder_1_precision="nf4-bnb",
                  quantize_via="pipeline", quantization_config={"unet": {"modules_to_not_convert": ["conv_in"]},
                                                                "text_encoder": {"bnb_4bit_use_double_quant": False}})
    settings = rules.parse_quantization_config(run.config.quantization_config)
    assert rules.entry_for(settings, "denoiser") == {"modules_to_not_convert": ["conv_in"]}
    assert rules.entry_for(settings, "text_encoder") == {"bnb_4bit_use_double_quant": False}
    assert rules.entry_for({"text_encoder": {"a": 1}, "default": {"b": 2}}, "text_encoder_2") == {"a": 1}
    assert rules.entry_for({"default": {"b": 2}}, "denoiser") == {"b": 2}


def test_device_specific_refusals(tmp_path, monkeypatch):
    monkeypatch.setattr(rules, "machine_device", lambda: "cuda")
    monkeypatch.setattr(rules, "has_package", lambda module: module != "mslk")
    with pytest.raises(ConfigError, match="mslk"):
        resolve(tmp_path, base_model_precision="int4-torchao")
    monkeypatch.setattr(rules, "_cuda_capability", lambda: (8, 0))
    with pytest.raises(ConfigError, match="compute capability 8.0"):
        resolve(tmp_path, base_model_precision="fp8-torchao", quantize_activations="true")
    monkeypatch.setattr(rules, "_cuda_capability", lambda: (9, 0))
    resolve(tmp_path, base_model_precision="fp8-torchao", quantize_activations="true")
    resolve(tmp_path, base_model_precision="nf4-bnb", quantize_via="pipeline")
    monkeypatch.setattr(rules, "machine_device", lambda: "mps")
    for preset in ("fp8-quanto", "fp8uz-quanto", "fp8-torchao", "nf4-bnb"):
        with pytest.raises(ConfigError, match="MPS"):
            resolve(tmp_path, base_model_precision=preset)


def test_a_missing_backend_package_is_named(tmp_path, on_cpu, monkeypatch):
    monkeypatch.setattr(rules, "has_package", lambda module: module != "optimum.quanto")
    with pytest.raises(ConfigError, match="pip install optimum-quanto"):
        resolve(tmp_path, text_encoder_1_precision="int4-quanto")
    # torchao and bitsandbytes presets quantize their convolutions with quanto
    with pytest.raises(ConfigError, match="nf4-bnb` quantizes the convolutions.*pip install optimum-quanto"):
        resolve(tmp_path, base_model_precision="nf4-bnb")


def test_warnings(tmp_path, on_cpu):
    run = resolve(tmp_path, base_model_precision="int8-quanto", quantize_via="accelerator")
    assert any("no accelerator" in w for w in run.warnings)
    run = resolve(tmp_path, base_model_precision="fp8uz-quanto", quantize_via="pipeline")
    assert any("e4m3fn" in w for w in run.warnings)


def test_gguf_sources(tmp_path, on_cpu):
    with pytest.raises(ConfigError, match="holds the denoiser only"):
        resolve(tmp_path, pretrained_model_name_or_path=str(tmp_path / "model.gguf"))
    unet = tmp_path / "unet"
    unet.mkdir()
    (unet / "config.json").write_text("{}")
    (unet / "diffusion_pytorch_model.gguf").write_bytes(b"GGUF")
    resolve(tmp_path)  # a pipeline folder whose unet/ holds a .gguf
    with pytest.raises(ConfigError, match="quantized already"):
        resolve(tmp_path, base_model_precision="int8-quanto")
    with pytest.raises(ConfigError, match="in full"):
        resolve(tmp_path, model_type="full")
    with pytest.raises(ConfigError, match="cannot load the pixart_sigma denoiser"):
        resolve(tmp_path, model_family="pixart_sigma", pretrained_transformer_model_name_or_path="x.gguf")


def test_gguf_families_are_single_file_loadable_in_diffusers():
    from diffusers.loaders.single_file_model import SINGLE_FILE_LOADABLE_CLASSES

    assert set(rules.GGUF_DENOISERS.values()) <= set(SINGLE_FILE_LOADABLE_CLASSES)
    assert "PixArtTransformer2DModel" not in SINGLE_FILE_LOADABLE_CLASSES


def test_validation_imports_no_torch(tmp_path):
    dataset_list = write_minimal_dataset_list(tmp_path)
    code = (
        "import sys\n"
        "from simpletuner.options.resolve import resolve_run\n"
        f"resolve_run(['--model_family', 'sd1x', '--pretrained_model_name_or_path', {str(tmp_path)!r}, "
        f"'--output_dir', {str(tmp_path / 'out')!r}, '--data_backend_config', {str(dataset_list)!r}, "
        "'--max_train_steps', '3', '--model_type', 'lora', '--base_model_precision', 'nf4-bnb', "
        "'--text_encoder_1_precision', 'int8-quanto', '--quantize_via', 'pipeline', "
        "'--quantization_config', '{\"text_encoder\": {\"weights\": \"int4\"}}'], environ={})\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    # nf4-bnb through the pipeline needs a GPU: refused, without importing torch to find that out
    assert "ConfigError" in result.stderr and "nf4-bnb" in result.stderr, result.stderr[-2000:]
    code = code.replace("'nf4-bnb'", "'int8-torchao'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert result.stdout.strip() == "[]", result.stderr[-2000:]
