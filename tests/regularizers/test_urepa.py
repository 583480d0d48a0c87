"""U-REPA: the alignment and manifold terms against an independent float64 reference, the teacher's
patch tokens from a real (tiny) Dinov2Model loaded from a folder, no gradient into the teacher, config
rules, a CLI run on the tiny sd1x whose terms reach TensorBoard, and exact resume with the projector and
the similarity average."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from simpletuner.options import ConfigError  # noqa: E402
from simpletuner.regularizers.base import Regularizers  # noqa: E402
from simpletuner.regularizers.schedule import SimilarityGate, WeightSchedule  # noqa: E402
from simpletuner.regularizers.urepa import (Urepa, alignment_similarity, feature_map_tokens,  # noqa: E402
                                            manifold_distance)
from simpletuner.regularizers.vision_teacher import TeacherFeatures, make_projector  # noqa: E402
from simpletuner.testing.tiny_vision import make_tiny_dinov2  # noqa: E402

CHANNELS = 6  # the stand-in UNet's mid-block width


@pytest.fixture(scope="module")
def dinov2_folder(tmp_path_factory) -> Path:
    return make_tiny_dinov2(tmp_path_factory.mktemp("dinov2"))


def reference_terms(projected: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    """Alignment and manifold written out in float64 with explicit loops over samples and token pairs."""
    projected, target = projected.double(), target.double()
    similarities, manifolds = [], []
    for h, y in zip(projected, target):
        h = h / h.norm(dim=-1, keepdim=True)
        y = y / y.norm(dim=-1, keepdim=True)
        similarities.append(sum(float(h[i] @ y[i]) for i in range(len(h))) / len(h))
        squares = [(float(h[i] @ h[j]) - float(y[i] @ y[j])) ** 2 for i in range(len(h)) for j in range(len(h))]
        manifolds.append(sum(squares) / len(squares))
    return sum(similarities) / len(similarities), sum(manifolds) / len(manifolds)


def test_terms_equal_a_float64_reference_and_the_manifold_vanishes_only_when_structures_match():
    torch.manual_seed(0)
    projected, target = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    similarity, manifold = reference_terms(projected, target)
    assert alignment_similarity(projected, target).item() == pytest.approx(similarity, rel=1e-5, abs=1e-6)
    assert manifold_distance(projected, target).item() == pytest.approx(manifold, rel=1e-5)
    assert manifold > 1e-3
    assert manifold_distance(target, target).item() == pytest.approx(0.0, abs=1e-6)
    assert manifold_distance(3.0 * target, target).item() == pytest.approx(0.0, abs=1e-6)  # scale-free


def test_feature_maps_become_row_major_tokens():
    features = torch.arange(2 * 3 * 2 * 4, dtype=torch.float32).reshape(2, 3, 2, 4)
    tokens, grid = feature_map_tokens(features)
    assert grid == (2, 4) and tokens.shape == (2, 8, 3)
    assert torch.equal(tokens[1, 5], features[1, :, 1, 1])


class StandInUNet:
    """A denoiser with a ``mid_block`` that outputs a (B, C, 2, 2) map, and a VAE whose decode turns a
    3-channel latent into a 40-pixel image."""

    def __init__(self):
        torch.manual_seed(0)
        self.denoiser = SimpleNamespace(mid_block=torch.nn.Conv2d(3, CHANNELS, 1))
        self.vae = SimpleNamespace(device=torch.device("cpu"), dtype=torch.float32, decode=self.decode)
        self.config = SimpleNamespace(model_family="stand-in")

    @staticmethod
    def decode(latent):
        return SimpleNamespace(sample=torch.tanh(F.interpolate(latent, size=(40, 40), mode="nearest")))

    def forward(self, latent):
        return self.denoiser.mid_block(F.avg_pool2d(latent, 2))


def urepa(features, weight=0.5, manifold_weight=3.0):
    torch.manual_seed(1)
    return Urepa(projector=make_projector(CHANNELS, features.hidden_size), teacher=features,
                 schedule=WeightSchedule(base=weight), gate=SimilarityGate(None), manifold_weight=manifold_weight)


def test_term_uses_one_teacher_row_per_patch_and_matches_the_reference(dinov2_folder: Path):
    features = TeacherFeatures(str(dinov2_folder), 56, "cpu", torch.float32)
    encoder = features.encoder
    model, regularizer = StandInUNet(), urepa(features)
    regularizers = Regularizers([regularizer], model)
    latent = torch.randn(2, 3, 4, 4)
    with regularizers.capturing():
        features = model.forward(latent)
    term = regularizer.term({"latent_mean": latent}, 0)

    pixels = torch.tanh(F.interpolate(latent, size=(40, 40), mode="nearest"))
    images = F.interpolate(pixels, size=(56, 56), mode="bilinear", align_corners=False)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        hidden = encoder(pixel_values=((images + 1) / 2 - mean) / std).last_hidden_state
    patches = (56 // encoder.config.patch_size) ** 2
    assert hidden.shape[1] == patches + 1  # CLS + one row per patch; the CLS is dropped below
    grid = hidden[:, 1:].reshape(2, 4, 4, -1).permute(0, 3, 1, 2)
    target = F.interpolate(grid, size=(2, 2), mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
    with torch.no_grad():
        projected = regularizer.projector(features.flatten(2).transpose(1, 2))
    similarity, manifold = reference_terms(projected, target)
    assert term.logs["similarity"] == pytest.approx(similarity, rel=1e-4)
    assert term.logs["manifold"] == pytest.approx(manifold, rel=1e-4) and manifold > 0
    assert term.loss.item() == pytest.approx(0.5 * (-similarity + 3.0 * manifold), rel=1e-4)

    term.loss.backward()
    assert all(p.grad is not None for p in regularizer.projector.parameters())
    assert all(p.grad is None and not p.requires_grad for p in encoder.parameters())
    assert all(p.grad is not None for p in model.denoiser.mid_block.parameters())


def test_hooks_record_only_inside_the_training_forward(dinov2_folder: Path):
    features = TeacherFeatures(str(dinov2_folder), 56, "cpu", torch.float32)
    encoder = features.encoder
    model, regularizer = StandInUNet(), urepa(features)
    regularizers = Regularizers([regularizer], model)
    model.forward(torch.randn(1, 3, 4, 4))  # validation-like forward: nothing captured
    with pytest.raises(RuntimeError, match="captured no mid-block output"):
        regularizer.term({"latent_mean": torch.randn(1, 3, 4, 4)}, 0)
    regularizers.detach()
    with regularizers.capturing():
        model.forward(torch.randn(1, 3, 4, 4))
    assert regularizer.captured is None


def resolve(project: Path, family: str, **overrides):
    from simpletuner.options.resolve import resolve_run
    from tests.models.conftest import family_args

    return resolve_run(family_args(project, family, "out", **overrides)).config


@pytest.fixture(scope="module")
def sd1x_project(tmp_path_factory) -> Path:
    from simpletuner.testing.projects import make_family_project

    return make_family_project(tmp_path_factory.mktemp("urepa-sd1x"), "sd1x")


def urepa_args(dinov2_folder: Path, **extra) -> dict:
    return dict(urepa_enabled="true", urepa_model=str(dinov2_folder), urepa_encoder_image_size=56, **extra)


def test_config_rules(sd1x_project: Path, dinov2_folder: Path, tmp_path: Path):
    from simpletuner.testing.projects import make_family_project

    with pytest.raises(ConfigError, match="`--urepa_lambda` has no effect without `--urepa_enabled true`"):
        resolve(sd1x_project, "sd1x", urepa_lambda=0.3)
    with pytest.raises(ConfigError, match="`--urepa_model` 'nowhere' is neither"):
        resolve(sd1x_project, "sd1x", urepa_enabled="true", urepa_model="nowhere")
    with pytest.raises(ConfigError, match="`--urepa_power` has no effect without `--urepa_scheduler polynomial`"):
        resolve(sd1x_project, "sd1x", **urepa_args(dinov2_folder, urepa_scheduler="cosine", urepa_power=2))
    with pytest.raises(ConfigError, match="`--urepa_threshold_mode` has no effect without `--urepa_similarity_thr"):
        resolve(sd1x_project, "sd1x", **urepa_args(dinov2_folder, urepa_threshold_mode="recoverable"))
    with pytest.raises(ConfigError, match="`--urepa_use_tae` decodes latents .* add `--alignment_teacher_features live`"):
        resolve(sd1x_project, "sd1x", **urepa_args(dinov2_folder, urepa_use_tae="true"))
    with pytest.raises(ConfigError, match="`--tiny_autoencoder_path` has no effect without `--urepa_use_tae true`"):
        resolve(sd1x_project, "sd1x", **urepa_args(dinov2_folder, tiny_autoencoder_path="madebyollin/taesd"))
    with pytest.raises(ConfigError, match="`--tiny_autoencoder_path` '/nowhere/tae' is not a folder"):
        resolve(sd1x_project, "sd1x", **urepa_args(dinov2_folder, urepa_use_tae="true", alignment_teacher_features="live",
                                                   tiny_autoencoder_path="/nowhere/tae"))
    with pytest.raises(ConfigError, match="`--alignment_teacher_features` has no effect without a DINOv2 teacher"):
        resolve(sd1x_project, "sd1x", alignment_teacher_features="live")
    assert resolve(sd1x_project, "sd1x", **urepa_args(dinov2_folder, urepa_use_tae="true",
                                                      alignment_teacher_features="live")).urepa_use_tae
    assert resolve(sd1x_project, "sd1x", urepa_enabled="true", urepa_model="dinov2_vits14").urepa_enabled
    flux = make_family_project(tmp_path / "flux", "flux")
    with pytest.raises(ConfigError, match="`--urepa_enabled` only applies to .*sd1x.*not to flux"):
        resolve(flux, "flux", urepa_enabled="true")


@pytest.mark.parametrize("family", ["sd1x", "sd2x", "sdxl", "kolors"])
def test_cli_runs_log_urepa_terms_to_tensorboard(family: str, sd1x_project: Path, dinov2_folder: Path,
                                                 tmp_path_factory):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from simpletuner.cli import main
    from simpletuner.testing.projects import make_family_project
    from tests.models.conftest import family_args

    project = sd1x_project if family == "sd1x" else make_family_project(tmp_path_factory.mktemp(family), family)
    argv = family_args(project, family, "urepa", report_to="tensorboard", **urepa_args(dinov2_folder))
    assert main(["train", *argv]) == 0
    events = EventAccumulator(str(next((project / "urepa" / "logs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    similarity = [event.value for event in events.Scalars("loss/urepa/similarity")]
    manifold = [event.value for event in events.Scalars("loss/urepa/manifold")]
    weighted = [event.value for event in events.Scalars("loss/urepa/loss")]
    assert [event.value for event in events.Scalars("loss/urepa/weight")] == [0.5] * 3
    assert len(similarity) == 3 and all(-1.0 <= value <= 1.0 for value in similarity)
    assert all(value > 0 for value in manifold)
    expected = [0.5 * (-s + 3.0 * m) for s, m in zip(similarity, manifold)]
    assert weighted == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_resume_with_urepa_restores_projector_and_similarity_average(sd1x_project: Path, dinov2_folder: Path):
    from tests.regularizers.conftest import assert_resumes_exactly

    assert_resumes_exactly(sd1x_project, "sd1x", "urepa", urepa_args(
        dinov2_folder, urepa_similarity_threshold=0.99, urepa_similarity_ema_decay=0.5,
        urepa_threshold_mode="recoverable"))
