"""What a regularizer is to the trainer, and the set of them one run uses.

A regularizer adds a weighted term to the method's loss from what it sees inside the denoiser's
forward pass: it attaches forward hooks to blocks the model family names (no model code is copied to
make a capture point), and after the method's forward turns what the hooks captured into a term and
named logs. It may bring trainable modules (a projector) and keeps its own schedule state, both saved
in the checkpoint through ``state_dict``. Its hooks only record inside :meth:`Regularizers.capturing`,
which the trainer opens around the training forward, so validation, evaluation and EMA sampling run
the model untouched.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol, runtime_checkable

import torch

from simpletuner.methods.base import LossOutput
from simpletuner.regularizers.routing import KeptTokens


@dataclass
class RegularizerTerm:
    """A regularizer's contribution to one batch's loss (already weighted) and its named logs."""

    loss: torch.Tensor
    logs: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class Regularizer(Protocol):
    #: Names its checkpoint file (``regularizer-<name>.pt``) and its log terms (``loss/<name>/...``).
    name: str

    def attach(self, model, capture: CaptureSwitch) -> None:
        """Add forward hooks to the family's blocks; they record only while ``capture.on``."""
        ...

    def detach(self) -> None:
        ...

    def term(self, batch: dict, step: int) -> RegularizerTerm | None:
        """The weighted term from what the hooks captured in this batch's forward (None while the
        regularizer is switched off by its schedule)."""
        ...

    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        ...

    def state_dict(self) -> dict[str, Any]:
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ...


class CaptureSwitch:
    """What the trainer tells the regularizers' hooks: whether they record now (on only during the
    training forward, see :meth:`Regularizers.capturing`), and how to average a number over the
    processes of a multi-process run (identity on one process). Statistics that steer a schedule,
    such as a similarity gate's moving average, go through ``process_mean`` so every process keeps
    the same state and takes the same decisions."""

    def __init__(self, process_mean: Callable[[float], float] | None = None) -> None:
        self.on = False
        self.process_mean: Callable[[float], float] = process_mean or (lambda value: value)
        #: The blocks TREAD routed in the current training forward and the tokens each ran on (a block
        #: not listed ran on every token); written by TREAD, read by the captures that compare tokens.
        self.kept_tokens: dict[torch.nn.Module, KeptTokens] = {}


def image_tokens(output: Any) -> torch.Tensor:
    """The image tokens a block returned: the tensor itself, or the last element of the tuple that
    diffusers' joint blocks return as ``(text tokens, image tokens)``."""
    return output[-1] if isinstance(output, (tuple, list)) else output


def transformer_blocks_of(model, who: str) -> list[torch.nn.Module]:
    """The family's repeated transformer blocks in execution order (``ModelFamily.transformer_blocks``);
    ``who`` names the regularizer in the error for a denoiser without them (a UNet)."""
    blocks = [block for _, block in model.transformer_blocks()]
    if not blocks:
        raise ValueError(f"{who} needs a transformer denoiser; {model.config.model_family}'s has no transformer blocks")
    return blocks


class BlockTokens:
    """The image tokens chosen blocks output during the training forward, kept by role until taken; for
    a block inside a TREAD route only the tokens it ran on (:meth:`kept` says which)."""

    def __init__(self) -> None:
        self.captured: dict[str, torch.Tensor] = {}
        self.routed: dict[str, KeptTokens] = {}
        self._handles: list = []

    def hook(self, blocks: dict[str, torch.nn.Module], capture: CaptureSwitch) -> None:
        for role, block in blocks.items():
            def record(module, inputs, output, role=role):
                if capture.on:
                    tokens = image_tokens(output)
                    kept = capture.kept_tokens.get(module)
                    if kept is not None and tokens.shape[1] == kept.total:
                        # a route's last block, seen after TREAD put the skipped tokens back: its own
                        # output is the kept tokens, whatever order the hooks were added in
                        tokens = tokens[:, kept.positions.to(tokens.device)]
                    self.captured[role] = tokens
                    if kept is None:
                        self.routed.pop(role, None)
                    else:
                        self.routed[role] = kept
            self._handles.append(block.register_forward_hook(record))

    def take(self, role: str) -> torch.Tensor | None:
        return self.captured.pop(role, None)

    def kept(self, role: str) -> KeptTokens | None:
        """The image tokens the role's block ran on in the last captured forward, when TREAD routed
        tokens around it (None: it ran on every token)."""
        return self.routed.get(role)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.routed.clear()



class Regularizers:
    """The regularizers of one run, attached to its model."""

    def __init__(self, regularizers: list[Regularizer], model,
                 process_mean: Callable[[float], float] | None = None) -> None:
        self.items = list(regularizers)
        self.switch = CaptureSwitch(process_mean)
        names = [regularizer.name for regularizer in self.items]
        if len(set(names)) != len(names):
            raise ValueError(f"two regularizers share a name: {names}")
        for regularizer in self.items:
            regularizer.attach(model, self.switch)

    def __bool__(self) -> bool:
        return bool(self.items)

    @contextlib.contextmanager
    def capturing(self) -> Iterator[None]:
        """Hooks record inside this block only: the training forward of one batch."""
        self.switch.on = True
        try:
            yield
        finally:
            self.switch.on = False

    def add_terms(self, output: LossOutput, batch: dict, step: int) -> LossOutput:
        """The method's output plus every active regularizer's term, with their logs under their names."""
        loss, logs = output.loss, dict(output.logs)
        for regularizer in self.items:
            term = regularizer.term(batch, step)
            if term is None:
                continue
            loss = loss + term.loss
            logs.update({f"{regularizer.name}/{key}": value for key, value in term.logs.items()})
        return LossOutput(loss, logs, updates_model=output.updates_model)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for regularizer in self.items for module in regularizer.trainable_modules().values()
                for p in module.parameters() if p.requires_grad]

    def detach(self) -> None:
        for regularizer in self.items:
            regularizer.detach()
