"""Shared harness for the model-family tests: a tiny model folder per family, a small captioned
dataset, the CLI arguments of short runs, the resolved config or refusal of such a run, the family's
model or diffusers pipeline on the tiny folder, and an in-process ``simpletuner train`` that snapshots
the trainable weights so a test can check training moved them."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from simpletuner.testing.projects import make_family_project  # noqa: F401  (re-exported for the tests)

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def family_args(root: Path, family: str, output: str, **overrides) -> list[str]:
    """CLI arguments for a short, quiet run of ``family`` on the project at ``root``."""
    values = {
        "model_family": family, "pretrained_model_name_or_path": str(root / "model"), "model_type": "lora",
        "output_dir": str(root / output), "data_backend_config": str(root / "multidatabackend.json"),
        "cache_dir": str(root / "cache"), "resolution": 64, "resolution_type": "pixel",
        "aspect_bucket_alignment": 8, "mixed_precision": "no", "train_batch_size": 2, "max_train_steps": 3,
        "seed": 7, "learning_rate": 1e-3, "report_to": "none", "disable_benchmark": "true",
        "optimizer": "optimi-adamw",
    }
    values.update(overrides)
    return [token for key, value in values.items() if value is not None for token in (f"--{key}", str(value))]


def loaded_family(family: str, defaults: dict, **options):
    """The ``family`` model of a config of ``defaults`` with ``options`` over them, loaded on the CPU
    in fp32: what a test of the family's own methods needs, without a trainer around it."""
    import torch

    from simpletuner.models.registry import load_family_class
    from simpletuner.testing.config import make_config

    config = make_config(**{"model_family": family, **defaults, **options})
    model = load_family_class(family)(config, torch.device("cpu"), torch.float32)
    model.load()
    return model


def keep_trainer(monkeypatch) -> dict:
    """Runs through the CLI create their own trainer; this keeps it as ``seen["trainer"]`` once set up."""
    from simpletuner.training.trainer import Trainer

    seen = {}
    original_setup = Trainer.setup

    def setup_and_keep(self):
        original_setup(self)
        seen["trainer"] = self

    monkeypatch.setattr(Trainer, "setup", setup_and_keep)
    return seen


def assert_finite_losses(trainer, steps: int = 3) -> None:
    """The run logged one finite loss per step of the short runs :func:`family_args` asks for."""
    losses = trainer.state.losses
    assert len(losses) == steps and all(math.isfinite(loss) for loss in losses), losses


def check_trained(trainer, start: dict) -> None:
    """Finite losses for every step, and the optimizer moved trainable weights snapshotted in ``start``."""
    import torch

    assert_finite_losses(trainer)
    now = dict(trainer._unwrapped_denoiser().named_parameters())
    assert start and any(not torch.equal(now[name].detach(), value) for name, value in start.items())


def tiny_pipeline(pipeline_class, folder: Path):
    """``pipeline_class`` loaded from ``folder`` with its progress bar off, as the tests compare outputs."""
    pipeline = pipeline_class.from_pretrained(folder)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


#: The options ``plan-memory`` reads from a short run's arguments (:meth:`FamilyHarness.plan_args`).
PLAN_MEMORY_OPTIONS = {"--model_family", "--pretrained_model_name_or_path", "--output_dir", "--data_backend_config",
                       "--resolution", "--resolution_type", "--aspect_bucket_alignment", "--train_batch_size"}


@dataclass(frozen=True)
class FamilyHarness:
    """The shared test helpers bound to one family, so each family's test module names it once.

    ``defaults`` are CLI options every run of the module starts from (Sana keeps captions short, say);
    a test's own overrides win over them."""

    family: str
    defaults: dict = field(default_factory=dict)

    def project_fixture(self):
        """A module-scoped ``project`` fixture (assign it to ``project`` in the test module): the tiny
        model and captioned shapes of :func:`make_family_project`, built once so the module's runs
        share one text cache."""
        family = self.family

        @pytest.fixture(scope="module")
        def project(tmp_path_factory) -> Path:
            return make_family_project(tmp_path_factory.mktemp(family), family)

        return project

    def model(self, model_folder: Path, **options):
        """The family's model on the tiny folder (:func:`loaded_family`), ``options`` over its config."""
        return loaded_family(self.family, {"pretrained_model_name_or_path": str(model_folder)}, **options)

    def args(self, project: Path, output: str, **overrides) -> list[str]:
        """:func:`family_args` for this family with the module's ``defaults`` under ``overrides``."""
        return family_args(project, self.family, output, **{**self.defaults, **overrides})

    def plan_args(self, project: Path, **overrides) -> list[str]:
        """The arguments of ``simpletuner plan-memory`` for a short run: the model, data and batch options
        it reads (and ``overrides``), none of the training-only ones it would refuse."""
        planned = PLAN_MEMORY_OPTIONS | {f"--{key}" for key in overrides}
        argv = self.args(project, "plan", **overrides)
        return [token for key, value in zip(argv[::2], argv[1::2]) if key in planned for token in (key, value)]

    def config(self, project: Path, output: str = "unit", **overrides):
        """The resolved config of a short run, as the CLI would build it."""
        from simpletuner.options.resolve import resolve_run

        return resolve_run(self.args(project, output, **overrides), environ={}, root=project).config

    def error(self, project: Path, family: str | None = None, **overrides) -> str:
        """The ``ConfigError`` message a run with just ``overrides`` (not the module's ``defaults``) is
        refused with; ``family`` swaps in another family, to show an option of this one is refused there."""
        from simpletuner.options import ConfigError
        from simpletuner.options.resolve import resolve_run

        with pytest.raises(ConfigError) as error:
            resolve_run(family_args(project, family or self.family, "out", **overrides), environ={}, root=project)
        return str(error.value)

    def lora_run_fixture(self, prompt: str):
        """A module-scoped ``lora_run`` fixture: ``(trainer, start weights, output folder)`` of a LoRA run
        to ``lora/`` with gradient checkpointing and validation of ``prompt`` before and after its
        3 steps (2 sampling steps, benchmark on), which several tests of a module read."""
        harness = self

        @pytest.fixture(scope="module")
        def lora_run(project):
            trainer, start = harness.run(project, "lora", validation_prompt=prompt, validation_step_interval=3,
                                         validation_num_inference_steps=2, gradient_checkpointing="true",
                                         disable_benchmark=None)
            return trainer, start, project / "lora"

        return lora_run

    def run(self, project: Path, output: str, **overrides) -> tuple:
        """``simpletuner train`` in-process; returns the finished trainer and its trainable weights right
        after setup, so a test can show training moved them (:func:`check_trained`)."""
        import simpletuner.training.trainer as trainer_module
        from simpletuner.cli import main

        finished, start = [], {}
        original_train, original_setup = trainer_module.train, trainer_module.Trainer.setup

        def recording_train(*args, **kwargs):
            finished.append(original_train(*args, **kwargs))
            return finished[-1]

        def setup_and_snapshot(trainer):
            original_setup(trainer)
            start.update({name: p.detach().clone() for name, p in trainer._unwrapped_denoiser().named_parameters()
                          if p.requires_grad})

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(trainer_module, "train", recording_train)
            patch.setattr(trainer_module.Trainer, "setup", setup_and_snapshot)
            assert main(["train", *self.args(project, output, **overrides)]) == 0
        return finished[0], start


def check_validation_images(out: Path, steps=("step_0_base_model", "step_3"), size: int = 64) -> None:
    """The run at ``out`` saved a captioned grid and a ``size`` px first image for each validation step."""
    from PIL import Image

    for step in steps:
        assert (out / "validation" / step / f"grid_{size}x{size}.png").is_file(), step
        assert Image.open(out / "validation" / step / f"{size}x{size}_00.png").size == (size, size), step


def check_lora_loads_like_training(pipeline, model_folder: Path, lora_folder: Path, denoiser, generate) -> None:
    """The LoRA saved in ``lora_folder`` loads with diffusers' ``load_lora_weights`` into a fresh pipeline
    from ``model_folder``, changes what ``generate`` samples, and samples what the trained ``denoiser``
    does in ``pipeline`` (so the saved file carries the trained strength, not just some weights)."""
    import torch

    before = generate(pipeline)
    loaded = tiny_pipeline(type(pipeline), model_folder)
    loaded.load_lora_weights(lora_folder)
    after = generate(loaded)
    assert (before - after).abs().max() > 1e-4, "loading the trained LoRA must change the output"
    live = type(pipeline)(**{**pipeline.components, "transformer": denoiser.eval()})
    live.set_progress_bar_config(disable=True)
    torch.testing.assert_close(after, generate(live), rtol=0, atol=1e-5)


def check_saved_transformer_is_trained(saved, base, trained: dict) -> None:
    """The ``saved`` pipeline's transformer holds exactly the ``trained`` state dict, which differs from
    the ``base`` pipeline's."""
    import torch

    loaded = saved.transformer.state_dict()
    assert all(torch.equal(loaded[name], value) for name, value in trained.items())
    assert any(not torch.equal(base.transformer.state_dict()[name], value) for name, value in loaded.items())


def check_checkpointing_keeps_gradients(load_model, latents_shape: tuple[int, ...], prompt: str,
                                        checkpointed: dict[int, int], handed_blocks: int | None = None,
                                        every_adapter_learns: bool = True) -> dict:
    """Gradient checkpointing every block and every second block leaves a seeded rank-4 LoRA's gradients
    exactly as they are without it, on one fixed batch (``prompt`` and the empty caption, random latents
    of ``latents_shape``, t = 300 and 800).

    ``load_model()`` gives a fresh family model; ``checkpointed`` maps each interval to the blocks it
    wraps; ``handed_blocks`` is how many blocks the transformer passes to its checkpointing function (all
    of them, whatever it recomputes; None: not counted); ``every_adapter_learns`` is False where an
    adapter's output is never read (Qwen-Image's last text stream). Returns the plain gradients by
    parameter name for the family's own checks."""
    import torch

    from simpletuner.models.adapters import add_lora

    def gradients(interval: int | None) -> tuple[dict, int]:
        model = load_model()
        torch.manual_seed(1)  # the same adapter initialisation every time
        add_lora(model.denoiser, model.lora_target_modules(), rank=4, alpha=4, dropout=0.0)
        handed = []
        if interval is not None:
            assert model.enable_gradient_checkpointing(interval) == checkpointed[interval]
            if handed_blocks is not None:
                inner = model.denoiser._gradient_checkpointing_func
                model.denoiser._gradient_checkpointing_func = lambda block, *a: handed.append(block) or inner(block, *a)
        torch.manual_seed(0)
        text = model.encode_prompts([prompt, ""])
        model.predict(torch.randn(*latents_shape), torch.tensor([300.0, 800.0]), text).square().mean().backward()
        trainable = {name: p for name, p in model.denoiser.named_parameters() if p.requires_grad}
        if every_adapter_learns:
            assert all(p.grad is not None for p in trainable.values())
        return {name: p.grad.clone() for name, p in trainable.items() if p.grad is not None}, len(handed)

    plain, _ = gradients(None)
    for interval in (1, 2):
        with_checkpointing, handed = gradients(interval)
        assert with_checkpointing.keys() == plain.keys()
        if handed_blocks is not None:
            assert handed == handed_blocks
        for name, grad in plain.items():
            torch.testing.assert_close(with_checkpointing[name], grad, msg=name)
    return plain


def saved_lora_keys(folder: Path) -> tuple[list[str], dict[str, str]]:
    """The tensor names and the metadata of the LoRA file a run saved in ``folder``, read without
    loading the tensors."""
    from safetensors import safe_open

    with safe_open(str(folder / "pytorch_lora_weights.safetensors"), framework="pt") as handle:
        return list(handle.keys()), handle.metadata()


def recorded_flow_loss(model, config, prompt: str, latent_shape: tuple[int, ...], monkeypatch, count: int = 512):
    """One supervised flow-matching loss of ``model`` under ``config`` on ``count`` copies of ``prompt``
    with random clean latents of ``latent_shape`` (no posterior spread), the denoiser replaced by one that
    predicts zeros and records its inputs: enough samples to read the sigma distribution, and a loss
    that is the target's own size. Returns ``(loss, sigmas, noisy latents, latent means)``."""
    import torch

    from simpletuner.methods.sft import SupervisedFineTuning

    method = SupervisedFineTuning(model, 0.0, config=config)
    seen = {}

    def record(noisy, timesteps, text, batch=None):
        seen.update(noisy=noisy, timesteps=timesteps)
        return torch.zeros_like(noisy)

    monkeypatch.setattr(model, "predict", record)
    mean = torch.randn(count, *latent_shape)
    text = model.encode_prompts([prompt])
    expanded = {key: value.expand(count, *value.shape[1:]) for key, value in text.items()}
    batch = {"latent_mean": mean, "latent_std": torch.zeros_like(mean), **expanded, "empty_prompt": expanded}
    torch.manual_seed(0)
    loss = method.compute_loss(batch, torch.device("cpu")).loss
    return loss, seen["timesteps"] / 1000, seen["noisy"], mean


def check_loss_regresses_eps_minus_x0(loss, sigmas, noisy, x0) -> None:
    """``loss`` (of a zero prediction) is the mean square of the flow target ``eps - x0``, with the noise
    read back from ``noisy = (1 - sigma) x0 + sigma eps``: the objective interpolates and regresses as
    the family's pipeline samples."""
    import torch

    s = sigmas.view(-1, *[1] * (noisy.dim() - 1))
    noise = (noisy - (1 - s) * x0) / s
    torch.testing.assert_close(loss, (noise - x0).pow(2).mean(), rtol=1e-4, atol=1e-5)
