"""Regularisation (prior-preservation) datasets: drawn at their share, their loss scaled by
``--prior_loss_weight``, trained towards the base model's own prediction with
``regularisation_target: base_model``, and refused clearly where that cannot work."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from simpletuner.data.build import build_training_data  # noqa: E402
from simpletuner.data.schema import DatasetConfigError  # noqa: E402
from simpletuner.methods.prior_preservation import PriorPreservation  # noqa: E402
from simpletuner.options import ConfigError  # noqa: E402
from tests.data.fake_model import FakeModel, local, make_config, make_plan, write_images  # noqa: E402
from tests.training.conftest import config_for  # noqa: E402


def dataset_list(root: Path, name: str, *, subject: bool = True, prior: dict | None = None) -> str:
    """A dataset list at ``root/name`` holding the shapes (unless ``subject`` is False) and, with
    ``prior``, the ``prior`` folder as a regularisation dataset with those extra keys."""
    entries = []
    if subject:
        entries.append({"id": "shapes", "type": "local", "instance_data_dir": str(root / "data"),
                        "caption_strategy": "textfile", "resolution": 64, "resolution_type": "pixel"})
    if prior is not None:
        entries.append({"id": "prior", "type": "local", "instance_data_dir": str(root / "prior"),
                        "caption_strategy": "textfile", "resolution": 64, "resolution_type": "pixel",
                        "is_regularisation_data": True, **prior})
    entries.append({"id": "text", "dataset_type": "text_embeds", "cache_dir": str(root / "cache" / "text"),
                    "default": True})
    path = root / name
    path.write_text(json.dumps(entries))
    return str(path)


@pytest.fixture(scope="module")
def reg_project(project: Path) -> Path:
    """The tiny sd1x project plus 4 other captioned shapes in ``prior/`` (the class images)."""
    from simpletuner.testing.shapes import make_demo_dataset

    if not (project / "prior").exists():
        make_demo_dataset(project / "prior", 4, size=64, seed=11)
    return project


def started_trainer(config):
    """A trainer set up (model, data, adapter, method) without training a step."""
    from simpletuner.training.trainer import Trainer

    trainer = Trainer(config, show_progress=False)
    trainer.setup()
    return trainer


def next_batch_of(trainer, dataset_id: str) -> dict:
    for _ in range(200):
        batch = trainer._next_local_batch()
        if batch["dataset_id"] == dataset_id:
            return batch
    raise AssertionError(f"no {dataset_id} batch in 200 draws")


# --- mixing ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampling, probabilities, expected_share", [
    ("uniform", (0.75, 0.25), 0.25),  # uniform: the probabilities alone
    ("auto-weighting", (1.0, 1.0), 0.75),  # auto: probability x images (2 subject vs 6 prior images)
    ("auto-weighting", (1.0, 0.5), 0.6),  # 2 vs 0.5 x 6 = 3
])
def test_regularisation_batches_come_at_their_configured_share(tmp_path: Path, sampling, probabilities,
                                                               expected_share) -> None:
    write_images(tmp_path / "subject", 2)
    write_images(tmp_path / "prior", 6, prefix="prior")
    plan = make_plan(tmp_path, local("subject", tmp_path / "subject", probability=probabilities[0]),
                     local("prior", tmp_path / "prior", probability=probabilities[1], is_regularisation_data=True))
    data = build_training_data(make_config(tmp_path, data_backend_sampling=sampling), FakeModel(), plan,
                               show_progress=False)
    draws = 2000
    flags = Counter(bool(data.next_batch()["is_regularisation_data"]) for _ in range(draws))
    assert flags[True] / draws == pytest.approx(expected_share, abs=0.04)


# --- the weight ------------------------------------------------------------------------------------


def test_prior_loss_weight_scales_the_logged_loss_of_regularisation_batches_exactly(reg_project: Path) -> None:
    from simpletuner.training.trainer import train

    only_prior = dataset_list(reg_project, "prior-only.json", subject=False, prior={})
    losses = {}
    for weight in (1.0, 0.25, 3.0):
        config = config_for(reg_project, f"prior-w{weight}", data_backend_config=only_prior, max_train_steps=1,
                            prior_loss_weight=weight)
        trainer = train(config, show_progress=False)
        assert isinstance(trainer.method, PriorPreservation)
        losses[weight] = trainer.state.losses[0]
    assert losses[1.0] > 0
    assert losses[0.25] == pytest.approx(losses[1.0] * 0.25, rel=1e-6)
    assert losses[3.0] == pytest.approx(losses[1.0] * 3.0, rel=1e-6)


def test_training_batches_are_not_weighted_and_the_prior_term_is_logged(reg_project: Path) -> None:
    mixed = dataset_list(reg_project, "mixed.json", prior={})
    trainer = started_trainer(config_for(reg_project, "prior-mixed", data_backend_config=mixed, prior_loss_weight=0.5))
    device = trainer.accelerator.device
    shapes, prior = next_batch_of(trainer, "shapes"), next_batch_of(trainer, "prior")
    for batch, is_prior, weight in ((shapes, False, 1.0), (prior, True, 0.5)):
        torch.manual_seed(1)
        wrapped = trainer.method.compute_loss(batch, device)
        torch.manual_seed(1)
        plain = trainer.method.method.compute_loss(batch, device)  # the wrapped SFT, same noise
        assert wrapped.loss.item() == pytest.approx(weight * plain.loss.item(), rel=1e-6)
        assert ("prior" in wrapped.logs) == is_prior
    assert wrapped.logs["prior"] == pytest.approx(plain.loss.item(), rel=1e-6)


# --- the base model as target ----------------------------------------------------------------------


def lora_gradients(trainer) -> list[torch.Tensor]:
    return [p.grad for p in trainer.trainable]


def test_base_model_target_starts_at_zero_loss_and_gradient_then_grows(reg_project: Path) -> None:
    mixed = dataset_list(reg_project, "base-target.json", prior={"regularisation_target": "base_model"})
    trainer = started_trainer(config_for(reg_project, "prior-base", data_backend_config=mixed, max_train_steps=6))
    device = trainer.accelerator.device
    prior = next_batch_of(trainer, "prior")
    trainable_before = [p.requires_grad for p in trainer.trainable]

    output = trainer.method.compute_loss(prior, device)
    output.loss.backward()
    assert output.loss.item() == 0.0 and output.logs["prior"] == 0.0
    grads = [g for g in lora_gradients(trainer) if g is not None]
    assert grads and all(torch.count_nonzero(g) == 0 for g in grads)
    assert [p.requires_grad for p in trainer.trainable] == trainable_before  # the adapter is back on, trainable
    trainer.optimizer.zero_grad(set_to_none=True)

    trainer.fit()  # six steps, the ordinary batches move the adapter away from the base
    torch.manual_seed(0)
    after = trainer.method.compute_loss(prior, device)
    assert after.loss.item() > 0
    after.loss.backward()
    assert any(g is not None and torch.count_nonzero(g) > 0 for g in lora_gradients(trainer))


def test_base_model_target_works_with_lycoris(reg_project: Path, tmp_path: Path) -> None:
    lycoris = tmp_path / "lycoris.json"
    lycoris.write_text(json.dumps({"algo": "lora", "linear_dim": 4, "linear_alpha": 4}))
    mixed = dataset_list(reg_project, "base-target.json", prior={"regularisation_target": "base_model"})
    trainer = started_trainer(config_for(reg_project, "prior-lycoris", data_backend_config=mixed,
                                         lora_type="lycoris", lycoris_config=str(lycoris)))
    network = trainer.model.adapter.network
    for module in network.loras:  # a non-zero adapter: the base prediction must differ from ours
        for parameter in module.parameters():
            torch.nn.init.normal_(parameter, std=0.05)
    prior = next_batch_of(trainer, "prior")
    output = trainer.method.compute_loss(prior, trainer.accelerator.device)
    assert output.loss.item() > 0
    assert network.multiplier == 1.0  # restored after the base prediction


# --- refusals --------------------------------------------------------------------------------------


def test_base_model_target_is_refused_for_full_training(reg_project: Path) -> None:
    mixed = dataset_list(reg_project, "base-target.json", prior={"regularisation_target": "base_model"})
    expected = (r"dataset 'prior': \"regularisation_target\": \"base_model\" cannot be used here: "
                r".*`--model_type full` trains the base weights.*--model_type lora")
    with pytest.raises(ConfigError, match=expected):
        config_for(reg_project, "prior-full", data_backend_config=mixed, model_type="full")


def test_base_model_target_is_refused_with_a_base_altering_init(reg_project: Path) -> None:
    mixed = dataset_list(reg_project, "base-target.json", prior={"regularisation_target": "base_model"})
    with pytest.raises(ConfigError, match=r"`--lora_init_type pissa` moves part of the base weights"):
        config_for(reg_project, "prior-pissa", data_backend_config=mixed, lora_init_type="pissa")


def test_regularisation_target_needs_a_regularisation_dataset(tmp_path: Path) -> None:
    write_images(tmp_path / "d", 2)
    with pytest.raises(DatasetConfigError, match=r"key 'regularisation_target' \('base_model'\) only applies to a "
                                                 r"regularisation dataset; add \"is_regularisation_data\": true"):
        make_plan(tmp_path, local("d", tmp_path / "d", regularisation_target="base_model"))


def test_an_unknown_regularisation_target_lists_the_choices(tmp_path: Path) -> None:
    write_images(tmp_path / "d", 2)
    entry = local("d", tmp_path / "d", is_regularisation_data=True, regularisation_target="teacher")
    with pytest.raises(DatasetConfigError, match=r"regularisation_target.*'teacher'.*\['data', 'base_model'\]"):
        make_plan(tmp_path, entry)


def test_a_negative_prior_loss_weight_is_refused(reg_project: Path) -> None:
    with pytest.raises(ConfigError, match="prior_loss_weight"):
        config_for(reg_project, "prior-neg", prior_loss_weight=-1)


def test_runs_without_regularisation_data_keep_the_plain_method(reg_project: Path) -> None:
    from simpletuner.methods.sft import SupervisedFineTuning

    trainer = started_trainer(config_for(reg_project, "prior-none"))
    assert isinstance(trainer.method, SupervisedFineTuning)


@pytest.mark.parametrize("overrides, reason", [
    ({"train_text_encoder": True}, "`--train_text_encoder` changes the prompt embeddings"),
    ({"tread_config": {"routes": []}}, "`--tread_config` drops a random set of tokens"),
    ({"lora_init_type": "olora"}, "`--lora_init_type olora` moves part of the base weights"),
])
def test_base_model_target_names_each_setting_that_rules_it_out(overrides, reason) -> None:
    from types import SimpleNamespace

    from simpletuner.methods.prior_preservation import base_model_problem

    settings = {"model_type": "lora", "lora_init_type": None, "train_text_encoder": False, "tread_config": None}
    assert base_model_problem(SimpleNamespace(**settings)) is None
    assert base_model_problem(SimpleNamespace(**{**settings, **overrides})).startswith(reason)
