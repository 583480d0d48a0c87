"""The three networks of score distillation on as few copies of the base weights as possible.

Distribution-matching distillation needs a frozen *teacher* (the real score), the *student* being
trained, and a trainable *fake score* that tracks the student's output distribution. Peers load three
models. Here:

* **LoRA student** (``--model_type lora``): one base model. The student is the run's LoRA (PEFT's
  ``default`` adapter), the fake score a second named adapter (``fake_score``) on the same layers, and
  the teacher is the base with every adapter switched off. One copy of the base weights in memory.
* **Full student** (``--model_type full``): the student is the trained denoiser; the teacher a frozen
  copy taken before the first step, and the fake score a LoRA adapter on that copy. Two copies.

Which network answers is chosen by context managers (:meth:`ScoreNetworks.teacher`, ``fake_score``);
outside them the student answers, as the trainer's backward, validation and saving expect. PEFT's
adapter switching also flips ``requires_grad`` flags, so every switch puts them back: the student's and
the fake score's adapters stay trainable throughout (each has its own optimizer, which only steps on
its own loss).
"""

from __future__ import annotations

import contextlib
import copy
from typing import Callable, Iterator

import torch

#: The PEFT adapter name of the fake score network (the student's LoRA is PEFT's ``default``).
FAKE_SCORE_ADAPTER = "fake_score"


def _tuner_layers(module: torch.nn.Module) -> list[torch.nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [layer for layer in module.modules() if isinstance(layer, BaseTunerLayer)]


def add_fake_score_adapter(denoiser: torch.nn.Module, target_modules: list[str], rank: int) -> list[torch.nn.Parameter]:
    """A fresh LoRA named ``fake_score`` on ``denoiser`` (which may already carry the student's), its
    parameters in fp32 and trainable; the previously active adapter stays active. Its up-projection
    starts at zero, so the fake score starts as the network it sits on (the teacher)."""
    from peft import LoraConfig, inject_adapter_in_model

    previous = {id(layer): list(layer.active_adapters) for layer in _tuner_layers(denoiser)}
    config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, init_lora_weights=True,
                        target_modules=target_modules)
    inject_adapter_in_model(config, denoiser, adapter_name=FAKE_SCORE_ADAPTER)
    for layer in _tuner_layers(denoiser):  # injection may activate the new adapter; the old one answers again
        if id(layer) in previous:
            layer.set_adapter(previous[id(layer)])
    parameters = list(named_adapter_parameters(denoiser, FAKE_SCORE_ADAPTER).values())
    if not parameters:
        raise ValueError(f"the fake score adapter found no layer among the targets {target_modules}")
    for parameter in parameters:
        parameter.data = parameter.data.float()
        parameter.requires_grad_(True)
    return parameters


def prompt_conditioning(model, batch: dict, device: torch.device, size: int) -> tuple[dict, dict]:
    """The prompts' cached embeddings and the empty prompt's, each ``size`` rows: the teacher's guidance
    needs both halves (no caption dropout: the student learns the guided teacher)."""
    text = {key: batch[key].to(device) for key in batch["empty_prompt"]}
    empty = model.unconditional_text(batch["empty_prompt"])
    unconditional = {key: value.to(device).expand(size, *value.shape[1:]) if value.shape[0] == 1 else value.to(device)
                     for key, value in empty.items()}
    return text, unconditional


def named_adapter_parameters(denoiser: torch.nn.Module, adapter: str) -> dict[str, torch.nn.Parameter]:
    """The parameters of one named adapter, by their module path (the checkpoint's keys)."""
    return {name: p for name, p in denoiser.named_parameters() if f".{adapter}." in name}


class ScoreNetworks:
    """Teacher, student and fake score of one distillation run (see the module docstring).

    ``model`` is the family wrapper: its ``predict`` runs ``model.denoiser``, which these contexts point
    at the right weights. ``fake_score_rank`` is the rank of the fake score's LoRA; LADD, which has no
    fake score, passes ``with_fake_score=False``.
    """

    def __init__(self, model, target_modules: list[str], fake_score_rank: int, lora_student: bool,
                 with_fake_score: bool = True):
        self.model = model
        self.lora_student = lora_student
        student = model.denoiser
        if lora_student:
            self.host = student  # the fake score and the teacher live on the student's own base
            self.teacher_copy = None
        else:
            self.teacher_copy = copy.deepcopy(student).requires_grad_(False).eval()
            self.host = self.teacher_copy
        self.fake_parameters = (add_fake_score_adapter(self.host, target_modules, fake_score_rank)
                                if with_fake_score else [])
        self._trainable = [p for p in student.parameters() if p.requires_grad] + self.fake_parameters

    def held_weight_bytes(self) -> tuple[int, int]:
        """(bytes of weights the three networks hold, bytes one copy of the denoiser's base weights
        takes): the first is what this layout costs, three times the second what three models would."""
        modules = [self.model.denoiser] + ([self.teacher_copy] if self.teacher_copy is not None else [])
        seen, held = set(), 0
        for module in modules:
            for tensor in [*module.parameters(), *module.buffers()]:
                if tensor.data_ptr() not in seen:
                    seen.add(tensor.data_ptr())
                    held += tensor.numel() * tensor.element_size()
        base = sum(p.numel() * p.element_size() for name, p in self.model.denoiser.named_parameters()
                   if "lora_" not in name)
        return held, base

    def fake_score_state(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().clone() for name, p in named_adapter_parameters(self.host, FAKE_SCORE_ADAPTER).items()}

    def load_fake_score_state(self, state: dict[str, torch.Tensor]) -> None:
        own = named_adapter_parameters(self.host, FAKE_SCORE_ADAPTER)
        if set(own) != set(state):  # the same run resumes with the same names; anything else is another run
            raise ValueError("the checkpoint's fake score does not fit this run's (different LoRA targets or family)")
        with torch.no_grad():
            for name, parameter in own.items():
                parameter.copy_(state[name])

    def _restore_flags(self) -> None:
        for parameter in self._trainable:
            parameter.requires_grad_(True)

    @contextlib.contextmanager
    def _answering(self, host: torch.nn.Module) -> Iterator[None]:
        """``model.predict`` runs ``host`` while inside (the family wrapper reads ``model.denoiser``)."""
        if host is self.model.denoiser:
            yield
            return
        student = self.model.denoiser
        self.model.denoiser = host
        try:
            yield
        finally:
            self.model.denoiser = student

    @contextlib.contextmanager
    def teacher(self) -> Iterator[None]:
        """The frozen base: every adapter of the host switched off."""
        layers = _tuner_layers(self.host)
        for layer in layers:
            layer.enable_adapters(False)
        try:
            with self._answering(self.host):
                yield
        finally:
            for layer in layers:
                layer.enable_adapters(True)
            self._restore_flags()

    def guided_teacher(self, predict: Callable[[torch.Tensor, torch.Tensor, dict], torch.Tensor], noisy: torch.Tensor,
                       timesteps: torch.Tensor, text: dict, unconditional: dict, guidance_scale: float) -> torch.Tensor:
        """The teacher's raw output with classifier-free guidance (no gradients); ``predict(sample,
        timesteps, text)`` is one model call."""
        with torch.no_grad(), self.teacher():
            conditional = predict(noisy, timesteps, text).float()
            if guidance_scale == 1.0:
                return conditional
            plain = predict(noisy, timesteps, unconditional).float()
            return plain + guidance_scale * (conditional - plain)

    @contextlib.contextmanager
    def fake_score(self) -> Iterator[None]:
        """The base with only the fake score's adapter active."""
        layers = _tuner_layers(self.host)
        previous = [list(layer.active_adapters) for layer in layers]
        for layer in layers:
            if FAKE_SCORE_ADAPTER in getattr(layer, "lora_A", {}):
                layer.set_adapter(FAKE_SCORE_ADAPTER)
            else:  # a layer only the student adapts answers as the base
                layer.enable_adapters(False)
        try:
            with self._answering(self.host):
                yield
        finally:
            for layer, names in zip(layers, previous):
                layer.enable_adapters(True)
                layer.set_adapter(names)
            self._restore_flags()
