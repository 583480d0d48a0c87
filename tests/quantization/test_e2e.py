"""Three LoRA steps through the real trainer on every quantized base the CPU can run: finite losses,
gradients only on the adapter, the base's linears really quantized, and a saved LoRA that loads into
the unquantized diffusers pipeline."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from simpletuner.training.trainer import Trainer, train  # noqa: E402
from tests.quantization.conftest import run_config  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

#: preset -> (layer type, weight type) of a quantized UNet linear (the PEFT base layer)
LAYERS = {
    "int8-quanto": ("QLinear", "WeightQBytesTensor"),
    "int4-quanto": ("QLinear", "WeightQBitsTensor"),
    "int2-quanto": ("QLinear", "WeightQBitsTensor"),
    "fp8-quanto": ("QLinear", "WeightQBytesTensor"),
    "fp8uz-quanto": ("QLinear", "WeightQBytesTensor"),
    "int8-torchao": ("Linear", "Int8Tensor"),
    "fp8-torchao": ("Linear", "Float8Tensor"),
    "nf4-bnb": ("Linear4bit", "Params4bit"),
}
QUANTO_QTYPES = {"int8-quanto": "qint8", "int4-quanto": "qint4", "int2-quanto": "qint2", "fp8-quanto": "qfloat8_e4m3fn",
                 "fp8uz-quanto": "qfloat8_e4m3fnuz"}
#: the quanto type of the UNet's convolutions: the quanto preset's own, else the one quanto gives them
#: at the precision of a library that has no quantized convolution
CONV_QTYPES = {**QUANTO_QTYPES, "int8-torchao": "qint8", "fp8-torchao": "qfloat8_e4m3fn", "nf4-bnb": "qint4"}


def train_and_watch(config, monkeypatch):
    """Train; returns the trainer and the adapter weights right after setup."""
    seen = {}
    original_setup = Trainer.setup

    def setup_and_snapshot(self):
        original_setup(self)
        seen["lora"] = {n: p.detach().clone() for n, p in self._unwrapped_denoiser().named_parameters()
                        if "lora_" in n}

    monkeypatch.setattr(Trainer, "setup", setup_and_snapshot)
    return train(config, show_progress=False), seen


def base_linear(trainer):
    layer = trainer._unwrapped_denoiser().down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
    return layer.base_layer if hasattr(layer, "base_layer") else layer


def check_convolutions(trainer, preset):
    """Every convolution of the UNet is a frozen quanto QConv2d, whichever library did the linears."""
    from optimum.quanto.nn import QConv2d

    convs = [m for name, m in trainer._unwrapped_denoiser().named_modules()
             if isinstance(m, torch.nn.Conv2d) and "lora_" not in name]
    assert convs and all(isinstance(m, QConv2d) for m in convs)
    assert {m.weight.qtype.name for m in convs} == {CONV_QTYPES[preset]}


def check_adapter_only(trainer, seen):
    assert len(trainer.state.losses) == 3 and all(math.isfinite(loss) for loss in trainer.state.losses)
    denoiser = trainer._unwrapped_denoiser()
    trainable = {n for n, p in denoiser.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.grad is None for n, p in denoiser.named_parameters() if "lora_" not in n)
    moved = [n for n, p in denoiser.named_parameters() if "lora_" in n and not torch.equal(seen["lora"][n], p.detach())]
    assert moved


def check_loads_unquantized(trainer, model_folder):
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    pipeline = StableDiffusionPipeline.from_pretrained(model_folder, safety_checker=None)
    pipeline.load_lora_weights(str(trainer.output_dir / "pytorch_lora_weights.safetensors"))
    loaded = get_peft_model_state_dict(pipeline.unet, adapter_name=next(iter(pipeline.unet.peft_config)))
    trained = get_peft_model_state_dict(trainer._unwrapped_denoiser())
    assert loaded.keys() == trained.keys() and loaded
    assert all(torch.equal(loaded[k].float(), trained[k].float()) for k in loaded)
    assert all(type(m.weight) is torch.nn.Parameter for m in pipeline.unet.modules() if type(m) is torch.nn.Linear)


@pytest.mark.parametrize("preset", list(LAYERS))
def test_lora_trains_on_a_quantized_base(project, tiny_sd1x, monkeypatch, preset):
    config = run_config(project, tiny_sd1x, f"run-{preset}", base_model_precision=preset)
    trainer, seen = train_and_watch(config, monkeypatch)
    check_adapter_only(trainer, seen)
    layer = base_linear(trainer)
    assert (type(layer).__name__, type(layer.weight).__name__) == LAYERS[preset]
    if preset in QUANTO_QTYPES:
        assert layer.weight.qtype.name == QUANTO_QTYPES[preset]
    elif preset == "nf4-bnb":
        assert layer.weight.dtype == torch.uint8 and layer.weight.quant_type == "nf4"
    elif preset == "int8-torchao":
        assert layer.weight.qdata.dtype == torch.int8
    else:
        assert layer.weight.qdata.dtype == torch.float8_e4m3fn
    assert trainer.model.quantization == {"unet": f"{preset} (cpu)"}
    check_convolutions(trainer, preset)
    check_loads_unquantized(trainer, tiny_sd1x)


def test_pipeline_route_with_quantized_text_encoder_and_bf16(project, tiny_sd1x, monkeypatch):
    config = run_config(project, tiny_sd1x, "run-pipeline", base_model_precision="int8-quanto",
                        text_encoder_1_precision="int8-torchao", quantize_via="pipeline", mixed_precision="bf16")
    trainer, seen = train_and_watch(config, monkeypatch)
    check_adapter_only(trainer, seen)
    assert trainer.model.quantization == {"unet": "int8-quanto (pipeline)", "text_encoder": "int8-torchao (pipeline)"}
    assert type(base_linear(trainer)).__name__ == "QLinear"
    check_convolutions(trainer, "int8-quanto")  # diffusers' QuantoConfig does linears; quanto convs after loading
    check_loads_unquantized(trainer, tiny_sd1x)


def test_gguf_base(project, tiny_sd1x, monkeypatch, tmp_path_factory):
    from simpletuner.testing.gguf import make_gguf_pipeline_folder

    folder = make_gguf_pipeline_folder(tiny_sd1x, tmp_path_factory.mktemp("gguf") / "model", quant_type="Q4_0")
    config = run_config(project, folder, "run-gguf")
    trainer, seen = train_and_watch(config, monkeypatch)
    check_adapter_only(trainer, seen)
    assert type(base_linear(trainer).weight).__name__ == "GGUFParameter"
    check_loads_unquantized(trainer, tiny_sd1x)


LYCORIS_BYPASS = '{"algo": "lokr", "linear_dim": 4, "conv_dim": 4, "factor": 4, "bypass_mode": true}'


@pytest.mark.parametrize("precision,conv_type", [("int8-torchao", "qint8"), ("int8-quanto", "qint8"),
                                                 ("nf4-bnb", "qint4")])
def test_lycoris_in_bypass_mode_adapts_the_same_layers_on_a_quantized_base(project, tiny_sd1x, precision, conv_type):
    def adapted(trainer):
        return sorted(lora.lora_name for lora in trainer.adapter.network.loras)

    plain = train(run_config(project, tiny_sd1x, "run-lycoris-plain", lora_type="lycoris",
                             lycoris_config=LYCORIS_BYPASS, lora_rank=None, lora_dropout=None), show_progress=False)
    config = run_config(project, tiny_sd1x, f"run-lycoris-{precision}", base_model_precision=precision,
                        lora_type="lycoris", lycoris_config=LYCORIS_BYPASS, lora_rank=None, lora_dropout=None)
    trainer = train(config, show_progress=False)
    assert all(math.isfinite(loss) for loss in trainer.state.losses)
    trainable = {n for n, p in trainer._unwrapped_denoiser().named_parameters() if p.requires_grad}
    assert trainable and all("lycoris" in n or "lokr" in n for n in trainable)
    # quantized Linear and Conv2d subclasses (QLinear, Linear4bit, QConv2d) are found like plain ones
    assert adapted(trainer) == adapted(plain)
    assert any(getattr(getattr(lora.org_module[0], "weight", None), "qtype", None) is not None
               and lora.org_module[0].weight.qtype.name == conv_type and "conv" in lora.lora_name.lower()
               for lora in trainer.adapter.network.loras)


def test_slider_lora_on_the_quantized_convolutions_of_a_bnb_base(project, tiny_sd1x, monkeypatch):
    """The slider targets include conv_in/conv_out, which nf4-bnb leaves to quanto: PEFT's factors on
    them are plain convolutions, and the saved LoRA loads into the unquantized pipeline. Under bf16
    autocast with fp32 unquantized weights the quanto convolutions are held in bf16, through training
    and a validation pass."""
    config = run_config(project, tiny_sd1x, "run-slider", base_model_precision="nf4-bnb", slider_lora_target="true",
                        mixed_precision="bf16", base_model_default_dtype="fp32", validation_prompt="a red circle",
                        validation_steps=3, validation_num_inference_steps=2)
    trainer, seen = train_and_watch(config, monkeypatch)
    check_adapter_only(trainer, seen)
    unet = trainer._unwrapped_denoiser()
    assert unet.conv_in.base_layer.weight.qtype.name == "qint4" and unet.conv_in.base_layer.weight.dtype == torch.bfloat16
    assert unet.conv_norm_out.weight.dtype == torch.float32  # --base_model_default_dtype for what stays unquantized
    assert type(unet.conv_in.lora_A["default"]) is torch.nn.Conv2d
    assert list((trainer.output_dir / "validation" / "step_3").glob("*.png"))
    check_loads_unquantized(trainer, tiny_sd1x)


def test_text_encoder_lora_on_a_quantized_text_encoder(project, tiny_sd1x, monkeypatch):
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    config = run_config(project, tiny_sd1x, "run-te", text_encoder_1_precision="nf4-bnb", train_text_encoder="true")
    trainer = train(config, show_progress=False)
    assert all(math.isfinite(loss) for loss in trainer.state.losses)
    encoder = trainer.model.text_encoder
    assert type(encoder.encoder.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    trainable = {n for n, p in encoder.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd1x, safety_checker=None)
    pipeline.load_lora_weights(str(trainer.output_dir / "pytorch_lora_weights.safetensors"))
    loaded = get_peft_model_state_dict(pipeline.text_encoder, adapter_name=next(iter(pipeline.text_encoder.peft_config)))
    trained = get_peft_model_state_dict(encoder)
    assert loaded and loaded.keys() == trained.keys()
    assert all(torch.equal(loaded[k].float(), trained[k].float()) for k in loaded)
