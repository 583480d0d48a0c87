"""simpletuner: fine-tune diffusion models (image and video) with LoRA, LyCORIS or full training.

Nothing heavy is imported here: the CLI must start without torch, diffusers or transformers.
"""

__version__ = "0.1.0"
