"""Prior preservation: what batches of a regularisation dataset (``is_regularisation_data: true``) train.

DreamBooth-style training shows the model its new subject next to "class" images, so it keeps
knowing what an ordinary dog looks like while learning one particular dog. Here the mixer
(data/mixing.py) already draws the regularisation dataset at its ``probability`` and never puts two
datasets in one batch, so the whole batch is either training data or regularisation data; this
module only changes the loss of the regularisation batches:

* its weight: the batch's denoising loss times ``--prior_loss_weight`` (the name kohya and the
  diffusers DreamBooth script use);
* its target, per dataset (``regularisation_target``): ``data`` is the usual denoising target on
  the class images; ``base_model`` is the frozen base model's own prediction for the same noisy
  input and caption, computed with the LoRA / LyCORIS adapter switched off. The adapter is then
  pulled back towards the base wherever those prompts lead, without a second copy of the model.

:class:`PriorPreservation` wraps the run's training method, so neither the trainer's loop nor the
method knows about regularisation data. Torch is imported inside functions: the config check
(:func:`check_regularisation_targets`) runs at validation, before any heavy import.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    import torch

    from simpletuner.methods.base import LossOutput

#: LoRA initialisations that move part of the base weight into the adapter: with the adapter off
#: the denoiser is no longer the base model, so it cannot serve as the ``base_model`` target.
_BASE_ALTERING_INITS = ("pissa", "olora")


@dataclass(frozen=True)
class RegularisationPlan:
    """The regularisation datasets of a run: dataset id -> ``regularisation_target``."""

    targets: dict[str, str]

    @classmethod
    def from_dataset_plan(cls, plan) -> RegularisationPlan:
        return cls({cfg.id: cfg.regularisation_target for cfg in plan.images
                    if cfg.is_regularisation_data and not cfg.disabled})

    @property
    def uses_base_model(self) -> bool:
        return "base_model" in self.targets.values()

    def target_of(self, batch: dict) -> str | None:
        """The batch's regularisation target, or None for an ordinary training batch."""
        if not batch.get("is_regularisation_data"):
            return None
        return self.targets.get(batch.get("dataset_id"), "data")


def base_model_problem(config) -> str | None:
    """Why this run cannot use ``regularisation_target: base_model`` (None when it can)."""
    if config.model_type != "lora":
        return (f"it compares against the frozen base model, and `--model_type {config.model_type}` trains the "
                "base weights themselves, so no frozen copy exists; train a LoRA / LyCORIS (`--model_type lora`) "
                "or use \"regularisation_target\": \"data\"")
    if config.lora_init_type in _BASE_ALTERING_INITS:
        return (f"`--lora_init_type {config.lora_init_type}` moves part of the base weights into the adapter, so the "
                "denoiser with its adapter switched off is not the base model; use another `--lora_init_type` or "
                "\"regularisation_target\": \"data\"")
    if config.train_text_encoder:
        return ("`--train_text_encoder` changes the prompt embeddings the base model would be asked with, so its "
                "prediction is no longer the base's; turn it off or use \"regularisation_target\": \"data\"")
    if config.tread_config:
        return ("`--tread_config` drops a random set of tokens in every forward pass, so the base pass and the "
                "trained pass would see different tokens and never agree; remove it or use "
                "\"regularisation_target\": \"data\"")
    return None


def check_regularisation_targets(config, plan) -> None:
    """Refuse, at validation, a ``base_model`` target the run cannot honour.

    Raises:
        DatasetConfigError: names the dataset, the key and what to change.
    """
    from simpletuner.data.config import DatasetConfigError

    for dataset_id, target in RegularisationPlan.from_dataset_plan(plan).targets.items():
        if target != "base_model":
            continue
        problem = base_model_problem(config)
        if problem is not None:
            source = config.data_backend_config or "the dataset list"
            raise DatasetConfigError(f"{source}: dataset {dataset_id!r}: \"regularisation_target\": \"base_model\" "
                                     f"cannot be used here: {problem}")


def with_prior_preservation(method, model, config, dataset_plan):
    """``method`` wrapped to handle regularisation batches; ``method`` itself when no dataset is one."""
    plan = RegularisationPlan.from_dataset_plan(dataset_plan)
    if not plan.targets:
        return method
    from simpletuner.methods.distillation.settings import DISTILLATION_METHODS
    from simpletuner.methods.registry import method_of

    if method_of(config) in DISTILLATION_METHODS:
        raise ValueError(f"regularisation datasets weigh a denoising loss; `--training_method {method_of(config)}` "
                         "learns from the teacher instead. Drop \"is_regularisation_data\" from the dataset list")
    return PriorPreservation(method, model, plan, float(config.prior_loss_weight), config)


@contextlib.contextmanager
def adapter_switched_off(model) -> Iterator[None]:
    """The denoiser as the base model: LyCORIS at multiplier 0, PEFT's LoRA layers disabled; both
    restored after, the adapters' ``requires_grad`` flags included (PEFT resets them on the way)."""
    network = getattr(getattr(model, "adapter", None), "network", None)
    if network is not None:
        previous = network.multiplier
        network.set_multiplier(0.0)
        try:
            yield
        finally:
            network.set_multiplier(previous)
        return
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [module for module in model.denoiser.modules() if isinstance(module, BaseTunerLayer)]
    if not layers:
        raise RuntimeError("regularisation_target base_model: the denoiser carries no LoRA / LyCORIS adapter to "
                           "switch off")
    trainable = {parameter: parameter.requires_grad for layer in layers for parameter in layer.parameters()}
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for parameter, flag in trainable.items():
            parameter.requires_grad_(flag)


class PriorPreservation:
    """A training method whose regularisation batches are weighted and, for ``base_model``, retargeted.

    Everything else (ordinary batches, evaluation, checkpoint state, trainable modules) is the wrapped
    method's. The unweighted loss of a regularisation batch is logged as ``loss/prior``.
    """

    def __init__(self, method, model, plan: RegularisationPlan, weight: float, config) -> None:
        if plan.uses_base_model:
            problem = base_model_problem(config)
            if problem is not None:
                raise ValueError(f"\"regularisation_target\": \"base_model\" cannot be used here: {problem}")
            hooks = ("text_conditioning", "loss_mask", "clean_first_frame")
            if not all(hasattr(method, name) for name in hooks):
                raise ValueError("\"regularisation_target\": \"base_model\" needs a denoising method (sft, "
                                 f"causal_sft); `--training_method {config.training_method}` does not noise "
                                 "batches that way")
        self.method = method
        self.model = model
        self.plan = plan
        self.weight = weight

    # --- the wrapped method's interface ------------------------------------------------------------

    @property
    def encode_text_live(self) -> bool:
        return self.method.encode_text_live

    @encode_text_live.setter
    def encode_text_live(self, value: bool) -> None:
        self.method.encode_text_live = value

    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        return self.method.trainable_modules()

    def state_dict(self) -> dict[str, Any]:
        return self.method.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.method.load_state_dict(state)

    def eval_positions(self, count: int) -> list[float]:
        return self.method.eval_positions(count)

    def eval_loss(self, batch: dict, device: torch.device, positions: list[float], generator) -> torch.Tensor:
        return self.method.eval_loss(batch, device, positions, generator)

    # --- the loss ----------------------------------------------------------------------------------

    def compute_loss(self, batch: dict, device: torch.device, step: int = 0) -> LossOutput:
        from simpletuner.methods.base import LossOutput

        target = self.plan.target_of(batch)
        if target is None:
            return self.method.compute_loss(batch, device, step=step)
        if target == "base_model":
            output = LossOutput(self.base_model_loss(batch, device))
        else:
            output = self.method.compute_loss(batch, device, step=step)
        logs = {**output.logs, "prior": float(output.loss.detach().float())}
        return LossOutput(output.loss * self.weight, logs)

    def base_model_loss(self, batch: dict, device: torch.device) -> torch.Tensor:
        """Mean squared distance between the adapted denoiser's prediction and the base model's for
        the same noisy latents, timesteps and (possibly dropped) caption. The base prediction carries
        no gradient; with a zero-initialised adapter the two are equal, so the loss starts at 0."""
        import torch

        from simpletuner.objectives.losses import masked_mean

        method, model = self.method, self.model
        cached = {"latent_mean": batch["latent_mean"].to(device), "latent_std": batch["latent_std"].to(device)}
        latents = model.latents_from_cache(cached)
        text = method.text_conditioning(batch, device)
        noise = torch.randn_like(latents)
        noised = (method.flow_noising if method.flow else method.ddpm_noising)(latents, noise, noise)
        noised = method.clean_first_frame(noised, latents, noise, batch)
        dtype = model.weight_dtype
        noisy = noised.noisy.to(dtype)
        text = {key: value.to(dtype) for key, value in text.items()}
        with torch.no_grad(), adapter_switched_off(model):
            base = model.predict(noisy, noised.model_timesteps, text, batch=batch)
        prediction = model.predict(noisy, noised.model_timesteps, text, batch=batch)
        elementwise = (prediction.float() - base.detach().float()) ** 2
        return masked_mean(elementwise, method.loss_mask(batch, device), weights=noised.frame_mask).mean()
