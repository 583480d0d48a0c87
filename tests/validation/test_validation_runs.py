"""Validation options on short real runs of the tiny sd1x model, and the runner's pieces in isolation."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from simpletuner.training.trainer import train  # noqa: E402
from simpletuner.validation import runner  # noqa: E402
from simpletuner.validation.prompt_library import BUILTIN_PROMPTS  # noqa: E402
from simpletuner.validation.runner import ValidationSettings, Validator  # noqa: E402
from tests.training.conftest import config_for  # noqa: E402

SAMPLING = {"validation_prompt": "a red square", "validation_num_inference_steps": 2, "validation_resolution": 64}


def folders(output: Path) -> set[str]:
    return {path.name for path in (output / "validation").iterdir()} if (output / "validation").exists() else set()


def settings(**overrides) -> ValidationSettings:
    values = dict(prompts=["a"], negative_prompt=None, num_images=1, num_inference_steps=2, guidance=5.0, seed=3,
                  resolutions=[(64, 64)])
    values.update(overrides)
    return ValidationSettings(**values)


def validator(**overrides) -> Validator:
    values = dict(settings=settings(), output_dir=Path("unused"), tracker=None, interval=None,
                  benchmark_enabled=False, device="cpu")
    values.update(overrides)
    return Validator(**values)


# --- in isolation ----------------------------------------------------------------------------------------


def test_step_and_epoch_intervals_combine_without_double_runs():
    both = validator(interval=3, epoch_interval_steps=2)
    assert [step for step in range(0, 13) if both.due(step)] == [2, 3, 4, 6, 8, 9, 10, 12]
    assert [step for step in range(0, 9) if validator(epoch_interval_steps=4).due(step)] == [4, 8]
    assert not validator(epoch_interval_steps=2, disabled=True).due(2)


def test_startup_reuses_the_benchmark_at_step_zero_and_has_its_own_label_after_resume(monkeypatch):
    calls = []
    monkeypatch.setattr(Validator, "run", lambda self, model, step, label=None: calls.append((step, label)))
    v = validator(on_startup=True)
    v.run_startup(None, 0)
    v.benchmark = {(64, 64): ["image"]}  # a benchmark was made: step 0 is not sampled twice
    v.run_startup(None, 0)
    v.run_startup(None, 5)
    validator(on_startup=False).run_startup(None, 0)
    assert calls == [(0, "step_0_base_model"), (5, "step_5_startup")]


class RecordingGenerator:
    devices: list = []

    def __init__(self, device):
        RecordingGenerator.devices.append(torch.device(device))
        self.seed = None

    def manual_seed(self, seed):
        self.seed = seed
        return self


class FakePipeline:
    def __init__(self):
        self.calls = []

    def __call__(self, **kwargs):
        from PIL import Image

        self.calls.append(kwargs)
        return type("Output", (), {"images": [Image.new("RGB", (kwargs["width"], kwargs["height"]))
                                              for _ in kwargs["prompt"]]})()


@pytest.mark.parametrize("source, accelerator, expected", [
    (None, "cuda:0", "cpu"), ("cpu", "cuda:0", "cpu"), ("gpu", "cuda:0", "cuda:0"), ("gpu", "cpu", "cpu"),
])
def test_seed_source_decides_where_the_generators_live(monkeypatch, source, accelerator, expected):
    RecordingGenerator.devices = []
    monkeypatch.setattr(torch, "Generator", RecordingGenerator)
    pipeline = FakePipeline()
    runner.generate_images(pipeline, ["a", "b"], settings(seed_source=source), accelerator, (64, 64), seed=10)
    assert RecordingGenerator.devices == [torch.device(expected)] * 2
    assert [g.seed for g in pipeline.calls[0]["generator"]] == [10, 11]


def test_guidance_rescale_is_only_passed_when_set():
    pipeline = FakePipeline()
    runner.generate_images(pipeline, ["a"], settings(), "cpu", (64, 64))
    runner.generate_images(pipeline, ["a"], settings(guidance_rescale=0.7), "cpu", (64, 64),
                           extra_arguments=settings(guidance_rescale=0.7).call_arguments())
    assert "guidance_rescale" not in pipeline.calls[0] and pipeline.calls[1]["guidance_rescale"] == 0.7


# --- real runs --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_startup_and_epoch_end_validations(project):
    # gradient accumulation 2 makes an epoch (8 images, batch 2) two optimizer steps long
    config = config_for(project, "epochs", max_train_steps=4, gradient_accumulation_steps=2,
                        validation_on_startup="true", validation_epoch_interval=1, **SAMPLING)
    trainer = train(config, show_progress=False)
    assert trainer.steps_per_epoch == 2
    assert folders(project / "epochs") == {"step_0_base_model", "step_2", "step_4"}
    startup = project / "epochs" / "validation" / "step_0_base_model"
    assert sorted(p.name for p in startup.glob("*.png")) == ["64x64_00.png", "grid_64x64.png"]


@pytest.mark.slow
def test_no_epoch_validation_without_the_option_and_no_startup_twice_with_benchmark(project):
    config = config_for(project, "plain", max_train_steps=2, validation_on_startup="true", disable_benchmark="false",
                        **SAMPLING)
    train(config, show_progress=False)
    # the benchmark is the startup sample; only the end-of-training validation follows
    assert folders(project / "plain") == {"step_0_base_model", "step_2"}


@pytest.fixture(scope="module")
def trained(project):
    """One 1-step run; the tests below sample its model again with different settings."""
    from accelerate.state import AcceleratorState

    trainer = train(config_for(project, "sampled", max_train_steps=1, validation_seed=11, **SAMPLING),
                    show_progress=False)
    AcceleratorState._reset_state(True)
    return trainer


def sample_with(trainer, project, label, **flags):
    config = config_for(project, "sampled", max_train_steps=1, **{**SAMPLING, **flags})
    trainer.validator.settings = ValidationSettings.from_config(config, fallback_edge=64)
    images = trainer.validator.run(trainer.model, 1, label=label)
    return images[(64, 64)], project / "sampled" / "validation" / label


def pixels(image) -> bytes:
    return image.tobytes()


@pytest.mark.slow
def test_fixed_seed_repeats_and_randomize_draws_and_logs_a_new_seed(trained, project, caplog):
    first, folder = sample_with(trained, project, "fixed_a", validation_seed=11)
    second, _ = sample_with(trained, project, "fixed_b", validation_seed=11)
    assert pixels(first[0]) == pixels(second[0])
    assert json.loads((folder / "validation.json").read_text())["seed"] == 11
    with caplog.at_level(logging.INFO, logger="simpletuner.validation.runner"):
        random_a, folder_a = sample_with(trained, project, "random_a", validation_randomize="true")
        random_b, folder_b = sample_with(trained, project, "random_b", validation_randomize="true")
    seeds = [json.loads((f / "validation.json").read_text())["seed"] for f in (folder_a, folder_b)]
    assert seeds[0] != seeds[1] and pixels(random_a[0]) != pixels(random_b[0])
    for seed in seeds:
        assert f"seed {seed}" in caplog.text
    # the logged seed reproduces the image
    again, _ = sample_with(trained, project, "reproduced", validation_seed=seeds[0])
    assert pixels(again[0]) == pixels(random_a[0])


@pytest.mark.slow
def test_guidance_options_and_scheduler_reach_the_pipeline(trained, project, monkeypatch):
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline

    calls = []
    original = StableDiffusionPipeline.__call__

    def spy(self, *args, **kwargs):
        calls.append((type(self.scheduler), kwargs))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", spy)
    sample_with(trained, project, "rescaled", validation_guidance_rescale=0.7, validation_noise_scheduler="euler-a")
    sample_with(trained, project, "uncond_off", validation_disable_unconditional="true")
    sample_with(trained, project, "default")
    (rescaled_scheduler, rescaled), (_, uncond_off), (default_scheduler, default) = calls
    assert rescaled["guidance_rescale"] == 0.7 and rescaled_scheduler is EulerAncestralDiscreteScheduler
    assert default_scheduler is not EulerAncestralDiscreteScheduler and "guidance_rescale" not in default
    assert uncond_off["guidance_scale"] == 1.0 and default["guidance_scale"] > 1.0
    # the run's own pipeline keeps its scheduler: the swap only lives in the validation pipeline
    assert type(trained.model.noise_scheduler()) is not EulerAncestralDiscreteScheduler


@pytest.mark.slow
def test_prompt_libraries_add_named_images(trained, project, tmp_path):
    library = tmp_path / "mine.json"
    library.write_text(json.dumps({"dog": "a photo of a dog", "animal": "a drawing of a horse"}))
    images, folder = sample_with(trained, project, "library", user_prompt_library=str(library),
                                 validation_prompt_library="true")
    names = {p.name for p in folder.glob("*.png")}
    expected = {"64x64_00.png", "grid_64x64.png", "64x64_dog_00.png",
                *(f"64x64_{name}_00.png" for name in BUILTIN_PROMPTS)}
    assert names == expected and len(images) == len(BUILTIN_PROMPTS) + 2
    record = json.loads((folder / "validation.json").read_text())["images"]
    assert record["animal_00"]["prompt"] == "a drawing of a horse"  # the user's entry replaces the bundled one
    assert record["00"]["prompt"] == "a red square"
