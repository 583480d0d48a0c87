"""CausVid and Self-Forcing (simpletuner/methods/distillation/causal_distillation.py) on the tiny Wan: the
chunk-by-chunk rollout calls the student at its schedule per chunk and writes each finished chunk once at
--context_noise; the cache holds exactly the chunks before the one being generated and is empty between clips;
the gradient enters each chunk at one exit step (Self-Forcing's two settings); CausVid's context is the dataset
clip, Self-Forcing's its own output; a short `simpletuner train` of each moves only the student LoRA and the fake
score; the configurations the cache cannot drive are refused before a model loads."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("av")

from simpletuner.options import ConfigError  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

LATENTS = (2, 16, 3, 4, 4)  # 9-frame 32 px clips: 3 latent frames of 4 x 4 cells
CONTEXT_NOISE = 0.1


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    from simpletuner.testing.clips import write_video_project
    from simpletuner.testing.tiny.wan import make_tiny_wan

    root = tmp_path_factory.mktemp("causal-distil")
    make_tiny_wan(root / "model", "t2v-2.1")
    write_video_project(root, clips=4, frames=9, size=32)
    return root


def causal_args(root: Path, output: str, method: str, settings: dict | None = None, **overrides) -> list[str]:
    from tests.models.conftest import family_args

    values = dict(model_flavour="t2v-1.3b-2.1", resolution=32, tokenizer_max_length=16, training_method=method,
                  causal_chunk_frames=1, context_noise=CONTEXT_NOISE, max_train_steps=2,
                  distillation_config=json.dumps(settings or {}))
    return family_args(root, "wan", output, **{**values, **overrides})


def method_for(root: Path, output: str, method: str, settings: dict | None = None, **overrides):
    from simpletuner.options.resolve import resolve_run
    from simpletuner.training.trainer import Trainer

    trainer = Trainer(resolve_run(causal_args(root, output, method, settings, **overrides)).config, show_progress=False)
    trainer.setup()
    return trainer.method


class Calls:
    """Every student call of a method: its timesteps, the cache's mode and frames at the time, grad mode."""

    def __init__(self, method, monkeypatch):
        self.method, self.calls = method, []
        real = method._predict

        def recording(sample, timesteps, text, batch):
            self.calls.append({"t": float(timesteps[0]), "mode": method.cache.mode, "frames": method.cache.frames,
                               "grad": torch.is_grad_enabled(), "sample": sample.detach().clone()})
            return real(sample, timesteps, text, batch)

        monkeypatch.setattr(method, "_predict", recording)

    def per_chunk(self) -> list[list[dict]]:
        """The calls split into chunks: the reads of one chunk, then (all but the last chunk) its write."""
        chunks, current = [], []
        for call in self.calls:
            current.append(call)
            if call["mode"] == "write":
                chunks.append(current)
                current = []
        return chunks + [current]


def inputs(seed: int = 0) -> tuple[torch.Tensor, dict, dict]:
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(LATENTS, generator=generator)
    text = {"prompt_embeds": torch.randn(2, 16, 32, generator=generator)}
    batch = {"latent_mean": torch.randn(LATENTS, generator=generator), "latent_std": torch.zeros(LATENTS)}
    return noise, text, batch


def generate(method, seed: int = 0, grad: bool = True) -> torch.Tensor:
    noise, text, batch = inputs(seed)
    with torch.set_grad_enabled(grad):
        return method.generate(noise, text, batch, method.exit_step())


def test_rollout_runs_the_schedule_per_chunk_then_writes_it_once_at_context_noise(project, monkeypatch):
    method = method_for(project, "timesteps", "self_forcing",
                        {"student_sample_steps": 2, "enable_gradient_in_rollout": False})
    calls = Calls(method, monkeypatch)
    generated = generate(method, grad=False)
    assert generated.shape == LATENTS
    schedule = method.schedule.timesteps
    assert len(schedule) == 2 and schedule[0] > schedule[1]
    chunks = calls.per_chunk()
    assert len(chunks) == 3  # 3 latent frames in chunks of 1
    for index, chunk in enumerate(chunks):
        reads = chunk if index == 2 else chunk[:-1]
        assert [call["t"] for call in reads] == pytest.approx(schedule)
        assert all(call["mode"] == "read" and call["frames"] == index for call in reads)  # the chunks before it
        if index < 2:
            write = chunk[-1]
            assert write["mode"] == "write" and write["t"] == pytest.approx(CONTEXT_NOISE * 1000)
            assert write["frames"] == index
    assert method.cache.frames == 0 and method.cache.tokens == 0  # cleared after the clip
    calls.calls.clear()
    generate(method, seed=1, grad=False)  # the next clip starts from an empty cache
    assert calls.calls[0]["frames"] == 0 and calls.calls[0]["mode"] == "read"


def exits_of(calls: Calls) -> list[int]:
    """Per chunk, the index of its one grad-enabled student call (asserting there is exactly one, at its
    last read: the steps before it ran without gradients, writes never carry any)."""
    exits = []
    for index, chunk in enumerate(calls.per_chunk()):
        reads = [call for call in chunk if call["mode"] == "read"]
        grads = [position for position, call in enumerate(reads) if call["grad"]]
        assert len(grads) == 1 and grads[0] == len(reads) - 1, f"chunk {index}: {[c['grad'] for c in reads]}"
        assert not any(call["grad"] for call in chunk if call["mode"] == "write")
        exits.append(grads[0])
    return exits


@pytest.mark.parametrize("same_step", [False, True])
def test_self_forcing_takes_the_gradient_at_one_exit_step_per_chunk(project, monkeypatch, same_step):
    method = method_for(project, f"exit-{same_step}", "self_forcing",
                        {"student_sample_steps": 4, "same_step_across_blocks": same_step})
    calls = Calls(method, monkeypatch)
    torch.manual_seed(0)
    clips = []
    for seed in range(6):
        calls.calls.clear()
        generated = generate(method, seed)
        assert generated.requires_grad
        clips.append(exits_of(calls))
    assert all(0 <= step < 4 for steps in clips for step in steps)
    if same_step:
        assert all(len(set(steps)) == 1 for steps in clips)
        assert len({steps[0] for steps in clips}) > 1  # still stochastic from clip to clip
    else:
        assert any(len(set(steps)) > 1 for steps in clips)


def test_without_gradient_in_rollout_only_each_chunks_final_step_has_gradients(project, monkeypatch):
    method = method_for(project, "final", "self_forcing",
                        {"student_sample_steps": 3, "enable_gradient_in_rollout": False})
    calls = Calls(method, monkeypatch)
    generated = generate(method)
    assert exits_of(calls) == [2, 2, 2]
    generated.float().pow(2).mean().backward()
    student = [p for n, p in method.model.denoiser.named_parameters() if "lora_B.default" in n]  # A's start: 0
    assert student and any(p.grad is not None and p.grad.abs().sum() > 0 for p in student)


def test_causvid_writes_the_dataset_clip_and_self_forcing_its_own_chunks(project, monkeypatch):
    """With context_noise 0 the written input is the context itself: CausVid's is the clip's own latent chunk
    (the batch's cached latents, normalised), Self-Forcing's the chunk it has just generated."""
    for name in ("causvid", "self_forcing"):
        method = method_for(project, f"context-{name}", name, {"student_sample_steps": 2})
        method.context_noise = 0.0
        calls = Calls(method, monkeypatch)
        noise, text, batch = inputs(3)
        with torch.no_grad():
            generated = method.generate(noise, text, batch, 1)
        writes = [call for call in calls.calls if call["mode"] == "write"]
        assert [call["t"] for call in writes] == [0.0, 0.0]
        for index, write in enumerate(writes):
            if name == "causvid":
                expected = method.model.normalize_latents(batch["latent_mean"][:, :, index:index + 1])
            else:
                expected = generated[:, :, index:index + 1]
            torch.testing.assert_close(write["sample"], expected.float())


def test_a_full_students_frozen_teacher_copy_keeps_plain_attention(project):
    from simpletuner.models.wan_causal import CachedSelfAttention

    method = method_for(project, "full", "self_forcing", {"student_sample_steps": 2}, model_type="full")
    teacher = method.networks.teacher_copy
    assert teacher is not None and teacher is not method.model.denoiser
    assert not any(isinstance(block.attn1.processor, CachedSelfAttention) for block in teacher.blocks)
    assert all(isinstance(block.attn1.processor, CachedSelfAttention) for block in method.model.denoiser.blocks)
    generated = generate(method)
    assert generated.shape == LATENTS and generated.requires_grad


def test_the_causal_methods_keep_dmd2s_critic_state_and_validation(project):
    from simpletuner.methods.distillation.causal_distillation import CausVid, SelfForcing
    from simpletuner.methods.distillation.score_distillation import ScoreDistillation

    method = method_for(project, "state", "causvid", {"student_sample_steps": 4})
    assert isinstance(method, CausVid) and isinstance(method, ScoreDistillation) and method.kind == "causvid"
    assert set(method.state_dict()) == {"fake_score", "critic", "student_updates"}
    assert method.validation_defaults()["validation_num_inference_steps"] == 4
    assert method.chunk_frames == 1 and method.context_noise == CONTEXT_NOISE
    assert issubclass(SelfForcing, ScoreDistillation)


VALIDATION = {"validation_prompt": "a red square moving right", "validation_step_interval": 2,
              "validation_num_video_frames": 5, "validation_resolution": 32, "framerate": 8}


@pytest.mark.parametrize("name, extra", [("causvid", VALIDATION), ("self_forcing", {"gradient_checkpointing": "true"})])
def test_simpletuner_train_moves_only_the_student_lora_and_the_fake_score(project, name, extra, monkeypatch):
    from accelerate.state import AcceleratorState

    from simpletuner.cli import main
    from tests.models.conftest import keep_trainer

    seen = keep_trainer(monkeypatch)
    start = {}
    from simpletuner.training.trainer import Trainer

    kept_setup = Trainer.setup

    def setup_and_snapshot(trainer):
        kept_setup(trainer)
        start.update({n: p.detach().clone() for n, p in trainer.model.denoiser.named_parameters()})

    monkeypatch.setattr(Trainer, "setup", setup_and_snapshot)
    try:
        assert main(["train", *causal_args(project, f"train-{name}", name,
                                           {"student_sample_steps": 2, "student_update_freq": 1}, **extra)]) == 0
    finally:
        AcceleratorState._reset_state(True)
    trainer = seen["trainer"]
    assert trainer.method.kind == name and trainer.method.student_updates == 2
    now = dict(trainer.model.denoiser.named_parameters())
    moved = {n for n, value in start.items() if not torch.equal(value, now[n].detach())}
    assert any(".lora_A.default." in n or ".lora_B.default." in n for n in moved)
    assert any(".fake_score." in n for n in moved)
    assert all(".default." in n or ".fake_score." in n for n in moved), sorted(moved)[:5]
    assert all(torch.isfinite(torch.tensor(loss)) for loss in trainer.state.losses)
    output = project / f"train-{name}"
    assert (output / "pytorch_lora_weights.safetensors").exists()
    if extra is VALIDATION:  # the parent's validation: the student samples at its own step count, plain attention
        record = json.loads((output / "validation" / "step_2" / "validation.json").read_text())
        assert record["videos"]["32x32_00"]["num_inference_steps"] == 2
        assert (output / "validation" / "step_2" / "32x32_00.mp4").stat().st_size > 0


# --- refused before a model loads ----------------------------------------------------------------------


@pytest.mark.parametrize("overrides, fragment", [
    ({"model_family": "sd1x", "model_flavour": None, "causal_chunk_frames": None, "context_noise": None,
      "tokenizer_max_length": None},
     "is an image family. Use `--training_method dmd2`"),
    ({"model_family": "ltxvideo", "model_flavour": None, "causal_chunk_frames": None, "context_noise": None},
     "built for Wan's transformer (wan) only; ltxvideo"),
    ({"model_flavour": "i2v-480p-14b-2.1"}, "`--model_flavour i2v-480p-14b-2.1` is not one"),
    ({"model_flavour": "t2v-a14b-2.2"}, "`--model_flavour t2v-a14b-2.2` is not one"),
    ({"training_method": "causvid", "distillation_config": '{"same_step_across_blocks": true}'}, "Self-Forcing's"),
    ({"distillation_config": '{"enable_gradient_in_rollout": "yes"}'}, "must be true or false"),
    ({"training_method": "dmd2", "causal_chunk_frames": None, "context_noise": None}, "video family"),
])
def test_what_the_cache_cannot_drive_is_refused(tmp_path, overrides, fragment):
    from simpletuner.options.resolve import resolve_run

    overrides = dict(overrides)
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        resolve_run(causal_args(tmp_path, "out", overrides.pop("training_method", "self_forcing"), **overrides))


@pytest.mark.parametrize("name", ["causvid", "self_forcing"])
def test_wan_text_to_video_with_the_causal_options_is_accepted(project, name):
    from simpletuner.options.resolve import resolve_run

    settings = {"student_sample_steps": 4}
    if name == "self_forcing":
        settings.update(enable_gradient_in_rollout=True, same_step_across_blocks=True)
    config = resolve_run(causal_args(project, "out", name, settings, causal_chunk_frames=3)).config
    assert (config.training_method, config.causal_chunk_frames, config.context_noise) == (name, 3, CONTEXT_NOISE)
