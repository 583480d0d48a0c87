"""Short real runs of the trainer's switches on the tiny sd1x model: text-encoder training (LoRA and
full, with its learning rate, limit, layer freezing, saving and resume), BitFit, the sample prediction
type, gradient checkpointing, fp32 gradients, and the accelerator cache interval."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from simpletuner.training.trainer import Trainer, train  # noqa: E402
from tests.training.conftest import config_for  # noqa: E402

pytestmark = pytest.mark.slow


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().float().clone() for name, p in module.named_parameters()}


def changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> set[str]:
    return {name for name, p in module.named_parameters() if not torch.equal(before[name], p.detach().float())}


def run_with_snapshots(config, monkeypatch, every_step: bool = False):
    """Train; returns the trainer, the text encoder / denoiser weights after setup, and per-step encoder copies."""
    seen: dict = {"steps": []}
    original_setup, original_after = Trainer.setup, Trainer._after_step

    def setup_and_snapshot(self):
        original_setup(self)
        seen["text_encoder"] = snapshot(self.model.text_encoder)
        seen["denoiser"] = snapshot(self._unwrapped_denoiser())

    def after_and_snapshot(self, *args):
        original_after(self, *args)
        if every_step:
            seen["steps"].append(snapshot(self.model.text_encoder))

    monkeypatch.setattr(Trainer, "setup", setup_and_snapshot)
    monkeypatch.setattr(Trainer, "_after_step", after_and_snapshot)
    trainer = train(config, show_progress=False)
    return trainer, seen


def test_text_encoder_lora_trains_with_its_own_rate_and_loads_in_diffusers(project, monkeypatch):
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    config = config_for(project, "te-lora", train_text_encoder="true", text_encoder_lr=5e-4,
                        save_text_encoder="true")
    trainer, seen = run_with_snapshots(config, monkeypatch)
    encoder = trainer.model.text_encoder
    moved = changed(seen["text_encoder"], encoder)
    assert moved and all("lora_" in name for name in moved)  # only the adapters moved
    assert [group["lr"] for group in trainer.optimizer.param_groups] == [1e-3, 5e-4]
    file = project / "te-lora" / "pytorch_lora_weights.safetensors"
    with safe_open(str(file), framework="pt") as handle:
        keys = list(handle.keys())
    assert any(k.startswith("lora_te_text_model_") for k in keys) and any(k.startswith("lora_unet_") for k in keys)

    pipeline = StableDiffusionPipeline.from_pretrained(project / "model", safety_checker=None)
    tokens = pipeline.tokenizer(["a red circle"], padding="max_length", max_length=pipeline.tokenizer.model_max_length,
                                return_tensors="pt").input_ids
    encoder.eval()  # LoRA dropout off
    with torch.no_grad():
        base = pipeline.text_encoder(tokens)[0]
        trained = encoder(tokens)[0]
        pipeline.load_lora_weights(str(file))
        loaded = pipeline.text_encoder(tokens)[0]
    assert not torch.allclose(base, trained)
    assert torch.allclose(loaded, trained, atol=1e-5)

    from transformers import CLIPTextModel  # --save_text_encoder: the merged encoder as a plain model
    saved = CLIPTextModel.from_pretrained(project / "te-lora" / "text_encoder")
    with torch.no_grad():
        assert torch.allclose(saved(tokens)[0], trained, atol=1e-5)


def test_full_text_encoder_training_freezes_layers_and_stops_at_the_limit(project, monkeypatch):
    config = config_for(project, "te-full", model_type="full", train_text_encoder="true", learning_rate=1e-4,
                        freeze_encoder_strategy="before", freeze_encoder_before=1, text_encoder_limit=2,
                        max_train_steps=4)
    trainer, seen = run_with_snapshots(config, monkeypatch, every_step=True)
    moved = changed(seen["text_encoder"], trainer.model.text_encoder)
    assert moved and not any(name.startswith("encoder.layers.0.") for name in moved)
    assert any(name.startswith("encoder.layers.1.") for name in moved)
    steps = seen["steps"]
    assert any(not torch.equal(steps[0][k], steps[1][k]) for k in steps[0])  # still training at step 2
    for name in steps[1]:  # frozen after step 2: steps 3 and 4 leave the encoder alone
        assert torch.equal(steps[1][name], steps[3][name]), name
    assert trainer.optimizer.param_groups[1]["lr"] == 0.0


def test_text_encoder_training_resumes_with_the_same_losses(project, monkeypatch):
    class Interrupted(Exception):
        pass

    overrides = dict(train_text_encoder="true", max_train_steps=4, checkpoint_step_interval=2)
    reference = train(config_for(project, "te-ref", **overrides), show_progress=False)
    original_after = Trainer._after_step

    def crash_after_step_3(self, *args):
        original_after(self, *args)
        if self.state.global_step == 3:
            raise Interrupted()

    monkeypatch.setattr(Trainer, "_after_step", crash_after_step_3)
    with pytest.raises(Interrupted):
        train(config_for(project, "te-cut", **overrides), show_progress=False)
    monkeypatch.setattr(Trainer, "_after_step", original_after)
    resumed = train(config_for(project, "te-cut", resume_from_checkpoint="latest", **overrides), show_progress=False)
    assert resumed.state.losses == reference.state.losses[2:]


def test_bitfit_full_run_moves_only_biases(project, monkeypatch):
    config = config_for(project, "bitfit", model_type="full", layer_freeze_strategy="bitfit", learning_rate=1e-3)
    trainer, seen = run_with_snapshots(config, monkeypatch)
    moved = changed(seen["denoiser"], trainer._unwrapped_denoiser())
    assert moved and all(name.endswith(".bias") for name in moved)
    assert len(trainer.trainable) == sum(1 for name, _ in trainer._unwrapped_denoiser().named_parameters()
                                         if name.endswith(".bias"))


def test_sample_prediction_trains_and_saves_its_prediction_type(project):
    trainer = train(config_for(project, "sample", model_type="full", prediction_type="sample",
                               learning_rate=1e-4), show_progress=False)
    assert trainer.model.prediction_type == "sample"
    assert all(loss == loss for loss in trainer.state.losses)
    saved = json.loads((project / "sample" / "pipeline" / "scheduler" / "scheduler_config.json").read_text())
    assert saved["prediction_type"] == "sample"


def test_gradient_checkpointing_gives_the_same_losses(project):
    plain = train(config_for(project, "gc-off"), show_progress=False).state.losses
    checkpointed = train(config_for(project, "gc-on", gradient_checkpointing="true",
                                    gradient_checkpointing_interval=2), show_progress=False)
    blocks = [m for m in checkpointed._unwrapped_denoiser().modules() if hasattr(m, "gradient_checkpointing")]
    assert any(b.gradient_checkpointing for b in blocks) and not all(b.gradient_checkpointing for b in blocks)
    assert checkpointed.state.losses == pytest.approx(plain, rel=1e-5)


def test_fp32_gradients_and_cache_clearing_in_a_bf16_full_run(project, monkeypatch):
    import simpletuner.training.trainer as trainer_module

    clears = []
    monkeypatch.setattr(trainer_module, "clear_accelerator_cache", lambda device: clears.append(str(device)))
    config = config_for(project, "bf16-fp32-grads", model_type="full", mixed_precision="bf16",
                        optimizer="adamw_bf16", gradient_accumulation_steps=2, gradient_precision="fp32",
                        accelerator_cache_clear_interval=2, max_train_steps=4)
    trainer = train(config, show_progress=False)
    assert trainer.grad_accumulator is not None and trainer.grad_accumulator.active
    assert not trainer.grad_accumulator.buffers  # every sum was written back before its optimizer step
    assert len(trainer.state.losses) == 4 and clears == ["cpu", "cpu"]


def masked_project(root: Path, project: Path, value: int) -> Path:
    """A copy of the dataset list with a mask dataset paired to every image; every mask is ``value``."""
    from PIL import Image

    masks = root / f"masks-{value}"
    masks.mkdir(parents=True, exist_ok=True)
    for image in sorted((project / "data").glob("*.png")):
        Image.new("L", Image.open(image).size, value).save(masks / image.name)
    datasets = json.loads((project / "multidatabackend.json").read_text())
    datasets[0] = {**datasets[0], "conditioning_data": "masks"}
    datasets.append({"id": "masks", "type": "local", "dataset_type": "conditioning", "instance_data_dir": str(masks),
                     "conditioning_type": "mask"})
    listing = root / f"masked-{value}.json"
    listing.write_text(json.dumps(datasets))
    return listing


def test_masked_loss_counts_only_the_masked_pixels(project, tmp_path):
    """An all-white mask changes nothing; an all-black one leaves nothing to learn (loss 0, weights unchanged)."""
    plain = train(config_for(project, "mask-none"), show_progress=False).state.losses
    white = train(config_for(project, "mask-white", data_backend_config=masked_project(tmp_path, project, 255)),
                  show_progress=False).state.losses
    assert white == pytest.approx(plain, rel=1e-5)
    black = train(config_for(project, "mask-black", data_backend_config=masked_project(tmp_path, project, 0),
                             masked_loss_probability=1.0), show_progress=False)
    assert black.state.losses == [0.0, 0.0, 0.0]


def test_prefetch_with_on_demand_encoding_trains_exactly_like_the_synchronous_run(project):
    """The prefetch thread encodes latents while the main thread trains; every random draw of a step
    comes from that batch's own seed, so the losses and LoRA weights equal the synchronous run's."""
    def lora(trainer):
        return {n: p.detach().clone() for n, p in trainer.model.denoiser.named_parameters() if "lora_" in n}

    flags = dict(vae_cache_ondemand="true", max_train_steps=6)
    synchronous = train(config_for(project, "sync", **flags), show_progress=False)
    prefetched = train(config_for(project, "prefetch", dataloader_prefetch="true", dataloader_prefetch_qlen=3,
                                  **flags), show_progress=False)
    assert prefetched.state.losses == synchronous.state.losses
    reference = lora(synchronous)
    assert all(torch.equal(p, reference[n]) for n, p in lora(prefetched).items())
