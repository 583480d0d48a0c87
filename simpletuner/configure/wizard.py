"""The interactive walk through a setup, one section at a time.

Each section asks about a handful of options and records the answers in the :class:`Draft`; current
values (from the file being edited, or the defaults that fit a new setup) are the defaults, so
pressing Enter throughout an edit changes nothing. A question is asked only when it applies to the
family, model type and machine chosen so far (:mod:`simpletuner.configure.relevance`), and only the
essential ones until the user shows a section's advanced questions. Sections that cover a whole
group of the table (adapters, precision, memory) pick up options as they become implemented,
without an edit to this file. Going back and showing the advanced questions replay the answers
(:mod:`simpletuner.configure.navigation`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from simpletuner.configure.draft import Draft, record_entry_value
from simpletuner.configure.navigation import GoBack, ToggleAdvanced, UI, Walk, WizardSession
from simpletuner.configure.questions import UNSET, dataset_question, env_question, flow_question, option_question
from simpletuner.configure.relevance import (
    FITTED, Setup, fitted_default, is_essential, skip_reason, value_applies,
)
from simpletuner.data import schema as dataset_schema
from simpletuner.models.registry import FAMILIES
from simpletuner.options import ConfigError, all_options, options_by_name

__all__ = ["SECTIONS", "UI", "WizardSession", "run_wizard"]


@dataclass
class Context:
    """What a section works with: the walk (questions), the draft (answers) and the session."""

    walk: Walk
    draft: Draft
    session: WizardSession

    @property
    def setup(self) -> Setup:
        return Setup(self.draft, lambda: self.session.machine)

    def heading(self, title: str) -> None:
        self.walk.heading(title)

    def asks(self, key: str, essential: bool | None = None) -> bool:
        """Whether ``key`` is asked in this walk: it is essential (``essential`` overrides the
        table for questions a branch needs) or the section shows its advanced questions."""
        return bool(essential) if essential is not None else (
            is_essential(key, self.setup) or self.walk.advanced())


def run_wizard(ui: UI, draft: Draft, session: WizardSession | None = None) -> None:
    """Ask the sections in order until a walk reaches the end; the answers end up in ``draft``.

    The user may go back (:class:`GoBack`) or show the advanced questions (:class:`ToggleAdvanced`)
    at any question: the draft is then reset to how the session found it and the walk starts
    again, replaying the answers kept.
    """
    session = session if session is not None else WizardSession()
    if session.start is None:
        session.start = draft.snapshot()
    titles = [title for title, _ in SECTIONS]
    while True:
        draft.restore(session.start)
        walk = Walk(ui, session)
        context = Context(walk, draft, session)
        try:
            for title, section in SECTIONS:
                context.heading(title)
                section(context)
            finish_new_setup(context)
            return
        except GoBack:
            ui.say("(back to the previous question)" if session.go_back() else "(this is the first question)")
        except ToggleAdvanced:
            shown = session.toggle_advanced(walk.section, titles)
            ui.say(f"(advanced questions {'shown' if shown else 'hidden'} from {walk.section} on)")


# --- asking options -----------------------------------------------------------------------------


def ask_option(context: Context, name: str, *, choices: tuple[str, ...] | None = None, current: Any = None,
               extra_help: str = "", essential: bool | None = None) -> Any:
    """Ask option ``name`` when it applies and is shown; record and return its value either way.

    The default is the value the file holds; in a new setup, a value that fits the family and the
    machine (``relevance.fitted_default``), which is also recorded when the question is not shown.
    A choice with a single value this machine can run is not asked.
    """
    draft, setup = context.draft, context.setup
    if not context.asks(name, essential):
        _keep_fitted_default(context, name)
        return draft.typed(name)
    if skip_reason(name, setup) is not None:
        return draft.typed(name)
    if current is None:
        current = fitted_default(name, setup) if name in FITTED and draft.is_new and not draft.has(name) \
            else draft.typed(name)
    question = option_question(name, current, choices=choices, extra_help=extra_help,
                               applies=lambda value: value_applies(name, value, setup))
    offered = [choice for choice in question.choices if choice != UNSET]
    if question.kind == "select" and len(offered) <= 1 and options_by_name()[name].default is not None:
        return draft.typed(name)
    value = context.walk.ask(question)
    draft.record(name, value)
    return value


def _keep_fitted_default(context: Context, name: str) -> None:
    draft = context.draft
    if name in FITTED and draft.is_new and not draft.has(name):
        draft.record(name, fitted_default(name, context.setup))


def ask_options(context: Context, names: Sequence[str]) -> None:
    for name in names:
        ask_option(context, name)


def implemented_in(*groups: str, besides: Sequence[str] = ()) -> list[str]:
    """Implemented options of the table's ``groups``, in table order, leaving out ``besides``."""
    return [o.name for o in all_options() if o.group in groups and o.implemented and o.name not in besides]


# --- sections ------------------------------------------------------------------------------------


def model_section(context: Context) -> None:
    draft = context.draft
    table_families = options_by_name()["model_family"].choices or ()
    # in the registry's order: the oldest, smallest family (sd1x) comes first and is the default
    family = ask_option(context, "model_family", choices=tuple(f for f in FAMILIES if f in table_families))
    info = FAMILIES[family]
    flavour, had_flavour = draft.typed("model_flavour"), draft.has("model_flavour")
    elsewhere = "" if context.walk.advanced() else (
        "A model from a local folder or another hub id is one of this section's advanced questions.")
    flavour = ask_option(context, "model_flavour", choices=tuple(info.flavours),
                         current=flavour if flavour in info.flavours else info.default_flavour, extra_help=elsewhere)
    if flavour in info.flavours and flavour == info.default_flavour and not had_flavour:
        draft.remove("model_flavour")  # unset already means the family's default flavour
    flavour = flavour if flavour in info.flavours else info.default_flavour
    ask_option(context, "pretrained_model_name_or_path",
               extra_help=f"Leave it empty to use the flavour's weights ({info.flavours[flavour]}).")
    model_type = ask_option(context, "model_type", choices=tuple(info.model_types))
    if model_type == "lora":
        ask_options(context, implemented_in("adapters"))


def precision_section(context: Context) -> None:
    ask_options(context, ["mixed_precision", *implemented_in("precision", "memory", besides=["mixed_precision"])])


def training_section(context: Context) -> None:
    ask_options(context, ["output_dir", "max_train_steps", "num_train_epochs", "learning_rate", "train_batch_size",
                          "gradient_accumulation_steps", "optimizer", "lr_scheduler"])


def data_section(context: Context) -> None:
    draft = context.draft
    ask_options(context, ["resolution", "resolution_type", "aspect_bucket_alignment"])
    existing = bool(draft.image_entries())
    if not existing:
        ask_dataset(context, draft.add_image())
    if not (existing or context.walk.advanced()):
        return
    while True:
        ids = [str(entry.get("id")) for entry in draft.image_entries()]
        choices = ("done", *(f"edit {i}" for i in ids), "add a dataset",
                   *(f"remove {i}" for i in ids if len(ids) > 1))
        pick = context.walk.ask(flow_question(
            "datasets", f"image datasets: {', '.join(ids)}. Edit, add or remove one, or go on.", choices, "done"))
        if pick == "done":
            return
        if pick == "add a dataset":
            ask_dataset(context, draft.add_image())
            continue
        action, _, dataset_id = pick.partition(" ")
        entry = draft.find_image(dataset_id)
        if entry is not None and action == "edit":
            ask_dataset(context, entry)
        elif entry is not None:
            draft.remove_image(entry)


def ask_dataset(context: Context, entry: dict[str, Any]) -> None:
    """The questions about one image dataset; keys not asked keep their values."""
    from pathlib import Path

    others = {str(e.get("id")) for e in context.draft.datasets if e is not entry}

    def unique(value: Any) -> None:
        if value in others:
            raise ConfigError(f"another dataset already has the id {value!r}; ids name cache folders, so pick another")

    def folder(value: Any) -> None:
        if not value or not Path(value).expanduser().is_dir():
            raise ConfigError(f"{value!r} is not a folder (relative paths start from {Path.cwd()})")

    ask_dataset_key(context, entry, "id", unique)
    storage = ask_dataset_key(context, entry, "type")
    if storage == "aws":
        for key in ("aws_bucket_name", "aws_data_prefix", "aws_region_name", "aws_endpoint_url"):
            ask_dataset_key(context, entry, key, essential=True)
    else:
        ask_dataset_key(context, entry, "instance_data_dir", folder, essential=True)
    if ask_dataset_key(context, entry, "caption_strategy") == "instanceprompt":
        ask_dataset_key(context, entry, "instance_prompt")
    for key in ("resolution", "repeats"):
        ask_dataset_key(context, entry, key)


def ask_dataset_key(context: Context, entry: dict[str, Any], key: str, check: Callable[[Any], None] | None = None,
                    essential: bool | None = None) -> Any:
    """Ask one key of ``entry`` when shown; an unchanged answer keeps the raw value, an unset one
    removes the key. Returns the key's value (its default when the entry leaves it out)."""
    if not context.asks(f"dataset.{key}", essential):
        return entry.get(key, dataset_schema.defaults("image").get(key))
    value = context.walk.ask(dataset_question(key, entry, check))
    record_entry_value(entry, key, value)
    return value


def validation_section(context: Context) -> None:
    if ask_option(context, "validation_prompt"):
        ask_option(context, "validation_step_interval")


def checkpoint_section(context: Context) -> None:
    ask_options(context, ["checkpoint_step_interval", "checkpoints_total_limit"])


def tracker_section(context: Context) -> None:
    """A list of trackers the file holds (``tensorboard,wandb``) is offered as one more choice, so that
    editing the setup keeps it unless another value is picked."""
    from simpletuner.configure.questions import offered_choices

    offered = offered_choices(options_by_name()["report_to"])
    current = context.draft.typed("report_to")
    ask_option(context, "report_to", choices=offered + ((current,) if current and current not in offered else ()))


def launch_section(context: Context) -> None:
    """config.env's process count: asked with several GPUs (or in advanced mode); always written."""
    draft, name = context.draft, "TRAINING_NUM_PROCESSES"
    # config.env overrides `num_processes` in config.json, so the effective value is the default
    current = draft.env_get(name) or str(draft.typed("num_processes") or 1)
    if draft.is_new and draft.env_get(name) is None and draft.typed("num_processes") is None \
            and context.session.machine.gpu_count > 1:
        current = str(context.session.machine.gpu_count)
    if context.asks(f"env.{name}"):
        current = context.walk.ask(env_question(name, current))
    draft.env_set(name, current)


def finish_new_setup(context: Context) -> None:
    """A new config resumes its own run when started again (``resume_from_checkpoint latest``)."""
    _keep_fitted_default(context, "resume_from_checkpoint")


#: The sections, in order; a title is also what the advanced-questions key refers to.
SECTIONS: list[tuple[str, Callable[[Context], None]]] = [
    ("Model", model_section),
    ("Precision and memory", precision_section),
    ("Training", training_section),
    ("Data", data_section),
    ("Validation images", validation_section),
    ("Checkpoints", checkpoint_section),
    ("Trackers", tracker_section),
    ("Launch", launch_section),
]
