"""weight_breakdown: where a quantized model's bytes go (benchmarks/memory.py --breakdown). The parts
must add up to weight_bytes, and each part must hold what the format says: one byte per int8 weight,
half a byte per 4-bit weight, one bf16 scale per output row for quanto int8, a float32 scale and an
int8 zero point per row for torchao int8, and norms and biases left in bf16."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")

from simpletuner.models.quantize import quantize_module, weight_breakdown, weight_bytes  # noqa: E402

from tests.quantization.test_convolutions import CONVS, UNetish  # noqa: E402

LINEARS = ("proj", "out")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return UNetish().to(torch.bfloat16).eval()


def elements(model, names) -> int:
    return sum(getattr(model, name).weight.numel() for name in names)


def rows(model, names) -> int:
    return sum(getattr(model, name).weight.shape[0] for name in names)


def biases(model, names) -> int:
    return sum(2 * getattr(model, name).bias.numel() for name in names)


def test_unquantized_model_is_all_high_precision(model):
    parts = weight_breakdown(model)
    assert sum(parts.values()) == weight_bytes(model)
    assert parts[("Linear", "unquantized weights")] == 2 * elements(model, LINEARS)
    assert parts[("Conv2d", "unquantized weights")] == 2 * elements(model, CONVS)
    assert parts[("norm", "unquantized weights")] == parts[("norm", "biases")] == 2 * 128
    assert not [key for key in parts if key[1] in ("quantized data", "scales and offsets")]


@pytest.mark.parametrize("preset, data_per_weight, linear_scale_bytes_per_row", [
    ("int8-quanto", 1, 2),  # bf16 scale per row
    ("int8-torchao", 1, 4 + 1),  # float32 scale + int8 zero point per row
])
def test_int8_parts_hold_what_the_format_says(model, preset, data_per_weight, linear_scale_bytes_per_row):
    quantized = copy.deepcopy(model)
    quantize_module(quantized, preset)
    parts = weight_breakdown(quantized)
    assert sum(parts.values()) == weight_bytes(quantized)
    assert parts[("Linear", "quantized data")] == data_per_weight * elements(model, LINEARS)
    assert parts[("Linear", "scales and offsets")] == linear_scale_bytes_per_row * rows(model, LINEARS)
    # convolutions too (quanto int8, per-output-channel bf16 scale), none left in bf16
    assert parts[("Conv2d", "quantized data")] == elements(model, CONVS)
    assert parts[("Conv2d", "scales and offsets")] == 2 * rows(model, CONVS)
    assert ("Conv2d", "unquantized weights") not in parts and ("Linear", "unquantized weights") not in parts
    # what stays high precision: norms and biases, byte for byte as before
    assert parts[("norm", "unquantized weights")] == parts[("norm", "biases")] == 2 * 128
    assert parts[("Linear", "biases")] == biases(model, LINEARS)
    assert parts[("Conv2d", "biases")] == biases(model, CONVS)


def test_nf4_packs_two_weights_a_byte_plus_block_statistics(model):
    quantized = copy.deepcopy(model)
    quantize_module(quantized, "nf4-bnb")
    parts = weight_breakdown(quantized)
    assert sum(parts.values()) == weight_bytes(quantized)
    assert parts[("Linear", "quantized data")] == elements(model, LINEARS) // 2
    # an absmax byte per block of 64 (double quantization), plus small per-layer tables: a few percent
    overhead = parts[("Linear", "scales and offsets")]
    assert elements(model, LINEARS) // 64 <= overhead < 0.3 * parts[("Linear", "quantized data")]
    assert parts[("Conv2d", "quantized data")] == elements(model, CONVS) // 2  # quanto int4
    assert ("Conv2d", "unquantized weights") not in parts
