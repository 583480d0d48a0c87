"""Uploading results to the Hugging Face Hub and other targets."""

from __future__ import annotations

from simpletuner.options.spec import Option

_G = "publishing"

OPTIONS: list[Option] = [
    Option(
        name="push_to_hub",
        kind="bool",
        default=False,
        help="Upload the finished model to a Hugging Face Hub repository.",
        group=_G,
    ),
    Option(
        name="push_checkpoints_to_hub",
        kind="bool",
        default=False,
        help="Also upload every intermediate checkpoint to that repository.",
        group=_G,
    ),
    Option(
        name="push_to_hub_background",
        kind="bool",
        default=False,
        help="Do Hub uploads on a separate thread so training is not paused by them; pending uploads finish before the run exits.",
        group=_G,
    ),
    Option(
        name="hub_model_id",
        kind="str",
        default=None,
        help="Hub repository name, also used as the results folder name inside output_dir; derived from the project when empty.",
        group=_G,
    ),
    Option(
        name="model_card_private",
        kind="bool",
        default=False,
        help="Make the created Hub repository private.",
        group=_G,
    ),
    Option(
        name="model_card_safe_for_work",
        kind="bool",
        default=False,
        help="Omit the NSFW warning that model cards carry by default.",
        group=_G,
    ),
    Option(
        name="model_card_note",
        kind="str",
        default=None,
        help="Short free-form text shown first on the model card.",
        group=_G,
    ),
    Option(
        name="modelspec_comment",
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
