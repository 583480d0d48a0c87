"""The interactive walk through a setup, one section at a time.

Each section asks about a handful of options and records the answers in the :class:`Draft`; current
values (from the file being edited, or the table's defaults) are the defaults, so pressing Enter
throughout an edit changes nothing. Which options belong to a section is the only thing decided
here; sections that cover a whole group of the table (adapters, memory) pick up options as they
become implemented, without an edit to this file.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence

from simpletuner.configure.draft import Draft, record_entry_value
from simpletuner.configure.questions import (
    Question, dataset_question, env_question, flow_question, offered_choices, option_question,
)
from simpletuner.models.registry import FAMILIES
from simpletuner.options import ConfigError, all_options, options_by_name


class UI(Protocol):
    """What the wizard needs from a terminal (see :class:`~simpletuner.configure.terminal.TerminalUI`)."""

    def ask(self, question: Question) -> Any: ...
    def heading(self, title: str) -> None: ...
    def say(self, text: str) -> None: ...


def run_wizard(ui: UI, draft: Draft) -> None:
    """Ask every section in order; the answers end up in ``draft``."""
    for section in (model_section, precision_section, training_section, data_section, validation_section,
                    checkpoint_section, tracker_section, launch_section):
        section(ui, draft)


def ask_option(ui: UI, draft: Draft, name: str, **narrowing: Any) -> Any:
    """Ask option ``name`` with its current value as the default; record and return the answer."""
    current = narrowing.pop("current", draft.typed(name))
    value = ui.ask(option_question(name, current, **narrowing))
    draft.record(name, value)
    return value


def ask_options(ui: UI, draft: Draft, names: Sequence[str]) -> None:
    """Ask several options; skip a choice with only one offered value, and skip ``x_*`` options
    while a yes/no option ``x`` asked just before is off (``gradient_checkpointing_interval``
    means nothing without ``gradient_checkpointing``)."""
    table = options_by_name()
    switched_off: list[str] = []
    for name in names:
        option = table[name]
        if any(name.startswith(off + "_") for off in switched_off):
            continue
        if option.choices and len(offered_choices(option)) <= 1 and option.default is not None:
            continue
        value = ask_option(ui, draft, name)
        if option.kind == "bool" and not value:
            switched_off.append(name)


def implemented_in(*groups: str, besides: Sequence[str] = ()) -> list[str]:
    """Implemented options of the table's ``groups``, in table order, leaving out ``besides``."""
    return [o.name for o in all_options() if o.group in groups and o.implemented and o.name not in besides]


# --- sections ------------------------------------------------------------------------------------


def model_section(ui: UI, draft: Draft) -> None:
    ui.heading("Model")
    table_families = options_by_name()["model_family"].choices or ()
    # in the registry's order: the oldest, smallest family (sd1x) comes first and is the default
    family = ask_option(ui, draft, "model_family", choices=tuple(f for f in FAMILIES if f in table_families))
    info = FAMILIES[family]
    flavour, had_flavour = draft.typed("model_flavour"), draft.has("model_flavour")
    flavour = ask_option(ui, draft, "model_flavour", choices=tuple(info.flavours),
                         current=flavour if flavour in info.flavours else info.default_flavour)
    if flavour == info.default_flavour and not had_flavour:
        draft.remove("model_flavour")  # unset already means the family's default flavour
    ask_option(ui, draft, "pretrained_model_name_or_path",
               extra_help=f"Leave it empty to use the flavour's weights ({info.flavours[flavour]}).")
    model_type = ask_option(ui, draft, "model_type", choices=tuple(info.model_types))
    if model_type == "lora":
        ask_options(ui, draft, implemented_in("adapters"))


def precision_section(ui: UI, draft: Draft) -> None:
    ui.heading("Precision and memory")
    ask_options(ui, draft, ["mixed_precision", *implemented_in("precision", "memory", besides=["mixed_precision"]),
                            "train_batch_size", "gradient_accumulation_steps"])


def training_section(ui: UI, draft: Draft) -> None:
    ui.heading("Training")
    ask_options(ui, draft, ["output_dir", "max_train_steps", "num_train_epochs", "learning_rate", "optimizer",
                            "lr_scheduler"])


def data_section(ui: UI, draft: Draft) -> None:
    ui.heading("Data")
    ask_options(ui, draft, ["resolution", "resolution_type", "aspect_bucket_alignment"])
    if not draft.image_entries():
        ask_dataset(ui, draft, draft.add_image())
    while True:
        ids = [str(entry.get("id")) for entry in draft.image_entries()]
        choices = ("done", *(f"edit {i}" for i in ids), "add a dataset",
                   *(f"remove {i}" for i in ids if len(ids) > 1))
        pick = ui.ask(flow_question("datasets", f"image datasets: {', '.join(ids)}. Edit, add or remove one, or go on.",
                                    choices, "done"))
        if pick == "done":
            return
        if pick == "add a dataset":
            ask_dataset(ui, draft, draft.add_image())
            continue
        action, _, dataset_id = pick.partition(" ")
        entry = draft.find_image(dataset_id)
        if entry is not None and action == "edit":
            ask_dataset(ui, draft, entry)
        elif entry is not None:
            draft.remove_image(entry)


def ask_dataset(ui: UI, draft: Draft, entry: dict[str, Any]) -> None:
    """The questions about one image dataset; keys not asked keep their values."""
    others = {str(e.get("id")) for e in draft.datasets if e is not entry}

    def unique(value: Any) -> None:
        if value in others:
            raise ConfigError(f"another dataset already has the id {value!r}; ids name cache folders, so pick another")

    def folder(value: Any) -> None:
        from pathlib import Path

        if not value or not Path(value).expanduser().is_dir():
            raise ConfigError(f"{value!r} is not a folder (relative paths start from {Path.cwd()})")

    ask_dataset_key(ui, entry, "id", unique)
    storage = ask_dataset_key(ui, entry, "type")
    if storage == "aws":
        for key in ("aws_bucket_name", "aws_data_prefix", "aws_region_name", "aws_endpoint_url"):
            ask_dataset_key(ui, entry, key)
    else:
        ask_dataset_key(ui, entry, "instance_data_dir", folder)
    if ask_dataset_key(ui, entry, "caption_strategy") == "instanceprompt":
        ask_dataset_key(ui, entry, "instance_prompt")
    for key in ("resolution", "repeats"):
        ask_dataset_key(ui, entry, key)


def ask_dataset_key(ui: UI, entry: dict[str, Any], key: str, check: Any = None) -> Any:
    """Ask one key of ``entry``; an unchanged answer keeps the raw value, an unset one removes the key."""
    value = ui.ask(dataset_question(key, entry, check))
    record_entry_value(entry, key, value)
    return value


def validation_section(ui: UI, draft: Draft) -> None:
    ui.heading("Validation images")
    if ask_option(ui, draft, "validation_prompt"):
        ask_options(ui, draft, ["validation_step_interval"])


def checkpoint_section(ui: UI, draft: Draft) -> None:
    ui.heading("Checkpoints")
    ask_options(ui, draft, ["checkpoint_step_interval", "checkpoints_total_limit"])


def tracker_section(ui: UI, draft: Draft) -> None:
    ui.heading("Trackers")
    ask_options(ui, draft, ["report_to"])


def launch_section(ui: UI, draft: Draft) -> None:
    ui.heading("Launch")
    name = "TRAINING_NUM_PROCESSES"
    # config.env overrides `num_processes` in config.json, so the effective value is the default
    current = draft.env_get(name) or str(draft.typed("num_processes") or 1)
    draft.env_set(name, ui.ask(env_question(name, current)))
