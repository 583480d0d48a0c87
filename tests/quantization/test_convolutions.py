"""Convolutions under presets whose library cannot quantize them (torchao: no convolution op;
bitsandbytes: no 4-bit convolution): after the Linear pass they are quantized with optimum-quanto at
the preset's precision, honour the same skip lists, stay close to the original, shrink by what their
bits say, and take a PEFT LoRA or a LyCORIS LoCon on top."""

from __future__ import annotations

import copy
import logging

import pytest

torch = pytest.importorskip("torch")

from simpletuner.models.quantize import (  # noqa: E402
    convolution_settings,
    quantize_module,
    quantized_layers,
    weight_bytes,
)
from simpletuner.testing.config import make_config  # noqa: E402

#: preset -> (quanto weight type of its convolutions, type of its linears' weights, largest relative error)
CONV_PRESETS = {
    "int8-torchao": ("qint8", "Int8Tensor", 0.02),
    "fp8-torchao": ("qfloat8_e4m3fn", "Float8Tensor", 0.08),
    "nf4-bnb": ("qint4", "Params4bit", 0.15),
}
CONVS = ("conv_in", "conv1", "conv2", "conv_out")


class UNetish(torch.nn.Module):
    """A resnet-style pair of 3x3 convolutions between conv_in and conv_out, with a linear
    feed-forward over the pixels in between: most weights in convolutions, as in SD 1.x's UNet."""

    def __init__(self):
        super().__init__()
        self.conv_in = torch.nn.Conv2d(4, 64, 3, padding=1)
        self.conv1 = torch.nn.Conv2d(64, 128, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(128, 128, 3, padding=1)
        self.norm = torch.nn.GroupNorm(8, 128)
        self.proj = torch.nn.Linear(128, 256)
        self.out = torch.nn.Linear(256, 128)
        self.conv_out = torch.nn.Conv2d(128, 4, 3, padding=1)

    def forward(self, x):
        h = self.conv2(torch.nn.functional.silu(self.conv1(self.conv_in(x))))
        h = self.norm(h)
        tokens = self.out(torch.nn.functional.gelu(self.proj(h.flatten(2).transpose(1, 2))))
        return self.conv_out(h + tokens.transpose(1, 2).reshape(h.shape))


@pytest.fixture(scope="module")
def unetish():
    torch.manual_seed(0)
    return UNetish().eval()


@pytest.fixture(scope="module")
def sample():
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))


def conv_elements(model) -> int:
    return sum(getattr(model, name).weight.numel() for name in CONVS)


@pytest.mark.parametrize("preset", list(CONV_PRESETS))
def test_convolutions_are_quantized_with_quanto_after_the_linears(unetish, sample, preset, caplog):
    from optimum.quanto.nn import QConv2d

    qtype, linear_weight, tolerance = CONV_PRESETS[preset]
    with torch.no_grad():
        reference = unetish(sample)
    linears_only = copy.deepcopy(unetish)
    quantize_module(linears_only, preset, convolutions=False)
    assert all(type(getattr(linears_only, name)) is torch.nn.Conv2d for name in CONVS)
    model = copy.deepcopy(unetish)
    with caplog.at_level(logging.INFO, logger="simpletuner.models.quantize"):
        quantize_module(model, preset)

    for name in CONVS:
        layer = getattr(model, name)
        assert isinstance(layer, QConv2d) and layer.weight.qtype.name == qtype, name
        assert not layer.weight.requires_grad
    assert type(model.proj.weight).__name__ == linear_weight  # the Linear pass is the library's own
    assert type(model.norm.weight) is torch.nn.Parameter
    assert quantized_layers(model) == len(CONVS) + 2 == quantized_layers(linears_only) + len(CONVS)
    share = conv_elements(unetish) / sum(p.numel() for p in unetish.parameters())
    assert f"{len(CONVS)} convolutions ({100 * share:.1f}% of the weights) quantized with optimum-quanto" in caplog.text

    # the fp32 convolutions shrink to the preset's bits per weight, plus quanto's scales (< 4% here)
    saved = weight_bytes(linears_only) - weight_bytes(model)
    bits = 4 if qtype == "qint4" else 8
    expected = conv_elements(unetish) * (4 - bits / 8)
    assert 0.96 * expected <= saved <= expected, (saved, expected)
    with torch.no_grad():
        error = (model(sample) - reference).abs().mean() / reference.abs().mean()
    assert error < tolerance, float(error)


def test_skip_listed_convolutions_stay_plain(unetish):
    model = copy.deepcopy(unetish)
    quantize_module(model, "int8-torchao", overrides={"modules_to_not_convert": ["conv_out", "proj"]})
    assert type(model.conv_out) is torch.nn.Conv2d and type(model.conv_out.weight) is torch.nn.Parameter
    assert type(model.proj.weight) is torch.nn.Parameter  # the same list the Linear pass honours
    assert type(model.conv1).__name__ == "QConv2d" and type(model.conv1.weight).__name__ == "WeightQBytesTensor"
    model = copy.deepcopy(unetish)
    quantize_module(model, "nf4-bnb", overrides={"llm_int8_skip_modules": ["conv_in"]})
    assert type(model.conv_in) is torch.nn.Conv2d
    assert type(model.conv2.weight).__name__ == "WeightQBitsTensor"


def test_convolutions_follow_the_autocast_type(unetish, sample):
    """--base_model_default_dtype fp32 with --mixed_precision bf16: quanto's weights cannot be cast by
    autocast, so the convolutions are held in bf16 while the rest of the unquantized weights stay fp32."""
    config = make_config(mixed_precision="bf16")
    model = copy.deepcopy(unetish)
    quantize_module(model, "int8-torchao", dtype=torch.float32, **convolution_settings(config))
    assert model.conv1.weight.dtype == torch.bfloat16 and model.norm.weight.dtype == torch.float32
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(model(sample).float()).all()
    assert convolution_settings(make_config(mixed_precision="no")) == {"convolutions": True, "conv_dtype": None}
    # fp16 keeps fp32 weights under fp16 autocast and validates without autocast: no quanto type fits both
    assert convolution_settings(make_config(mixed_precision="fp16"))["convolutions"] is False


@pytest.mark.parametrize("preset", ["int8-torchao", "nf4-bnb", "int8-quanto"])
def test_a_lora_on_quantized_convolutions_trains(unetish, sample, preset):
    """PEFT builds a convolution's LoRA factors as ``type(base_layer)(...)``; on a quanto QConv2d that
    gave weightless QConv2d factors. They are plain convolutions, and the adapter saves as usual."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    model = copy.deepcopy(unetish)
    quantize_module(model, preset)
    inject_adapter_in_model(LoraConfig(r=4, target_modules=["proj", "conv1", "conv_out"], init_lora_weights="gaussian"),
                            model)
    assert type(model.conv1.lora_A["default"]) is torch.nn.Conv2d
    assert type(model.conv1.lora_B["default"]) is torch.nn.Conv2d
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
    model.train()
    model(sample).pow(2).mean().backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    assert {"conv1.lora_A.default.weight", "conv_out.lora_B.default.weight"} <= with_grad
    assert all("lora_" in name for name in with_grad)
    assert sorted(get_peft_model_state_dict(model)) == sorted(
        f"{layer}.lora_{factor}.weight" for layer in ("proj", "conv1", "conv_out") for factor in "AB")


def test_lycoris_locon_still_adapts_the_convolutions(unetish, sample):
    """LyCORIS picks layers by class name; told about the quantized subclasses (as the trainer's
    adapter does), a LoCon adapts the convolutions a torchao preset now quantizes as it did in bf16."""
    from lycoris import LycorisNetwork, create_lycoris

    from simpletuner.training.adapter import _reset_lycoris_presets, match_quantized_layers

    counts = {}
    for preset in (None, "int8-torchao"):
        model = copy.deepcopy(unetish)
        if preset:
            quantize_module(model, preset)
        model.requires_grad_(False)
        _reset_lycoris_presets()
        match_quantized_layers(LycorisNetwork, model)
        network = create_lycoris(model, 1.0, linear_dim=4, linear_alpha=1, algo="locon", conv_dim=4, conv_alpha=1,
                                 bypass_mode=True, warn_on_unmatched=False)
        counts[preset] = sum(isinstance(lora.org_module[0], torch.nn.Conv2d) for lora in network.loras)
        network.apply_to()
        model.train()
        model(sample).pow(2).mean().backward()
        assert all(p.grad is not None for p in network.parameters() if p.requires_grad)
    assert counts == {None: len(CONVS), "int8-torchao": len(CONVS)}
