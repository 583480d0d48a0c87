"""Loading a family quantized: through diffusers/transformers at load time (--quantize_via pipeline)
and from a GGUF denoiser, via the family contract only (the sd1x family file knows nothing of it)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from simpletuner.models.quantize import QuantizationError, load_model, quantized_layers  # noqa: E402
from tests.quantization.conftest import run_config  # noqa: E402


def loaded(project, model_folder, **flags):
    from simpletuner.models.sd1x import StableDiffusion1x

    config = run_config(project, model_folder, "unused", **flags)
    dtype = torch.bfloat16 if config.mixed_precision == "bf16" else torch.float32
    model = StableDiffusion1x(config, torch.device("cpu"), dtype)
    return model, load_model(model, config)


def to_q(model):
    return model.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q


def test_pipeline_quantizes_while_loading_and_restores_the_loaders(project, tiny_sd1x):
    import diffusers
    import transformers

    originals = (diffusers.ModelMixin.__dict__["from_pretrained"], transformers.PreTrainedModel.__dict__["from_pretrained"])
    model, done = loaded(project, tiny_sd1x, base_model_precision="int8-torchao", text_encoder_1_precision="int8-quanto",
                         quantize_via="pipeline", mixed_precision="bf16",
                         quantization_config='{"unet": {"modules_to_not_convert": ["time_embedding", "conv_out"]}}')
    assert done == {"unet": "int8-torchao (pipeline)", "text_encoder": "int8-quanto (pipeline)"}
    assert getattr(model.unet, "is_quantized", False) and model.unet.hf_quantizer is not None  # diffusers did it
    assert type(to_q(model).weight).__name__ == "Int8Tensor"
    assert type(model.unet.time_embedding.linear_1.weight) is torch.nn.Parameter  # the entry's exclusion
    # diffusers' TorchAoConfig quantizes linears only; the convolutions get quanto's int8 after loading
    assert model.unet.conv_in.weight.qtype.name == "qint8" and type(model.unet.conv_in).__name__ == "QConv2d"
    assert type(model.unet.conv_out) is torch.nn.Conv2d  # excluded like the linears
    assert type(model.text_encoder.encoder.layers[0].self_attn.q_proj).__name__ == "QLinear"
    assert model.unet.conv_in.weight.dtype == torch.bfloat16  # loaded in the compute type
    assert "to" not in model.unet.__dict__ and "to" not in model.text_encoder.__dict__  # no patched instances
    assert (diffusers.ModelMixin.__dict__["from_pretrained"], transformers.PreTrainedModel.__dict__["from_pretrained"]) \
        == originals
    assert model.denoiser is model.unet
    with torch.no_grad():
        embeds = model.encode_prompts(["a red circle"])["prompt_embeds"]
        out = model.predict(torch.randn(1, 4, 8, 8, dtype=torch.bfloat16), torch.tensor([10]),
                            {"prompt_embeds": embeds})
    assert torch.isfinite(out.float()).all()


def test_cpu_route_quantizes_after_loading(project, tiny_sd1x):
    model, done = loaded(project, tiny_sd1x, base_model_precision="int4-quanto", text_encoder_1_precision="nf4-bnb")
    assert done == {"unet": "int4-quanto (cpu)", "text_encoder": "nf4-bnb (cpu)"}
    assert type(to_q(model)).__name__ == "QLinear" and not getattr(model.unet, "is_quantized", False)
    assert quantized_layers(model.text_encoder) == 12
    assert all(not p.requires_grad for p in model.unet.parameters())


def test_gguf_denoiser_folder_loads_quantized_and_close_to_the_original(project, tiny_sd1x, tmp_path):
    from diffusers import UNet2DConditionModel

    from simpletuner.testing.gguf import make_gguf_pipeline_folder

    folder = make_gguf_pipeline_folder(tiny_sd1x, tmp_path / "gguf-model")
    model, done = loaded(project, folder)
    assert done == {"unet": "gguf (diffusion_pytorch_model.gguf)"}
    weight = to_q(model).weight
    assert type(weight).__name__ == "GGUFParameter" and weight.dtype == torch.uint8
    assert int(weight.quant_type) == 8  # GGMLQuantizationType.Q8_0
    original = UNet2DConditionModel.from_pretrained(tiny_sd1x, subfolder="unet")
    inputs = (torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 700]))
    text = torch.randn(2, 77, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = original(*inputs, encoder_hidden_states=text).sample
        got = model.unet(*inputs, encoder_hidden_states=text).sample
    assert ((got - expected).abs().mean() / expected.abs().mean()) < 0.05


def test_gguf_override_file_goes_through_from_single_file(project, tiny_sd1x, tmp_path):
    """The `.gguf` given as the denoiser's own path (what --pretrained_transformer_model_name_or_path
    holds for Flux/SD3): loading the denoiser from that file goes to diffusers' GGUF loader."""
    from diffusers import UNet2DConditionModel

    from simpletuner.models.quantize import QuantizedLoading
    from simpletuner.models.sd1x import StableDiffusion1x
    from simpletuner.testing.gguf import write_denoiser_gguf

    file = write_denoiser_gguf(UNet2DConditionModel.from_pretrained(tiny_sd1x, subfolder="unet"), tmp_path / "u.gguf",
                               quant_type="Q4_0")
    config = run_config(project, tiny_sd1x, "unused")
    family = StableDiffusion1x(config, torch.device("cpu"), torch.float32)
    family.loading = loading = QuantizedLoading(config, {}, {})
    unet = family.load_denoiser(UNet2DConditionModel, str(file), subfolder="unet")
    assert type(unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q.weight).__name__ == "GGUFParameter"
    assert loading.done == {"denoiser": "gguf (u.gguf)"}
    loading.done.clear()  # the same file asked for as a single-file checkpoint goes the same way
    unet = family.load_single_file_component("denoiser", UNet2DConditionModel, str(file), config=str(tiny_sd1x),
                                             subfolder="unet")
    assert type(unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q.weight).__name__ == "GGUFParameter"
    assert loading.done == {"denoiser": "gguf (u.gguf)"}


def library_loaders():
    import diffusers
    import transformers
    from diffusers.loaders.single_file_model import FromOriginalModelMixin

    return (diffusers.ModelMixin.__dict__["from_pretrained"], transformers.PreTrainedModel.__dict__["from_pretrained"],
            FromOriginalModelMixin.__dict__["from_single_file"])


def probing_family(on_first_load=None):
    """sd1x recording the library loaders each time it loads a component (and running
    ``on_first_load`` in the middle of its own loading, once)."""
    from simpletuner.models.sd1x import StableDiffusion1x

    class Probe(StableDiffusion1x):
        seen: list = []

        def load_component(self, role, model_class, path, **kwargs):
            self.seen.append(library_loaders())
            if on_first_load is not None and len(self.seen) == 1:
                on_first_load()
            return super().load_component(role, model_class, path, **kwargs)

    return Probe


@pytest.mark.parametrize("how", ["pipeline", "gguf"])
def test_quantized_loading_never_patches_the_library_loaders(project, tiny_sd1x, tmp_path, how):
    from simpletuner.testing.gguf import make_gguf_pipeline_folder

    before = library_loaders()
    if how == "gguf":
        folder, flags = make_gguf_pipeline_folder(tiny_sd1x, tmp_path / "gguf-model"), {}
    else:
        folder, flags = tiny_sd1x, dict(base_model_precision="int8-quanto", text_encoder_1_precision="int8-quanto",
                                        quantize_via="pipeline")
    config = run_config(project, folder, "unused", **flags)
    family = probing_family()
    model = family(config, torch.device("cpu"), torch.float32)
    done = load_model(model, config)
    assert done["unet"] == ("gguf (diffusion_pytorch_model.gguf)" if how == "gguf" else "int8-quanto (pipeline)")
    assert len(family.seen) >= 3 and all(seen == before for seen in family.seen)  # during loading too
    assert library_loaders() == before


def test_a_model_loaded_while_another_loads_quantized_stays_unquantized(project, tiny_sd1x):
    """Quantized loading belongs to the model being loaded: a plain model loaded in the middle of
    it, in the same process, gets full-precision components."""
    from simpletuner.models.sd1x import StableDiffusion1x

    plain_config = run_config(project, tiny_sd1x, "unused")
    plain = StableDiffusion1x(plain_config, torch.device("cpu"), torch.float32)
    family = probing_family(on_first_load=lambda: load_model(plain, plain_config))
    config = run_config(project, tiny_sd1x, "unused", base_model_precision="int8-quanto",
                        text_encoder_1_precision="int8-quanto", quantize_via="pipeline")
    quantized = family(config, torch.device("cpu"), torch.float32)
    assert load_model(quantized, config) == {"unet": "int8-quanto (pipeline)", "text_encoder": "int8-quanto (pipeline)"}
    assert quantized_layers(quantized.unet) > 0 and quantized_layers(quantized.text_encoder) > 0
    assert plain.quantization == {}
    assert quantized_layers(plain.unet) == 0 and quantized_layers(plain.text_encoder) == 0
    assert not getattr(plain.unet, "is_quantized", False) and getattr(plain.text_encoder, "hf_quantizer", None) is None
    assert type(to_q(plain).weight) is torch.nn.Parameter


def test_a_text_encoder_the_family_lacks_is_a_clear_error(project, tiny_sd1x, monkeypatch):
    from simpletuner.options import quantization_rules

    monkeypatch.setattr(quantization_rules, "text_encoder_count", lambda family: None)  # as for a family the table lacks
    with pytest.raises(QuantizationError, match="has no text_encoder_2"):
        loaded(project, tiny_sd1x, text_encoder_2_precision="int8-quanto")


def test_quantized_text_encoders_get_their_own_text_cache_keys(project, tiny_sd1x):
    from simpletuner.models.sd1x import StableDiffusion1x

    def parts(**flags):
        config = run_config(project, tiny_sd1x, "unused", **flags)
        return StableDiffusion1x(config, torch.device("cpu"), torch.float32).fingerprint_parts()

    plain = parts()
    assert parts(base_model_precision="int8-quanto") == plain  # the denoiser does not touch text embeds
    assert not any("precision" in key for key in plain)  # unquantized runs keep their old keys
    quantized = parts(text_encoder_1_precision="nf4-bnb")
    assert quantized != plain and quantized["text_encoder_1_precision"] == "nf4-bnb"
    assert parts(text_encoder_1_precision="int8-quanto") != quantized


LOAD_TIME_FAMILIES = ["sd1x", "sdxl", "kolors", "sd3", "deepfloyd", "pixart_sigma", "flux", "ltxvideo", "wan"]


@pytest.mark.parametrize("family", LOAD_TIME_FAMILIES)
def test_every_family_names_its_components_so_the_pipeline_route_quantizes_them_while_loading(tmp_path, family):
    """Each family file loads its denoiser and text encoders through the base class, naming them: with
    `--quantize_via pipeline` every one of them comes back quantized by the library loader (none falls
    back to quantizing after loading), and the library loaders are the same objects afterwards."""
    from simpletuner.models.registry import load_family_class
    from simpletuner.options.quantization_rules import text_encoder_name
    from simpletuner.testing.config import make_config
    from simpletuner.testing.tiny_models import make_tiny_model

    make_tiny_model(family, tmp_path / "model", seed=0)
    plain = load_family_class(family)(make_config(model_family=family,
                                                  pretrained_model_name_or_path=str(tmp_path / "model")),
                                      torch.device("cpu"), torch.float32)
    plain.load()
    encoders = list(plain.text_encoder_modules())
    assert encoders, family
    config = make_config(model_family=family, pretrained_model_name_or_path=str(tmp_path / "model"),
                         quantize_via="pipeline", base_model_precision="int8-quanto",
                         **{f"text_encoder_{index}_precision": "int8-quanto" for index in range(1, len(encoders) + 1)})
    assert [text_encoder_name(index) for index in range(1, len(encoders) + 1)] == encoders
    before = library_loaders()
    model = load_family_class(family)(config, torch.device("cpu"), torch.float32)
    done = load_model(model, config)
    assert done == {model.denoiser_name: "int8-quanto (pipeline)", **{name: "int8-quanto (pipeline)" for name in encoders}}
    for module in (model.denoiser, *model.text_encoder_modules().values()):
        assert getattr(module, "hf_quantizer", None) is not None and quantized_layers(module) > 0
    assert library_loaders() == before


def test_a_denoiser_built_without_weights_has_the_shapes_and_no_memory(project, tiny_sd1x):
    """--fsdp_cpu_ram_efficient_loading on the processes other than the main one: the UNet comes from its
    config on the meta device (FSDP2 fills it from the main process), everything else loads as usual."""
    from simpletuner.models.base import on_meta_device
    from simpletuner.models.sd1x import StableDiffusion1x

    config = run_config(project, tiny_sd1x, "unused")
    whole = StableDiffusion1x(config, torch.device("cpu"), torch.float32)
    load_model(whole, config)
    shapes = StableDiffusion1x(config, torch.device("cpu"), torch.float32)
    load_model(shapes, config, denoiser_without_weights=True)
    assert on_meta_device(shapes.unet) and not on_meta_device(whole.unet)
    assert {n: (p.shape, p.dtype) for n, p in shapes.unet.named_parameters()} == \
           {n: (p.shape, p.dtype) for n, p in whole.unet.named_parameters()}
    assert not on_meta_device(shapes.text_encoder) and not on_meta_device(shapes.vae)
    assert all(not b.is_meta for b in shapes.unet.buffers())  # computed buffers are real; FSDP2 keeps them whole
