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
        implemented=True,
        kind="json",
        default=None,
        help="S3 targets the final outputs (the product, EMA copies, README.md, last validation images) are also "
        "uploaded to, inline or as a JSON file: {\"provider\": \"s3\", \"bucket\": ..., \"prefix\", \"endpoint_url\", "
        "\"region\", \"access_key_id\", \"secret_access_key\"} or a list of them; needs boto3. Keys are never logged. "
        "See documentation/PUBLISHING.md.",
        group=_G,
    ),
    Option(
        name="post_upload_script",
        implemented=True,
        kind="str",
        default=None,
        help="Command started in the background after each final upload (Hub, each S3 target), or once when "
        "nothing is uploaded; run without a shell, each argument's placeholders filled in ({remote_checkpoint_path}, "
        "{local_checkpoint_path}, {global_step}, {model_family}...). Failures are only logged.",
        group=_G,
    ),
]
