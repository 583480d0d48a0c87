"""``--evaluation_type clip``: a CLIP score of images sampled from the validation prompts.

At each evaluation (the ``--eval_steps_interval`` / ``--eval_epoch_interval`` schedule) the live
weights sample ``--num_eval_images`` images with the family's pipeline: image ``i`` gets prompt
``i mod len(prompts)`` of the validation prompts (``--validation_prompt``, then the prompt libraries)
and a generator seeded with ``validation seed + i``, at the first validation resolution. A CLIP model
(``--pretrained_evaluation_model_name_or_path``) embeds every image and its prompt; the score is
``max(100 * cosine similarity, 0)`` per image, averaged over the images, logged as ``eval/clip_score``.

The same weights therefore always give the same score, and the global random state is untouched
(seeded generators, and the state is also saved and restored around the sampling). Only the main
process samples and scores: nothing here is collective, the other processes skip it.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, replace

import torch

logger = logging.getLogger(__name__)

#: The tracker key of the score.
CLIP_KEY = "eval/clip_score"
#: Images sampled per evaluation when ``--num_eval_images`` is not set.
DEFAULT_NUM_EVAL_IMAGES = 4


def eval_prompts(prompts: list[str], count: int) -> list[str]:
    """``count`` prompts: the validation prompts in turn, repeated as needed."""
    return [prompts[index % len(prompts)] for index in range(count)]


def clip_score(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> float:
    """The mean over pairs of ``max(100 * cos(image, text), 0)``."""
    image_embeds = torch.nn.functional.normalize(image_embeds.float(), dim=-1)
    text_embeds = torch.nn.functional.normalize(text_embeds.float(), dim=-1)
    per_image = (100.0 * (image_embeds * text_embeds).sum(dim=-1)).clamp(min=0)
    return float(per_image.mean())


def _image_processor(path: str, image_size: int):
    """The checkpoint's CLIP image processor; the PIL implementation, which needs no torchvision.
    A folder without a preprocessor config gets CLIP's standard preprocessing at the model's size."""
    try:
        from transformers import CLIPImageProcessorPil as processor_class
    except ImportError:  # older transformers: the PIL-based one is CLIPImageProcessor itself
        from transformers import CLIPImageProcessor as processor_class
    try:
        return processor_class.from_pretrained(path)
    except (OSError, ValueError):
        logger.info("%s has no image processor config: standard CLIP preprocessing at %d px", path, image_size)
        return processor_class(size={"shortest_edge": image_size},
                               crop_size={"height": image_size, "width": image_size})


@dataclass
class ClipEvaluation:
    """Samples the eval images and scores them; built on every process, run on the main one."""

    model_path: str
    prompts: list[str]
    settings: object  # ValidationSettings: steps, guidance, negative prompt, seed, resolutions
    device: torch.device
    _clip: tuple | None = None

    @classmethod
    def from_config(cls, config, settings, device) -> ClipEvaluation | None:
        """None unless ``--evaluation_type clip`` and an eval interval are set (the config rules
        make sure a model path and a prompt are there)."""
        if config.evaluation_type != "clip" or not (config.eval_steps_interval or config.eval_epoch_interval):
            return None
        count = config.num_eval_images or DEFAULT_NUM_EVAL_IMAGES
        return cls(config.pretrained_evaluation_model_name_or_path, eval_prompts(settings.prompts, count),
                   settings, torch.device(device))

    def load(self) -> tuple:
        """(model, tokenizer, image processor), loaded on first use: on the training device, in eval
        mode, with gradients off."""
        if self._clip is None:
            from transformers import AutoTokenizer, CLIPModel

            logger.info("loading the CLIP evaluation model from %s", self.model_path)
            model = CLIPModel.from_pretrained(self.model_path).to(self.device).eval().requires_grad_(False)
            tokenizer = AutoTokenizer.from_pretrained(self.model_path)
            processor = _image_processor(self.model_path, model.config.vision_config.image_size)
            self._clip = (model, tokenizer, processor)
        return self._clip

    def generate(self, model) -> list:
        """The eval images from the live weights, the trained networks in eval mode meanwhile."""
        from simpletuner.training.adapter import validation_strength
        from simpletuner.training.distributed import unwrap_parallel
        from simpletuner.training.evaluation import eval_mode
        from simpletuner.validation.runner import generate_images, use_sampling_scheduler

        denoiser = unwrap_parallel(model.denoiser)
        settings = replace(self.settings, num_images=1)
        arguments = {**model.pipeline_call_arguments(), **settings.call_arguments()}
        # half-precision weights: autocast keeps each layer's inputs in its dtype, as validation does
        autocast = (contextlib.nullcontext() if model.weight_dtype == torch.float32
                    else torch.autocast(device_type=self.device.type, dtype=model.weight_dtype))
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), eval_mode(denoiser, *model.trainable_text_encoders().values()):
            pipeline = model.build_pipeline(denoiser)
            pipeline.set_progress_bar_config(disable=True)
            use_sampling_scheduler(pipeline, settings, model.prediction_type == "flow_matching")
            with torch.no_grad(), autocast, validation_strength(model):
                return generate_images(pipeline, self.prompts, settings, self.device, settings.resolutions[0],
                                       extra_arguments=arguments, seed=settings.seed)

    def score(self, images: list, prompts: list[str]) -> float:
        """The CLIP score of ``images`` against ``prompts`` (same length)."""
        clip, tokenizer, processor = self.load()
        with torch.no_grad():
            pixels = processor(images=[image.convert("RGB") for image in images], return_tensors="pt")["pixel_values"]
            tokens = tokenizer(prompts, padding=True, truncation=True, return_tensors="pt")
            image_embeds = clip.get_image_features(pixel_values=pixels.to(self.device, clip.dtype))
            text_embeds = clip.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                                 attention_mask=tokens["attention_mask"].to(self.device))
        return clip_score(_embeds(image_embeds), _embeds(text_embeds))

    def run(self, model) -> dict[str, float]:
        """``{"eval/clip_score": value}`` for the live weights; main process only."""
        images = self.generate(model)
        return {CLIP_KEY: self.score(images, self.prompts)}


def _embeds(output) -> torch.Tensor:
    """``get_*_features`` returns the projected embeddings, as a tensor or (newer transformers) inside
    an output object."""
    if isinstance(output, torch.Tensor):
        return output
    return output.pooler_output
