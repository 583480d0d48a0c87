"""Uploading results to the Hugging Face Hub and other targets."""

from __future__ import annotations

from simpletuner.options.spec import Option

_G = "publishing"

OPTIONS: list[Option] = [
    Option(
        name="push_to_hub",
        implemented=True,
        kind="bool",
        default=False,
        help="Upload the finished model, its model card and final validation images to the Hugging Face Hub "
        "repository --hub_model_id; needs the network and a huggingface_hub login.",
        group=_G,
    ),
    Option(
        name="push_checkpoints_to_hub",
        implemented=True,
        kind="bool",
        default=False,
        help="Also upload every checkpoint folder, as it is saved, to checkpoints/<folder> in that repository; "
        "a failed checkpoint upload only warns.",
        group=_G,
    ),
    Option(
        name="push_to_hub_background",
        implemented=True,
        kind="bool",
        default=False,
        help="Do Hub uploads on a separate thread so training is not paused by them; pending uploads finish before the run exits.",
        group=_G,
    ),
    Option(
        name="hub_model_id",
        implemented=True,
        kind="str",
        default=None,
        help="Hub repository (`owner/name`) that --push_to_hub uploads to; required with it. "
        "Results stay directly in output_dir.",
        group=_G,
    ),
    Option(
        name="model_card_private",
        implemented=True,
        kind="bool",
        default=False,
        help="Make the created Hub repository private.",
        group=_G,
    ),
    Option(
        name="model_card_safe_for_work",
        implemented=True,
        kind="bool",
        default=False,
        help="Omit the NSFW warning that model cards carry by default.",
        group=_G,
    ),
    Option(
        name="model_card_note",
        implemented=True,
        kind="str",
        default=None,
        help="Short free-form text shown first on the model card (README.md in output_dir, written after every run).",
        group=_G,
    ),
    Option(
        name="modelspec_comment",
        implemented=True,
        kind="str",
        default=None,
        help="Comment stored as modelspec.comment in saved safetensors metadata; {env:NAME} placeholders are expanded. "
        "A config file may give a list of lines.",
        group=_G,
    ),
    Option(
        name="publishing_config",
        kind="json",
        default=None,
        help="Extra upload targets besides the Hub (S3-compatible, Backblaze B2, Azure Blob, Dropbox), inline or as a file. "
        "Provider SDKs must be installed.",
        group=_G,
    ),
    Option(
        name="post_upload_script",
        kind="str",
        default=None,
        help="Command run in the background after each upload (or save, if nothing is uploaded); "
        "placeholders such as {remote_checkpoint_path} are filled in. Failures are only logged.",
        group=_G,
    ),
]
