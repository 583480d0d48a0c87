"""LayerSync and the regularizer seam: its term against an independent float64 reference, no gradient
into the teacher, hooks silent outside the training forward, config rules, a CLI run on the tiny flux
and SD3 whose terms reach TensorBoard, and a regularizer registered from this file alone that trains a
projector, keeps state and resumes exactly."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from simpletuner.options import ConfigError  # noqa: E402
from simpletuner.regularizers.base import Regularizers, RegularizerTerm  # noqa: E402
from simpletuner.regularizers.layersync import LayerSync, block_index  # noqa: E402
from simpletuner.regularizers.registry import register_regularizer, unregister_regularizer  # noqa: E402


class TwoBlockModel:
    """A stand-in family with two repeated blocks, run in sequence, as ``transformer_blocks`` names them."""

    def __init__(self):
        torch.manual_seed(0)
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)])

    def transformer_blocks(self):
        return [(f"blocks.{index}", block) for index, block in enumerate(self.blocks)]

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def test_block_numbers_count_depth_from_one_and_zero_names_the_first():
    assert [block_index(n, 4, "x") for n in (0, 1, 2, 4)] == [0, 0, 1, 3]
    with pytest.raises(ValueError, match="`--x` 5 is past the denoiser's 4 transformer blocks; use 1 to 4"):
        block_index(5, 4, "x")


def test_term_matches_a_float64_reference_and_the_teacher_gets_no_gradient():
    model = TwoBlockModel()
    regularizers = Regularizers([LayerSync(student_block=1, teacher_block=2, weight=0.3)], model)
    x = torch.randn(2, 5, 4)
    with regularizers.capturing():
        model.forward(x)
    term = regularizers.items[0].term({}, step=0)
    student = model.blocks[0](x).double()
    teacher = model.blocks[1](model.blocks[0](x)).double()
    cosine = (student * teacher).sum(-1) / (student.norm(dim=-1) * teacher.norm(dim=-1))
    expected = 0.3 * (1 - cosine.mean())
    assert term.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert term.logs["similarity"] == pytest.approx(cosine.mean().item(), rel=1e-6)
    term.loss.backward()
    assert model.blocks[0].weight.grad is not None and model.blocks[0].weight.grad.abs().sum() > 0
    assert model.blocks[1].weight.grad is None  # the teacher's tokens are detached


def test_hooks_record_only_inside_the_training_forward_and_detach_cleanly():
    model = TwoBlockModel()
    regularizers = Regularizers([LayerSync(student_block=1, teacher_block=2, weight=0.2)], model)
    model.forward(torch.randn(1, 3, 4))  # validation, evaluation, EMA sampling: nothing captured
    with pytest.raises(RuntimeError, match="captured no block outputs"):
        regularizers.items[0].term({}, step=0)
    regularizers.detach()
    with regularizers.capturing():
        model.forward(torch.randn(1, 3, 4))
    assert regularizers.items[0].tokens.captured == {}


def resolve(project: Path, family: str, **overrides):
    from simpletuner.options.resolve import resolve_run
    from tests.models.conftest import family_args

    return resolve_run(family_args(project, family, "out", **overrides)).config


@pytest.fixture(scope="module")
def flux_project(tmp_path_factory) -> Path:
    from simpletuner.testing.projects import make_family_project

    return make_family_project(tmp_path_factory.mktemp("layersync-flux"), "flux")


def test_config_rules(flux_project: Path, tmp_path: Path):
    from simpletuner.testing.projects import make_family_project

    with pytest.raises(ConfigError, match="needs `--layersync_student_block`"):
        resolve(flux_project, "flux", layersync_enabled="true")
    with pytest.raises(ConfigError, match="`--layersync_lambda` has no effect without `--layersync_enabled true`"):
        resolve(flux_project, "flux", layersync_lambda=0.5)
    with pytest.raises(ConfigError, match="`--layersync_lambda` = 0.0 must be"):
        resolve(flux_project, "flux", layersync_enabled="true", layersync_student_block=1, layersync_lambda=0)
    unet = make_family_project(tmp_path / "sd1x", "sd1x")
    with pytest.raises(ConfigError, match="`--layersync_enabled` only applies to sd3, pixart_sigma, flux, not to sd1x"):
        resolve(unet, "sd1x", layersync_enabled="true", layersync_student_block=1)


@pytest.mark.parametrize("family", ["flux", "sd3", "pixart_sigma"])
def test_cli_runs_log_layersync_terms_to_tensorboard(family: str, flux_project: Path, tmp_path_factory):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from simpletuner.cli import main
    from simpletuner.testing.projects import make_family_project
    from tests.models.conftest import family_args

    project = flux_project if family == "flux" else make_family_project(tmp_path_factory.mktemp(family), family)
    argv = family_args(project, family, "layersync", report_to="tensorboard", layersync_enabled="true",
                       layersync_student_block=1, layersync_teacher_block=2)
    assert main(["train", *argv]) == 0
    events = EventAccumulator(str(next((project / "layersync" / "logs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    similarity = [event.value for event in events.Scalars("loss/layersync/similarity")]
    weighted = [event.value for event in events.Scalars("loss/layersync/loss")]
    assert len(similarity) == 3 and all(-1.0 <= value <= 1.0 for value in similarity)
    assert weighted == pytest.approx([0.2 * (1 - value) for value in similarity], rel=1e-5)


class ProjectedNorm:
    """A test regularizer: a trainable projector on the denoiser's output norm, and a step counter."""

    name = "projected_norm"

    def __init__(self, model, config):
        self.projector = torch.nn.Linear(1, 1)
        torch.nn.init.constant_(self.projector.weight, 0.1)
        self.seen = None
        self.steps = 0
        self.handle = None

    def attach(self, model, capture):
        def record(module, inputs, output):
            if capture.on:
                self.seen = output[0] if isinstance(output, tuple) else output.sample
        self.handle = model.denoiser.register_forward_hook(record)

    def detach(self):
        self.handle.remove()

    def term(self, batch, step):
        self.steps += 1
        value = self.projector(self.seen.float().pow(2).mean().view(1, 1)).squeeze()
        return RegularizerTerm(0.01 * value.pow(2), {"value": value.item(), "steps": self.steps})

    def trainable_modules(self):
        return {"projector": self.projector}

    def state_dict(self):
        return {"projector": self.projector.state_dict(), "steps": self.steps}

    def load_state_dict(self, state):
        self.projector.load_state_dict(state["projector"])
        self.steps = state["steps"]


@pytest.fixture
def projected_norm():
    register_regularizer("projected_norm", ProjectedNorm, enabled=lambda config: True)
    yield
    unregister_regularizer("projected_norm")


def test_a_registered_regularizer_trains_its_projector_and_resumes_exactly(projected_norm, tmp_path_factory):
    from simpletuner.testing.projects import make_family_project
    from simpletuner.training.trainer import train
    from tests.training.conftest import Interrupted, config_for, crash_after_step

    project = make_family_project(tmp_path_factory.mktemp("regularizer-seam"), "sd1x")
    overrides = dict(max_train_steps=4, checkpoint_step_interval=2)
    reference = train(config_for(project, "ref", **overrides), show_progress=False)
    regularizer = reference.regularizers.items[0]
    assert regularizer.steps == 4 and regularizer.projector.weight.item() != 0.1
    assert (project / "ref" / "checkpoint-2" / "regularizer-projected_norm.pt").is_file()
    with crash_after_step(3), pytest.raises(Interrupted):
        train(config_for(project, "cut", **overrides), show_progress=False)
    resumed = train(config_for(project, "cut", resume_from_checkpoint="latest", **overrides), show_progress=False)
    assert resumed.regularizers.items[0].steps == 4
    assert resumed.state.losses == reference.state.losses[2:]
    assert resumed.regularizers.items[0].projector.weight.item() == regularizer.projector.weight.item()
