"""The data path under a video family: clip lengths the family's VAE accepts (chosen below, or refused
naming the dataset), image datasets mixed in as one-frame clips (or refused), and clips a file cannot
fill left out with the reason."""

from __future__ import annotations

import logging
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

av = pytest.importorskip("av")

from simpletuner.data.build import build_training_data  # noqa: E402
from simpletuner.data.config import DatasetConfigError  # noqa: E402
from simpletuner.data.settings import resolve_dataset  # noqa: E402
from simpletuner.data.video import VideoRecord, fit_clip_length, place_videos  # noqa: E402
from simpletuner.models.base import ModelFamily  # noqa: E402
from tests.data.fake_model import local, make_config, make_plan, snapshot, write_images  # noqa: E402
from tests.data.test_video import FakeVideoModel, write_video  # noqa: E402


class CausalVideoModel(FakeVideoModel):
    """A video stand-in with a causal VAE's clip rule (1 + 4k frames, ModelFamily's own methods) that
    also encodes images, as one-frame clips."""

    family = "fakevideo"
    accepted_frame_count = ModelFamily.accepted_frame_count
    accepted_frame_counts_text = ModelFamily.accepted_frame_counts_text
    latent_frame_count = ModelFamily.latent_frame_count

    def __init__(self, step: int = 4, stills: bool = True) -> None:
        super().__init__()
        self.step = step
        self.stills = stills

    def temporal_compression(self) -> int:
        return self.step

    def trains_images_as_clips(self) -> bool:
        return self.stills

    def encode_images(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        return super().encode_images(pixels.unsqueeze(2) if pixels.dim() == 4 else pixels)


def test_a_causal_vae_takes_one_plus_whole_groups_of_frames() -> None:
    model = CausalVideoModel()
    assert [model.accepted_frame_count(n) for n in (0, 1, 2, 5, 8, 9, 12, 13, 150)] == \
        [None, 1, 1, 5, 5, 9, 9, 13, 149]
    assert model.accepted_frame_counts_text() == "1, 5, 9, 13, ... (1 + 4k)"
    assert [model.latent_frame_count(n) for n in (1, 5, 9, 81)] == [1, 2, 3, 21]
    # an image family's "clip" is any length (it has no time axis)
    assert ModelFamily.accepted_frame_count(CausalVideoModel(step=1), 7) == 7


def test_num_frames_is_lowered_to_an_accepted_length_with_a_warning(tmp_path: Path, caplog) -> None:
    folder = tmp_path / "videos"
    for name in ("a", "b"):
        write_video(folder / f"{name}.mp4", frames=16)
    write_video(folder / "short.mp4", frames=7)  # min_frames lets it in: 7 frames -> a 5-frame clip
    write_video(folder / "tiny.mp4", frames=4)  # 4 frames -> a 1-frame clip
    plan = make_plan(tmp_path, local("clips", folder, dataset_type="video", resolution=32,
                                     video={"num_frames": 11, "min_frames": 4}))
    model = CausalVideoModel()
    with caplog.at_level(logging.WARNING):
        data = build_training_data(make_config(tmp_path), model, plan, show_progress=False, num_processes=1)
    assert data.summaries[0].buckets == {(48, 32, 9): 2, (48, 32, 5): 1, (48, 32, 1): 1}
    assert sorted({shape[2] for shape in model.shapes}) == [1, 5, 9]  # the VAE only saw accepted lengths
    warning = next(r.getMessage() for r in caplog.records if "not 11" in r.getMessage())
    assert "dataset clips" in warning and "1, 5, 9, 13, ... (1 + 4k)" in warning and "clips of 9 frames" in warning


def test_a_clip_length_no_count_fits_is_refused_naming_the_dataset(tmp_path: Path) -> None:
    (tmp_path / "v").mkdir()
    plan = make_plan(tmp_path, local("clips", tmp_path / "v", dataset_type="video", video={"num_frames": 3}))
    cfg = resolve_dataset(plan.images[0], make_config(tmp_path))
    cfg = cfg.__class__(**{**cfg.__dict__, "video": cfg.video.__class__(num_frames=0)})
    with pytest.raises(DatasetConfigError) as error:
        fit_clip_length(cfg, CausalVideoModel())
    assert "dataset 'clips'" in str(error.value) and "1, 5, 9, 13, ... (1 + 4k)" in str(error.value)
    # placement: a file too short for even one accepted clip is left out with the reason
    rule = CausalVideoModel(step=4)
    rule_without_single_frames = lambda n: None if n < 5 else rule.accepted_frame_count(n)  # noqa: E731
    short = resolve_dataset(make_plan(tmp_path, local("clips", tmp_path / "v", dataset_type="video", resolution=32,
                                                      video={"num_frames": 9, "min_frames": 2})).images[0],
                            make_config(tmp_path))
    records = [VideoRecord(Path("ok.mp4"), 64, 48, "c", "clips", frames=12),
               VideoRecord(Path("three.mp4"), 64, 48, "c", "clips", frames=3)]
    placed, skipped = place_videos(records, short, alignment=16, frame_count=rule_without_single_frames)
    assert [p.size for p in placed.values()] == [(48, 32, 9)]
    assert "shorter than any clip length the model's VAE encodes" in dict(skipped)[Path("three.mp4")]


def test_images_join_video_training_as_one_frame_clips(tmp_path: Path) -> None:
    write_video(tmp_path / "videos" / "a.mp4", frames=9)
    write_video(tmp_path / "videos" / "b.mp4", frames=9)
    write_images(tmp_path / "stills", 2, size=(64, 48))
    plan = make_plan(tmp_path, local("clips", tmp_path / "videos", dataset_type="video", resolution=32,
                                     video={"num_frames": 5}),
                     local("stills", tmp_path / "stills", resolution=32))
    model = CausalVideoModel()
    data = build_training_data(make_config(tmp_path), model, plan, show_progress=False, num_processes=1)
    assert {s.id: s.buckets for s in data.summaries} == {"clips": {(48, 32, 5): 2}, "stills": {(48, 32): 2}}
    assert sorted(shape[1:] for shape in model.shapes) == [(3, 1, 32, 48), (3, 5, 32, 48)]
    shapes = set()
    for _ in range(4):
        batch = data.next_batch()
        shapes.add(tuple(batch["latent_mean"].shape))
        assert ("num_frames" in batch) == (batch["dataset_id"] == "clips")
    assert shapes == {(2, 3, 5, 4, 6), (2, 3, 1, 4, 6)}  # stills are 5-D latents with one frame


def test_a_family_that_cannot_learn_from_stills_refuses_image_datasets(tmp_path: Path) -> None:
    write_video(tmp_path / "videos" / "a.mp4", frames=9)
    write_images(tmp_path / "stills", 2)
    before = snapshot(tmp_path / "stills")
    plan = make_plan(tmp_path, local("clips", tmp_path / "videos", dataset_type="video", video={"num_frames": 5}),
                     local("stills", tmp_path / "stills"))
    with pytest.raises(DatasetConfigError) as error:
        build_training_data(make_config(tmp_path), CausalVideoModel(stills=False), plan, show_progress=False,
                            num_processes=1)
    assert str(error.value) == ("dataset 'stills' holds images, but model family 'sd1x' cannot train images as "
                                "one-frame clips; use \"dataset_type\": \"video\" datasets only, or disable the dataset")
    assert snapshot(tmp_path / "stills") == before


def test_corrupt_and_truncated_clips_are_reported_and_left_in_place(tmp_path: Path, caplog) -> None:
    from tests.data.test_video import truncated_video

    folder = tmp_path / "videos"
    for name in ("a", "b"):
        write_video(folder / f"{name}.mp4", frames=9)
    truncated_video(folder / "cut.mp4")
    (folder / "junk.mp4").write_bytes(b"\x00garbage" * 40)
    before = snapshot(folder)
    plan = make_plan(tmp_path, local("clips", folder, dataset_type="video", resolution=32, video={"num_frames": 9}))
    with caplog.at_level(logging.WARNING):
        data = build_training_data(make_config(tmp_path), CausalVideoModel(), plan, show_progress=False,
                                   num_processes=1)
    reasons = {Path(path).name: reason for path, reason in data.summaries[0].skipped}
    assert set(reasons) == {"cut.mp4", "junk.mp4"}
    assert "cannot decode video" in reasons["cut.mp4"] and "cannot read video header" in reasons["junk.mp4"]
    assert data.summaries[0].buckets == {(48, 32, 9): 2}
    assert snapshot(folder) == before  # reported and skipped; nothing deleted or rewritten
