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
        name="overwrite_output_dir",
        kind="bool",
        default=False,
        help="Start over in an output_dir that holds an earlier run: its checkpoints, validation images, logs and "
        "outputs are moved into a dated previous-run-* folder inside output_dir (nothing is deleted), then training "
        "starts at step 0.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="logging_dir",
        kind="str",
        default="logs",
        help="Folder for tracker files, relative to output_dir unless absolute: TensorBoard events go to "
        "<logging_dir>/<tracker_project_name>/<tracker_run_name>, and wandb's run folder here unless WANDB_DIR is set.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="report_to",
        kind="str",
        default="tensorboard",
        help="Experiment tracker (through accelerate) that receives every loss term, the learning rate, validation "
        "images and videos and the resolved config (secrets redacted); several trackers separated by commas "
        "(tensorboard,wandb) all receive the same; all uses every installed one of tensorboard, wandb and comet_ml, "
        "none disables tracking (both only on their own). comet_ml is optional: pip install 'comet_ml>=3.41'.",
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
        help="How wandb shows validation grids: gallery (unset) logs each grid as an image in the media panel; table "
        "adds a (step, size, grid) row to a table per size, to compare steps side by side. TensorBoard and comet "
        "always show the grid as an image.",
        group=_G,
        choices=("gallery", "table"),
        implemented=True,
    ),
    Option(
        name="webhook_config",
        kind="json",
        default=None,
        help="Webhook targets (Discord or custom endpoints), inline or as a file, that receive live training events: "
        "one object or a list, each with webhook_type (raw or discord), callback_url, and optionally message_prefix "
        "and log_level. SIMPLETUNER_JOB_ID in the environment fills the job_id field.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="webhook_reporting_interval",
        kind="int",
        default=None,
        minimum=1,
        help="Optimizer steps between periodic progress messages sent to webhooks (unset: no progress messages).",
        group=_G,
        implemented=True,
    ),
    Option(
        name="debug_aspect_buckets",
        kind="bool",
        default=False,
        help="After the datasets are built, log every aspect bucket with its image count and a few file names.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="debug_dataset_loader",
        kind="bool",
        default=False,
        help="Log every batch as it is drawn: its dataset, bucket and file names.",
        group=_G,
        implemented=True,
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
        help="Log how many samples each dataset and bucket contributed, at the end of every epoch and of the run.",
        group=_G,
        implemented=True,
    ),
]
