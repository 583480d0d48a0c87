"""``--mixed_precision fp16`` with accelerate's gradient scaler, and ``--vae_dtype``, on the tiny sd1x
project on CPU (torch has fp16 CPU autocast and a CPU GradScaler; accelerate only wires them for GPUs,
so the trainer adds them)."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from simpletuner.testing.projects import make_family_project  # noqa: E402
from tests.training.conftest import config_for  # noqa: E402


def test_fp16_lora_run_scales_the_loss_and_holds_the_base_in_fp16(project: Path, monkeypatch) -> None:
    from simpletuner.training.trainer import train

    seen_inputs: set[torch.dtype] = set()
    original_linear = torch.nn.functional.linear

    def recording_linear(input, weight, bias=None):
        seen_inputs.add(input.dtype)
        return original_linear(input, weight, bias)

    monkeypatch.setattr(torch.nn.functional, "linear", recording_linear)
    trainer = train(config_for(project, "fp16", mixed_precision="fp16", max_train_steps=3), show_progress=False)
    monkeypatch.undo()
    scaler = trainer.accelerator.scaler
    assert isinstance(scaler, torch.amp.GradScaler) and trainer.accelerator.native_amp
    assert scaler.get_scale() > 0 and scaler._growth_tracker.item() == 3  # three optimizer steps, none skipped
    assert trainer.state.global_step == 3
    unet = trainer.model.unet
    base = [p for name, p in unet.named_parameters() if "lora_" not in name]
    adapters = [p for name, p in unet.named_parameters() if "lora_" in name]
    assert {p.dtype for p in base} == {torch.float16} and {p.dtype for p in adapters} == {torch.float32}
    assert trainer.model.vae.dtype == torch.float32  # the family's own choice: fp16 VAEs overflow
    assert torch.float16 in seen_inputs  # autocast ran the layers in fp16
    assert (project / "fp16" / "pytorch_lora_weights.safetensors").is_file()


def test_fp16_checkpoints_carry_the_loss_scale_and_resume_restores_it(project: Path) -> None:
    from simpletuner.training.trainer import train

    first = train(config_for(project, "fp16-resume", mixed_precision="fp16", max_train_steps=2,
                             checkpoint_step_interval=2), show_progress=False)
    saved = torch.load(project / "fp16-resume" / "checkpoint-2" / "grad_scaler.pt", weights_only=True)
    assert saved["scale"] == first.accelerator.scaler.get_scale() and saved["_growth_tracker"] == 2
    resumed = train(config_for(project, "fp16-resume", mixed_precision="fp16", max_train_steps=3,
                               resume_from_checkpoint="latest"), show_progress=False)
    assert resumed.accelerator.scaler._growth_tracker.item() == 3  # 2 restored + 1 new step, not 1


def test_fp16_full_training_keeps_fp32_weights_for_the_scaler(tmp_path: Path) -> None:
    from simpletuner.training.precision import weight_dtype_for

    full = config_for(make_family_project(tmp_path, "sd1x", images=2), "full", mixed_precision="fp16",
                      model_type="full")
    assert weight_dtype_for(full) == torch.float32


@pytest.mark.parametrize("choice, dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_vae_dtype_sets_the_type_of_the_vae_weights_and_of_encoding(project: Path, choice: str, dtype) -> None:
    from simpletuner.training.trainer import Trainer

    config = config_for(project, f"vae-{choice}", vae_dtype=choice, mixed_precision="bf16" if choice == "fp32" else "no")
    trainer = Trainer(config, show_progress=False)
    trainer.setup()
    try:
        vae = trainer.model.vae
        assert {p.dtype for p in vae.parameters()} == {dtype}
        captured = []
        handle = vae.encoder.conv_in.register_forward_pre_hook(lambda module, args: captured.append(args[0].dtype))
        try:
            trainer.model.encode_images(torch.zeros(1, 3, 64, 64))
        finally:
            handle.remove()
        assert captured == [dtype]
    finally:
        trainer.data.close()


def test_default_vae_dtype_keeps_the_family_choice() -> None:
    from simpletuner.training.precision import apply_vae_dtype

    class Model:
        vae = torch.nn.Linear(2, 2)

    assert apply_vae_dtype(Model(), "default") is None and Model.vae.weight.dtype == torch.float32


def test_latents_of_a_half_precision_vae_get_their_own_cache_key(project: Path) -> None:
    """``--vae_dtype default`` follows ``--mixed_precision``: latents a bf16 VAE encoded must not be reused by a
    run whose VAE encodes in fp32 (and the reverse), while an explicit ``--vae_dtype bf16`` shares their key."""
    from simpletuner.training.trainer import Trainer

    keys = {}
    for name, overrides in {"fp32": {}, "bf16": {"vae_dtype": "bf16"}}.items():
        trainer = Trainer(config_for(project, f"key-{name}", **overrides), show_progress=False)
        trainer.setup()
        try:
            keys[name] = trainer.model.latent_fingerprint_parts()
            if name == "fp32":
                trainer.model.vae.to(torch.bfloat16)  # what the family's default does under bf16 mixed precision
                keys["default-bf16"] = trainer.model.latent_fingerprint_parts()
        finally:
            trainer.data.close()
    assert "vae_dtype" not in keys["fp32"]
    assert keys["default-bf16"]["vae_dtype"] == keys["bf16"]["vae_dtype"] == "bf16"
