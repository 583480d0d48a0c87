"""Saving, rotating and resuming checkpoints."""

from __future__ import annotations

from simpletuner.options.spec import Option

_G = "checkpointing"

OPTIONS: list[Option] = [
    Option(
        name="checkpoint_step_interval",
        kind="int",
        default=None,
        minimum=1,
        help="Write a resumable checkpoint every N optimizer steps.",
        group=_G,
        aliases=("checkpointing_steps",),
        implemented=True,
    ),
    Option(
        name="checkpoint_epoch_interval",
        kind="int",
        default=None,
        minimum=1,
        help="Write a checkpoint after every N completed epochs, in addition to any step-based ones.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="checkpoints_total_limit",
        kind="int",
        default=None,
        minimum=1,
        help="Delete the oldest checkpoints beyond this count.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="checkpointing_rolling_steps",
        kind="int",
        default=None,
        minimum=1,
        help="Step interval for an extra set of rolling checkpoints kept separately from the regular ones.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="checkpoints_rolling_total_limit",
        kind="int",
        default=None,
        minimum=1,
        help="How many rolling checkpoints to keep; regular ones only count against checkpoints_total_limit.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="checkpointing_use_tempdir",
        kind="bool",
        default=False,
        help="Write each checkpoint into a folder under the system temp dir (local disk) first and move it into output_dir once complete; useful when output_dir is a network mount.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="resume_from_checkpoint",
        kind="str",
        default=None,
        help="Continue a previous run: latest (the newest complete checkpoint in output_dir; starts fresh when there is none), "
        "a checkpoint folder name inside output_dir or a path to one, s3://bucket/prefix/checkpoint-N (or s3://bucket/prefix/ "
        "for its newest checkpoint; downloaded into output_dir/resumed-from-s3 first), or none (never resume). Unset, a run resumes by "
        "itself when output_dir holds checkpoints of the same config and refuses to start when they belong to another "
        "config; latest on the command line continues them anyway.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="disk_low_threshold",
        kind="str",
        default=None,
        help="Free space required before a checkpoint is saved, as bytes or a size like 50M, 100G or 1T. Unset disables the check.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="disk_low_action",
        kind="str",
        default="stop",
        help="Reaction when free space is under disk_low_threshold: stop the run, wait and re-check every 30 seconds, or run disk_low_script.",
        group=_G,
        choices=("stop", "wait", "script"),
        implemented=True,
    ),
    Option(
        name="disk_low_script",
        kind="str",
        default=None,
        help="Executable cleanup script run when disk_low_action is script; training stops if it fails or frees too little.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="post_checkpoint_script",
        kind="str",
        default=None,
        help="Command run in the background after each checkpoint is written locally. "
        "Placeholders like {local_checkpoint_path} and {global_step} are filled in.",
        group=_G,
        implemented=True,
    ),
]
