"""CREPA: the teacher's patch tokens from a real (tiny) Dinov2Model loaded from a folder, the term against
an independent float64 reference, neighbour weighting on a synthetic multi-frame tensor, the weight
schedules and similarity threshold, no gradient into any teacher, config rules, a CLI run on the tiny
flux whose terms reach TensorBoard, and exact resume with the projector, similarity average and cutoff."""

from __future__ import annotations

import copy
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from simpletuner.options import ConfigError  # noqa: E402
from simpletuner.regularizers.base import Regularizers  # noqa: E402
from simpletuner.regularizers.crepa import Crepa, NeighbourSettings, alignment_score, token_grid  # noqa: E402
from simpletuner.regularizers.vision_teacher import (TeacherFeatures, encoder_patch_tokens, load_encoder,  # noqa: E402
                                                     make_projector)
from simpletuner.regularizers.schedule import SimilarityGate, WeightSchedule  # noqa: E402
from simpletuner.testing.tiny_vision import make_tiny_dinov2  # noqa: E402

WIDTH = 8  # the stand-in denoiser's token width


@pytest.fixture(scope="module")
def dinov2_folder(tmp_path_factory) -> Path:
    return make_tiny_dinov2(tmp_path_factory.mktemp("dinov2"))


class StandInFamily:
    """Two repeated token blocks, as ``transformer_blocks`` names them, and a VAE whose decode turns a
    3-channel latent into a 40-pixel image (the teacher only needs some fixed pixels per latent)."""

    def __init__(self):
        torch.manual_seed(0)
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(WIDTH, WIDTH), torch.nn.Linear(WIDTH, WIDTH)])
        self.vae = SimpleNamespace(device=torch.device("cpu"), dtype=torch.float32, decode=self.decode)
        self.config = SimpleNamespace(model_family="stand-in")

    @staticmethod
    def decode(latent):
        return SimpleNamespace(sample=torch.tanh(F.interpolate(latent, size=(40, 40), mode="nearest")))

    def transformer_blocks(self):
        return [(f"blocks.{index}", block) for index, block in enumerate(self.blocks)]

    def forward(self, tokens):
        for block in self.blocks:
            tokens = block(tokens)
        return tokens


def crepa(features=None, teacher_block_index=None, target_width=24, weight=0.5, gate=None, **schedule):
    torch.manual_seed(1)
    return Crepa(block_index=0, teacher_block_index=teacher_block_index, projector=make_projector(WIDTH, target_width),
                 schedule=WeightSchedule(base=weight, **schedule), gate=gate or SimilarityGate(None),
                 neighbours=NeighbourSettings(), teacher=features)


def reference_teacher_tokens(encoder, pixels: torch.Tensor) -> torch.Tensor:
    """The encoder's patch tokens, written out in this test: resize, [0, 1], ImageNet statistics."""
    images = F.interpolate(pixels, size=(56, 56), mode="bilinear", align_corners=False)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        hidden = encoder(pixel_values=((images + 1) / 2 - mean) / std).last_hidden_state
    return hidden[:, 1:].double()


def test_teacher_features_are_one_row_per_patch_from_a_dinov2_folder(dinov2_folder: Path):
    encoder = load_encoder(str(dinov2_folder), "cpu", torch.float32)
    assert type(encoder).__name__ == "Dinov2Model" and not any(p.requires_grad for p in encoder.parameters())
    pixels = torch.rand(3, 3, 40, 40) * 2 - 1
    tokens = encoder_patch_tokens(encoder, pixels, image_size=56, frames_batch_size=2)  # batches of 2 and 1
    assert tokens.shape == (3, (56 // 14) ** 2, 24)  # 16 patches, no CLS row
    assert torch.allclose(tokens.double(), reference_teacher_tokens(encoder, pixels), atol=1e-5)


def test_term_matches_a_float64_reference_and_no_gradient_reaches_the_encoder(dinov2_folder: Path):
    model = StandInFamily()
    features = TeacherFeatures(str(dinov2_folder), 56, "cpu", torch.float32)
    encoder = features.encoder
    regularizer = crepa(features=features)
    regularizers = Regularizers([regularizer], model)
    tokens, latent = torch.randn(2, 4, WIDTH), torch.randn(2, 3, 4, 4)  # 4 tokens: a 2x2 grid of 2x2 patches
    with regularizers.capturing():
        model.forward(tokens)
    term = regularizer.term({"latent_mean": latent}, step=0)

    student = model.blocks[0](tokens).double()
    projector = [layer.double() for layer in copy.deepcopy(regularizer.projector)]
    projected = projector[4](F.silu(projector[2](F.silu(projector[0](student)))))
    teacher = reference_teacher_tokens(encoder, model.decode(latent).sample)  # (2, 16, 24): a 4x4 grid
    teacher = F.interpolate(teacher.view(2, 4, 4, 24).permute(0, 3, 1, 2), size=(2, 2), mode="bilinear",
                            align_corners=False).permute(0, 2, 3, 1).reshape(2, 4, 24)
    cosine = (projected * teacher).sum(-1) / (projected.norm(dim=-1) * teacher.norm(dim=-1))
    assert term.logs["similarity"] == pytest.approx(cosine.mean().item(), abs=1e-5)
    assert term.loss.item() == pytest.approx(-0.5 * cosine.mean().item(), abs=1e-5)
    term.loss.backward()
    assert regularizer.projector[0].weight.grad.abs().sum() > 0 and model.blocks[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in encoder.parameters())


def test_backbone_features_align_with_a_detached_deeper_block():
    model = StandInFamily()
    regularizer = crepa(teacher_block_index=1, target_width=WIDTH, weight=1.0)
    regularizers = Regularizers([regularizer], model)
    tokens = torch.randn(2, 4, WIDTH)
    with regularizers.capturing():
        model.forward(tokens)
    term = regularizer.term({"latent_mean": torch.zeros(2, 3, 4, 4)}, step=0)
    student = model.blocks[0](tokens)
    projected, teacher = regularizer.projector(student).double(), model.blocks[1](student).double()
    cosine = (projected * teacher).sum(-1) / (projected.norm(dim=-1) * teacher.norm(dim=-1))
    assert term.loss.item() == pytest.approx(-cosine.mean().item(), abs=1e-6)
    term.loss.backward()
    assert model.blocks[0].weight.grad.abs().sum() > 0
    assert model.blocks[1].weight.grad is None  # the teacher block's tokens are detached


def test_grids_are_inferred_from_the_latent_and_mismatched_grids_pool_without_spatial_align():
    assert token_grid(16, 8, 8) == (4, 4) and token_grid(8, 8, 4) == (4, 2) and token_grid(7, 8, 8) is None
    from simpletuner.regularizers.crepa import match_token_grids

    student, target = torch.randn(1, 1, 4, 3), torch.randn(1, 1, 16, 3)
    pooled_student, pooled_target = match_token_grids(student, target, (2, 2), (4, 4), spatial_align=False)
    assert torch.equal(pooled_student, student.mean(2, keepdim=True))
    assert torch.equal(pooled_target, target.mean(2, keepdim=True))


@pytest.mark.parametrize("cumulative", [False, True])
@pytest.mark.parametrize("normalize_sum", [False, True])
@pytest.mark.parametrize("normalize_by_frames", [False, True])
def test_neighbour_alignment_on_several_frames_matches_a_float64_loop(cumulative, normalize_sum, normalize_by_frames):
    torch.manual_seed(3)
    projected, target = torch.randn(2, 5, 6, 4), torch.randn(2, 5, 6, 4)
    settings = NeighbourSettings(distance=2, tau=0.7, cumulative=cumulative, normalize_sum=normalize_sum,
                                 normalize_by_frames=normalize_by_frames)
    p, t = projected.double(), target.double()
    samples = []
    for b in range(2):
        frames = []
        for f in range(5):
            neighbours = {f: 1.0}
            for d in (range(1, 3) if cumulative else (2,)):
                for k in (f - d, f + d):
                    if 0 <= k < 5:
                        neighbours[k] = math.exp(-d / 0.7)
            score = sum(w * F.cosine_similarity(p[b, f], t[b, k], dim=-1).mean() for k, w in neighbours.items())
            frames.append(score / sum(neighbours.values()) if normalize_sum else score)
        samples.append(sum(frames) / 5 if normalize_by_frames else sum(frames))
    assert alignment_score(projected, target, settings).item() == pytest.approx((sum(samples) / 2).item(), rel=1e-5)


def test_each_schedule_gives_its_documented_curve():
    def curve(scheduler, **extra):
        schedule = WeightSchedule(base=1.0, scheduler=scheduler, warmup_steps=2, decay_steps=4, lambda_end=0.2, **extra)
        return [schedule.weight(step) for step in range(9)]

    warmup = [0.0, 0.5]
    assert curve("constant") == pytest.approx(warmup + [1.0] * 7)
    assert curve("linear") == pytest.approx(warmup + [1.0, 0.8, 0.6, 0.4, 0.2, 0.2, 0.2])
    cosine = [0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * min(t / 4, 1))) for t in range(7)]
    assert curve("cosine") == pytest.approx(warmup + cosine)
    assert curve("polynomial", power=2.0) == pytest.approx(warmup + [0.2 + 0.8 * (1 - min(t / 4, 1)) ** 2 for t in range(7)])
    assert curve("linear", cutoff_step=5) == pytest.approx(warmup + [1.0, 0.8, 0.6, 0.0, 0.0, 0.0, 0.0])
    whole_run = WeightSchedule(base=1.0, scheduler="linear", decay_steps=0, total_steps=10)  # 0 = the whole run
    assert [whole_run.weight(step) for step in (0, 5, 10)] == pytest.approx([1.0, 0.5, 0.0])


def test_permanent_threshold_switches_off_for_good_and_recoverable_comes_back():
    permanent, recoverable = SimilarityGate(0.5, 0.5, "permanent"), SimilarityGate(0.5, 0.5, "recoverable")
    for gate in (permanent, recoverable):
        for value, expected_average in ((0.2, 0.2), (0.6, 0.4), (0.8, 0.6)):
            assert gate.open
            gate.observe(value)
            assert gate.average == pytest.approx(expected_average)
        assert not gate.open  # 0.6 reached the threshold
        gate.observe(0.0)  # average 0.3
    assert not permanent.open and not permanent.watching
    assert recoverable.open and recoverable.watching


def test_the_regularizer_goes_quiet_while_switched_off_and_keeps_measuring_when_recoverable():
    model = StandInFamily()
    regularizer = crepa(teacher_block_index=1, target_width=WIDTH, gate=SimilarityGate(-1.0, 0.0, "recoverable"))
    regularizers = Regularizers([regularizer], model)
    batch = {"latent_mean": torch.zeros(1, 3, 4, 4)}

    def step(number):
        with regularizers.capturing():
            model.forward(torch.randn(1, 4, WIDTH))
        return regularizer.term(batch, number)

    assert step(0) is not None and not regularizer.gate.open  # any score reaches -1
    first = regularizer.gate.average
    assert step(1) is None and regularizer.gate.average != first  # still measured while off
    regularizer.gate.threshold = 2.0
    assert step(2) is None and regularizer.gate.open  # recovered: the next step carries the term
    assert step(3) is not None


def resolve(project: Path, family: str, **overrides):
    from simpletuner.options.resolve import resolve_run
    from tests.models.conftest import family_args

    return resolve_run(family_args(project, family, "out", **overrides)).config


@pytest.fixture(scope="module")
def flux_project(tmp_path_factory) -> Path:
    from simpletuner.testing.projects import make_family_project

    return make_family_project(tmp_path_factory.mktemp("crepa-flux"), "flux")


def test_config_rules(flux_project: Path, dinov2_folder: Path, tmp_path: Path):
    from simpletuner.testing.projects import make_family_project

    on = dict(crepa_enabled="true", crepa_block_index=0)
    with pytest.raises(ConfigError, match="needs `--crepa_block_index`"):
        resolve(flux_project, "flux", crepa_enabled="true")
    with pytest.raises(ConfigError, match="`--crepa_lambda` has no effect without `--crepa_enabled true`"):
        resolve(flux_project, "flux", crepa_lambda=0.3)
    with pytest.raises(ConfigError, match="`--crepa_model` 'nowhere' is neither"):
        resolve(flux_project, "flux", crepa_model="nowhere", **on)
    with pytest.raises(ConfigError, match="`--crepa_teacher_block_index` has no effect without `--crepa_use_backbone"):
        resolve(flux_project, "flux", crepa_teacher_block_index=1, crepa_model=str(dinov2_folder), **on)
    with pytest.raises(ConfigError, match="`--crepa_model` has no effect without an image encoder"):
        resolve(flux_project, "flux", crepa_use_backbone_features="true", crepa_model=str(dinov2_folder), **on)
    with pytest.raises(ConfigError, match="`--crepa_power` has no effect without `--crepa_scheduler polynomial`"):
        resolve(flux_project, "flux", crepa_scheduler="cosine", crepa_power=2, crepa_model=str(dinov2_folder), **on)
    with pytest.raises(ConfigError, match="`--crepa_threshold_mode` has no effect without `--crepa_similarity_thr"):
        resolve(flux_project, "flux", crepa_threshold_mode="recoverable", crepa_model=str(dinov2_folder), **on)
    assert resolve(flux_project, "flux", crepa_model="dinov2_vits14", **on).crepa_enabled
    unet = make_family_project(tmp_path / "sd1x", "sd1x")
    with pytest.raises(ConfigError, match="`--crepa_block_index` only applies to sd3, pixart_sigma, flux, not to sd1x"):
        resolve(unet, "sd1x", **on)


def crepa_args(dinov2_folder: Path, **extra) -> dict:
    return dict(crepa_enabled="true", crepa_block_index=0, crepa_model=str(dinov2_folder),
                crepa_encoder_image_size=56, **extra)


@pytest.mark.parametrize("family", ["flux", "sd3", "pixart_sigma"])
def test_cli_runs_log_crepa_terms_to_tensorboard(family: str, flux_project: Path, dinov2_folder: Path,
                                                 tmp_path_factory):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from simpletuner.cli import main
    from simpletuner.testing.projects import make_family_project
    from tests.models.conftest import family_args

    project = flux_project if family == "flux" else make_family_project(tmp_path_factory.mktemp(family), family)
    argv = family_args(project, family, "crepa", report_to="tensorboard", **crepa_args(dinov2_folder))
    assert main(["train", *argv]) == 0
    events = EventAccumulator(str(next((project / "crepa" / "logs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    similarity = [event.value for event in events.Scalars("loss/crepa/similarity")]
    weighted = [event.value for event in events.Scalars("loss/crepa/loss")]
    assert len(similarity) == 3 and all(-1.0 <= value <= 1.0 for value in similarity)
    assert weighted == pytest.approx([-0.5 * value for value in similarity], rel=1e-5, abs=1e-7)


def test_resume_with_crepa_restores_projector_similarity_average_and_cutoff(flux_project: Path, dinov2_folder: Path):
    from tests.regularizers.conftest import assert_resumes_exactly

    assert_resumes_exactly(flux_project, "flux", "crepa", crepa_args(
        dinov2_folder, crepa_cutoff_step=3, crepa_similarity_threshold=0.99, crepa_similarity_ema_decay=0.5,
        crepa_threshold_mode="recoverable"))
