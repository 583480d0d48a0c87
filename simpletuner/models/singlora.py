"""SingLoRA as a PEFT LoRA layer: one low-rank matrix instead of two.

SingLoRA (Bensaïd et al., 2025, "SingLoRA: Low Rank Adaptation Using a Single Matrix") replaces LoRA's
update ``B·A`` by ``A·Aᵀ`` with a single ``A`` of shape (d, r), which halves the adapter's parameters
and removes the scale imbalance between two separately learned factors:

    W = W₀ + (α / r) · u(t) · A[:d_out] · A[:d_in]ᵀ,    A ∈ R^{max(d_out, d_in) × r}

For a non-square layer the rows of ``A`` are truncated to each side (the paper's extension to
rectangular weights). ``A`` starts random (Kaiming-uniform, or Gaussian), so the ramp
``u(t) = min(t / T, 1)`` over the first ``T`` optimizer steps is what makes training start from the
base model: ``u(0) = 0``.

PEFT (0.21) has no SingLoRA. This layer plugs into PEFT through its custom-module dispatch
(``LoraConfig._register_custom_module({nn.Linear: SingLoraLinear})``): injection, trainable-parameter
marking, ``get_peft_model_state_dict``, merging and adapter enabling all keep working, because the
layer keeps PEFT's ``lora_A``/``lora_B`` structure: ``lora_A`` holds ``A`` and computes ``x·A[:d_in]``,
``lora_B`` owns no parameter and applies ``u(t)·A[:d_out]ᵀ``. Their ``weight`` properties are the
equivalent standard LoRA factors, so :func:`singlora_to_lora` exports an ordinary LoRA file that
diffusers and ComfyUI load, computing exactly what the live layer computes.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from torch import nn


class SingLoraA(nn.Module):
    """The single matrix ``A`` (``matrix``, shape (max(d_in, d_out), r)); applies ``x · A[:d_in]``."""

    def __init__(self, in_features: int, out_features: int, rank: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.matrix = nn.Parameter(torch.empty(max(in_features, out_features), rank))

    @property
    def weight(self) -> torch.Tensor:
        """The equivalent LoRA ``A`` (r, d_in)."""
        return self.matrix[: self.in_features].t().contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class SingLoraB(nn.Module):
    """No parameters: ``h · (u(t) · A[:d_out])ᵀ``, reading ``A`` from its :class:`SingLoraA`."""

    def __init__(self, source: SingLoraA, ramp: Callable[[], float]):
        super().__init__()
        # a plain attribute, not a submodule: A must appear once in the state dict
        object.__setattr__(self, "_source", source)
        object.__setattr__(self, "_ramp", ramp)

    @property
    def weight(self) -> torch.Tensor:
        """The equivalent LoRA ``B`` (d_out, r), ramp included."""
        factor = self._ramp()
        up = self._source.matrix[: self._source.out_features]
        return up if factor == 1.0 else up * factor

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.weight)


class SingLoraLinear(PeftLoraLinear):
    """A PEFT LoRA ``Linear`` whose update is SingLoRA's ``u(t)·A·Aᵀ``.

    The ramp is read through :attr:`ramp` (a callable returning u(t)); :func:`set_ramp` installs it on
    every layer after injection. Without one the factor is 1.
    """

    ramp: Callable[[], float] | None = None

    def update_layer(self, adapter_name, r, lora_alpha, config, **kwargs):
        super().update_layer(adapter_name, r, lora_alpha, config, **kwargs)
        source = SingLoraA(self.in_features, self.out_features, r)
        if config.init_lora_weights == "gaussian":
            nn.init.normal_(source.matrix, std=1 / r)
        else:  # Kaiming-uniform, as the paper and PEFT's default LoRA A
            nn.init.kaiming_uniform_(source.matrix, a=math.sqrt(5))
        self.lora_A[adapter_name] = source
        self.lora_B[adapter_name] = SingLoraB(source, self._ramp_factor)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def _ramp_factor(self) -> float:
        return 1.0 if self.ramp is None else float(self.ramp())

    def __repr__(self) -> str:
        return "singlora." + super().__repr__()


def ramp_schedule(ramp_up_steps: int, current_step: Callable[[], int]) -> Callable[[], float]:
    """``u(t) = min(t / T, 1)`` with ``t`` the number of optimizer steps taken so far."""
    if ramp_up_steps < 1:
        raise ValueError(f"SingLoRA ramp needs at least 1 step, got {ramp_up_steps}")
    return lambda: min(current_step() / ramp_up_steps, 1.0)


def set_ramp(module: nn.Module, ramp: Callable[[], float] | None) -> int:
    """Install ``ramp`` on every SingLoRA layer of ``module``; returns how many there are."""
    layers = [m for m in module.modules() if isinstance(m, SingLoraLinear)]
    for layer in layers:
        layer.ramp = ramp
    return len(layers)


def singlora_to_lora(module: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter as standard LoRA tensors (PEFT layout, same alpha and rank), at the current ramp."""
    state = {}
    with torch.no_grad():
        for name, layer in module.named_modules():
            if isinstance(layer, SingLoraLinear) and adapter_name in layer.lora_A:
                state[f"{name}.lora_A.weight"] = layer.lora_A[adapter_name].weight.detach().cpu().clone()
                state[f"{name}.lora_B.weight"] = layer.lora_B[adapter_name].weight.detach().cpu().clone()
    return state


def singlora_raw_state(module: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The trained matrices themselves (``<path>.lora_A.matrix``), what a checkpoint resumes from."""
    return {f"{name}.lora_A.matrix": layer.lora_A[adapter_name].matrix.detach().cpu().clone()
            for name, layer in module.named_modules()
            if isinstance(layer, SingLoraLinear) and adapter_name in layer.lora_A}


def load_singlora_raw_state(module: nn.Module, state: dict[str, torch.Tensor], adapter_name: str = "default") -> None:
    layers = {name: layer for name, layer in module.named_modules() if isinstance(layer, SingLoraLinear)}
    missing = sorted(set(layers) - {key[: -len(".lora_A.matrix")] for key in state})
    unknown = sorted(key for key in state if key[: -len(".lora_A.matrix")] not in layers)
    if missing or unknown:
        raise ValueError(f"SingLoRA state does not match the model: missing {missing[:3]}, unknown {unknown[:3]}")
    with torch.no_grad():
        for name, layer in layers.items():
            layer.lora_A[adapter_name].matrix.copy_(state[f"{name}.lora_A.matrix"])
