"""What ``simpletuner train`` does with an ``--output_dir`` that already holds a run.

Running the same command twice must never mix two runs in one folder (a fresh run overwriting
``checkpoint-10`` of an earlier one while its ``checkpoint-20`` stays beside it, for ``latest`` to
pick later). So before any model loads, the folder is looked at and one of these happens:

* no checkpoint in it: the run starts at step 0 (also with ``--resume_from_checkpoint latest``);
* checkpoints of the **same run**: the run resumes from the newest one by itself, so "run the same
  command again" continues an interrupted run;
* checkpoints of **another run** (its config differs in an option that defines the run): the run
  refuses to start, naming the folder, the first differing options and the three ways out;
* ``--resume_from_checkpoint latest`` given on the command line, or a named checkpoint: the run
  continues from it whatever the config says (the differing options are listed in the note);
* ``--overwrite_output_dir``: the earlier run's files are moved into a dated ``previous-run-*``
  folder inside ``output_dir`` (a rename, nothing is deleted), and the run starts at step 0.

What defines a run is every option except the ones listed in :data:`RESUME_SAFE_GROUPS` and
:data:`RESUME_SAFE_OPTIONS`: those only say how long to train, where to write, what to log or
validate, and how fast or in how much memory to compute; changing them between two starts of one
run is normal. Each checkpoint records the run-defining options in ``training_state.json``
(``run_config``); checkpoints written before that are compared with ``training_config.json``.

``"resume_from_checkpoint": "latest"`` in a config file (what the wizard writes) counts as the
default behaviour, not as "continue anyway": only the command line can override a refusal. This
module is torch-free; the trainer is told the outcome through ``--resume_from_checkpoint``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping

from simpletuner.options import ConfigError, options_by_name
from simpletuner.training import checkpoint as ckpt
from simpletuner.training.remote_checkpoint import STAGING_FOLDER

logger = logging.getLogger(__name__)

#: Option groups that may change between two starts of the same run: run length and checkpointing,
#: validation and evaluation, logging and output, publishing, speed and memory savers.
RESUME_SAFE_GROUPS = frozenset({"checkpointing", "validation", "logging", "publishing", "performance", "memory"})
#: Options of the other groups that may change too (how long to train, how data is read and cached,
#: where EMA weights live), without changing what the run learns.
RESUME_SAFE_OPTIONS = frozenset({
    "max_train_steps", "num_train_epochs", "ignore_final_epochs", "nan_action", "save_text_encoder",
    "i_know_what_i_am_doing", "delete_model_after_load",
    "ema_device", "ema_cpu_only", "ema_foreach_disable", "ema_validation",
    "allow_dataset_oversubscription", "ignore_missing_files", "delete_unwanted_images", "delete_problematic_images",
    "aspect_bucket_worker_count", "aspect_bucket_disable_rebuild", "metadata_update_interval",
    "preserve_data_backend_cache", "override_dataset_config", "skip_file_discovery", "cache_dir", "cache_dir_text",
    "cache_dir_vae", "compress_disk_cache", "vae_batch_size", "vae_cache_ondemand", "vae_cache_disable",
    "vae_cache_scan_behaviour", "image_processing_batch_size", "read_batch_size", "write_batch_size", "max_workers",
    "aws_max_pool_connections", "dataloader_prefetch", "dataloader_prefetch_qlen",
    "alignment_teacher_features", "crepa_encoder_frames_batch_size",
})
#: Key of the run-defining options in a checkpoint's ``training_state.json``.
RUN_CONFIG_KEY = "run_config"
#: The resolved config the trainer writes at every start (all options, secrets redacted).
RESOLVED_CONFIG_FILE = "training_config.json"
#: Files and folders a run writes directly in ``output_dir`` (besides checkpoints and the tracker's
#: logs): what ``--overwrite_output_dir`` moves out of the way.
RUN_OUTPUTS = ("training_config.json", "validation", "pipeline", "ema", "pytorch_lora_weights.safetensors",
               "singlora_state.safetensors", "README.md", "text_encoder", "text_encoder_2", "text_encoder_3",
               "text_encoder_4")
#: Name of the folders an overwritten run is moved into (``previous-run-20250101-120000``).
ARCHIVE_PREFIX = "previous-run-"
#: How many differing options a refusal names before "and N more".
SHOWN_DIFFERENCES = 3


# --- what defines a run ------------------------------------------------------------------------------


def defines_the_run(name: str) -> bool:
    """Whether option ``name`` is part of a run's identity (see the module docstring)."""
    option = options_by_name().get(name)
    if option is None:  # an option this version no longer knows: it cannot matter any more
        return False
    return option.group not in RESUME_SAFE_GROUPS and name not in RESUME_SAFE_OPTIONS


def run_identity(values: Mapping[str, Any]) -> dict[str, Any]:
    """The run-defining options of a config (a TrainConfig or its ``as_dict()``), as plain JSON with
    secrets redacted: what a checkpoint records and what a new start is compared with."""
    from simpletuner.options.secrets import redacted_config

    values = values.as_dict() if hasattr(values, "as_dict") else values
    return redacted_config({name: value for name, value in values.items() if defines_the_run(name)})


def identity_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(option, old value, new value)`` for every run-defining option that differs, in table order.

    An option the old record lacks (added in a later version) counts as its table default then.
    """
    table = options_by_name()
    defaults = run_identity({name: option.default for name, option in table.items()})
    differences = []
    for name in table:
        if name not in new:
            continue
        before = old.get(name, defaults.get(name))
        if before != new[name]:
            differences.append((name, before, new[name]))
    return differences


def recorded_identity(checkpoint: Path, output_dir: Path) -> dict[str, Any] | None:
    """The run-defining options a checkpoint was written with: its own record, else those of the
    folder's ``training_config.json`` (checkpoints of older versions); None when neither exists."""
    try:
        state = ckpt.read_training_state(checkpoint)
    except (OSError, ValueError):
        state = {}
    if isinstance(state, dict) and isinstance(state.get(RUN_CONFIG_KEY), dict):
        return state[RUN_CONFIG_KEY]
    try:
        resolved = json.loads((output_dir / RESOLVED_CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(resolved, dict):
        return None
    return {name: value for name, value in resolved.items() if defines_the_run(name)}


def _shown(value: Any) -> str:
    if value is None:
        return "unset"
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."


def describe_differences(differences: list[tuple[str, Any, Any]], limit: int = SHOWN_DIFFERENCES) -> str:
    """``learning_rate 0.0001 -> 0.0005, lora_rank 4 -> 8 (and 2 more)``."""
    shown = ", ".join(f"{name} {_shown(old)} -> {_shown(new)}" for name, old, new in differences[:limit])
    more = len(differences) - limit
    return shown + (f" (and {more} more)" if more > 0 else "")


# --- the decision ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FolderPlan:
    """What happens to ``output_dir`` and where training starts.

    ``action`` is ``fresh`` (step 0, nothing to move), ``resume`` (same run found), ``continue``
    (the checkpoint ``--resume_from_checkpoint`` names) or ``overwrite`` (move ``moved`` into
    ``archive``, then step 0). ``resume_from_checkpoint`` is what the trainer is told; ``note`` says
    it in one sentence, for ``--dry-run`` and the start-up summary.
    """

    output_dir: Path
    action: str
    note: str
    resume_from_checkpoint: str | None
    archive: Path | None = None
    moved: tuple[Path, ...] = ()


def plan_output_folder(config, command_line: frozenset[str] | set[str] = frozenset(),
                       now: datetime | None = None) -> FolderPlan:
    """Decide what this start does with ``config.output_dir``; reads only, moves nothing.

    ``command_line`` holds the options given as flags (``ResolvedRun.command_line``): a
    ``--resume_from_checkpoint latest`` typed there continues another run's checkpoints, the same
    value in a config file does not.

    Raises:
        ConfigError: the folder holds another run's checkpoints, a named checkpoint is missing or
            incomplete, or ``--resume_from_checkpoint none`` meets existing checkpoints.
    """
    output_dir = Path(config.output_dir).expanduser()
    request = config.resume_from_checkpoint
    if config.overwrite_output_dir:
        return _plan_overwrite(config, output_dir, request, now or datetime.now())
    if ckpt.asks_for_fresh_start(request):
        return _plan_fresh_start(output_dir, request)
    if request and (request != "latest" or "resume_from_checkpoint" in command_line):
        return _plan_requested_resume(config, output_dir, request)
    return _plan_default(config, output_dir)


def _resume_target(output_dir: Path, request: str) -> Path | None:
    try:
        return ckpt.resolve_resume_path(output_dir, request)
    except ckpt.CheckpointError as error:
        raise ConfigError(str(error)) from None


def _plan_default(config, output_dir: Path) -> FolderPlan:
    """No explicit request: resume the same run, refuse another one."""
    if not ckpt.list_checkpoints(output_dir):
        return FolderPlan(output_dir, "fresh", f"{output_dir} holds no checkpoint: starting at step 0", None)
    checkpoint = _resume_target(output_dir, "latest")  # every checkpoint suspect: that error names the way out
    recorded = recorded_identity(checkpoint, output_dir)
    differences = None if recorded is None else identity_differences(recorded, run_identity(config))
    if differences == []:
        return FolderPlan(output_dir, "resume", f"resuming from {checkpoint.name}: {output_dir} holds checkpoints of "
                          "this same run (`--overwrite_output_dir` starts over instead)", str(checkpoint))
    why = ("its config differs: " + describe_differences(differences)) if differences else \
        f"nothing records the config that wrote them (no {RESOLVED_CONFIG_FILE})"
    raise ConfigError(
        f"`--output_dir` {output_dir} holds checkpoints of another run (newest: {checkpoint.name}); {why}. Use a new "
        "`--output_dir`, or `--resume_from_checkpoint latest` on the command line to continue that run with these "
        f"settings, or `--overwrite_output_dir` to move the earlier run into {output_dir}/{ARCHIVE_PREFIX}<date>/ and "
        "start over")


def _plan_requested_resume(config, output_dir: Path, request: str) -> FolderPlan:
    """``latest`` from the command line, or a named checkpoint: continue it whatever the config says."""
    checkpoint = _resume_target(output_dir, request)
    if checkpoint is None:
        return FolderPlan(output_dir, "fresh", f"`--resume_from_checkpoint {request}`: {output_dir} holds no "
                          "checkpoint yet, starting at step 0", None)
    note = f"resuming from {checkpoint} as `--resume_from_checkpoint {request}` asks"
    recorded = recorded_identity(checkpoint, checkpoint.parent)
    differences = identity_differences(recorded, run_identity(config)) if recorded is not None else []
    if differences:
        note += f", with changed options: {describe_differences(differences)}"
    return FolderPlan(output_dir, "continue", note, str(checkpoint))


def _plan_fresh_start(output_dir: Path, request: str) -> FolderPlan:
    checkpoints = ckpt.list_checkpoints(output_dir)
    if checkpoints:
        raise ConfigError(
            f"`--resume_from_checkpoint {request}` starts over, but `--output_dir` {output_dir} holds checkpoints "
            f"(newest: {checkpoints[-1].path.name}) that a new run would overwrite and mix with its own; add "
            "`--overwrite_output_dir` to move them out of the way first, or use a new `--output_dir`")
    return FolderPlan(output_dir, "fresh", f"`--resume_from_checkpoint {request}`: starting at step 0", None)


def _plan_overwrite(config, output_dir: Path, request: str | None, now: datetime) -> FolderPlan:
    """Move every file of the earlier run aside; a named checkpoint outside the folder may still seed the run."""
    resume = None if (request in (None, "latest") or ckpt.asks_for_fresh_start(request)) else request
    if resume is not None:
        target = _resume_target(output_dir, resume)
        staged_from_s3 = target is not None and _inside(target, output_dir / STAGING_FOLDER)  # not moved away
        if target is not None and _inside(target, output_dir) and not staged_from_s3:
            raise ConfigError(f"`--overwrite_output_dir` moves the checkpoints of {output_dir} away, including "
                              f"`--resume_from_checkpoint {resume}`; remove one of the two options")
        resume = str(target) if target is not None else None
    moved = tuple(earlier_run_files(config, output_dir))
    if not moved:
        return FolderPlan(output_dir, "fresh", f"`--overwrite_output_dir`: {output_dir} holds no earlier run, "
                          "starting at step 0", resume)
    archive = _archive_folder(output_dir, now)
    names = ", ".join(path.name for path in moved[:4]) + (f" and {len(moved) - 4} more" if len(moved) > 4 else "")
    return FolderPlan(output_dir, "overwrite", f"`--overwrite_output_dir`: moving the earlier run ({names}) into "
                      f"{archive}, then starting at step 0", resume, archive, moved)


def _inside(path: Path, folder: Path) -> bool:
    try:
        return path.resolve().is_relative_to(folder.resolve())
    except OSError:
        return False


def _archive_folder(output_dir: Path, now: datetime) -> Path:
    base = output_dir / f"{ARCHIVE_PREFIX}{now:%Y%m%d-%H%M%S}"
    candidate, number = base, 2
    while candidate.exists():
        candidate, number = base.with_name(f"{base.name}-{number}"), number + 1
    return candidate


def tensorboard_run_folder(config, output_dir: Path) -> Path:
    """Where this run's TensorBoard events go (as :func:`simpletuner.tracking.build_tracker` builds it)."""
    logging_dir = Path(config.logging_dir or "logs").expanduser()
    if not logging_dir.is_absolute():
        logging_dir = output_dir / logging_dir
    return logging_dir / config.tracker_project_name / config.tracker_run_name


def earlier_run_files(config, output_dir: Path) -> list[Path]:
    """What a run left in ``output_dir``: checkpoints (complete or not, with the hidden temporary and
    trash folders), the resolved config, validation images, final outputs, and the logging folder when
    it lies inside ``output_dir``. Anything else in the folder (earlier archives, the user's own files)
    stays where it is."""
    if not output_dir.is_dir():
        return []
    logging_dir = tensorboard_run_folder(config, output_dir).parents[1]
    found = []
    for entry in sorted(output_dir.iterdir()):
        name = entry.name
        if (ckpt.CHECKPOINT_PATTERN.match(name) or name.startswith((ckpt.TEMP_PREFIX, ckpt.TRASH_PREFIX))
                or name in RUN_OUTPUTS or entry == logging_dir):
            found.append(entry)
    return found


# --- acting on it ------------------------------------------------------------------------------------


def apply_folder_plan(plan: FolderPlan, config, move: bool = True):
    """Carry out ``plan``: with ``move`` (the main process only), rename the earlier run into its
    archive; returns ``config`` with ``resume_from_checkpoint`` saying what the trainer resumes.

    A TensorBoard run folder outside ``output_dir`` cannot join the archive; it is renamed in place
    to ``<run name>-<archive name>``, so the new run's curves start clean.
    """
    if move and plan.action == "overwrite":
        plan.archive.mkdir(parents=True)
        for path in plan.moved:
            os.replace(path, plan.archive / path.name)
        logger.info("moved %d file(s) of the earlier run from %s into %s", len(plan.moved), plan.output_dir,
                    plan.archive)
    if move and config.overwrite_output_dir:
        _set_aside_outside_tensorboard_run(config, plan)
    return config.replace(resume_from_checkpoint=plan.resume_from_checkpoint)


def _set_aside_outside_tensorboard_run(config, plan: FolderPlan) -> None:
    run_folder = tensorboard_run_folder(config, plan.output_dir)
    if _inside(run_folder, plan.output_dir) or not run_folder.is_dir():
        return
    stamp = (plan.archive.name if plan.archive is not None
             else f"{ARCHIVE_PREFIX}{datetime.now():%Y%m%d-%H%M%S}")
    target = run_folder.with_name(f"{run_folder.name}-{stamp}")
    os.replace(run_folder, target)
    logger.info("--overwrite_output_dir: renamed the earlier TensorBoard run %s to %s", run_folder, target)
