"""The LoRA key-layout converters and the SingLoRA layer, on small hand-built modules."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from simpletuner.models import lora_formats as formats  # noqa: E402


def toy_model() -> torch.nn.Module:
    """Module paths with dots and underscores, like a diffusers UNet's."""
    model = torch.nn.Module()
    model.down_blocks = torch.nn.ModuleList([torch.nn.Module()])
    model.down_blocks[0].attn1 = torch.nn.Module()
    model.down_blocks[0].attn1.to_q = torch.nn.Linear(8, 6)
    model.down_blocks[0].attn1.to_out = torch.nn.ModuleList([torch.nn.Linear(6, 8)])
    model.conv_in = torch.nn.Conv2d(3, 4, 3)
    return model


def peft_state(rank: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "down_blocks.0.attn1.to_q.lora_A.weight": torch.randn(rank, 8, generator=g),
        "down_blocks.0.attn1.to_q.lora_B.weight": torch.randn(6, rank, generator=g),
        "down_blocks.0.attn1.to_out.0.lora_A.weight": torch.randn(rank, 6, generator=g),
        "down_blocks.0.attn1.to_out.0.lora_B.weight": torch.randn(8, rank, generator=g),
    }


def test_kohya_names_are_module_paths_with_underscores_and_round_trip():
    model, state = toy_model(), peft_state()
    tensors = formats.peft_to_comfyui({"unet": state}, {"unet": 3.0}, formats.KOHYA_SD, {"unet": model})
    assert sorted(tensors) == [
        "lora_unet_down_blocks_0_attn1_to_out_0.alpha", "lora_unet_down_blocks_0_attn1_to_out_0.lora_down.weight",
        "lora_unet_down_blocks_0_attn1_to_out_0.lora_up.weight", "lora_unet_down_blocks_0_attn1_to_q.alpha",
        "lora_unet_down_blocks_0_attn1_to_q.lora_down.weight", "lora_unet_down_blocks_0_attn1_to_q.lora_up.weight",
    ]
    assert tensors["lora_unet_down_blocks_0_attn1_to_q.alpha"].item() == 3.0
    states, alphas = formats.comfyui_to_peft(tensors, formats.KOHYA_SD, {"unet": model})
    assert states["unet"].keys() == state.keys()
    assert all(torch.equal(states["unet"][k], state[k]) for k in state)
    assert alphas == {"unet": {"down_blocks.0.attn1.to_q": 3.0, "down_blocks.0.attn1.to_out.0": 3.0}}


def test_every_key_must_name_a_real_module_both_ways():
    model = toy_model()
    with pytest.raises(formats.LoraFormatError, match="not a module"):
        formats.peft_to_comfyui({"unet": {"nope.lora_A.weight": torch.zeros(2, 2)}}, {"unet": 1.0}, formats.KOHYA_SD,
                                {"unet": model})
    with pytest.raises(formats.LoraFormatError, match="name no module"):
        formats.comfyui_to_peft({"lora_unet_down_blocks_0_attn9_to_q.lora_down.weight": torch.zeros(2, 8)},
                                formats.KOHYA_SD, {"unet": model})
    with pytest.raises(formats.LoraFormatError, match="DoRA"):
        formats.peft_to_comfyui({"unet": {"conv_in.lora_magnitude_vector": torch.zeros(4)}}, {"unet": 1.0},
                                formats.KOHYA_SD, {"unet": model})


def test_dotted_naming_with_native_renames_round_trips():
    """The shape a family like Wan declares: native module names under ``diffusion_model.``."""
    naming = formats.ComfyNaming({"transformer": "diffusion_model"}, style="dotted",
                                 renames=(("attn1.to_q", "self_attn.q"), ("attn1.to_out.0", "self_attn.o")))
    model, state = toy_model(), peft_state()
    tensors = formats.peft_to_comfyui({"transformer": state}, {"transformer": 2.0}, naming, {"transformer": model})
    assert "diffusion_model.down_blocks.0.self_attn.q.lora_A.weight" in tensors
    assert "diffusion_model.down_blocks.0.self_attn.o.alpha" in tensors
    states, _ = formats.comfyui_to_peft(tensors, naming, {"transformer": model})
    assert all(torch.equal(states["transformer"][k], state[k]) for k in state)


def test_format_detection_and_header_reading(tmp_path):
    from safetensors.torch import save_file

    assert formats.detect_format(["unet.a.lora_A.weight"]) == "diffusers"
    assert formats.detect_format(["lora_unet_a.lora_down.weight", "lora_unet_a.alpha"]) == "comfyui"
    assert formats.detect_format(["lycoris_a.lokr_w1"]) == "lycoris"
    assert formats.detect_format(["lora_unet_a.hada_w1_a"]) == "lycoris"
    assert formats.detect_format(["lora_unet_a.lora_down.weight"], {formats.META_ADAPTER: "lycoris"}) == "lycoris"
    file = tmp_path / "x.safetensors"
    save_file({"lora_unet_a.lora_down.weight": torch.zeros(1)}, str(file), metadata={"k": "v"})
    assert formats.read_safetensors_header(file) == (["lora_unet_a.lora_down.weight"], {"k": "v"})
    (tmp_path / "bad.safetensors").write_bytes(b"\x05")
    with pytest.raises(formats.LoraFormatError, match="not a safetensors file"):
        formats.read_safetensors_header(tmp_path / "bad.safetensors")


@pytest.mark.parametrize("in_features,out_features", [(8, 6), (6, 8), (5, 5)])
def test_singlora_update_is_a_a_transposed_with_ramp(in_features, out_features):
    """ΔW = (α/r)·u(t)·A[:out]·A[:in]ᵀ with one A of max(in, out) rows; u(0) = 0 is the base model; the
    exported standard LoRA computes exactly what the layer computes; gradients reach A."""
    from peft import LoraConfig, inject_adapter_in_model

    from simpletuner.models.singlora import SingLoraLinear, ramp_schedule, set_ramp, singlora_to_lora

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(in_features, out_features))
    base = torch.nn.Sequential(torch.nn.Linear(in_features, out_features))
    base.load_state_dict(model.state_dict())
    config = LoraConfig(r=3, lora_alpha=6, target_modules=["0"], init_lora_weights=True)
    config._register_custom_module({torch.nn.Linear: SingLoraLinear})
    inject_adapter_in_model(config, model)
    layer = model[0]
    assert isinstance(layer, SingLoraLinear)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["0.lora_A.default.matrix"]
    step = [0]
    set_ramp(model, ramp_schedule(4, lambda: step[0]))
    x = torch.randn(5, in_features)
    assert torch.equal(model(x), base(x))  # u(0) = 0
    step[0] = 2
    a = layer.lora_A["default"].matrix.detach()
    delta = 2.0 * 0.5 * a[:out_features] @ a[:in_features].T
    assert torch.allclose(model(x) - base(x), x @ delta.T, atol=1e-5)
    exported = singlora_to_lora(model)
    lora = exported["0.lora_B.weight"] @ exported["0.lora_A.weight"] * 2.0
    assert torch.allclose(lora, delta, atol=1e-6)
    model(x).sum().backward()
    assert layer.lora_A["default"].matrix.grad is not None and layer.lora_A["default"].matrix.grad.abs().sum() > 0
