"""ControlNet training (``--controlnet``): SFT's denoising loss, with a ControlNet in the loop.

The ControlNet is the only network that learns. Each step it reads the batch's control image
(``conditioning_pixels``, from the conditioning dataset paired with the training images, see
simpletuner/data/conditioning.py) and the noisy latents, and its residuals are added to the frozen
denoiser's blocks exactly as the family's diffusers ControlNet pipeline adds them
(``ModelFamily.controlnet_predict``). Everything else (noise, timesteps or flow sigmas, targets, loss
weighting, caption dropout, masked loss, the evaluation loss) is plain SFT's: this method is SFT run
on a view of the model whose ``predict`` goes through the ControlNet.

Its state is the ControlNet's weights, saved with every checkpoint (``method.pt``) and restored on
resume, so a resumed run continues exactly; the run's product is a ``controlnet/`` folder that
``ControlNetModel.from_pretrained`` (or the family's ControlNet class) loads. The rules that keep
impossible combinations from starting are in simpletuner/options/controlnet_rules.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from simpletuner.methods.base import LossOutput
from simpletuner.methods.sft import SupervisedFineTuning


class ControlledModel:
    """The model family as SFT sees it during ControlNet training: every attribute is the family's,
    except that :meth:`predict` runs the ControlNet on the batch's control image first."""

    def __init__(self, model, controlnet: torch.nn.Module):
        self._model = model
        self._controlnet = controlnet

    def __getattr__(self, name: str):
        return getattr(self._model, name)

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, text: dict[str, torch.Tensor],
                batch: dict | None = None) -> torch.Tensor:
        control = control_pixels_of(batch)
        return self._model.controlnet_predict(self._controlnet, noisy_latents, timesteps, text, control, batch=batch)


def control_pixels_of(batch: dict | None) -> torch.Tensor:
    """The batch's control images (B, 3, H, W) in [-1, 1]; a batch without any (a dataset with no
    ``conditioning_data``, which the config rules refuse) raises, naming its dataset."""
    pixels = (batch or {}).get("conditioning_pixels")
    if pixels is None:
        dataset = (batch or {}).get("dataset_id", "?")
        raise ValueError(f"--controlnet: a batch of dataset {dataset!r} has no control image; give that dataset "
                         "\"conditioning_data\" naming a conditioning dataset with "
                         "\"conditioning_type\": \"controlnet\"")
    return pixels


def build(model, config) -> ControlNetTraining:
    """The method of a ``--controlnet`` run (the registry builds it in place of ``sft``)."""
    from simpletuner.models.controlnet import controlnet_for

    controlnet = controlnet_for(model, config)
    if config.gradient_checkpointing:
        controlnet.enable_gradient_checkpointing()
    return ControlNetTraining(model, controlnet, config)


class ControlNetTraining(SupervisedFineTuning):
    """SFT through a trainable ControlNet; the denoiser (frozen by the trainer) only passes gradients on."""

    def __init__(self, model, controlnet: torch.nn.Module, config):
        self.controlnet = controlnet
        super().__init__(ControlledModel(model, controlnet), config.caption_dropout_probability, config=config)
        self.family_model = model
        model.controlnet = controlnet  # what validation samples with (validation/controlnet.py)

    def compute_loss(self, batch: dict, device: torch.device, step: int = 0) -> LossOutput:
        control_pixels_of(batch)  # a clear message before any work when the dataset has no control images
        return super().compute_loss(batch, device, step)

    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        return {"controlnet": self.controlnet}

    def state_dict(self) -> dict[str, Any]:
        return {"controlnet": {name: tensor.detach().clone() for name, tensor in self.controlnet.state_dict().items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.controlnet.load_state_dict(state["controlnet"])


def save_controlnet(model, output_dir: Path) -> Path:
    """The run's product: ``<output_dir>/controlnet``, a diffusers ControlNet folder (config.json and
    safetensors weights) that the family's ControlNet class and pipeline load."""
    from simpletuner.models.controlnet import CONTROLNET_FOLDER

    folder = Path(output_dir) / CONTROLNET_FOLDER
    model.controlnet.save_pretrained(str(folder), safe_serialization=True)
    return folder
