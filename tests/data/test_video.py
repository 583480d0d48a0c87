"""Video datasets: header-only scan, length rules, frame selection, shared crops, (w, h, frames)
buckets, clip latents through the family's encode_images, cache keys, and the config keys."""

from __future__ import annotations

import logging
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

av = pytest.importorskip("av")

from simpletuner.data.build import build_training_data  # noqa: E402
from simpletuner.data.config import DatasetConfigError, VideoSettings  # noqa: E402
from simpletuner.data.images import load_image_tensor  # noqa: E402
from simpletuner.data.settings import resolve_dataset  # noqa: E402
from simpletuner.data.video import (  # noqa: E402
    CorruptVideoError,
    VideoInfo,
    VideoRecord,
    load_video_tensor,
    place_videos,
    probe_video,
)
from tests.data.fake_model import FakeModel, local, make_config, make_plan, snapshot  # noqa: E402

FPS = 8
WIDE = (64, 48)


class FakeVideoModel(FakeModel):
    """Records the pixel shapes it is given; "latents" are the clips average-pooled 8x in space."""

    encodes_video = True

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def encode_images(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        assert pixels.ndim == 5, f"video pixels must be (B, C, F, H, W), got {tuple(pixels.shape)}"
        assert float(pixels.min()) >= -1.0 and float(pixels.max()) <= 1.0
        self.shapes.append(tuple(pixels.shape))
        self.images_encoded += pixels.shape[0]
        mean = torch.nn.functional.avg_pool3d(pixels, (1, 8, 8))
        return {"latent_mean": mean, "latent_std": torch.full_like(mean, 0.1)}


def grey(index: int) -> int:
    """Background level of frame ``index``: each of the first 19 frames tells which one it is."""
    return 16 + (12 * index) % 228


def write_video(path: Path, frames: int = 16, size: tuple[int, int] = WIDE, faststart: bool = False,
                caption: str | None = "a red square moving") -> Path:
    """``frames`` frames at 8 fps (h264, else mpeg4): a grey level per frame and a red square moving right."""
    path.parent.mkdir(parents=True, exist_ok=True)
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    width, height = size
    with av.open(str(path), "w", options={"movflags": "faststart"} if faststart else {}) as container:
        stream = container.add_stream(codec, rate=FPS)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for index in range(frames):
            pixels = np.full((height, width, 3), grey(index), np.uint8)
            left = (4 * index) % (width - 16)
            pixels[8:24, left:left + 16] = (255, 0, 0)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    if caption is not None:
        path.with_suffix(".txt").write_text(f"{caption}\n", encoding="utf-8")
    return path


def truncated_video(path: Path) -> Path:
    """A video whose index (moov first) is intact but whose frame data is cut off: the header scan
    accepts it, decoding fails."""
    write_video(path, faststart=True)
    data = path.read_bytes()
    path.write_bytes(data[: data.find(b"mdat") + 200])
    return path


# --- probe and decode ------------------------------------------------------------------------------


def test_probe_reads_size_length_and_rate_without_decoding(tmp_path: Path) -> None:
    assert probe_video(write_video(tmp_path / "a.mp4")) == VideoInfo(64, 48, 16, 8.0)
    # Matroska stores no frame count: packets are counted instead
    assert probe_video(write_video(tmp_path / "b.mkv", frames=11)) == VideoInfo(64, 48, 11, 8.0)
    # the frames of this one are gone, yet the header gives its length: nothing was decoded
    broken = truncated_video(tmp_path / "cut.mp4")
    assert probe_video(broken).frames == 16
    with pytest.raises(CorruptVideoError, match="cannot decode video"):
        load_video_tensor(broken, (32, 32, 4))
    (tmp_path / "junk.mp4").write_bytes(b"not a video at all " * 20)
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(CorruptVideoError, match="cannot read video header"):
        probe_video(tmp_path / "junk.mp4")
    with pytest.raises(CorruptVideoError, match="empty file"):
        probe_video(tmp_path / "empty.mp4")


def test_clip_takes_every_nth_frame_from_the_first_with_one_crop_box(tmp_path: Path) -> None:
    path = write_video(tmp_path / "a.mp4")
    clip = load_video_tensor(path, (32, 32, 4), anchor=(0.0, 0.0), frame_interval=3)
    assert clip.shape == (3, 4, 32, 32) and clip.dtype == torch.float32
    levels = [round(float((clip[:, k, -4:, -4:].mean() + 1) * 127.5)) for k in range(4)]
    assert levels == pytest.approx([grey(0), grey(3), grey(6), grey(9)], abs=3)  # frames 0, 3, 6, 9
    # each frame is exactly what the image path makes of that frame, with the same window
    with av.open(str(path)) as container:
        frames = [frame.to_image() for frame in container.decode(video=0)]
    for k, index in enumerate((0, 3, 6, 9)):
        frames[index].save(tmp_path / f"frame{index}.png")
        image = load_image_tensor(tmp_path / f"frame{index}.png", (32, 32), anchor=(0.0, 0.0))
        assert torch.equal(clip[:, k], image)
    # a clip longer than the file is a decode error naming the file
    with pytest.raises(CorruptVideoError, match="only 6 of the 7 frames"):
        load_video_tensor(path, (32, 32, 7), frame_interval=3)


class _Bucket:
    """A remote backend stand-in: no local paths, counts whole-object reads."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.whole_reads: list[str] = []

    def local_path(self, key: str):
        return None

    def locate(self, key: str) -> str:
        return f"s3://bucket/{key}"

    def read_head(self, key: str, length: int) -> bytes:
        return (self.folder / key).read_bytes()[:length]

    def read_bytes(self, key: str) -> bytes:
        self.whole_reads.append(key)
        return (self.folder / key).read_bytes()


def test_remote_videos_are_probed_from_their_first_bytes_when_the_index_is_there(tmp_path: Path,
                                                                                 monkeypatch) -> None:
    import simpletuner.data.video as video

    write_video(tmp_path / "front.mp4", faststart=True)  # index first: the head is enough
    write_video(tmp_path / "back.mp4")  # index last: the whole object is needed
    write_video(tmp_path / "count.mkv")  # no frame count in the header: packets are counted
    monkeypatch.setattr(video, "VIDEO_HEADER_BYTES", 1200)
    bucket = _Bucket(tmp_path)
    for key in ("front.mp4", "back.mp4", "count.mkv"):
        assert video.read_video_info_from(bucket, key) == VideoInfo(64, 48, 16, 8.0), key
    assert bucket.whole_reads == ["back.mp4", "count.mkv"]


# --- placement -------------------------------------------------------------------------------------


def _record(name: str, frames: int, size: tuple[int, int] = WIDE) -> VideoRecord:
    return VideoRecord(Path(name), size[0], size[1], "c", "clips", frames=frames, fps=8.0)


def test_length_rules_and_frame_buckets(tmp_path: Path) -> None:
    (tmp_path / "v").mkdir()
    plan = make_plan(tmp_path, local("clips", tmp_path / "v", dataset_type="video", resolution=32,
                                     video={"num_frames": 4, "frame_interval": 2, "max_frames": 30}))
    cfg = resolve_dataset(plan.images[0], make_config(tmp_path))
    records = [_record("full.mp4", 16), _record("exact.mp4", 7), _record("short.mp4", 6),
               _record("long.mp4", 31), _record("tall.mp4", 16, (48, 64))]
    placed, skipped = place_videos(records, cfg, alignment=16)
    assert {r.path.name: p.size for r, p in placed.items()} == {
        "full.mp4": (48, 32, 4), "exact.mp4": (48, 32, 4), "tall.mp4": (32, 48, 4)}
    reasons = dict(skipped)
    assert "too short: 6 frames, fewer than 7" in reasons[Path("short.mp4")]
    assert "too long: 31 frames, more than max_frames 30" in reasons[Path("long.mp4")]
    # min_frames below a full clip keeps shorter files, as shorter clips in their own bucket
    shorter = resolve_dataset(make_plan(tmp_path, local("clips", tmp_path / "v", dataset_type="video", resolution=32,
                                                        video={"num_frames": 4, "frame_interval": 2,
                                                               "min_frames": 5})).images[0], make_config(tmp_path))
    placed, skipped = place_videos(records[:3], shorter, alignment=16)
    assert [p.size for p in placed.values()] == [(48, 32, 4), (48, 32, 4), (48, 32, 3)] and not skipped


# --- the whole data path ---------------------------------------------------------------------------


def _corpus(folder: Path) -> None:
    for name in ("wide_a", "wide_b"):
        write_video(folder / f"{name}.mp4")
    for name in ("tall_a", "tall_b"):
        write_video(folder / f"{name}.mp4", size=(48, 64))
    write_video(folder / "short.mp4", frames=5)
    write_video(folder / "long.mp4", frames=40)
    truncated_video(folder / "truncated.mp4")
    (folder / "junk.mp4").write_bytes(b"\x00\x01garbage" * 50)
    (folder / "junk.txt").write_text("junk\n", encoding="utf-8")
    (folder / "still.png").write_bytes(b"")  # not a video suffix: never listed


def test_video_dataset_trains_from_clip_latents(tmp_path: Path, caplog) -> None:
    folder = tmp_path / "videos"
    _corpus(folder)
    before = snapshot(folder)
    entry = local("clips", folder, dataset_type="video", resolution=32,
                  video={"num_frames": 4, "frame_interval": 2, "max_frames": 30})
    plan = make_plan(tmp_path, entry)
    config = make_config(tmp_path)
    model = FakeVideoModel()
    with caplog.at_level(logging.INFO):
        data = build_training_data(config, model, plan, show_progress=False, num_processes=1)
    summary = data.summaries[0]
    assert summary.found == 8 and summary.role == "video"
    assert summary.buckets == {(48, 32, 4): 2, (32, 48, 4): 2}
    reasons = {Path(path).name: reason for path, reason in summary.skipped}
    assert set(reasons) == {"short.mp4", "long.mp4", "truncated.mp4", "junk.mp4"}
    assert "too short" in reasons["short.mp4"] and "too long" in reasons["long.mp4"]
    assert "cannot read video header" in reasons["junk.mp4"]
    assert "cannot decode video" in reasons["truncated.mp4"]
    for name in reasons:  # one log line each, naming the file and the reason
        assert sum(name in record.getMessage() and reasons[name][:20] in record.getMessage()
                   for record in caplog.records) == 1, name
    # the family's encoder got 5-D clips: (B, C, frames, H, W)
    assert sorted({shape[1:] for shape in model.shapes}) == [(3, 4, 32, 48), (3, 4, 48, 32)]
    assert model.images_encoded == 4  # the truncated clip failed to decode: never encoded
    seen = set()
    for _ in range(6):
        batch = data.next_batch()
        assert batch["latent_mean"].shape in {(2, 3, 4, 4, 6), (2, 3, 4, 6, 4)}
        assert batch["num_frames"] == 4
        assert batch["frame_rate"].tolist() == [4.0, 4.0]  # 8 fps, every 2nd frame
        names = {Path(p).name.split("_")[0] for p in batch["paths"]}
        assert len(names) == 1  # a batch never mixes sizes
        seen |= {Path(p).name for p in batch["paths"]}
    assert seen == {"wide_a.mp4", "wide_b.mp4", "tall_a.mp4", "tall_b.mp4"}
    assert "48x32x4: 2" in data.describe()
    assert snapshot(folder) == before  # nothing in the dataset folder changed

    # same settings: every clip's latents reused; another frame_interval: new entries
    again = FakeVideoModel()
    data = build_training_data(config, again, plan, show_progress=False, num_processes=1)
    assert again.images_encoded == 0 and data.summaries[0].latents_reused == 4
    entry["video"] = {"num_frames": 4, "frame_interval": 3, "max_frames": 30}
    other = FakeVideoModel()
    data = build_training_data(config, other, make_plan(tmp_path, entry), show_progress=False, num_processes=1)
    assert data.summaries[0].latents_built == 4 and data.summaries[0].latents_reused == 0


def test_an_image_family_refuses_video_datasets(tmp_path: Path) -> None:
    write_video(tmp_path / "videos" / "a.mp4")
    plan = make_plan(tmp_path, local("clips", tmp_path / "videos", dataset_type="video", video={"num_frames": 2}))
    with pytest.raises(DatasetConfigError, match="model family 'sd1x' encodes images only"):
        build_training_data(make_config(tmp_path), FakeModel(), plan, show_progress=False, num_processes=1)


def test_clips_encode_on_demand_too(tmp_path: Path) -> None:
    folder = tmp_path / "videos"
    for name in ("a", "b"):
        write_video(folder / f"{name}.mp4", frames=6)
    plan = make_plan(tmp_path, local("clips", folder, dataset_type="video", resolution=32,
                                     video={"num_frames": 3}))
    model = FakeVideoModel()
    data = build_training_data(make_config(tmp_path, vae_cache_ondemand=True), model, plan, show_progress=False,
                               num_processes=1)
    assert model.images_encoded == 0
    batch = data.next_batch()
    assert batch["latent_mean"].shape == (2, 3, 3, 4, 6) and model.shapes == [(2, 3, 3, 32, 48)]


def test_a_stored_scan_restores_video_records(tmp_path: Path) -> None:
    folder = tmp_path / "videos"
    for name in ("a", "b"):
        write_video(folder / f"{name}.mp4", frames=6)
    plan = make_plan(tmp_path, local("clips", folder, dataset_type="video", resolution=32, video={"num_frames": 3}))
    build_training_data(make_config(tmp_path), FakeVideoModel(), plan, show_progress=False, num_processes=1)
    # no file is opened to list, size or time the videos now: the stored scan has their frames and rate
    data = build_training_data(make_config(tmp_path, skip_file_discovery="metadata vae"), FakeVideoModel(), plan,
                               show_progress=False, num_processes=1)
    assert data.summaries[0].buckets == {(48, 32, 3): 2}
    assert data.next_batch()["frame_rate"].tolist() == [8.0, 8.0]


# --- config ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("keys", "message"), [
    ({"num_frames": 4}, "video settings go inside the \"video\" object"),
    ({"video": {"num_frame": 4}}, "did you mean 'num_frames'"),
    ({"video": {"num_frames": 0}}, "'num_frames' has value 0; use 1 or more"),
    ({"video": {"min_frames": 20, "max_frames": 10}}, "'min_frames' (20) is larger than 'max_frames' (10)"),
    ({"video": {"frame_interval": 1.5}}, "expected an integer"),
    ({"conditioning_data": "masks"}, "'conditioning_data' is not supported on video datasets"),
])
def test_video_keys_are_checked(tmp_path: Path, keys: dict, message: str) -> None:
    (tmp_path / "v").mkdir()
    entry = local("clips", tmp_path / "v", dataset_type="video", **keys)
    masks = local("masks", tmp_path / "v", dataset_type="conditioning", conditioning_type="mask")
    with pytest.raises(DatasetConfigError) as error:
        make_plan(tmp_path, entry, masks)
    assert message in str(error.value) and "'clips'" in str(error.value)


def test_video_object_belongs_to_video_datasets_and_num_frames_defaults_to_five_seconds(tmp_path: Path) -> None:
    (tmp_path / "v").mkdir()
    with pytest.raises(DatasetConfigError, match="only used with \"dataset_type\": \"video\""):
        make_plan(tmp_path, local("photos", tmp_path / "v", video={"num_frames": 4}))
    plan = make_plan(tmp_path, local("clips", tmp_path / "v", dataset_type="video"))
    assert plan.enabled_images[0].id == "clips"
    assert resolve_dataset(plan.images[0], make_config(tmp_path)).video == VideoSettings(num_frames=150)
    assert resolve_dataset(plan.images[0], make_config(tmp_path, framerate=12)).video.num_frames == 60
