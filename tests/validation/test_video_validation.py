"""Validation videos: mp4 files written with PyAV and decoded back (frame count, size, frame rate,
pixels), first-frame grids for the trackers, FastVideo's ``--validation_dataset_file`` (per-entry
steps, size, frames and the starting picture of image-to-video), and the refusals, all with stand-in
pipelines that return frames. The tiny video families' real pipelines are in test_video_families.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
av = pytest.importorskip("av")

from PIL import Image  # noqa: E402

from simpletuner.options import ConfigError  # noqa: E402
from simpletuner.testing.config import make_config  # noqa: E402
from simpletuner.validation.dataset_file import ValidationEntry, load_validation_dataset  # noqa: E402
from simpletuner.validation.runner import ValidationSettings, Validator  # noqa: E402
from simpletuner.validation.video import VideoSettings, video_frames, write_mp4  # noqa: E402


def moving_square(frames: int, width: int = 64, height: int = 48) -> list[Image.Image]:
    """A white square walking right over a colour gradient: every frame differs from the last."""
    clip = []
    for index in range(frames):
        array = np.zeros((height, width, 3), dtype=np.uint8)
        array[..., 0] = np.linspace(0, 255, width, dtype=np.uint8)[None, :]
        array[..., 2] = 120
        left = 4 + index * 4
        array[16:32, left:left + 16] = 255
        clip.append(Image.fromarray(array))
    return clip


def decode(path: Path) -> tuple[list[np.ndarray], float]:
    """Every frame of ``path`` as RGB arrays, and its stream's average frame rate."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        rate = float(stream.average_rate)
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    return frames, rate


# --- mp4 files ---------------------------------------------------------------------------------------


def test_an_mp4_decodes_back_with_its_frames_size_rate_and_pixels(tmp_path):
    clip = moving_square(9)
    path = write_mp4(clip, tmp_path / "clip.mp4", fps=12)
    assert not list(tmp_path.glob("*.partial"))  # written under a temporary name, then renamed
    frames, rate = decode(path)
    assert len(frames) == 9 and rate == pytest.approx(12)
    assert all(frame.shape == (48, 64, 3) for frame in frames)
    for original, decoded in zip(clip, frames):  # H.264 is lossy, but close at crf 18
        assert np.abs(np.asarray(original).astype(int) - decoded.astype(int)).mean() < 4
    # the square moved: frame 8's square is where frame 0 had gradient
    assert decoded[20, 40].mean() > 200 and frames[0][20, 40].mean() < 200


def test_odd_sizes_are_written_too(tmp_path):
    clip = [frame.crop((0, 0, 63, 47)) for frame in moving_square(3)]
    frames, _ = decode(write_mp4(clip, tmp_path / "odd.mp4", fps=8))
    assert len(frames) == 3 and frames[0].shape == (47, 63, 3)


def test_pipeline_outputs_become_rgb_frames():
    floats = np.zeros((3, 8, 16, 3), dtype=np.float32)
    floats[1] = 1.0
    frames = video_frames(floats)
    assert len(frames) == 3 and frames[0].size == (16, 8)
    assert np.asarray(frames[1]).min() == 255 and np.asarray(frames[0]).max() == 0
    assert len(video_frames(torch.rand(2, 8, 16, 3))) == 2
    assert video_frames(moving_square(2))[1].size == (64, 48)
    with pytest.raises(ValueError, match="frames x height x width x channels"):
        video_frames(np.zeros((8, 16, 3)))


# --- validation runs with stand-in pipelines ------------------------------------------------------------


class TextToVideoPipeline:
    """Returns ``num_frames`` frames whose pixel value encodes the call: red = seed, green = frame."""

    def __init__(self):
        self.calls = []

    def set_progress_bar_config(self, **kwargs):
        pass

    def __call__(self, prompt, negative_prompt=None, num_inference_steps=50, guidance_scale=5.0, width=64,
                 height=64, num_frames=5, generator=None, output_type="np"):
        self.calls.append(dict(prompt=prompt, steps=num_inference_steps, size=(width, height), num_frames=num_frames,
                               seed=generator.initial_seed(), guidance=guidance_scale))
        video = np.zeros((1, num_frames, height, width, 3), dtype=np.float32)
        video[..., 0] = (generator.initial_seed() % 256) / 255
        video[..., 1] = (np.arange(num_frames) * 20 / 255)[None, :, None, None]
        return type("Output", (), {"frames": video})()


class ImageToVideoPipeline(TextToVideoPipeline):
    def __call__(self, image, prompt, negative_prompt=None, num_inference_steps=50, guidance_scale=5.0, width=64,
                 height=64, num_frames=5, generator=None, output_type="np"):
        self.calls.append({"image": np.asarray(image)[0, 0].tolist()})
        return super().__call__(prompt, negative_prompt, num_inference_steps, guidance_scale, width, height,
                                num_frames, generator, output_type)


class VideoFamily:
    """What the validation runner needs from a video family; 1 + 4k frames like Wan's VAE."""

    family = "stand_in_video"
    encodes_video = True
    prediction_type = "flow_matching"
    weight_dtype = torch.float32

    def __init__(self, pipeline):
        self.denoiser = torch.nn.Linear(1, 1)
        self.pipeline = pipeline

    def trainable_text_encoders(self):
        return {}

    def build_pipeline(self, denoiser=None):
        return self.pipeline

    def pipeline_call_arguments(self):
        return {}

    def accepted_frame_count(self, frames):
        return 1 + (frames - 1) // 4 * 4 if frames >= 1 else None

    def accepted_frame_counts_text(self):
        return "1, 5, 9, 13, ... (1 + 4k)"


class RecordingTracker:
    def __init__(self):
        self.images = []

    def log_image(self, tag, image, step):
        self.images.append((tag, image.size, step))

    def log_video(self, tag, path, step):
        pass


def video_settings(video: VideoSettings, prompts=("a cat", "a dog"), names=None, **overrides) -> ValidationSettings:
    values = dict(prompts=list(prompts), negative_prompt=None, num_images=1, num_inference_steps=2, guidance=4.0,
                  seed=100, resolutions=[(64, 48)], names=names or [None] * len(prompts), video=video)
    values.update(overrides)
    return ValidationSettings(**values)


def video_validator(tmp_path, settings, benchmark=False) -> Validator:
    return Validator(settings=settings, output_dir=tmp_path, tracker=RecordingTracker(), interval=1,
                     benchmark_enabled=benchmark, device="cpu")


def test_validation_writes_playable_mp4s_first_frame_grids_and_a_record(tmp_path):
    pipeline = TextToVideoPipeline()
    validator = video_validator(tmp_path, video_settings(VideoSettings(num_frames=9, framerate=8), num_images=2))
    validator.run(VideoFamily(pipeline), step=5)
    folder = tmp_path / "validation" / "step_5"
    assert sorted(p.name for p in folder.iterdir()) == [
        "64x48_00.mp4", "64x48_01.mp4", "64x48_02.mp4", "64x48_03.mp4", "grid_64x48.png", "validation.json"]
    for index, path in enumerate(sorted(folder.glob("*.mp4"))):
        frames, rate = decode(path)
        assert len(frames) == 9 and frames[0].shape == (48, 64, 3) and rate == pytest.approx(8)
        assert abs(int(frames[0][..., 0].mean()) - (100 + index)) <= 3  # clip i comes from seed 100 + i
        assert abs(int(frames[8][..., 1].mean()) - 160) <= 3  # frame 8 of the stand-in's clip
    assert [call["seed"] for call in pipeline.calls] == [100, 101, 102, 103]
    assert [call["prompt"] for call in pipeline.calls] == ["a cat", "a cat", "a dog", "a dog"]
    grid = Image.open(folder / "grid_64x48.png")
    assert grid.width == 4 * 64 and grid.height > 48  # four first frames in a row, under a caption band
    assert grid.text["simpletuner_panels"] == "step 5"
    assert validator.tracker.images == [("validation/64x48", grid.size, 5)]
    record = json.loads((folder / "validation.json").read_text())
    assert record["framerate"] == 8
    assert record["videos"]["64x48_02"] == {"prompt": "a dog", "seed": 102, "width": 64, "height": 48,
                                            "num_frames": 9, "num_inference_steps": 2, "image": None}


def test_later_grids_put_the_base_models_first_frame_beside_each_clip(tmp_path):
    pipeline = TextToVideoPipeline()
    validator = video_validator(tmp_path, video_settings(VideoSettings(num_frames=5)), benchmark=True)
    model = VideoFamily(pipeline)
    validator.run_benchmark(model)
    assert len(validator.benchmark[(64, 48)]) == 2 and len(validator.benchmark[(64, 48)][0]) == 5
    validator.run(model, step=10)
    grid = Image.open(tmp_path / "validation" / "step_10" / "grid_64x48.png")
    assert grid.width == 2 * 128  # two before/after pairs side by side
    assert grid.text["simpletuner_panels"] == "base model | step 10"


def test_an_unaccepted_frame_count_is_refused_before_sampling(tmp_path):
    pipeline = TextToVideoPipeline()
    validator = video_validator(tmp_path, video_settings(VideoSettings(num_frames=8)))
    with pytest.raises(ValueError, match=re.escape("validation clips of 8 frames: the stand_in_video VAE decodes "
                                                   "clips of 1, 5, 9, 13, ... (1 + 4k) frames")):
        validator.run(VideoFamily(pipeline), step=1)
    assert pipeline.calls == []


def write_dataset_file(tmp_path, entries) -> Path:
    path = tmp_path / "validation.json"
    path.write_text(json.dumps(entries))
    return path


def test_dataset_file_entries_bring_their_own_steps_size_frames_and_picture(tmp_path):
    Image.new("RGB", (32, 32), (200, 10, 10)).save(tmp_path / "start.png")
    file = write_dataset_file(tmp_path, {"data": [
        {"caption": "a red ball rolls", "image_path": "start.png", "num_inference_steps": 3, "width": 32,
         "height": 16, "num_frames": 5, "video_path": None},
        {"caption": "a red ball bounces", "image_path": str(tmp_path / "start.png")},
    ]})
    config = make_config(validation_dataset_file=str(file), validation_num_video_frames=9, framerate=10)
    settings = ValidationSettings.from_config(config, fallback_edge=64)
    assert settings.prompts == ["a red ball rolls", "a red ball bounces"]
    assert settings.names == ["dataset_00", "dataset_01"]
    pipeline = ImageToVideoPipeline()
    validator = video_validator(tmp_path / "out", settings)
    validator.run(VideoFamily(pipeline), step=2)
    pictures, calls = pipeline.calls[0::2], pipeline.calls[1::2]
    assert pictures == [{"image": [200, 10, 10]}] * 2  # the starting picture reached the pipeline
    assert [(c["steps"], c["size"], c["num_frames"]) for c in calls] == [(3, (32, 16), 5), (30, (64, 64), 9)]
    folder = tmp_path / "out" / "validation" / "step_2"
    frames, rate = decode(folder / "32x16_dataset_00_00.mp4")
    assert len(frames) == 5 and frames[0].shape == (16, 32, 3) and rate == pytest.approx(10)
    assert len(decode(folder / "64x64_dataset_01_00.mp4")[0]) == 9
    assert {p.name for p in folder.glob("grid_*.png")} == {"grid_32x16.png", "grid_64x64.png"}
    record = json.loads((folder / "validation.json").read_text())
    assert record["videos"]["32x16_dataset_00_00"]["image"] == str(tmp_path / "start.png")


def test_image_to_video_needs_a_picture_for_every_prompt_and_text_to_video_takes_none(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "start.png")
    entry = ValidationEntry(caption="a ball", image_path=tmp_path / "start.png")
    with_picture = video_settings(VideoSettings(entries=(entry,), first_entry=1), prompts=["plain", "a ball"])
    with pytest.raises(ValueError, match=r"generates image-to-video and needs a starting picture for every prompt, "
                                         r"but 'plain' has none"):
        video_validator(tmp_path, with_picture).run(VideoFamily(ImageToVideoPipeline()), step=1)
    with pytest.raises(ValueError, match=r"gives 'a ball' an image_path, but the stand_in_video validation pipeline "
                                         r"\(TextToVideoPipeline\) generates from text only"):
        video_validator(tmp_path, with_picture).run(VideoFamily(TextToVideoPipeline()), step=1)


def test_image_families_refuse_the_video_options(tmp_path):
    from simpletuner.validation.runner import refuse_video_settings

    with pytest.raises(ValueError, match="--validation_dataset_file is for video families; sd1x makes images"):
        refuse_video_settings(video_settings(VideoSettings(entries=(ValidationEntry("a"),))), "sd1x")
    with pytest.raises(ValueError, match="--validation_num_video_frames 9 is for video families; flux makes images"):
        refuse_video_settings(video_settings(VideoSettings(num_frames=9)), "flux")
    refuse_video_settings(video_settings(VideoSettings()), "flux")


# --- the dataset file and the options ---------------------------------------------------------------------


def test_a_plain_list_of_captions_loads(tmp_path):
    entries = load_validation_dataset(write_dataset_file(tmp_path, [{"caption": "a"}, {"caption": "b", "width": 16,
                                                                                        "height": 32}]))
    assert entries == [ValidationEntry("a"), ValidationEntry("b", width=16, height=32)]
    assert entries[1].size == (16, 32) and entries[0].size is None


@pytest.mark.parametrize("entries,message", [
    ([], "must hold a non-empty JSON list of entries"),
    ({"items": []}, "must hold a non-empty JSON list of entries"),
    (["a cat"], "entry 0 of '{file}' must be a JSON object with a \"caption\"; got str"),
    ([{"caption": "a"}, {"prompt": "b"}],
     "entry 1 of '{file}' has the unknown key 'prompt'; an entry may hold caption, image_path, num_inference_steps, "
     "width, height, num_frames"),
    ([{"caption": " "}], "entry 0 of '{file}' needs a \"caption\""),
    ([{"caption": "a", "num_frames": 0}], "num_frames = 0 must be a whole number of at least 1"),
    ([{"caption": "a", "num_inference_steps": 2.5}], "num_inference_steps = 2.5 must be a whole number"),
    ([{"caption": "a", "width": 64}], "gives only one of \"width\" and \"height\""),
    ([{"caption": "a", "width": 60, "height": 64}], "width = 60 must be a multiple of 8"),
    ([{"caption": "a", "image_path": "missing.png"}], "image_path 'missing.png' does not exist (looked for"),
    ([{"caption": "a", "video_path": "clip.mp4"}], "video-to-video validation is not supported"),
])
def test_dataset_file_mistakes_are_refused_at_config_time(tmp_path, entries, message):
    from simpletuner.options.video_validation_rules import check_validation_dataset_file

    file = write_dataset_file(tmp_path, entries)
    with pytest.raises(ConfigError, match=re.escape(message.format(file=file))) as refused:
        check_validation_dataset_file(make_config(validation_dataset_file=str(file)))
    assert str(refused.value).startswith("`--validation_dataset_file`: ")


def test_dataset_file_rule_is_registered_and_names_the_option(tmp_path):
    from simpletuner.options.validation import RULES
    from simpletuner.options.video_validation_rules import VIDEO_VALIDATION_RULES, check_validation_dataset_file

    assert set(VIDEO_VALIDATION_RULES) <= set(RULES)
    with pytest.raises(ConfigError, match=r"^`--validation_dataset_file`: file '.*nope.json' does not exist$"):
        check_validation_dataset_file(make_config(validation_dataset_file=str(tmp_path / "nope.json")))
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        check_validation_dataset_file(make_config(validation_dataset_file=str(tmp_path / "broken.json")))


def test_fastvideo_names_set_the_sampling_steps_and_guidance():
    """``--validation_sampling_steps`` and ``--validation_guidance_scale`` (FastVideo's names) set
    the same options as ours, on the command line and in a config file."""
    from simpletuner.options.resolve import build_train_parser, merge_sources

    namespace, _ = build_train_parser().parse_known_args(["--validation_sampling_steps", "12",
                                                          "--validation_guidance_scale", "3.5"])
    assert (namespace.validation_num_inference_steps, namespace.validation_guidance) == ("12", "3.5")
    warnings: list[str] = []
    config = merge_sources({"validation_sampling_steps": 7, "validation_guidance_scale": 2.0}, {}, "config.json",
                           warnings)
    assert config.validation_num_inference_steps == 7 and config.validation_guidance == 2.0


def test_the_start_of_training_refuses_what_the_first_validation_would(tmp_path):
    """``run_benchmark`` (called before the first step) checks the settings against the model even
    when no base-model samples are made, so a long run does not fail at its first validation."""
    pipeline = ImageToVideoPipeline()
    validator = video_validator(tmp_path, video_settings(VideoSettings(num_frames=5)), benchmark=False)
    with pytest.raises(ValueError, match="needs a starting picture for every prompt"):
        validator.run_benchmark(VideoFamily(pipeline))
    assert pipeline.calls == [] and not (tmp_path / "validation").exists()
    image_family = type("ImageFamily", (), {"family": "sdxl", "encodes_video": False})()
    with pytest.raises(ValueError, match="--validation_num_video_frames 5 is for video families; sdxl makes images"):
        validator.run_benchmark(image_family)
    validator.run_benchmark(VideoFamily(TextToVideoPipeline()))  # a text-to-video model takes these settings
