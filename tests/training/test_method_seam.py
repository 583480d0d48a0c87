"""The method seam: a training method registered from this file alone (no edit to the trainer or the
checkpoint code) trains, brings a trainable module of its own, logs its terms to TensorBoard and
resumes exactly; and the built-in method names agree with ``--training_method``'s choices."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from simpletuner.methods.base import LossOutput, TrainingMethod  # noqa: E402
from simpletuner.methods.registry import (BUILTIN_METHODS, build_method, method_names, register_method,  # noqa: E402
                                          unregister_method)
from simpletuner.methods.sft import SupervisedFineTuning  # noqa: E402
from simpletuner.training.trainer import train  # noqa: E402
from tests.training.conftest import Interrupted, config_for, crash_after_step  # noqa: E402


class GatedSft:
    """SFT whose loss is scaled by ``1 + gate**2``, with ``gate`` a trainable module of the method's own,
    plus a call counter: state only the method's own checkpoint part can bring back."""

    def __init__(self, model, config):
        self.sft = SupervisedFineTuning(model, config.caption_dropout_probability, config=config)
        self.encode_text_live = False
        self.gate = torch.nn.Linear(1, 1, bias=False)
        torch.nn.init.constant_(self.gate.weight, 0.5)
        self.calls = 0

    def compute_loss(self, batch, device, step=0) -> LossOutput:
        self.sft.encode_text_live = self.encode_text_live
        base = self.sft.compute_loss(batch, device, step).loss
        gate = self.gate.weight.squeeze()
        self.calls += 1
        return LossOutput(base * (1 + gate ** 2), {"denoise": base.item(), "gate": gate.item(), "calls": self.calls})

    def trainable_modules(self):
        return {"gate": self.gate}

    def state_dict(self):
        return {"gate": self.gate.state_dict(), "calls": self.calls}

    def load_state_dict(self, state):
        self.gate.load_state_dict(state["gate"])
        self.calls = state["calls"]


@pytest.fixture
def gated_method():
    register_method("gated_sft", GatedSft)
    yield "gated_sft"
    unregister_method("gated_sft")


def gated_config(project, output: str, **overrides):
    # validation knows the built-in names only; a registered method is chosen on the resolved config
    return config_for(project, output, report_to="tensorboard", **overrides).replace(training_method="gated_sft")


def test_builtin_method_names_are_the_options_choices():
    from simpletuner.options import options_by_name

    assert tuple(BUILTIN_METHODS) == options_by_name()["training_method"].choices
    assert options_by_name()["training_method"].default == "sft"


def test_an_unknown_method_name_lists_the_known_ones():
    from simpletuner.testing.config import make_config

    with pytest.raises(ValueError, match="unknown training method 'nope'; known: sft"):
        build_method("nope", None, make_config())


def test_a_registered_method_trains_its_module_logs_its_terms_and_resumes_exactly(project, gated_method):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert "gated_sft" in method_names()
    overrides = dict(max_train_steps=4, checkpoint_step_interval=2)
    reference = train(gated_config(project, "gated-ref", **overrides), show_progress=False)
    gate = reference.method.gate.weight.item()
    assert gate != 0.5  # the optimizer trained the method's own module
    assert reference.method.calls == 4
    assert any(p is reference.method.gate.weight for p in reference.trainable)

    out = project / "gated-ref"
    events = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss/train", "loss/denoise", "loss/gate", "loss/calls"} <= tags
    assert [event.value for event in events.Scalars("loss/calls")] == [1.0, 2.0, 3.0, 4.0]
    assert (out / "checkpoint-2" / "method.pt").is_file()

    with crash_after_step(3), pytest.raises(Interrupted):
        train(gated_config(project, "gated-cut", **overrides), show_progress=False)
    resumed = train(gated_config(project, "gated-cut", resume_from_checkpoint="latest", **overrides),
                    show_progress=False)
    assert resumed.method.calls == 4  # 2 restored from checkpoint-2, then steps 3 and 4 again
    assert resumed.state.losses == reference.state.losses[2:]
    assert resumed.method.gate.weight.item() == gate
    for ours, theirs in zip(resumed.trainable, reference.trainable):
        assert torch.equal(ours.detach(), theirs.detach())


def test_sft_writes_no_method_file_and_resumes_checkpoints_without_one(project):
    trainer = train(config_for(project, "sft-parts", max_train_steps=2, checkpoint_step_interval=2), show_progress=False)
    assert isinstance(trainer.method, SupervisedFineTuning) and isinstance(trainer.method, TrainingMethod)
    assert trainer.state_parts.files() == ["optimizer.pt", "lr_scheduler.pt", "method.pt", "sampler.json",
                                           "random_states.pt"]
    assert not (project / "sft-parts" / "checkpoint-2" / "method.pt").exists()
