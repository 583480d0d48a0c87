"""Output locations, experiment trackers, webhooks and debug output."""

from __future__ import annotations

from simpletuner.options.spec import Option

_G = "logging"

OPTIONS: list[Option] = [
    Option(
        name="output_dir",
        kind="str",
        default=None,
        help="Folder that receives checkpoints, the final model and run logs.",
        group=_G,
        implemented=True,
        required=True,
    ),
    Option(
        name="logging_dir",
        kind="str",
        default="logs",
        help="Folder for TensorBoard event files.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="report_to",
        kind="str",
        default="tensorboard",
        help="Experiment tracker that receives metrics and sample images; all uses every installed one, none disables tracking.",
        group=_G,
        choices=("tensorboard", "wandb", "comet_ml", "all", "none"),
        implemented=True,
    ),
    Option(
        name="tracker_project_name",
        kind="str",
        default="simpletuner",
        help="Project the run is filed under in the tracker.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="tracker_run_name",
        kind="str",
        default="simpletuner-run",
        help="Display name of this run in the tracker.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="tracker_image_layout",
        kind="str",
        default=None,
        help="Show validation images in the tracker as a gallery or as a table.",
        group=_G,
        choices=("gallery", "table"),
    ),
    Option(
        name="webhook_config",
        kind="json",
        default=None,
        help="Webhook targets (Discord or custom endpoints), inline or as a file, that receive live training events. "
        "SIMPLETUNER_JOB_ID in the environment fills the job_id field.",
        group=_G,
    ),
    Option(
        name="webhook_reporting_interval",
        kind="int",
        default=None,
        help="Seconds between periodic progress messages sent to webhooks.",
        group=_G,
    ),
    Option(
        name="debug_aspect_buckets",
        kind="bool",
        default=False,
        help="Log very detailed information about aspect bucketing.",
        group=_G,
    ),
    Option(
        name="debug_dataset_loader",
        kind="bool",
        default=False,
        help="Log very detailed information from the dataset loader.",
        group=_G,
    ),
    Option(
        name="print_filenames",
        kind="bool",
        default=False,
        help="Log each file name as it is processed, to find a corrupt or truncated image.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="print_sampler_statistics",
        kind="bool",
        default=False,
        help="Log statistics from the dataset sampler, for debugging.",
        group=_G,
    ),
]
