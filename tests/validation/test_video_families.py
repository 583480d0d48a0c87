"""Validation videos from the tiny video families' real diffusers pipelines: the runner samples with
the family's pipeline (text-to-video, and image-to-video from a ``--validation_dataset_file`` picture)
and writes mp4 files that PyAV decodes back with the requested frame count, size and frame rate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
av = pytest.importorskip("av")

from simpletuner.testing.config import make_config  # noqa: E402
from simpletuner.validation.runner import ValidationSettings, Validator  # noqa: E402

PROMPT = "a red circle on a white background"
#: per family: clip length its VAE decodes whole, and an edge its transformer takes
CLIPS = {"ltxvideo": (9, 32), "wan": (5, 32)}


def decode(path: Path) -> tuple[list[np.ndarray], float]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)], float(stream.average_rate)


class NoTracker:
    def log_image(self, tag, image, step):
        pass

    def log_video(self, tag, path, step):
        pass


def make_model_folder(family: str, folder: Path, variant: str | None = None) -> None:
    if family == "wan":
        from simpletuner.testing.tiny.wan import make_tiny_wan

        make_tiny_wan(folder, variant or "t2v-2.1")
    else:
        from simpletuner.testing.tiny_models import make_tiny_model

        make_tiny_model(family, folder)


def family_model(family: str, folder: Path, variant: str | None = None, **options):
    from simpletuner.models.registry import load_family_class

    if not (folder / "model_index.json").exists():
        make_model_folder(family, folder, variant)
    _, edge = CLIPS[family]
    config = make_config(model_family=family, pretrained_model_name_or_path=str(folder), resolution=edge,
                         resolution_type="pixel", tokenizer_max_length=16, **options)
    model = load_family_class(family)(config, torch.device("cpu"), torch.float32)
    model.load()
    return model, config


def validate(model, config, output: Path, step: int = 3) -> Path:
    settings = ValidationSettings.from_config(config, fallback_edge=CLIPS[config.model_family][1],
                                              family_defaults=model.validation_defaults())
    Validator(settings=settings, output_dir=output, tracker=NoTracker(), interval=1, benchmark_enabled=False,
              device="cpu").run(model, step)
    return output / "validation" / f"step_{step}"


@pytest.mark.parametrize("family", ["ltxvideo", "wan"])
def test_text_to_video_validation_writes_a_playable_mp4(tmp_path, family):
    frames, edge = CLIPS[family]
    model, config = family_model(family, tmp_path / "model", validation_prompt=PROMPT,
                                 validation_num_video_frames=frames, validation_num_inference_steps=2,
                                 validation_resolution=str(edge), framerate=12, num_validation_images=2)
    folder = validate(model, config, tmp_path / "out")
    clips = sorted(folder.glob("*.mp4"))
    assert [p.name for p in clips] == [f"{edge}x{edge}_00.mp4", f"{edge}x{edge}_01.mp4"]
    decoded = [decode(path) for path in clips]
    for video, rate in decoded:
        assert len(video) == frames and video[0].shape == (edge, edge, 3) and rate == pytest.approx(12)
    # two seeds, two different clips; and the clip moves (its frames are not all one picture)
    assert np.abs(decoded[0][0][0].astype(int) - decoded[1][0][0].astype(int)).mean() > 1
    assert max(np.abs(f.astype(int) - decoded[0][0][0].astype(int)).mean() for f in decoded[0][0][1:]) > 0.5
    assert (folder / f"grid_{edge}x{edge}.png").exists()
    record = json.loads((folder / "validation.json").read_text())
    assert record["videos"][f"{edge}x{edge}_01"]["num_frames"] == frames


@pytest.mark.parametrize("family, variant, options, pipeline_class", [
    ("ltxvideo", None, {"ltx_train_mode": "i2v"}, "LTXImageToVideoPipeline"),
    ("wan", "ti2v-2.2", {"model_flavour": "ti2v-5b-2.2"}, "WanImageToVideoValidationPipeline"),
    ("wan", "i2v-2.1", {"model_flavour": "i2v-480p-14b-2.1"}, "WanImageToVideoValidationPipeline"),
])
def test_image_to_video_validation_starts_from_the_dataset_files_picture(tmp_path, family, variant, options,
                                                                        pipeline_class):
    from PIL import Image

    frames, edge = CLIPS[family]
    Image.new("RGB", (edge, edge), (220, 30, 30)).save(tmp_path / "start.png")
    (tmp_path / "prompts.json").write_text(json.dumps([{"caption": PROMPT, "image_path": "start.png",
                                                        "num_frames": frames, "num_inference_steps": 2}]))
    model, config = family_model(family, tmp_path / "model", variant, validation_resolution=str(edge),
                                 validation_dataset_file=str(tmp_path / "prompts.json"), **options)
    assert type(model.build_pipeline()).__name__ == pipeline_class
    folder = validate(model, config, tmp_path / "out")
    video, rate = decode(folder / f"{edge}x{edge}_dataset_00_00.mp4")
    assert len(video) == frames and video[0].shape == (edge, edge, 3) and rate == pytest.approx(30)  # default rate
    record = json.loads((folder / "validation.json").read_text())
    assert record["videos"][f"{edge}x{edge}_dataset_00_00"]["image"] == str(tmp_path / "start.png")
