"""Validation: sample images with the family's own pipeline during training, save grids, log them."""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from simpletuner.validation.resolutions import parse_resolutions

if TYPE_CHECKING:
    from simpletuner.validation.adapters import AdapterRun
    from simpletuner.validation.external import ExternalValidation
    from simpletuner.validation.previews import PreviewSettings
    from simpletuner.validation.video import VideoSettings

logger = logging.getLogger(__name__)


def make_grid(images: list, columns: int):
    """Paste images (same size) into one grid image, row-major."""
    from PIL import Image

    width, height = images[0].size
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for index, image in enumerate(images):
        grid.paste(image.convert("RGB"), ((index % columns) * width, (index // columns) * height))
    return grid


#: What the step-0 images show, written above them (and above the left half of every later comparison).
BASE_MODEL_CAPTION = "base model"
#: The PNG text key of a grid that holds its panel captions (``Image.open(grid).text``).
CAPTION_KEY = "simpletuner_panels"


def panel_caption(step: int, label: str | None = None) -> str:
    """What one validation run's images show, in words: ``base model`` at step 0, else ``step N``, with
    what the folder label adds (``step_20_ema`` -> ``step 20 (EMA weights)``)."""
    if step == 0:
        return BASE_MODEL_CAPTION
    detail = (label or "").removeprefix(f"step_{step}").strip("_")
    detail = {"ema": "EMA weights"}.get(detail, detail.replace("_", " "))
    return f"step {step}" + (f" ({detail})" if detail else "")


def _fitting_font(draw, texts: list[str], width: int, tile_height: int):
    """The largest font (from about a tenth of a tile's height, 8 to 24 px, down to 6) in which every
    text fits ``width``; PIL's built-in font, which scales without any font file."""
    from PIL import ImageFont

    size = max(8, min(24, tile_height // 10))
    while True:
        font = ImageFont.load_default(size=size)
        if size <= 6 or all(draw.textlength(text, font=font) <= width - 2 for text in texts):
            return font, size
        size -= 1


def caption_grid(grid, tile_width: int, tile_height: int, captions: list[str]):
    """``grid`` with a white band on top naming each part of the tiles below it: one caption per
    side-by-side part of a tile (``["base model", "step 20"]`` over before/after pairs), repeated over
    every column. The captions also go into the PNG's text chunk under :data:`CAPTION_KEY`."""
    from PIL import Image, ImageDraw

    part_width = tile_width // len(captions)
    font, size = _fitting_font(ImageDraw.Draw(grid), captions, part_width, tile_height)
    band = size + 6
    labelled = Image.new("RGB", (grid.width, grid.height + band), "white")
    labelled.paste(grid, (0, band))
    draw = ImageDraw.Draw(labelled)
    for column in range(grid.width // tile_width):
        for part, caption in enumerate(captions):
            centre = column * tile_width + part * part_width + part_width / 2
            draw.text((centre, band / 2), caption, fill="black", font=font, anchor="mm")
    labelled.info[CAPTION_KEY] = " | ".join(captions)
    return labelled


def save_grid(grid, path: Path) -> None:
    """Save a grid as PNG, keeping its captions (if any) readable as PNG text."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if CAPTION_KEY in grid.info:
        info.add_text(CAPTION_KEY, grid.info[CAPTION_KEY])
    grid.save(path, pnginfo=info)


def stitch_left(benchmark, image):
    """Put the base model's image to the left of the trained one, for before/after comparison."""
    from PIL import Image

    canvas = Image.new("RGB", (benchmark.width + image.width, max(benchmark.height, image.height)), "white")
    canvas.paste(benchmark.convert("RGB"), (0, 0))
    canvas.paste(image.convert("RGB"), (benchmark.width, 0))
    return canvas


@dataclass
class ValidationSettings:
    prompts: list[str]
    negative_prompt: str | None
    num_images: int
    num_inference_steps: int
    guidance: float
    seed: int
    resolutions: list[tuple[int, int]]
    #: per prompt: its library shortname (used in file names), or None for ``--validation_prompt``
    names: list[str | None] | None = None
    #: per prompt: the settings its library entry carries (seed, steps, guidance, width, height,
    #: negative_prompt; see prompt_library.PROMPT_SETTINGS), {} for a prompt that uses the run's
    prompt_settings: list[dict] | None = None
    randomize: bool = False
    #: ``--validation_seed_source``: "gpu" puts the generators on the accelerator, anything else on the CPU
    seed_source: str | None = None
    guidance_rescale: float | None = None
    scheduler: str | None = None
    #: video families: frame count, frame rate and ``--validation_dataset_file`` (validation/video.py)
    video: "VideoSettings | None" = None
    #: ``--validation_guidance_skip_layers`` and its tuning, as the SD3 pipeline's keyword arguments
    skip_layer_guidance: dict = field(default_factory=dict)
    #: ``--validation_method external-script``: the user's command instead of sampling (validation/external.py)
    external: "ExternalValidation | None" = None
    #: ``--validation_preview``: Tiny AutoEncoder pictures during sampling (validation/previews.py)
    preview: "PreviewSettings | None" = None
    #: ``--validation_adapter_*``: passes with extra LoRAs merged in (validation/adapters.py), and
    #: whether the plain pass runs too (``comparison``), not at all (``adapter_only``) or alone (``none``)
    adapter_runs: "list[AdapterRun]" = field(default_factory=list)
    adapter_mode: str = "none"
    #: ``--validation_using_datasets`` on an image family: per prompt, the picture img2img starts from
    inputs: list[Path] | None = None
    #: ``--validation_stitch_input_location``: the side of each grid tile the starting picture goes
    stitch_location: str | None = None
    #: ``--validation_torch_compile``: sample through ``torch.compile`` of the denoiser
    compile: bool = False
    #: ``--enable_watermark``: stamp an invisible watermark on every image (validation/watermark.py)
    watermark: bool = False
    #: ``--control``: the family's channel-control pipeline gets the run's control image (validation/controlnet.py)
    channel_control: bool = False
    #: a distilled student's sampler (the method's ``validation_defaults``): the diffusers scheduler class
    #: the pipeline's scheduler is rebuilt as, and the timesteps it samples at
    sampling_scheduler: str | None = None
    sampling_timesteps: list[int] | None = None

    @classmethod
    def from_config(cls, config, fallback_edge: int, family_defaults: dict | None = None) -> "ValidationSettings":
        """``family_defaults`` (from :meth:`ModelFamily.validation_defaults`) replace the table's
        defaults for options the user did not set, e.g. Flux's embedded guidance of 3.5."""
        from simpletuner.options.validation_rules import EMBEDDED_GUIDANCE_FAMILIES
        from simpletuner.validation.prompt_library import library_prompts

        explicit = config.explicit

        def value(name: str):
            if name not in explicit and family_defaults and name in family_defaults:
                return family_defaults[name]
            return getattr(config, name)

        from simpletuner.validation.prompt_library import library_prompt_settings

        prompts = [config.validation_prompt] if config.validation_prompt else []
        names: list[str | None] = [None] * len(prompts)
        for shortname, prompt in library_prompts(config).items():
            prompts.append(prompt)
            names.append(shortname)
        own_settings = library_prompt_settings(config)
        prompt_settings = [own_settings.get(name, {}) if name else {} for name in names]
        guidance = value("validation_guidance")
        # guidance 1.0 is the pipelines' switch for "no unconditional pass"; an embedded guidance
        # value (Flux) is not classifier-free guidance and stays as it is
        if config.validation_disable_unconditional \
                and config.model_family not in EMBEDDED_GUIDANCE_FAMILIES:
            guidance = 1.0
        from simpletuner.validation.video import VideoSettings

        video = VideoSettings.from_config(config, value, prompts, names)  # adds the dataset file's prompts
        inputs = None
        if config.validation_using_datasets:
            video, inputs = dataset_starts(config, video, prompts)
        from simpletuner.validation.adapters import adapter_mode, runs_from_config
        from simpletuner.validation.external import ExternalValidation
        from simpletuner.validation.previews import PreviewSettings

        return cls(
            prompts=prompts,
            negative_prompt=value("validation_negative_prompt") or None,
            num_images=config.num_validation_images or 1,
            num_inference_steps=value("validation_num_inference_steps"),
            guidance=guidance,
            seed=config.validation_seed if config.validation_seed is not None else (config.seed or 0),
            resolutions=parse_resolutions(config.validation_resolution, fallback_edge),
            names=names,
            prompt_settings=prompt_settings if any(prompt_settings) else None,
            randomize=bool(config.validation_randomize),
            seed_source=config.validation_seed_source,
            guidance_rescale=config.validation_guidance_rescale,
            scheduler=config.validation_noise_scheduler,
            video=video,
            skip_layer_guidance=skip_layer_arguments(config),
            external=ExternalValidation.from_config(config),
            preview=PreviewSettings.from_config(config),
            adapter_runs=runs_from_config(config),
            adapter_mode=adapter_mode(config),
            inputs=inputs,
            stitch_location=config.validation_stitch_input_location,
            compile=bool(config.validation_torch_compile),
            watermark=bool(config.enable_watermark),
            channel_control=bool(config.control),
            sampling_scheduler=(family_defaults or {}).get("sampling_scheduler"),
            sampling_timesteps=(family_defaults or {}).get("sampling_timesteps"),
        )

    def passes(self) -> "list[AdapterRun | None]":
        """The sampling passes of one validation, in order: None is the plain model."""
        if not self.adapter_runs or self.adapter_mode == "none":
            return [None]
        return ([None] if self.adapter_mode == "comparison" else []) + list(self.adapter_runs)

    def call_arguments(self) -> dict:
        """Pipeline keyword arguments that only some options add."""
        arguments = dict(self.skip_layer_guidance)
        if self.sampling_timesteps:
            arguments["timesteps"] = list(self.sampling_timesteps)
        if self.guidance_rescale is not None:
            arguments["guidance_rescale"] = float(self.guidance_rescale)
        return arguments


def dataset_starts(config, video: "VideoSettings", prompts: list[str]):
    """``--validation_using_datasets``: (video settings, per-prompt pictures). A video family gets every
    prompt as an entry with a starting picture (first frame, image-to-video); an image family the
    pictures img2img starts from."""
    import dataclasses

    from simpletuner.options.validation_rules import VIDEO_FAMILIES
    from simpletuner.validation.dataset_file import ValidationEntry
    from simpletuner.validation.dataset_inputs import pictures_for_prompts

    pictures = pictures_for_prompts(config, len(prompts))
    if config.model_family in VIDEO_FAMILIES:
        entries = tuple(ValidationEntry(caption=prompt, image_path=picture) for prompt, picture in zip(prompts, pictures))
        return dataclasses.replace(video, entries=entries, first_entry=0), None
    return video, pictures


def skip_layer_arguments(config) -> dict:
    """``--validation_guidance_skip_layers`` (and start / stop / scale when given) as SD3's pipeline names
    them; unset tuning keeps the pipeline's own defaults."""
    if config.validation_guidance_skip_layers is None:
        return {}
    arguments = {"skip_guidance_layers": [int(layer) for layer in config.validation_guidance_skip_layers]}
    for option, keyword in (("validation_guidance_skip_scale", "skip_layer_guidance_scale"),
                            ("validation_guidance_skip_layers_start", "skip_layer_guidance_start"),
                            ("validation_guidance_skip_layers_stop", "skip_layer_guidance_stop")):
        if getattr(config, option) is not None:
            arguments[keyword] = float(getattr(config, option))
    return arguments


def refuse_video_settings(settings: ValidationSettings, family: str) -> None:
    """An image family cannot honour the video validation options: refuse them rather than ignore them
    (or sample ``--validation_dataset_file``'s captions as images and drop the rest of its entries)."""
    video = settings.video
    if video is not None and video.entries:
        raise ValueError(f"--validation_dataset_file is for video families; {family} makes images. Put the prompts in "
                         "--validation_prompt or --user_prompt_library instead")
    if video is not None and video.num_frames is not None:
        raise ValueError(f"--validation_num_video_frames {video.num_frames} is for video families; {family} makes "
                         "images. Remove it")


def generator_device(settings: ValidationSettings, device):
    """Where the per-image generators live: the accelerator with ``--validation_seed_source gpu``,
    else the CPU (the same seed then gives the same image on any machine)."""
    import torch

    return torch.device(device) if settings.seed_source == "gpu" else torch.device("cpu")


def fresh_seed() -> int:
    """A random seed from the OS, leaving every global random state untouched (exact resume)."""
    import secrets

    return secrets.randbelow(2**31 - 1)


def use_sampling_scheduler(pipeline, settings: ValidationSettings, flow_matching: bool) -> None:
    """Give ``pipeline`` the scheduler validation samples with: ``--validation_noise_scheduler``'s, else a
    distilled student's own (rebuilt from the pipeline's config); otherwise it keeps its own."""
    if settings.scheduler:
        pipeline.scheduler = validation_scheduler(settings.scheduler, pipeline.scheduler, flow_matching)
    elif settings.sampling_scheduler:
        import diffusers

        from simpletuner.objectives.flow import with_euler_shift

        config = pipeline.scheduler.config
        if settings.sampling_scheduler == "FlowMatchEulerDiscreteScheduler":
            config = with_euler_shift(config)  # Wan's UniPC names its shift flow_shift
        pipeline.scheduler = getattr(diffusers, settings.sampling_scheduler).from_config(config)


def validation_scheduler(name: str, current, flow_matching: bool):
    """``--validation_noise_scheduler``: the named diffusers scheduler built from the pipeline's own
    scheduler config (so prediction type, betas and timestep spacing carry over)."""
    import diffusers

    from simpletuner.options.validation_rules import scheduler_class_name

    class_name = scheduler_class_name(name, flow_matching)
    if class_name is None:  # the config rules refuse these before a model loads
        raise ValueError(f"--validation_noise_scheduler {name} cannot sample this model")
    return getattr(diffusers, class_name).from_config(current.config)


def generate_images(pipeline, prompts: list[str], settings: ValidationSettings, device,
                    size: tuple[int, int], batch_size: int = 16, extra_arguments: dict | None = None,
                    seed: int | None = None, step_callback=None, inputs: list | None = None,
                    prompt_settings: list[dict] | None = None) -> list:
    """One image per prompt, each with its own seeded generator (image ``i`` uses ``seed + i``;
    ``seed`` defaults to ``settings.seed``) so results do not depend on batching and never touch the
    global random state (which would break exact resume). ``step_callback(start, count)`` may give a
    pipeline ``callback_on_step_end`` for the prompts ``start`` to ``start + count`` (previews).
    ``inputs`` (img2img): per prompt, the picture to start from, already at ``size``.
    ``prompt_settings``: per prompt, a library entry's own seed / steps / guidance / size / negative
    prompt; such prompts are drawn one by one with those (its seed replaces ``seed + i``)."""
    import torch

    if prompt_settings and any(prompt_settings):
        return _generate_with_own_settings(pipeline, prompts, settings, device, size, extra_arguments, seed,
                                           step_callback, inputs, prompt_settings)

    base_seed = settings.seed if seed is None else seed
    where = generator_device(settings, device)
    images = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        generators = [torch.Generator(device=where).manual_seed(base_seed + start + i) for i in range(len(chunk))]
        callback = step_callback(start, len(chunk)) if step_callback else None
        callbacks = {"callback_on_step_end": callback, "callback_on_step_end_tensor_inputs": ["latents"]} \
            if callback else {}
        shape = {"width": size[0], "height": size[1]}
        if inputs is not None:  # img2img: the picture sets the size (SD's img2img takes no width / height)
            callbacks["image"] = inputs[start:start + len(chunk)]
            accepted = inspect.signature(pipeline.__call__).parameters
            shape = {key: value for key, value in shape.items() if key in accepted}
        result = pipeline(
            prompt=chunk,
            negative_prompt=[settings.negative_prompt] * len(chunk) if settings.negative_prompt else None,
            num_inference_steps=settings.num_inference_steps,
            guidance_scale=settings.guidance,
            generator=generators,
            **shape,
            **(extra_arguments or {}),
            **callbacks,
        )
        images.extend(result.images)
    return images


def _generate_with_own_settings(pipeline, prompts, settings, device, size, extra_arguments, seed, step_callback,
                                inputs, prompt_settings: list[dict]) -> list:
    """:func:`generate_images` one prompt at a time, each with its entry's settings over the run's."""
    import dataclasses

    base_seed = settings.seed if seed is None else seed
    images = []
    for index, (prompt, own) in enumerate(zip(prompts, prompt_settings)):
        one = dataclasses.replace(
            settings, num_inference_steps=own.get("steps", settings.num_inference_steps),
            guidance=own.get("guidance", settings.guidance),
            negative_prompt=own.get("negative_prompt", settings.negative_prompt))
        own_size = (own.get("width", size[0]), own.get("height", size[1]))
        callback = (lambda start, count, offset=index: step_callback(offset, count)) if step_callback else None
        images += generate_images(pipeline, [prompt], one, device, own_size, extra_arguments=extra_arguments,
                                  seed=own.get("seed", base_seed + index), step_callback=callback,
                                  inputs=inputs[index:index + 1] if inputs is not None else None)
    return images


@dataclass
class Validator:
    """Runs validation at the configured interval and keeps the base model's images for comparison."""

    settings: ValidationSettings
    output_dir: Path
    tracker: object
    interval: int | None
    benchmark_enabled: bool
    device: object
    disabled: bool = False
    benchmark: dict[tuple[int, int], list] = field(default_factory=dict)
    #: ``--validation_epoch_interval`` in optimizer steps (epochs x steps per epoch)
    epoch_interval_steps: int | None = None
    on_startup: bool = False
    #: the seed of the latest run (``--validation_randomize`` draws a new one each time)
    last_seed: int | None = None
    #: ``--validation_preview``'s Tiny AutoEncoder, loaded at the first validation and kept
    _preview_autoencoder: object = None
    #: extra validation adapters read from disk, by path (read once, merged at every validation)
    _adapter_files: dict = field(default_factory=dict)
    #: ``--validation_torch_compile``: the compiled wrapper of the denoiser, made once and reused (it
    #: shares the live weights, so later validations see the trained values without recompiling)
    _compiled: object = None
    #: ``--enable_watermark``'s encoder, made at the first validation and kept
    _watermarker: object = None

    @property
    def enabled(self) -> bool:
        """Sampling needs a prompt; an external validation command needs none."""
        return (bool(self.settings.prompts) or self.settings.external is not None) and not self.disabled

    def due(self, step: int) -> bool:
        """At the step interval or at the end of every Nth epoch; once, when both fall on one step."""
        if not self.enabled or step <= 0:
            return False
        return any(interval and step % interval == 0 for interval in (self.interval, self.epoch_interval_steps))

    def run_startup(self, model, step: int) -> None:
        """``--validation_on_startup``: sample before the first step of this process's training. At
        step 0 the benchmark images are those samples already, so they are not made twice."""
        if not (self.enabled and self.on_startup):
            return
        if step == 0 and self.benchmark:
            logger.info("validation on startup: the step-0 base model images serve as the startup samples")
            return
        self.run(model, step, label="step_0_base_model" if step == 0 else f"step_{step}_startup")

    def run(self, model, step: int, label: str | None = None) -> dict[tuple[int, int], list]:
        """Sample every prompt x image index x resolution; write PNGs and a grid per resolution. With
        ``--validation_method external-script`` the user's command runs instead (nothing is sampled)."""
        if self.settings.external is not None:
            self.settings.external.run(step, self.output_dir,
                                       self.output_dir / "validation" / (label or f"step_{step}"))
            return {}
        from simpletuner.validation.adapters import merged

        label = label or f"step_{step}"
        results = None
        for adapter_run in self.settings.passes():
            if adapter_run is None:
                found = self._sample(model, step, label, panel_caption(step, label), "validation")
            else:  # the adapter's images go to their own folder, grid caption and tracker key
                with merged(model, adapter_run, self._adapter_files):
                    found = self._sample(model, step, f"{label}_adapter_{adapter_run.label}",
                                         f"{panel_caption(step, label)} + {adapter_run.label}",
                                         f"validation/adapter_{adapter_run.label}")
            results = found if results is None else results
        return results

    def _sample(self, model, step: int, label: str, caption: str, tracker_key: str) -> dict[tuple[int, int], list]:
        """One sampling pass of every prompt, written to ``validation/<label>``."""
        import torch

        from simpletuner.training.distributed import unwrap_parallel

        denoiser = unwrap_parallel(model.denoiser)  # DDP's forward would wait for the other processes
        # every trained network samples in eval mode (no LoRA dropout), then goes back to training
        networks = [denoiser, *model.trainable_text_encoders().values()]
        training_modes = [network.training for network in networks]
        for network in networks:
            network.eval()
        pipeline = model.build_pipeline(denoiser)
        from simpletuner.validation.controlnet import controlnet_validation

        pipeline, control_arguments = controlnet_validation(model, pipeline, denoiser,  # --controlnet / --control
                                                            channel_control=self.settings.channel_control)
        if self.settings.inputs is not None and not model.encodes_video:
            from simpletuner.validation.dataset_inputs import img2img_pipeline

            pipeline = img2img_pipeline(pipeline)
        from simpletuner.validation.watermark import without_builtin_watermark

        pipeline = without_builtin_watermark(pipeline)
        pipeline.set_progress_bar_config(disable=True)
        if self.settings.compile:
            self._use_compiled_denoiser(pipeline, model, denoiser)
        use_sampling_scheduler(pipeline, self.settings, model.prediction_type == "flow_matching")
        prompts = [p for p in self.settings.prompts for _ in range(self.settings.num_images)]
        own_settings = [s for s in (self.settings.prompt_settings or []) for _ in range(self.settings.num_images)]
        names = self._file_names(step)
        folder = self.output_dir / "validation" / label
        folder.mkdir(parents=True, exist_ok=True)
        seed = fresh_seed() if self.settings.randomize else self.settings.seed
        self.last_seed = seed
        logger.info("validation %s: seed %d (image i uses seed %d + i, generators on %s)", folder.name, seed, seed,
                    generator_device(self.settings, self.device).type)
        arguments = {**model.pipeline_call_arguments(), **self.settings.call_arguments(), **control_arguments}
        results = {}
        from simpletuner.training.adapter import validation_strength

        # --validation_lycoris_strength: the adapter's multiplier while sampling, restored after
        with torch.no_grad(), self._autocast(model), validation_strength(model):
            if model.encodes_video:  # mp4 files, first-frame grids and their record (validation/video.py)
                from simpletuner.validation.video import sample_videos

                results = sample_videos(self, pipeline, model, folder, names, seed, step, arguments, label,
                                        caption, tracker_key)
            else:
                refuse_video_settings(self.settings, model.family)
                previews = self._preview_callbacks(pipeline, model, folder, names)
                for size in self.settings.resolutions:
                    inputs = self._inputs(size)
                    images = generate_images(pipeline, prompts, self.settings, self.device, size,
                                             extra_arguments=arguments, seed=seed,
                                             step_callback=previews(size) if previews else None, inputs=inputs,
                                             prompt_settings=own_settings or None)
                    images = self._watermarked(images)
                    results[size] = images
                    self._write(folder, size, names, images, step, caption, tracker_key, inputs)
                self._write_record(folder, step, seed, prompts, names, type(pipeline.scheduler).__name__)
        for network, was_training in zip(networks, training_modes):
            network.train(was_training)
        logger.info("validation images for step %d written to %s", step, folder)
        return results

    def _watermarked(self, images: list) -> list:
        """``images`` stamped with ``--enable_watermark``'s invisible mark, or as they are."""
        if not self.settings.watermark:
            return images
        if self._watermarker is None:
            from simpletuner.validation.watermark import Watermarker

            self._watermarker = Watermarker()
        return self._watermarker.apply(images)

    def _use_compiled_denoiser(self, pipeline, model, denoiser) -> None:
        """Put ``torch.compile(denoiser)`` into the pipeline in place of the denoiser. Compiling is slow
        once; the wrapper is kept, and dynamo's guards recompile only if shapes or modes change."""
        import torch

        if self._compiled is None or self._compiled._orig_mod is not denoiser:
            self._compiled = torch.compile(denoiser)
            logger.info("validation: %s compiled with torch.compile (the first validation pays for it)",
                        model.denoiser_name)
        setattr(pipeline, model.denoiser_name, self._compiled)

    def _inputs(self, size: tuple[int, int]) -> list | None:
        """``--validation_using_datasets``: per image (prompt x image index), its starting picture at ``size``."""
        if self.settings.inputs is None:
            return None
        from simpletuner.validation.dataset_inputs import load_input

        return [load_input(path, size) for path in self.settings.inputs for _ in range(self.settings.num_images)]

    def _preview_callbacks(self, pipeline, model, folder: Path, names: list[str]):
        """``--validation_preview``: per size, a factory of step callbacks writing previews of the
        images ``start`` to ``start + count`` into ``folder/previews``; None without previews."""
        preview = self.settings.preview
        if preview is None:
            return None
        from simpletuner.validation.previews import PreviewWriter, load_preview_autoencoder

        if self._preview_autoencoder is None:
            channels = getattr(getattr(pipeline, "vae", None), "config", None)
            self._preview_autoencoder = load_preview_autoencoder(
                preview, self.device, getattr(channels, "latent_channels", None))

        def for_size(size):
            tag = f"{size[0]}x{size[1]}"
            return lambda start, count: PreviewWriter(preview, self._preview_autoencoder, folder / "previews", tag,
                                                      names[start:start + count], size)
        return for_size

    def check_model(self, model) -> None:
        """Refuse what the first validation would refuse (video options on an image family; clip
        lengths or starting pictures the video pipeline cannot take), without sampling anything."""
        if self.settings.external is not None:
            return  # nothing is sampled here
        self._check_skip_layers(model)
        if not model.encodes_video:
            refuse_video_settings(self.settings, model.family)
            return
        from simpletuner.validation.video import check_requests, video_requests

        check_requests(video_requests(self.settings, self._file_names(0), self.settings.seed), model,
                       model.build_pipeline())

    def _check_skip_layers(self, model) -> None:
        """Skip-layer indices must name blocks the transformer has (the pipeline would fail mid-run)."""
        layers = self.settings.skip_layer_guidance.get("skip_guidance_layers")
        if not layers:
            return
        count = getattr(getattr(model.denoiser, "config", None), "num_layers", None)
        if count is not None and max(layers) >= count:
            raise ValueError(f"--validation_guidance_skip_layers {layers}: the {model.family} transformer has "
                             f"{count} blocks (0 to {count - 1}); choose indices in that range")

    def _file_names(self, step: int) -> list[str]:
        """Per image, the file name stem after the size tag: the running index for
        ``--validation_prompt``, ``<shortname>_<n>`` for library prompts."""
        shortnames = self.settings.names or [None] * len(self.settings.prompts)
        stems = []
        for shortname in shortnames:
            for n in range(self.settings.num_images):
                stems.append(f"{len(stems):02d}" if shortname is None else f"{shortname}_{n:02d}")
        return stems

    def _write_record(self, folder: Path, step: int, seed: int, prompts: list[str], names: list[str],
                      scheduler: str) -> None:
        """``validation.json``: the seed and prompt of every image and how they were sampled, enough to
        reproduce any of them (a per-prompt library entry may override the steps and guidance)."""
        import json

        record = {
            "step": step, "seed": seed, "seed_source": self.settings.seed_source or "cpu",
            "randomized": self.settings.randomize, "scheduler": scheduler,
            "num_inference_steps": self.settings.num_inference_steps, "guidance": self.settings.guidance,
            **({"timesteps": list(self.settings.sampling_timesteps)} if self.settings.sampling_timesteps else {}),
            "images": {stem: {"prompt": prompt, "seed": seed + index}
                       for index, (stem, prompt) in enumerate(zip(names, prompts))},
        }
        if self.settings.inputs is not None:  # --validation_using_datasets: the picture each image started from
            for index, stem in enumerate(names):
                record["images"][stem]["input"] = str(self.settings.inputs[index // self.settings.num_images])
        (folder / "validation.json").write_text(json.dumps(record, indent=2))

    def _autocast(self, model):
        """Half-precision models mix dtypes inside the pipeline (the scheduler works in fp32);
        autocast keeps every layer's inputs in the layer's dtype, as in training."""
        import contextlib

        import torch

        if model.weight_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=torch.device(self.device).type, dtype=model.weight_dtype)

    def run_benchmark(self, model) -> None:
        """Images from the untrained model at step 0, later stitched left of each validation image.
        Settings the model cannot sample are refused here, before the first step, even without one."""
        if self.enabled:
            self.check_model(model)
        if self.enabled and self.benchmark_enabled and self.settings.external is None:
            self.benchmark = self.run(model, 0, label="step_0_base_model")

    def _write(self, folder: Path, size: tuple[int, int], names: list[str], images: list, step: int,
               caption: str, tracker_key: str = "validation", inputs: list | None = None) -> None:
        """The images, and their grid captioned with what it shows: ``caption`` alone, or ``base model``
        over the left and ``caption`` over the right half of before/after pairs; with
        ``--validation_stitch_input_location``, the starting picture (``inputs``) on that side."""
        tag = f"{size[0]}x{size[1]}"
        base = self.benchmark.get(size)
        compared = bool(base) and step > 0
        shown = []
        for index, image in enumerate(images):
            image.save(folder / f"{tag}_{names[index]}.png")
            shown.append(stitch_left(base[index], image) if compared else image)
        captions = [BASE_MODEL_CAPTION, caption] if compared else [caption]
        side = self.settings.stitch_location
        if inputs is not None and side:
            from simpletuner.validation.dataset_inputs import stitch_input

            shown = [stitch_input(inputs[index], tile, side) for index, tile in enumerate(shown)]
            captions = ["input", *captions] if side == "left" else [*captions, "input"]
        grid = make_grid(shown, columns=min(len(shown), 4))
        grid = caption_grid(grid, shown[0].width, shown[0].height, captions)
        save_grid(grid, folder / f"grid_{tag}.png")
        self.tracker.log_image(f"{tracker_key}/{tag}", grid, step)
