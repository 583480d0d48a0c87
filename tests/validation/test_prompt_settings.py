"""Prompt library entries that carry their own seed / steps / guidance / size / negative prompt
(as kohya's and ai-toolkit's sample prompts do) reach the pipeline call with those values."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from PIL import Image  # noqa: E402

from simpletuner.testing.config import make_config  # noqa: E402
from simpletuner.validation import runner  # noqa: E402
from simpletuner.validation.runner import ValidationSettings  # noqa: E402


class RecordingPipeline:
    """Records every call and the first random number of each generator (which shows its seed)."""

    def __init__(self):
        self.calls = []

    def __call__(self, **kwargs):
        draws = [float(torch.rand(1, generator=g)) for g in kwargs["generator"]]
        self.calls.append({**kwargs, "draws": draws})
        return type("Output", (), {"images": [Image.new("RGB", (kwargs["width"], kwargs["height"]))
                                              for _ in kwargs["prompt"]]})()


def first_draw(seed: int) -> float:
    return float(torch.rand(1, generator=torch.Generator().manual_seed(seed)))


def test_library_entry_settings_reach_the_pipeline(tmp_path):
    library = tmp_path / "library.json"
    library.write_text(json.dumps({
        "cafe": {"prompt": "a cafe", "seed": 1234, "steps": 7, "guidance": 2.5, "width": 96, "height": 64,
                 "negative_prompt": "blurry"},
        "plain": "a plain prompt",
    }))
    config = make_config(model_family="sd1x", user_prompt_library=str(library), validation_prompt="a cat",
                         validation_num_inference_steps=20, validation_guidance=6.0, validation_seed=5,
                         validation_negative_prompt="ugly")
    settings = ValidationSettings.from_config(config, fallback_edge=64)
    assert settings.prompt_settings == [{}, {"seed": 1234, "steps": 7, "guidance": 2.5, "width": 96, "height": 64,
                                         "negative_prompt": "blurry"}, {}]
    pipeline = RecordingPipeline()
    images = runner.generate_images(pipeline, settings.prompts, settings, "cpu", (64, 64),
                                    prompt_settings=settings.prompt_settings)
    cat, cafe, plain = pipeline.calls
    assert (cat["num_inference_steps"], cat["guidance_scale"], cat["negative_prompt"]) == (20, 6.0, ["ugly"])
    assert cat["draws"] == [first_draw(5)]  # the run's seed + index 0
    assert (cafe["num_inference_steps"], cafe["guidance_scale"], cafe["negative_prompt"]) == (7, 2.5, ["blurry"])
    assert (cafe["width"], cafe["height"]) == (96, 64) and images[1].size == (96, 64)
    assert cafe["draws"] == [first_draw(1234)]  # the entry's own seed
    assert plain["draws"] == [first_draw(5 + 2)] and plain["num_inference_steps"] == 20


def test_plain_libraries_keep_batched_sampling(tmp_path):
    library = tmp_path / "library.json"
    library.write_text(json.dumps({"one": "a dog", "two": "a cat"}))
    settings = ValidationSettings.from_config(make_config(model_family="sd1x", user_prompt_library=str(library)),
                                              fallback_edge=64)
    assert settings.prompt_settings is None
    pipeline = RecordingPipeline()
    runner.generate_images(pipeline, settings.prompts, settings, "cpu", (64, 64),
                           prompt_settings=settings.prompt_settings)
    assert len(pipeline.calls) == 1 and pipeline.calls[0]["prompt"] == ["a dog", "a cat"]


@pytest.mark.slow
def test_a_real_run_samples_library_entries_with_their_own_settings(project, tmp_path, monkeypatch):
    from diffusers import StableDiffusionPipeline

    from simpletuner.training.trainer import train
    from tests.training.conftest import config_for

    calls = []
    original = StableDiffusionPipeline.__call__

    def spy(self, *args, **kwargs):
        calls.append(kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", spy)
    library = tmp_path / "library.json"
    library.write_text(json.dumps({"own": {"prompt": "a blue circle", "seed": 77, "steps": 3, "width": 96,
                                           "negative_prompt": "green"}}))
    train(config_for(project, "own_settings", max_train_steps=1, validation_prompt="a red square",
                     validation_num_inference_steps=2, validation_resolution=64, validation_seed=11,
                     user_prompt_library=str(library)), show_progress=False)
    by_prompt = {tuple(call["prompt"]): call for call in calls}
    plain, own = by_prompt[("a red square",)], by_prompt[("a blue circle",)]
    assert plain["num_inference_steps"] == 2 and (plain["width"], plain["height"]) == (64, 64)
    assert own["num_inference_steps"] == 3 and (own["width"], own["height"]) == (96, 64)
    assert own["negative_prompt"] == ["green"]
    assert own["generator"][0].initial_seed() == 77 and plain["generator"][0].initial_seed() == 11
    written = Image.open(project / "own_settings" / "validation" / "step_1" / "64x64_own_00.png")
    assert written.size == (96, 64)
