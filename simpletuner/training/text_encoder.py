"""``--train_text_encoder``: train the family's text encoders alongside the denoiser.

With ``--model_type lora`` each encoder gets its own LoRA on its attention projections (saved in the
same file as the denoiser's, under the encoder's pipeline name, as diffusers' ``load_lora_weights``
expects); with ``--model_type full`` the encoder's weights train directly, minus any layers
``--freeze_encoder_strategy`` keeps frozen. ``--text_encoder_lr`` gives the encoders their own
learning rate and ``--text_encoder_limit`` freezes them after that many steps.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from simpletuner.training.freezing import freeze_encoder_layers

logger = logging.getLogger(__name__)

#: Attention projections of CLIP-style text encoders (q/k/v/out), the usual text-encoder LoRA target.
TEXT_ENCODER_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


class TextEncoderTraining:
    """The trained text encoders of one run and their bookkeeping."""

    def __init__(self, model, config):
        self.config = config
        self.encoders: dict[str, torch.nn.Module] = dict(model.trainable_text_encoders())
        self.lora_configs: dict[str, dict[str, Any]] = {}
        self.limit = config.text_encoder_limit
        self.frozen_for_good = False

    def prepare(self) -> list[torch.nn.Parameter]:
        """Make the encoders trainable (adapters or weights); returns their trainable parameters."""
        from simpletuner.models.adapters import add_lora

        config = self.config
        for name, encoder in self.encoders.items():
            if config.model_type == "lora":
                self.lora_configs[name] = add_lora(encoder, TEXT_ENCODER_LORA_TARGETS, config.lora_rank,
                                                   config.lora_alpha, config.lora_dropout)
            else:
                encoder.requires_grad_(True)
                frozen = freeze_encoder_layers(encoder, config.freeze_encoder_strategy, config.freeze_encoder_before,
                                               config.freeze_encoder_after)
                if frozen:
                    logger.info("%s: layers %s stay frozen (--freeze_encoder_strategy %s)", name, frozen,
                                config.freeze_encoder_strategy)
            encoder.train()
        return self.parameters()

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for encoder in self.encoders.values() for p in encoder.parameters() if p.requires_grad]

    def learning_rate(self) -> float:
        """``--text_encoder_lr``, else the denoiser's ``--learning_rate``, as the user wrote it: the
        optimizer builder scales it with the denoiser's rate (``--lr_scale``)."""
        if self.config.text_encoder_lr is None:
            return self.config.learning_rate
        return self.config.text_encoder_lr

    def maybe_freeze(self, step: int, optimizer, lr_scheduler=None) -> bool:
        """At ``--text_encoder_limit`` steps: stop updating the encoders. Their gradients go to None
        (optimizers skip such parameters, weight decay included) and their group's rate to 0, in
        the LR schedule too, which would otherwise restore it. Returns True on the step it happens."""
        if self.frozen_for_good or self.limit is None or step < self.limit:
            return False
        params = self.parameters()
        ids = {id(p) for p in params}
        for index, group in enumerate(optimizer.param_groups):
            if any(id(p) in ids for p in group["params"]):
                group["lr"] = 0.0
                if lr_scheduler is not None and hasattr(lr_scheduler, "base_lrs"):
                    lr_scheduler.base_lrs[index] = 0.0
        for parameter in params:
            parameter.grad = None
        for encoder in self.encoders.values():
            encoder.requires_grad_(False)
            encoder.eval()
        self.frozen_for_good = True
        logger.info("text encoders frozen at step %d (--text_encoder_limit %d)", step, self.limit)
        return True

    # --- saving ------------------------------------------------------------------------------------

    def lora_states(self) -> dict[str, dict[str, torch.Tensor]]:
        from simpletuner.models.adapters import lora_state_dict

        return {name: lora_state_dict(encoder) for name, encoder in self.encoders.items()}

    def full_state_files(self) -> dict[str, Any]:
        """Checkpoint writers for fully trained encoders: ``<name>.safetensors`` each."""
        from safetensors.torch import save_model

        return {f"{name}.safetensors": (lambda path, e=encoder: save_model(e, str(path)))
                for name, encoder in self.encoders.items()}

    def load_checkpoint(self, folder: Path, lora_file: Path | None) -> None:
        from safetensors.torch import load_model

        from simpletuner.models.adapters import load_lora_weights_into

        for name, encoder in self.encoders.items():
            if self.config.model_type == "lora":
                load_lora_weights_into(encoder, lora_file, prefix=name)
            else:
                load_model(encoder, str(folder / f"{name}.safetensors"))

    def save_pretrained(self, folder: Path) -> list[Path]:
        """``--save_text_encoder``: each encoder as a loadable model folder (LoRA merged into a copy)."""
        import copy

        written = []
        for name, encoder in self.encoders.items():
            target = folder / name
            module = encoder
            if self.config.model_type == "lora":
                from peft.tuners.tuners_utils import BaseTunerLayer

                merged = copy.deepcopy(encoder)
                for layer in merged.modules():
                    if isinstance(layer, BaseTunerLayer):
                        layer.merge()
                module = type(encoder)(encoder.config)  # a plain model, without the adapter bookkeeping
                module.load_state_dict(_strip_lora(merged).state_dict())
            module.save_pretrained(target, safe_serialization=True)
            written.append(target)
        return written


def _strip_lora(module: torch.nn.Module) -> torch.nn.Module:
    """Replace merged PEFT layers by their base layers so the copy saves as a plain model."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, child in list(module.named_children()):
        if isinstance(child, BaseTunerLayer):
            setattr(module, name, child.get_base_layer())
        else:
            _strip_lora(child)
    return module
