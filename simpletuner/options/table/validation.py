"""Sample generation during training and evaluation metrics."""

from __future__ import annotations

from simpletuner.options.spec import MAX_SEED, Option

_G = "validation"

OPTIONS: list[Option] = [
    # --- scheduling --------------------------------------------------------------------------
    Option(
        name="validation_step_interval",
        kind="int",
        default=None,
        minimum=1,
        help="Generate validation samples every N optimizer steps.",
        group=_G,
        aliases=("validation_steps",),
        implemented=True,
    ),
    Option(
        name="validation_epoch_interval",
        kind="int",
        default=None,
        minimum=1,
        help="Generate validation samples after every N epochs.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="validation_disable",
        kind="bool",
        default=False,
        help="Turn off validation sampling entirely.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="validation_on_startup",
        kind="bool",
        default=False,
        help="Also sample once from the untouched base model before the first training step.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="disable_benchmark",
        kind="bool",
        default=False,
        help="Skip the step-0 base model samples that are otherwise placed beside later validation images for comparison.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="validation_method",
        kind="str",
        default="simpletuner-local",
        help="Run validation with the built-in pipeline, or hand it to validation_external_script.",
        group=_G,
        choices=("simpletuner-local", "external-script"),
        implemented=True,
    ),
    Option(
        name="validation_external_script",
        kind="str",
        default=None,
        help="Command run for validation when validation_method is external-script, split into arguments like a "
        "shell would but never run through one. Placeholders filled inside each argument: {local_checkpoint_path} "
        "(newest checkpoint folder), {global_step}, {output_dir}, {tracker_run_name}, {tracker_project_name}, "
        "{model_family}, {model_type}, {lora_type}, {huggingface_path} (hub_model_id), {remote_checkpoint_path} "
        "(empty) and any {validation_*} option.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="validation_external_background",
        kind="bool",
        default=False,
        help="Start the external validation command and continue training without waiting for it or checking its exit code.",
        group=_G,
        implemented=True,
    ),
    # --- prompts and sampling ----------------------------------------------------------------
    Option(
        name="validation_prompt",
        kind="str",
        default=None,
        help="A prompt to draw sample images from while training, to watch the model learn; leave it empty for none.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="validation_negative_prompt",
        kind="str",
        default="blurry, cropped, ugly",
        help="Negative prompt used for validation samples.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="validation_prompt_library",
        kind="bool",
        default=False,
        help="Add the trainer's bundled set of test prompts to validation.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="user_prompt_library",
        kind="str",
        default=None,
        help="JSON file of your own named validation prompts.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="num_validation_images",
        kind="int",
        default=1,
        minimum=1,
        help="Samples generated for each validation prompt.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="validation_num_inference_steps",
        kind="int",
        default=30,
        minimum=1,
        help="Denoising steps per validation sample. FastVideo's name, validation_sampling_steps, is accepted too.",
        group=_G,
        aliases=("validation_sampling_steps",),  # FastVideo's name
        implemented=True,
    ),
    Option(
        name="validation_guidance",
        kind="float",
        default=7.5,
        minimum=0,
        help="Classifier-free guidance scale used for validation samples. FastVideo's name, "
        "validation_guidance_scale, is accepted too.",
        group=_G,
        aliases=("validation_guidance_scale",),  # FastVideo's name
        implemented=True,
    ),
    Option(
        name="validation_guidance_real",
        kind="float",
        default=None,
        minimum=1.0,
        help="Flux: real classifier-free guidance scale at validation (the pipeline's true_cfg_scale): above 1.0 "
        "every step also runs the negative prompt (--validation_negative_prompt; set it to \"\" to use the empty prompt "
        "caption dropout trained), twice the cost. Unset or 1.0 leaves it off; --validation_guidance stays the "
        "embedded guidance.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="validation_guidance_rescale",
        kind="float",
        default=None,
        minimum=0, maximum=1,
        help="Guidance rescale factor (0 to 1) for validation, reducing over-saturation at high CFG; "
        "sd1x, sd2x and sdxl only.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="validation_no_cfg_until_timestep",
        kind="int",
        default=None,
        minimum=0,
        help="Flux only: run the first N validation denoising steps without real CFG (N counts steps, not "
        "timestep values), turning it on from step N; needs --validation_guidance_real above 1.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="validation_disable_unconditional",
        kind="bool",
        default=False,
        help="Sample validation images without the unconditional (negative prompt) pass, i.e. classifier-free "
        "guidance off (guidance 1.0); Flux's embedded guidance is unchanged.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="validation_guidance_skip_layers",
        kind="list",
        default=None,
        help="SD3: transformer block indices skipped in an extra guidance pass (skip-layer guidance), as a JSON list "
        "such as [7, 8, 9]; needs classifier-free guidance.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="validation_guidance_skip_layers_start",
        kind="float",
        default=None,
        minimum=0, maximum=1,
        help="Fraction of the sampling run where skip-layer guidance begins (SD3 pipeline default 0.01).",
        group=_G,
        implemented=True,
    ),
    Option(
        name="validation_guidance_skip_layers_stop",
        kind="float",
        default=None,
        minimum=0, maximum=1,
        help="Fraction of the sampling run where skip-layer guidance ends (SD3 pipeline default 0.2).",
        group=_G,
        implemented=True,
    ),
    Option(
        name="validation_guidance_skip_scale",
        kind="float",
        default=None,
        minimum=0,
        help="Strength of the skip-layer guidance term (SD3 pipeline default 2.8).",
        group=_G,
        implemented=True,
    ),
    Option(
        name="validation_noise_scheduler",
        kind="str",
        default=None,
        help="Sampler used for validation images; unset keeps the model's own scheduler.",
        group=_G,
        choices=("ddim", "ddpm", "euler", "euler-a", "unipc", "dpm++", "perflow"),
        implemented=True,
    ),
    Option(
        name="validation_seed",
        kind="int",
        default=None,
        minimum=0, maximum=MAX_SEED,
        help="Fixed seed for validation so samples can be compared across steps.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="validation_randomize",
        kind="bool",
        default=False,
        help="Use a new random seed at every validation instead of a fixed one.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="validation_seed_source",
        kind="str",
        default=None,
        help="Device on which the validation random generator is created.",
        group=_G,
        choices=("cpu", "gpu"),
        implemented=True,
    ),
    Option(
        name="validation_resolution",
        kind="str",
        default="",
        help="Sample size(s) for validation: one number, WIDTHxHEIGHT, or a comma-separated list such as 512x768,1024. "
        "Empty falls back to the training resolution.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="validation_num_video_frames",
        kind="int",
        default=None,
        minimum=1,
        help="Frames per validation video (video families); it must be a length the family's VAE decodes (1 + 4k "
        "for Wan, 1 + 8k for LTX-Video). Unset: the pipeline's default length.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="validation_dataset_file",
        kind="str",
        default=None,
        help="Video families: FastVideo's validation file, a JSON list of {\"caption\": ..., \"image_path\": ...} "
        "entries (image_path: the picture an image-to-video model starts from); an entry's num_inference_steps, "
        "width, height and num_frames override the validation options for it. Its captions join the other "
        "validation prompts.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="validation_audio_only",
        kind="bool",
        default=False,
        help="For audio-capable models, render only audio during validation; no model family here renders audio, so "
        "setting it is refused.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="validation_torch_compile",
        kind="bool",
        default=False,
        help="Sample validation images through torch.compile of the denoiser (compiled once, reused at every validation); "
        "slower first run, faster afterwards.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="validation_lycoris_strength",
        kind="float",
        default=None,
        minimum=0,
        help="Multiplier applied to LyCORIS adapter weights while sampling (the training multiplier is restored after).",
        group=_G,
        implemented=True,
    ),
    Option(
        name="validation_using_datasets",
        kind="bool",
        default=False,
        help="Start validation from dataset pictures (those of eval_dataset_id, else the eval datasets, else the "
        "trained ones; prompt i gets picture i): img2img for sd1x, sd2x, sdxl, kolors, sd3 and flux, the first frame "
        "of an image-to-video flavour for ltxvideo and wan.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="validation_stitch_input_location",
        kind="str",
        default=None,
        help="Side of each validation grid tile on which the starting picture of validation_using_datasets is shown "
        "(image families).",
        group=_G,
        implemented=True,
        choices=("left", "right"),
    ),
    # --- temporary adapters ------------------------------------------------------------------
    Option(
        name="validation_adapter_path",
        kind="str",
        default=None,
        help="LoRA merged into the model only while validating: a local file or folder, or a hub repo (org/repo or "
        "org/repo:file.safetensors, read from the local cache when offline). Its images go to "
        "validation/step_N_adapter_<name>. Cannot be combined with validation_adapter_config.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="validation_adapter_name",
        kind="str",
        default=None,
        help="Name of the validation-only adapter in logs, folder names and tracker keys (default: the file's name).",
        group=_G,
        implemented=True,
    ),
    Option(
        name="validation_adapter_strength",
        kind="float",
        default=1.0,
        minimum=0, exclusive_minimum=True,
        help="Scale of the validation-only adapter; any positive number.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="validation_adapter_mode",
        kind="str",
        default=None,
        help="Sample with the extra adapter only (adapter_only), with and without it (comparison, the default: one "
        "folder each), or not at all (none).",
        group=_G,
        implemented=True,
        choices=("adapter_only", "comparison", "none"),
    ),
    Option(
        name="validation_adapter_config",
        kind="json",
        default=None,
        help="JSON list (or object with a runs list, inline or as a file) of adapter setups to validate one after another; "
        "each entry may give label, path, adapter_name, strength or several adapters.",
        group=_G,
        implemented=True,
    ),
    # --- live previews -----------------------------------------------------------------------
    Option(
        name="validation_preview",
        kind="bool",
        default=False,
        help="Write pictures of validation samples while they are denoised (previews/ beside the images), decoded with the "
        "Tiny AutoEncoder of --tiny_autoencoder_path or the family's default; sd1x, sd2x, sdxl, kolors, sd3 and flux.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="validation_preview_steps",
        kind="int",
        default=1,
        minimum=1,
        help="Decode a preview every N sampling steps; larger values cost less.",
        group=_G,
        implemented=True,
    ),
    # --- evaluation metrics ------------------------------------------------------------------
    Option(
        name="evaluation_type",
        kind="str",
        default=None,
        help="Score validation images automatically; clip measures how well they match their prompts.",
        group=_G,
        choices=("none", "clip"),
        implemented=True,
    ),
    Option(
        name="pretrained_evaluation_model_name_or_path",
        kind="str",
        default=None,
        help="Model used to compute evaluation scores, e.g. a CLIP checkpoint.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="num_eval_images",
        kind="int",
        default=None,
        minimum=1,
        help="Images generated to compute evaluation metrics (default 4), cycling through the validation prompts.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="eval_steps_interval",
        kind="int",
        default=None,
        minimum=1,
        help="Compute evaluation metrics every N steps.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="eval_epoch_interval",
        kind="float",
        default=None,
        minimum=0, exclusive_minimum=True,
        help="Compute evaluation metrics every N epochs; fractions such as 0.5 evaluate several times per epoch.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="eval_timesteps",
        kind="int",
        default=None,
        minimum=1,
        help="Fixed, evenly spaced noise levels (timesteps or flow sigmas) each eval image is scored at; default 4.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="eval_dataset_id",
        kind="str",
        default=None,
        help="Compute the evaluation loss on this eval dataset only; unset scores every eval dataset.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="eval_dataset_pooling",
        kind="bool",
        default=False,
        help="Also report one evaluation loss pooled over all eval datasets (eval/loss) beside the per-dataset curves.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="eval_loss_disable",
        kind="bool",
        default=False,
        help="Skip the evaluation loss that the eval schedule otherwise computes on the eval datasets.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="enable_watermark",
        kind="bool",
        default=False,
        help="Stamp an invisible watermark (the 48-bit DWT-DCT mark of the SDXL reference code) on every validation "
        "image, so detectors can tell later that it was generated. Needs the invisible-watermark package "
        "(pip install 'simpletuner[watermark]'); images under 256x256 pixels of area are written unmarked. "
        "Image families only. See documentation/VALIDATION.md.",
        group=_G,
        implemented=True,
    ),
]
