"""optimum-quanto's quantized convolution, as simpletuner's quantized base models hold it.

PEFT builds a LoRA's factors for a convolution as ``type(base_layer)(in, rank, kernel, stride, padding,
  bias=False)``. For quanto's QConv2d that is a QConv2d without a weight type, whose forward passes
  ``None`` as the weight (quanto's ``qweight`` is None when nothing is quantized): a LoRA on a quantized
  convolution (``conv_in``/``conv_out`` of the slider targets, or ``--peft_lora_target_modules``) fails
  at its first step. :class:`QConv2d` here builds a plain ``nn.Conv2d`` when it is constructed like one
  (without quanto's ``weights`` argument), and is quanto's QConv2d otherwise.

simpletuner.models.quantize switches the class of quantized convolutions to it after quantizing; it adds
no state, so a module holding them copies, pickles and moves like any other. (LyCORIS, which picks layers
by class name, is told about quantized subclasses by simpletuner.training.adapter.)
"""

from __future__ import annotations

import torch
from optimum.quanto import nn as quanto_nn


class QConv2d(quanto_nn.QConv2d):
    """quanto's QConv2d, except that constructing it like an ``nn.Conv2d`` gives an ``nn.Conv2d``."""

    def __new__(cls, *args, **kwargs):
        if (args or kwargs) and "weights" not in kwargs:  # PEFT's LoRA factors: type(base_layer)(in, r, ...)
            return torch.nn.Conv2d(*args, **kwargs)
        return super().__new__(cls)  # quanto's qcreate (keywords, weights=...), copy and pickle (no arguments)

