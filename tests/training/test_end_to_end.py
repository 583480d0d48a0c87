"""End-to-end runs through the real CLI and trainer on the tiny offline sd1x model.

These pin behaviour users rely on: the outputs load in diffusers, checkpoints are complete and
pruned, ``latest`` ignores anything that is not a finished checkpoint, caches are reused, corrupt
images are skipped, and an interrupted run resumes with exactly the same losses.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch = pytest.importorskip("torch")

from simpletuner.cli import main  # noqa: E402
from simpletuner.options.resolve import resolve_run  # noqa: E402
from simpletuner.testing.shapes import make_demo_dataset  # noqa: E402
from simpletuner.testing.tiny_models import make_tiny_model  # noqa: E402
from simpletuner.training import checkpoint as ckpt  # noqa: E402
from simpletuner.training.trainer import Trainer, train  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model") / "sd1x"
    make_tiny_model("sd1x", folder, seed=0)
    return folder


@pytest.fixture()
def workspace(tmp_path: Path) -> Path:
    make_demo_dataset(tmp_path / "data", 16, size=64, seed=3)
    datasets = [
        {"id": "shapes", "type": "local", "instance_data_dir": str(tmp_path / "data"),
         "caption_strategy": "textfile", "resolution": 64, "resolution_type": "pixel"},
        {"id": "text", "dataset_type": "text_embeds", "cache_dir": str(tmp_path / "cache" / "text"), "default": True},
    ]
    (tmp_path / "multidatabackend.json").write_text(json.dumps(datasets))
    return tmp_path


def base_args(model: Path, work: Path, **overrides) -> list[str]:
    values = {
        "model_family": "sd1x", "pretrained_model_name_or_path": str(model), "model_type": "lora",
        "output_dir": str(work / "out"), "data_backend_config": str(work / "multidatabackend.json"),
        "cache_dir": str(work / "cache"), "resolution": "64", "resolution_type": "pixel",
        "aspect_bucket_alignment": "8", "mixed_precision": "no", "train_batch_size": "4",
        "max_train_steps": "3", "seed": "7", "learning_rate": "1e-3", "report_to": "none",
        "optimizer": "optimi-adamw",
    }
    values.update({k: str(v) for k, v in overrides.items()})
    return [token for key, value in values.items() for token in (f"--{key}", value)]


def resolved(model: Path, work: Path, **overrides):
    return resolve_run(base_args(model, work, **overrides)).config


def test_lora_run_through_cli_loads_in_diffusers(tiny_model, workspace):
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    args = base_args(tiny_model, workspace, checkpoint_step_interval=2, report_to="tensorboard",
                     validation_prompt="a red circle on a white background", validation_num_inference_steps=2,
                     num_validation_images=2)
    assert main(["train", *args]) == 0
    out = workspace / "out"
    lora = out / "pytorch_lora_weights.safetensors"
    with safe_open(str(lora), framework="pt") as handle:
        keys = list(handle.keys())
        metadata = handle.metadata()
    # sd1x's default layout: kohya names with alpha, which diffusers and ComfyUI both load (lora_formats.py)
    assert keys and all(k.startswith("lora_unet_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha"))
                        for k in keys)
    assert metadata["global_step"] == "3" and metadata["model_family"] == "sd1x"
    # the resolved config is written where the run writes
    assert json.loads((out / "training_config.json").read_text())["max_train_steps"] == 3
    # validation: base-model images at step 0 and the final ones with a grid, and tensorboard events
    assert (out / "validation" / "step_0_base_model" / "grid_64x64.png").is_file()
    assert len(list((out / "validation" / "step_3").glob("64x64_*.png"))) == 2
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    for tag in ("loss/train", "lr", "grad_norm", "timing/sec_per_step"):
        assert [e.step for e in events.Scalars(tag)] == [1, 2, 3], tag
    assert all(e.value > 0 for e in events.Scalars("loss/train"))
    assert "validation/64x64" in events.Tags()["images"]

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(prompt="a red circle on a white background", num_inference_steps=2, height=64, width=64,
                  output_type="np")
    before = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    pipe.load_lora_weights(out)
    after = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    assert abs(before - after).max() > 1e-4, "loading the trained LoRA must change the output"


def test_full_run_through_cli_writes_a_loadable_pipeline(tiny_model, workspace):
    from diffusers import DiffusionPipeline

    args = base_args(tiny_model, workspace, model_type="full", use_ema="true", ema_decay=0.9)
    assert main(["train", *args]) == 0
    out = workspace / "out"
    pipeline = DiffusionPipeline.from_pretrained(out / "pipeline")
    base = DiffusionPipeline.from_pretrained(tiny_model)
    trained = dict(pipeline.unet.named_parameters())
    changed = [n for n, p in base.unet.named_parameters() if not torch.equal(p, trained[n])]
    assert changed, "full training must change UNet weights"
    assert (out / "ema" / "pipeline" / "unet").is_dir()


def test_checkpoint_retention_and_manifest(tiny_model, workspace):
    config = resolved(tiny_model, workspace, max_train_steps=5, checkpoint_step_interval=1, checkpoints_total_limit=2)
    train(config, show_progress=False)
    out = workspace / "out"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-5"]
    manifest = json.loads((out / "checkpoint-5" / "manifest.json").read_text())
    assert manifest["step"] == 5
    assert {"pytorch_lora_weights.safetensors", "optimizer.pt", "lr_scheduler.pt", "random_states.pt",
            "sampler.json", "training_state.json"} <= set(manifest["files"])
    assert not list(out.glob(".tmp-checkpoint-*"))


def test_latest_ignores_incomplete_and_oddly_named_folders(tmp_path):
    def fake_checkpoint(step: int) -> Path:
        return ckpt.write_checkpoint(tmp_path, step, {"weights.bin": lambda p: p.write_bytes(b"x" * step)},
                                     {"global_step": step})

    fake_checkpoint(2)
    fake_checkpoint(5)
    (tmp_path / "checkpoint-final").mkdir()
    (tmp_path / "checkpoint-9").mkdir()  # no manifest: a crash before completion
    broken = fake_checkpoint(7)
    (broken / "weights.bin").write_bytes(b"short")  # size no longer matches the manifest
    (tmp_path / ".tmp-checkpoint-8-123").mkdir()
    assert ckpt.resolve_resume_path(tmp_path, "latest") == tmp_path / "checkpoint-5"
    assert [c.step for c in ckpt.list_checkpoints(tmp_path)] == [2, 5]
    with pytest.raises(ckpt.CheckpointError, match="incomplete"):
        ckpt.resolve_resume_path(tmp_path, "checkpoint-9")


def test_failed_checkpoint_write_leaves_existing_ones_intact(tmp_path):
    good = ckpt.write_checkpoint(tmp_path, 1, {"a.bin": lambda p: p.write_bytes(b"ok")}, {"global_step": 1})

    def disk_full(path: Path) -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(ckpt.CheckpointError, match="No space left on device"):
        ckpt.write_checkpoint(tmp_path, 2, {"a.bin": disk_full}, {"global_step": 2})
    assert ckpt.list_checkpoints(tmp_path) == [ckpt.CheckpointInfo(good, 1)]
    assert not list(tmp_path.glob(".tmp-checkpoint-*"))


class Interrupted(Exception):
    pass


def test_resume_reproduces_the_uninterrupted_loss_sequence(tiny_model, workspace, monkeypatch):
    overrides = dict(max_train_steps=6, checkpoint_step_interval=3, lr_scheduler="cosine", lr_warmup_steps=2,
                     use_ema="true", caption_dropout_probability=0.3, gradient_accumulation_steps=2)
    reference = train(resolved(tiny_model, workspace, output_dir=workspace / "a", **overrides), show_progress=False)
    assert len(reference.state.losses) == 6

    original = Trainer._after_step

    def crash_after_step_4(self, loss, grad_norm, seconds, progress):
        original(self, loss, grad_norm, seconds, progress)
        if self.state.global_step == 4:
            raise Interrupted()

    monkeypatch.setattr(Trainer, "_after_step", crash_after_step_4)
    with pytest.raises(Interrupted):
        train(resolved(tiny_model, workspace, output_dir=workspace / "b", **overrides), show_progress=False)
    monkeypatch.setattr(Trainer, "_after_step", original)
    resumed = train(resolved(tiny_model, workspace, output_dir=workspace / "b", resume_from_checkpoint="latest",
                             **overrides), show_progress=False)
    assert resumed.resumed_from.name == "checkpoint-3"
    assert resumed.state.losses == reference.state.losses[3:]


def test_second_run_reuses_caches_and_resolution_change_rebuilds(tiny_model, workspace, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="simpletuner")
    train(resolved(tiny_model, workspace, max_train_steps=1), show_progress=False)
    first = [r.getMessage() for r in caplog.records if "latents:" in r.getMessage()]
    assert first and "0 reused, 16 built" in first[-1]
    caplog.clear()
    second = train(resolved(tiny_model, workspace, max_train_steps=1, output_dir=workspace / "o2"), show_progress=False)
    assert any("16 reused, 0 built" in r.getMessage() for r in caplog.records)
    assert "16 reused" in second.data.describe()
    caplog.clear()
    datasets = json.loads((workspace / "multidatabackend.json").read_text())
    datasets[0]["resolution"] = 32
    (workspace / "multidatabackend.json").write_text(json.dumps(datasets))
    train(resolved(tiny_model, workspace, max_train_steps=1, output_dir=workspace / "o3"), show_progress=False)
    assert any("0 reused, 16 built" in r.getMessage() for r in caplog.records)


def test_corrupt_image_is_skipped_and_counted(tiny_model, workspace, caplog):
    import logging

    victim = sorted((workspace / "data").glob("*.png"))[0]
    victim.write_bytes(victim.read_bytes()[: len(victim.read_bytes()) // 2])
    caplog.set_level(logging.WARNING)
    trainer = train(resolved(tiny_model, workspace, max_train_steps=2), show_progress=False)
    warnings = [r.getMessage() for r in caplog.records if victim.name in r.getMessage()]
    assert len(warnings) == 1
    summary = trainer.data.summaries[0]
    assert [path.name for path, _ in summary.skipped] == [victim.name]
    assert "1 skipped" in trainer.data.describe()
    assert len(trainer.state.losses) == 2


def test_bf16_lora_run_trains_fp32_adapters_on_a_bf16_base(tiny_model, workspace):
    config = resolved(tiny_model, workspace, mixed_precision="bf16", optimizer="adamw_bf16", max_train_steps=2,
                      validation_prompt="a blue square on a white background", validation_num_inference_steps=2)
    trainer = train(config, show_progress=False)
    unet = trainer._unwrapped_denoiser()
    frozen = {p.dtype for p in unet.parameters() if not p.requires_grad}
    trained = {p.dtype for p in unet.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and trained == {torch.float32}
    assert all(math.isfinite(loss) for loss in trainer.state.losses)
    assert (workspace / "out" / "validation" / "step_2" / "grid_64x64.png").is_file()


def test_batch_larger_than_every_bucket_is_a_clear_error(tiny_model, workspace, capsys):
    assert main(["train", *base_args(tiny_model, workspace, train_batch_size=100)]) == 2
    error = capsys.readouterr().err
    assert "`--train_batch_size 100` is larger than every aspect bucket (64x64: 16 images)" in error


def test_two_datasets_are_mixed_by_weight_and_step_window(tiny_model, workspace):
    make_demo_dataset(workspace / "more", 8, size=96, seed=9)
    datasets = json.loads((workspace / "multidatabackend.json").read_text())
    datasets[0]["end_step"] = 2
    datasets.insert(1, {"id": "more", "type": "local", "instance_data_dir": str(workspace / "more"),
                        "resolution": 32, "resolution_type": "pixel", "start_step": 2, "probability": 2.0})
    (workspace / "multidatabackend.json").write_text(json.dumps(datasets))
    seen = []
    original = Trainer._next_local_batch

    def record_batch(self):
        batch = original(self)
        seen.append((self.state.global_step, {Path(p).parent.name for p in batch["paths"]},
                     tuple(batch["latent_mean"].shape[-2:])))
        return batch

    Trainer._next_local_batch = record_batch
    try:
        trainer = train(resolved(tiny_model, workspace, max_train_steps=4), show_progress=False)
    finally:
        Trainer._next_local_batch = original
    assert [(step, folders) for step, folders, _ in seen] == [
        (0, {"data"}), (1, {"data"}), (2, {"more"}), (3, {"more"})]
    assert {shape for step, _, shape in seen if step >= 2} == {(8, 8)}  # 32 px / VAE factor 4
    summary = trainer.data.describe()
    assert "dataset more: 8 found, 8 used" in summary and "draw weight 16" in summary


def test_loss_and_noise_options_change_the_losses(tiny_model, workspace):
    plain = train(resolved(tiny_model, workspace, max_train_steps=3, output_dir=workspace / "plain"),
                  show_progress=False).state.losses
    tuned = train(resolved(tiny_model, workspace, max_train_steps=3, output_dir=workspace / "tuned",
                           loss_type="huber", huber_schedule="snr", huber_c=0.1, snr_gamma=5,
                           offset_noise="true", noise_offset=0.1, noise_offset_probability=1.0,
                           input_perturbation=0.1, input_perturbation_steps=2), show_progress=False).state.losses
    assert all(math.isfinite(v) for v in tuned) and len(tuned) == 3
    assert all(t < p for t, p in zip(tuned, plain)), "pseudo-Huber with small c and Min-SNR weights shrink the loss"


@pytest.mark.parametrize("overrides, message", [
    ({"huber_c": 0.2}, "`--huber_c` only applies to `--loss_type huber`"),
    ({"noise_offset": 0.2}, "has no effect without `--offset_noise true`"),
    ({"use_soft_min_snr": "true", "snr_gamma": 5}, "`--use_soft_min_snr` and `--snr_gamma` conflict"),
    ({"input_perturbation_steps": 10}, "needs `--input_perturbation` > 0"),
])
def test_loss_option_conflicts_are_named(tiny_model, workspace, overrides, message):
    from simpletuner.options import ConfigError

    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        resolved(tiny_model, workspace, **overrides)


def test_ema_validation_comparison_writes_both_image_sets(tiny_model, workspace):
    config = resolved(tiny_model, workspace, max_train_steps=2, use_ema="true", ema_validation="comparison",
                      ema_update_interval=1, validation_prompt="a red square on a white background",
                      validation_num_inference_steps=2, disable_benchmark="true")
    train(config, show_progress=False)
    validation = workspace / "out" / "validation"
    assert sorted(p.name for p in validation.iterdir()) == ["step_2", "step_2_ema"]
    live = (validation / "step_2" / "64x64_00.png").read_bytes()
    assert live != (validation / "step_2_ema" / "64x64_00.png").read_bytes()


def test_ema_options_need_use_ema(tiny_model, workspace):
    from simpletuner.options import ConfigError

    with pytest.raises(ConfigError, match="`--ema_validation` only applies with `--use_ema true`"):
        resolved(tiny_model, workspace, ema_validation="ema_only")
