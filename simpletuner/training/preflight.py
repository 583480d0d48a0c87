"""Checks ``simpletuner train`` runs after option resolution and before any model loads.

Option resolution (:func:`simpletuner.options.resolve.resolve_run`) only looks at the options and
the dataset list; these checks look at the world: whether the model named can be loaded from here
(a local folder or file, the local Hugging Face cache, or the Hub when online), whether the datasets
hold at least one usable image, and what the run does with an ``--output_dir`` that already holds a
run (:mod:`simpletuner.training.output_folder`). ``--dry-run`` runs them too, so a dry run that
passes means the run will get as far as loading the model.

Nothing is written before every check has passed; the only write they ever make is moving an
earlier run aside for ``--overwrite_output_dir``, and a dry run never does that. Torch-free.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from simpletuner.options import ConfigError
from simpletuner.options.messages import show_value
from simpletuner.training.output_folder import FolderPlan, apply_folder_plan, plan_output_folder
from simpletuner.training.remote_checkpoint import is_remote as is_remote_request

logger = logging.getLogger(__name__)

#: Options naming a model (or one of its parts) that is loaded from a folder, a file or the Hub.
MODEL_SOURCE_OPTIONS = ("pretrained_model_name_or_path", "pretrained_vae_model_name_or_path",
                        "pretrained_transformer_model_name_or_path", "pretrained_unet_model_name_or_path",
                        "pretrained_t5_model_name_or_path")
#: Suffixes of single-file checkpoints: such a value is always a path, never a Hub id.
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".gguf", ".bin", ".pt", ".pth")
#: How many files of a dataset are scanned at a time while looking for its first usable image.
SCAN_CHUNK = 64


@dataclass
class PreflightReport:
    """What the checks found: the config to train with (``resume_from_checkpoint`` set by the
    output-folder decision), the decision itself, and notes for the dry run and start-up summary."""

    config: Any
    folder: FolderPlan
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def run_preflight(run, act: bool = True, is_main_process: bool = True,
                  environ: Mapping[str, str] | None = None) -> PreflightReport:
    """Every check, in order; raises :class:`ConfigError` on the first problem.

    ``act`` (a real run, not ``--dry-run``) carries out the output-folder decision; only the main
    process (``is_main_process``) moves files.
    """
    environ = os.environ if environ is None else environ
    config = run.config
    model_notes, warnings = check_model_sources(config, environ)
    check_datasets_have_images(config, run.dataset_plan)
    if is_remote_request(config.resume_from_checkpoint):
        if not act:
            folder, note = _dry_run_remote_resume(config)
            return PreflightReport(config, folder, notes=[*model_notes, summary_line("start", note)], warnings=warnings)
        config = config.replace(resume_from_checkpoint=str(_stage_remote_resume(config, environ)))
    folder = plan_output_folder(config, getattr(run, "command_line", frozenset()))
    note = folder.note
    if act:
        config = apply_folder_plan(folder, config, move=is_main_process)
    elif folder.action == "overwrite":
        note += " (a real run does this; this dry run moved nothing)"
    return PreflightReport(config, folder, notes=[*model_notes, summary_line("start", note)], warnings=warnings)


def _stage_remote_resume(config, environ: Mapping[str, str]) -> Path:
    """``--resume_from_checkpoint s3://...``: the local copy to resume from (local rank 0 downloads it,
    the other local ranks wait for it; see :mod:`simpletuner.training.remote_checkpoint`)."""
    from simpletuner.training.remote_checkpoint import RemoteCheckpointError, stage_remote_checkpoint

    try:
        return stage_remote_checkpoint(config.resume_from_checkpoint, Path(config.output_dir).expanduser(),
                                       config.publishing_config, downloads=environ.get("LOCAL_RANK", "0") == "0")
    except RemoteCheckpointError as error:
        raise ConfigError(str(error)) from None


def _dry_run_remote_resume(config) -> tuple[FolderPlan, str]:
    """What a real run would download, checked in S3 without writing anything."""
    from simpletuner.training.remote_checkpoint import RemoteCheckpointError, describe_remote_checkpoint

    output_dir = Path(config.output_dir).expanduser()
    try:
        note = describe_remote_checkpoint(config.resume_from_checkpoint, output_dir, config.publishing_config)
    except RemoteCheckpointError as error:
        raise ConfigError(str(error)) from None
    return FolderPlan(output_dir, "continue", note, config.resume_from_checkpoint), note


def summary_line(label: str, text: str) -> str:
    """``label:`` padded like the labels of the trainer's start-up summary, then ``text``."""
    return f"{label + ':':<14}{text}"


# --- the model ---------------------------------------------------------------------------------------


def hub_is_offline(environ: Mapping[str, str]) -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as huggingface_hub reads it."""
    value = environ.get("HF_HUB_OFFLINE") or environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().lower() in ("1", "true", "yes", "on")


def hub_cache_folder(environ: Mapping[str, str]) -> Path:
    """The Hugging Face hub cache, found from the environment the way huggingface_hub finds it
    (HF_HUB_CACHE, else HF_HOME/hub, else $XDG_CACHE_HOME or ~/.cache, then huggingface/hub)."""
    explicit = environ.get("HF_HUB_CACHE") or environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(os.path.expandvars(explicit)).expanduser()
    home = environ.get("HF_HOME") or os.path.join(environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def cached_snapshot(repo_id: str, revision: str | None, cache: Path) -> Path | None:
    """The cached snapshot folder an offline ``from_pretrained(repo_id, revision=...)`` would read:
    ``refs/<revision>`` names the commit (a commit hash names itself); None when it is not there."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    wanted = revision or "main"
    try:
        ref = repo / "refs" / wanted
        commit = ref.read_text(encoding="utf-8").strip() if ref.is_file() else wanted
        snapshot = repo / "snapshots" / commit
        return snapshot if snapshot.is_dir() and any(snapshot.iterdir()) else None
    except (OSError, ValueError):
        return None


def is_hub_id(value: str) -> bool:
    """Whether ``value`` is shaped like a Hub repository id (``owner/name`` or ``name``)."""
    if value.startswith(("/", "./", "../", "~", "\\")) or value.endswith(SINGLE_FILE_SUFFIXES) or "://" in value:
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True


def model_sources(config) -> list[tuple[str, str]]:
    """``(what, value)`` for every model location the run loads: the base model (the flavour's
    default when ``--pretrained_model_name_or_path`` is unset) and each component override."""
    from simpletuner.models.registry import family_info

    sources = []
    for name in MODEL_SOURCE_OPTIONS:
        value = getattr(config, name)
        if value not in (None, ""):
            sources.append((f"`--{name}` {show_value(str(value))}", str(value)))
    info = family_info(config.model_family)
    if not config.pretrained_model_name_or_path:
        flavour = config.model_flavour or info.default_flavour
        default = info.flavours[flavour]
        sources.insert(0, (f"the {info.name} {flavour} model {show_value(default)} (the default, as "
                           "`--pretrained_model_name_or_path` is unset)", default))
    return sources


def regularizer_model_sources(config) -> list[tuple[str, str]]:
    """The models the enabled regularizers load: their DINOv2 teachers and U-REPA's Tiny AutoEncoder
    (never at ``--revision``, which names a revision of the base model)."""
    from simpletuner.models.registry import family_info
    from simpletuner.options.alignment_rules import DINOV2_HUB_IDS

    info = family_info(config.model_family)
    sources = []
    teachers = [("crepa_model", config.crepa_enabled and not config.crepa_use_backbone_features),
                ("urepa_model", config.urepa_enabled)]
    for name, used in teachers:
        if used:
            value = getattr(config, name)
            sources.append((f"`--{name}` {show_value(value)}", DINOV2_HUB_IDS.get(value, value)))
    if config.urepa_enabled and config.urepa_use_tae:
        value = config.tiny_autoencoder_path or info.tiny_autoencoder
        if value:
            sources.append((f"the Tiny AutoEncoder {show_value(value)} (`--tiny_autoencoder_path`)", value))
    return sources


def check_model_sources(config, environ: Mapping[str, str]) -> tuple[list[str], list[str]]:
    """Each model location exists: a local folder or file, a Hub id in the local cache, or (online)
    a Hub id the Hub knows. Returns notes (where each one comes from) and warnings (a Hub that could
    not be asked); raises a one-line :class:`ConfigError` for a location that cannot be loaded."""
    notes, warnings = [], []
    offline = hub_is_offline(environ)
    cache = hub_cache_folder(environ)
    default = None if config.pretrained_model_name_or_path else model_sources(config)[0][1]
    sources = [(what, value, config.revision) for what, value in model_sources(config)]
    sources += [(what, value, None) for what, value in regularizer_model_sources(config)]
    for what, value, revision_wanted in sources:
        path = Path(value).expanduser()
        if _exists(path):
            continue
        if not is_hub_id(value):
            raise ConfigError(f"{what} is neither an existing folder nor a file (looked at {path.absolute()}); fix "
                              "the path, or give a Hugging Face Hub id such as owner/name")
        if cached_snapshot(value, revision_wanted, cache) is not None:
            continue
        revision = f" (revision {revision_wanted})" if revision_wanted else ""
        # a value the user typed may be a mistyped path; the flavour's default is always a Hub id
        not_local = "" if value == default else f"is not a local folder (no {path.absolute()}) and "
        fix = ("set `--pretrained_model_name_or_path` to a local model folder" if value == default
               else "fix the path or the id")
        if offline:
            raise ConfigError(f"{what} {not_local}is not in the local Hugging Face cache{revision} ({cache}), and "
                              f"HF_HUB_OFFLINE is set, so it cannot be downloaded; {fix}, or download the model once "
                              "with network access (or point HF_HUB_CACHE at a cache that holds it)")
        problem = hub_problem(value, revision_wanted)
        if problem is None:
            notes.append(summary_line("download", f"{value}{revision} from the Hugging Face Hub"))
        elif problem.startswith("could not"):
            warnings.append(f"{what}: {problem}; loading will try anyway")
        else:
            raise ConfigError(f"{what} {not_local}{problem}; {fix} (private or gated models need "
                              "`huggingface-cli login` or HF_TOKEN)")
    return notes, warnings


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


def hub_problem(repo_id: str, revision: str | None) -> str | None:
    """Why the Hub cannot serve ``repo_id`` (at ``revision``), or None when it can; a failure to ask
    at all starts with "could not"."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        HfApi().model_info(repo_id, revision=revision)
    except GatedRepoError:
        return None  # it exists; access is checked when the files are downloaded
    except RevisionNotFoundError:
        return f"the Hugging Face Hub has no revision {revision!r} of it"
    except RepositoryNotFoundError:
        return "the Hugging Face Hub has no model repository of that name (or it is private)"
    except Exception as error:  # noqa: BLE001 - the network, a proxy, the Hub itself: not conclusive
        return f"could not ask the Hugging Face Hub whether it exists ({type(error).__name__}: {error})"
    return None


# --- the datasets ------------------------------------------------------------------------------------


def check_datasets_have_images(config, plan) -> None:
    """At least one enabled image dataset has an image training can use (header readable, caption
    found, size within the dataset's limits), so an empty or mistyped folder stops the run here and
    not after the model has loaded. Each dataset is scanned only until its first usable image.

    Datasets that reuse a stored listing (``skip_file_discovery``, ``preserve_data_backend_cache``)
    are trusted, as the trainer trusts them.
    """
    if plan is None:
        return
    from simpletuner.data.settings import discovery_stages, resolve_dataset

    found = []
    for raw in plan.enabled_images:
        dataset = resolve_dataset(raw, config)
        if set(discovery_stages(dataset.skip_file_discovery)) & {"metadata", "aspect"} or \
                dataset.preserve_data_backend_cache:
            return
        count = first_usable_image(dataset, config, plan)
        if count.usable:
            return
        found.append(count.describe())
    if not found:
        raise ConfigError(f"{config.data_backend_config}: no enabled image dataset; enable one or add one")
    raise ConfigError(f"no usable images in any enabled dataset of {config.data_backend_config} ("
                      + "; ".join(found) + "); check instance_data_dir, the image files and their captions")


@dataclass
class DatasetCount:
    """What the search for a dataset's first usable image saw."""

    dataset_id: str
    where: str
    listed: int = 0
    skipped: int = 0
    first_reason: str | None = None
    usable: bool = False

    def describe(self) -> str:
        text = f"{self.dataset_id}: {self.listed} file(s) found in {self.where}, {self.skipped} skipped"
        return text + (f"; first reason: {self.first_reason}" if self.first_reason else "")


def first_usable_image(dataset, config, plan) -> DatasetCount:
    """Scan ``dataset`` in chunks of :data:`SCAN_CHUNK` files until one image is usable."""
    from simpletuner.data.backends import DatasetSource, open_dataset
    from simpletuner.data.caption_rules import CaptionRules
    from simpletuner.data.metadata import scan_image_dataset
    from simpletuner.data.video import placement_function

    source = open_dataset(dataset)
    rules = CaptionRules.for_dataset(dataset, plan.text_embeds_for(dataset).caption_filter_list)
    alignment = _bucket_alignment(dataset, config)
    place = placement_function(dataset)
    count = DatasetCount(dataset.id, source.description)
    if source.items is not None:  # a table (parquet, Hugging Face): its rows are listed already
        everything = list(source.items)
        chunks = (dict(source=DatasetSource(source.images, everything[i:i + SCAN_CHUNK], source.description))
                  for i in range(0, len(everything), SCAN_CHUNK))
    else:
        everything = source.images.list_files(_listed_suffixes(dataset))
        chunks = (dict(source=source, keys=everything[i:i + SCAN_CHUNK]) for i in range(0, len(everything), SCAN_CHUNK))
    count.listed = len(everything)
    for chunk in chunks:
        scan = scan_image_dataset(dataset, rules=rules, **chunk)
        placed, excluded = place(scan.records, dataset, alignment, rounding=config.aspect_bucket_rounding)
        if placed:
            count.usable = True
            return count
        skipped = list(scan.skipped) + list(excluded)
        count.skipped += len(skipped)
        if skipped and count.first_reason is None:
            path, reason = skipped[0]
            count.first_reason = f"{path}: {reason}"
    return count


def _listed_suffixes(dataset) -> tuple[str, ...]:
    """The file suffixes the trainer's scan lists for ``dataset`` (videos or images)."""
    from simpletuner.data.metadata import _extensions

    return _extensions(dataset)


def _bucket_alignment(dataset, config) -> int:
    """The bucket alignment training uses for ``dataset``, as the dry run computes it."""
    from simpletuner.data.buckets import bucket_alignment, pixel_edge
    from simpletuner.models.registry import family_info
    from simpletuner.training.plan import vae_scale_factor_of

    info = family_info(config.model_family)
    cell = 1 if info.pixel_space else vae_scale_factor_of(config.pretrained_model_name_or_path)
    edge = pixel_edge(dataset.resolution, dataset.resolution_type)
    return bucket_alignment(config.aspect_bucket_alignment, cell * info.latent_patch_size, edge)
