"""The DINOv2 teacher's features for CREPA and U-REPA: cached once per image beside the latents (from the
same crops, fingerprinted, reused by the next run without loading the encoder at all), read from the batch,
or computed live from the latents, through the VAE or a Tiny AutoEncoder (``--urepa_use_tae``)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from simpletuner.regularizers.vision_teacher import (TeacherFeatures, encoder_patch_tokens,  # noqa: E402
                                                     load_tiny_autoencoder, pixels_from_latents)
from simpletuner.testing.tiny_vision import make_tiny_autoencoder_tiny, make_tiny_dinov2  # noqa: E402


@pytest.fixture(scope="module")
def dinov2_folder(tmp_path_factory) -> Path:
    return make_tiny_dinov2(tmp_path_factory.mktemp("dinov2"))


@pytest.fixture(scope="module")
def flux_project(tmp_path_factory) -> Path:
    from simpletuner.testing.projects import make_family_project

    return make_family_project(tmp_path_factory.mktemp("features-flux"), "flux")


def crepa_config(project: Path, dinov2_folder: Path, output: str, **extra):
    from simpletuner.options.resolve import resolve_run
    from tests.models.conftest import family_args

    args = family_args(project, "flux", output, max_train_steps=2, crepa_enabled="true", crepa_block_index=0,
                       crepa_model=str(dinov2_folder), crepa_encoder_image_size=56, **extra)
    return resolve_run(args).config


def crepa_of(trainer):
    return next(item for item in trainer.regularizers.items if item.name == "crepa")


def test_features_are_cached_beside_the_latents_and_the_next_run_never_loads_the_encoder(flux_project: Path,
                                                                                          dinov2_folder: Path):
    from simpletuner.data.images import load_image_tensor
    from simpletuner.training.trainer import train

    first = train(crepa_config(flux_project, dinov2_folder, "first"), show_progress=False)
    key = crepa_of(first).teacher.batch_key
    summary = first.data.summaries[0]
    assert summary.features == {key: (0, summary.used)}  # every used image encoded once, at caching time
    role = first.data.roles[summary.id]
    cache = role.features[key]
    folder = Path(cache.cache_dir)
    assert folder.parent.name == "teacher_features" and folder.name == f"{dinov2_folder.name}-56"
    assert len(list(folder.rglob("*.safetensors"))) >= summary.used

    batch = first.data.next_batch()
    features = batch[key]
    assert features.dtype == torch.float16 and features.shape == (2, (56 // 14) ** 2, 24)  # one row per patch
    record = next(r for r in role.records if str(r.path) == batch["paths"][0])
    size = first.data.bucket_of[record]
    pixels = load_image_tensor(record.path, size[:2], anchor=first.data.latent_caches[summary.id].anchor_of(record))
    expected = encoder_patch_tokens(crepa_of(first).teacher.encoder, pixels.unsqueeze(0), 56)[0]
    assert torch.allclose(features[0].float(), expected, atol=2e-2, rtol=2e-3)  # float16 storage

    second = train(crepa_config(flux_project, dinov2_folder, "second"), show_progress=False)
    assert second.data.summaries[0].features == {key: (summary.used, 0)}
    assert crepa_of(second).teacher._encoder is None  # neither caching nor training ran DINOv2
    assert all(value is not None for value in second.state.losses)


def test_live_features_skip_the_cache_and_encode_decoded_latents(flux_project: Path, dinov2_folder: Path):
    from simpletuner.training.trainer import train

    trainer = train(crepa_config(flux_project, dinov2_folder, "live", alignment_teacher_features="live"),
                    show_progress=False)
    assert trainer.data.summaries[0].features == {}
    regularizer = crepa_of(trainer)
    assert regularizer.teacher._encoder is not None  # loaded to encode every step
    batch = trainer.data.next_batch()
    assert regularizer.teacher.batch_key not in batch


def test_a_different_image_size_is_a_different_cache(flux_project: Path, dinov2_folder: Path):
    small = TeacherFeatures(str(dinov2_folder), 28, "cpu", torch.float32)
    large = TeacherFeatures(str(dinov2_folder), 56, "cpu", torch.float32)
    assert small.batch_key != large.batch_key and small.cache_folder != large.cache_folder
    assert small.latent_fingerprint_parts() != large.latent_fingerprint_parts()
    assert small.grid == (2, 2) and large.grid == (4, 4) and large.hidden_size == 24
    assert large._encoder is None  # width and grid come from the config alone


def test_the_tiny_autoencoder_decodes_the_scaled_latents(tmp_path: Path):
    tiny = load_tiny_autoencoder(str(make_tiny_autoencoder_tiny(tmp_path / "tae")), "cpu", torch.float32)
    assert not any(p.requires_grad for p in tiny.parameters())
    vae = SimpleNamespace(config=SimpleNamespace(scaling_factor=0.5, shift_factor=0.25), device="cpu", dtype=torch.float32)
    mean = torch.randn(2, 4, 8, 8)
    pixels = pixels_from_latents(mean, vae, tiny)
    with torch.no_grad():
        expected = tiny.decode((mean - 0.25) * 0.5).sample
    assert pixels.shape == (2, 3, 32, 32) and torch.equal(pixels, expected)
    with pytest.raises(RuntimeError, match="U-REPA needs the family's VAE"):
        pixels_from_latents(mean, None, tiny, who="U-REPA")


def test_urepa_with_the_tiny_autoencoder_trains_on_the_tiny_sd1x(tmp_path: Path, dinov2_folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from simpletuner.cli import main
    from simpletuner.testing.projects import make_family_project
    from tests.models.conftest import family_args, keep_trainer

    project = make_family_project(tmp_path / "sd1x", "sd1x")
    tae = make_tiny_autoencoder_tiny(tmp_path / "tae")
    argv = family_args(project, "sd1x", "tae", report_to="tensorboard", urepa_enabled="true",
                       urepa_model=str(dinov2_folder), urepa_encoder_image_size=56, urepa_use_tae="true",
                       alignment_teacher_features="live", tiny_autoencoder_path=str(tae))
    with pytest.MonkeyPatch.context() as patch:
        seen = keep_trainer(patch)
        assert main(["train", *argv]) == 0
    regularizer = next(item for item in seen["trainer"].regularizers.items if item.name == "urepa")
    assert type(regularizer.tiny_autoencoder).__name__ == "AutoencoderTiny"
    events = EventAccumulator(str(next((project / "tae" / "logs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert len(events.Scalars("loss/urepa/manifold")) == 3
