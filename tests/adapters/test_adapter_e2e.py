"""Adapters through the real trainer on the tiny sd1x model: exact resume (LyCORIS, ComfyUI-layout
LoRA with its text encoder, SingLoRA mid-ramp), validation at --validation_lycoris_strength, the
saved files in their consumers' loaders, and --init_lora continuing from a saved adapter."""

from __future__ import annotations

import copy
import json

import pytest

torch = pytest.importorskip("torch")

from simpletuner.models import lora_formats as formats  # noqa: E402
from simpletuner.training.trainer import Trainer, train  # noqa: E402
from tests.adapters.conftest import adapter_config  # noqa: E402

pytestmark = pytest.mark.slow

g = torch.Generator().manual_seed(1)
LATENTS, TEXT, TIMESTEPS = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 64, generator=g), torch.tensor([300])


def unet_output(unet) -> torch.Tensor:
    unet.eval()
    with torch.no_grad():
        return unet(LATENTS, TIMESTEPS, encoder_hidden_states=TEXT).sample


class Interrupted(Exception):
    pass


def resumed_losses(project, monkeypatch, output: str, **overrides):
    """(reference trainer, resumed trainer): 3 steps straight, and 2 steps + crash + resume from step 2."""
    overrides = dict(checkpoint_step_interval=2, **overrides)
    reference = train(adapter_config(project, f"{output}-ref", **overrides), show_progress=False)
    original_after = Trainer._after_step

    def crash_after_step_2(self, *args):
        original_after(self, *args)
        if self.state.global_step == 2:
            raise Interrupted()

    monkeypatch.setattr(Trainer, "_after_step", crash_after_step_2)
    with pytest.raises(Interrupted):
        train(adapter_config(project, f"{output}-cut", **overrides), show_progress=False)
    monkeypatch.setattr(Trainer, "_after_step", original_after)
    resumed = train(adapter_config(project, f"{output}-cut", resume_from_checkpoint="latest", **overrides),
                    show_progress=False)
    assert resumed.resumed_from.name == "checkpoint-2"
    assert resumed.state.losses == reference.state.losses[2:]
    return reference, resumed


def test_lycoris_resumes_exactly_validates_at_its_strength_and_loads_in_lycoris(project, monkeypatch):
    import simpletuner.validation.runner as runner
    from lycoris import create_lycoris_from_weights
    from PIL import Image

    seen = []

    def record(pipeline, prompts, settings, device, size, **kwargs):
        network = pipeline.unet.lycoris_network
        seen.append(network.multiplier)
        return [Image.new("RGB", size) for _ in prompts]

    monkeypatch.setattr(runner, "generate_images", record)
    settings = {"algo": "lokr", "linear_dim": 10000, "linear_alpha": 1, "factor": 4,
                "apply_preset": {"target_module": ["Attention"]}}
    reference, resumed = resumed_losses(
        project, monkeypatch, "lycoris", lora_type="lycoris", lycoris_config=settings, lora_rank=None,
        validation_prompt="a red square", validation_step_interval=3, validation_lycoris_strength=0.25)
    assert seen == [0.25, 0.25]  # the reference run and the resumed one validated at step 3
    network = reference.adapter.network
    assert network.multiplier == 1.0  # restored after sampling
    file = project / "lycoris-ref" / "pytorch_lora_weights.safetensors"
    _, metadata = formats.read_safetensors_header(file)
    assert json.loads(metadata["lycoris_config"]) == settings and metadata["global_step"] == "3"
    unet = copy.deepcopy(reference.model.unet)
    del unet.lycoris_network
    fresh = type(unet).from_pretrained(project / "model", subfolder="unet")
    loaded, _ = create_lycoris_from_weights(1.0, str(file), fresh)
    loaded.apply_to()
    assert torch.equal(unet_output(fresh), unet_output(reference.model.unet))
    assert torch.equal(unet_output(resumed.model.unet), unet_output(reference.model.unet))


def test_comfyui_lora_with_text_encoder_resumes_exactly_and_loads_in_diffusers(project, monkeypatch):
    from diffusers import StableDiffusionPipeline

    reference, _ = resumed_losses(project, monkeypatch, "comfy", lora_format="comfyui", train_text_encoder="true")
    file = project / "comfy-ref" / "pytorch_lora_weights.safetensors"
    keys, metadata = formats.read_safetensors_header(file)
    assert metadata[formats.META_FORMAT] == "comfyui"
    assert {k.split("_")[1] for k in keys} == {"unet", "te"}  # lora_unet_* and lora_te_* only
    pipeline = StableDiffusionPipeline.from_pretrained(project / "model", safety_checker=None)
    pipeline.load_lora_weights(str(file))
    assert torch.equal(unet_output(pipeline.unet), unet_output(reference.model.unet))
    tokens = pipeline.tokenizer(["a red circle"], padding="max_length", return_tensors="pt",
                                max_length=pipeline.tokenizer.model_max_length).input_ids
    trained_encoder = reference.model.text_encoder
    for encoder in (pipeline.text_encoder, trained_encoder):
        encoder.eval()
    with torch.no_grad():
        assert torch.equal(pipeline.text_encoder(tokens)[0], trained_encoder(tokens)[0])

    # --init_lora: a new run (diffusers layout, no text encoder) starts where that adapter ended
    start = {}
    original_setup = Trainer.setup

    def setup_and_measure(self):
        original_setup(self)
        start["output"] = unet_output(self.model.unet)
        self.model.unet.train()

    monkeypatch.setattr(Trainer, "setup", setup_and_measure)
    seeded = train(adapter_config(project, "seeded", init_lora=str(file)), show_progress=False)
    assert torch.equal(start["output"], unet_output(reference.model.unet))
    assert len(seeded.state.losses) == 3


def test_singlora_resumes_exactly_mid_ramp(project, monkeypatch):
    from diffusers import StableDiffusionPipeline

    reference, _ = resumed_losses(project, monkeypatch, "singlora", peft_lora_mode="singlora",
                                  singlora_ramp_up_steps=4)
    pipeline = StableDiffusionPipeline.from_pretrained(project / "model", safety_checker=None)
    pipeline.load_lora_weights(str(project / "singlora-ref" / "pytorch_lora_weights.safetensors"))
    assert torch.equal(unet_output(pipeline.unet), unet_output(reference.model.unet))
