"""Quantizing loaded modules: each preset really replaces the linears, shrinks the stored weights,
keeps the outputs close, and leaves a PEFT LoRA on top as the only thing with gradients."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")

from simpletuner.models.quantize import quantize_module, quantized_layers, tensor_bytes, weight_bytes  # noqa: E402

CPU_PRESETS = ("int8-quanto", "int4-quanto", "int2-quanto", "fp8-quanto", "fp8uz-quanto", "int8-torchao",
               "fp8-torchao", "nf4-bnb")


class Block(torch.nn.Module):
    """Two linears and a norm: shaped like a transformer MLP, wide enough for 128-wide groups."""

    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(256)
        self.up = torch.nn.Linear(256, 512)
        self.down = torch.nn.Linear(512, 256)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


@pytest.fixture(scope="module")
def block():
    torch.manual_seed(0)
    return Block().eval()


def weight_kind(layer) -> tuple[str, str]:
    return type(layer).__name__, type(layer.weight).__name__


EXPECTED = {
    "int8-quanto": (("QLinear", "WeightQBytesTensor"), 0.30),
    "int4-quanto": (("QLinear", "WeightQBitsTensor"), 0.20),
    "int2-quanto": (("QLinear", "WeightQBitsTensor"), 0.15),
    "fp8-quanto": (("QLinear", "WeightQBytesTensor"), 0.30),
    "fp8uz-quanto": (("QLinear", "WeightQBytesTensor"), 0.30),
    "int8-torchao": (("Linear", "Int8Tensor"), 0.30),
    "fp8-torchao": (("Linear", "Float8Tensor"), 0.30),
    "nf4-bnb": (("Linear4bit", "Params4bit"), 0.20),
}


@pytest.mark.parametrize("preset", CPU_PRESETS)
def test_each_preset_quantizes_the_linears_and_trains_a_lora_on_top(block, preset):
    from peft import LoraConfig, inject_adapter_in_model

    model = copy.deepcopy(block)
    before = weight_bytes(model)
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(x)
    quantize_module(model, preset)
    (kind, ratio) = EXPECTED[preset]
    assert weight_kind(model.up) == kind and weight_kind(model.down) == kind
    assert quantized_layers(model) == 2
    assert weight_bytes(model) <= ratio * before, (weight_bytes(model), before)
    with torch.no_grad():
        error = (model(x) - reference).abs().mean() / reference.abs().mean()
    assert error < (0.6 if preset == "int2-quanto" else 0.15), float(error)

    inject_adapter_in_model(LoraConfig(r=4, target_modules=["up", "down"], init_lora_weights="gaussian"), model)
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
    model(x).pow(2).mean().backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all("lora_" in name for name in with_grad)
    assert all(not p.requires_grad for name, p in model.named_parameters() if "lora_" not in name)
    lora_b = model.up.lora_B["default"].weight
    assert lora_b.grad is not None and torch.isfinite(lora_b.grad).all()


def test_bitsandbytes_weights_are_packed_nf4(block):
    model = copy.deepcopy(block)
    quantize_module(model, "nf4-bnb")
    weight = model.up.weight
    assert weight.dtype == torch.uint8 and weight.quant_type == "nf4" and weight.bnb_quantized
    assert weight.numel() == 256 * 512 // 2  # two 4-bit values per byte
    assert tensor_bytes(weight) > weight.numel()  # plus the per-block scales


def test_default_dtype_casts_what_the_quantizer_leaves(block):
    model = copy.deepcopy(block)
    quantize_module(model, "int8-torchao", dtype=torch.bfloat16)
    assert model.norm.weight.dtype == torch.bfloat16 and model.up.bias.dtype == torch.bfloat16


def test_modules_to_not_convert_are_left_alone(block):
    model = copy.deepcopy(block)
    quantize_module(model, "int8-torchao", overrides={"modules_to_not_convert": ["down"]})
    assert type(model.down.weight) is torch.nn.Parameter and type(model.up.weight).__name__ == "Int8Tensor"
    model = copy.deepcopy(block)
    quantize_module(model, "int8-quanto", via="accelerator", overrides={"modules_to_not_convert": ["down"]})
    assert type(model.down).__name__ == "Linear" and type(model.up).__name__ == "QLinear"


def test_torchao_activation_variant(block):
    model = copy.deepcopy(block)
    quantize_module(model, "int8-torchao", activations=True)
    assert model.up.weight.act_quant_kwargs is not None  # int8 activations quantized per token on the fly


def test_quanto_layers_accept_inputs_that_are_not_contiguous(block):
    """quanto's int8 CPU matmul rejects a permuted input, as SDXL-style UNets (use_linear_projection)
    hand their proj_in; the pre-hook makes it contiguous."""
    model = copy.deepcopy(block)
    quantize_module(model, "int8-quanto", dtype=torch.bfloat16)  # the int8 kernel quanto uses for bf16
    x = torch.randn(256, 4, generator=torch.Generator().manual_seed(2)).bfloat16().t()
    assert not x.is_contiguous()
    with torch.no_grad():
        assert torch.isfinite(model.up(x)).all()
        model.up._forward_pre_hooks.clear()
        with pytest.raises(RuntimeError, match="contiguous"):
            model.up(x)
