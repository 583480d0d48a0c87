"""The ``simpletuner configure`` command line: interactive wizard or ``--non-interactive --set ...``.

Both modes start from the same :class:`~simpletuner.configure.draft.Draft` (the existing files, or
nothing), apply the same follow-up rules (:meth:`Draft.settle`) and go through the same validation
and atomic write, so a script and a person giving the same answers get the same files.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path
from typing import Sequence

from simpletuner.configure.draft import Draft, load_draft
from simpletuner.configure.questions import flow_question
from simpletuner.configure.settings import apply_setting, option_named
from simpletuner.configure.write import Staging, describe_changes, staged, start_command
from simpletuner.options import ConfigError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="simpletuner configure",
        description="Write or edit config.json, multidatabackend.json and config.env, interactively or from "
                    "--set KEY=VALUE answers. Nothing is written until the whole setup validates.",
        epilog="--set keys: an option name (learning_rate=2e-4), dataset.KEY (first image dataset), "
               "dataset.ID.KEY (the dataset with that id), text_embeds.KEY, env.TRAINING_NUM_PROCESSES. "
               "See documentation/CONFIGURE.md.",
    )
    parser.add_argument("config", nargs="?", default=None,
                        help="the config.json to write or edit (default: config/config.json); the dataset list "
                             "and config.env go beside it")
    parser.add_argument("--non-interactive", "--non_interactive", dest="non_interactive", action="store_true",
                        help="ask nothing: apply the --set answers to the existing files (or to an empty setup)")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                        help="an answer; repeat for several. In interactive mode they become the defaults")
    return parser


def run(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    cwd = Path.cwd()
    draft = load_draft(args.config)
    if args.non_interactive and draft.is_new:
        start_from_fitted_defaults(draft, args.config, args.settings)
    for setting in args.settings:
        apply_setting(draft, setting)
    if args.non_interactive:
        return run_non_interactive(draft, cwd)
    if not sys.stdin.isatty():
        raise ConfigError("the wizard needs a terminal; in scripts use "
                          "`simpletuner configure --non-interactive --set KEY=VALUE ...`")
    try:
        return run_interactive(draft, cwd)
    except KeyboardInterrupt:
        print("\ncancelled: no file was changed", file=sys.stderr)
        return 130


def start_from_fitted_defaults(draft: Draft, config_arg: str | None, settings: Sequence[str]) -> None:
    """Give a new setup the defaults the wizard proposes (the family's resolution, mixed precision
    for this machine, ``resume_from_checkpoint latest``) before the ``--set`` answers, so that an
    answer always wins and a script gets the files a person pressing Enter would.

    The family decides the resolution, so the answers are first applied to a scratch draft to learn it.
    """
    from simpletuner.configure.machine import detect_machine
    from simpletuner.configure.relevance import FITTED, Setup, fitted_default

    answered = load_draft(config_arg)
    for setting in settings:
        apply_setting(answered, setting)
    named = {option_named(setting) for setting in settings}
    machine_of = functools.cache(detect_machine)  # torch is imported only when mixed_precision is not answered
    setup = Setup(answered, machine_of)
    for name in FITTED:
        if name not in named:
            draft.record(name, fitted_default(name, setup))


def run_non_interactive(draft: Draft, cwd: Path) -> int:
    for note in draft.settle():
        print(note)
    if not draft.image_entries():
        raise ConfigError("no image dataset: add one with `--set dataset.instance_data_dir=FOLDER` (or "
                          "`--set dataset.type=aws --set dataset.aws_bucket_name=BUCKET`)")
    with staged(draft, cwd) as staging:
        report(staging, draft)
        written = staging.commit()
    finish(draft, cwd, written)
    return 0


def run_interactive(draft: Draft, cwd: Path) -> int:
    """The wizard, then validation and the summary; Esc at the final questions goes back into the
    wizard, and a setup that does not validate can be gone through again with the answers kept."""
    from simpletuner.configure.navigation import GoBack, Navigation, WizardSession
    from simpletuner.configure.terminal import TerminalUI, footer_text
    from simpletuner.configure.wizard import run_wizard

    ui = TerminalUI()
    session = WizardSession()
    ui.say(f"{'Editing' if not draft.is_new else 'Creating'} {draft.config_path}. Keys:"
           f"{footer_text(Navigation(advanced_shown=False))}")
    while True:
        run_wizard(ui, draft, session)
        for note in draft.settle():
            ui.say(note)
        try:
            with staged(draft, cwd) as staging:
                ui.heading("Summary")
                report(staging, draft)
                if not ui.ask(flow_question("write", "write these files?", default=True), Navigation()):
                    ui.say("nothing written")
                    return 1
                written = staging.commit()
        except GoBack:
            session.go_back()
            ui.say("(back to the last question)")
            continue
        except ConfigError as error:
            ui.say(f"\nthis setup does not validate yet:\n  {error}")
            try:
                again = ui.ask(flow_question("retry", "go through the questions again (your answers are the new "
                                                      "defaults)?", default=True), Navigation())
            except GoBack:
                session.go_back()
                ui.say("(back to the last question)")
                continue
            if again:
                session.start_over(draft.snapshot())
                continue
            ui.say("nothing written")
            return 2
        finish(draft, cwd, written)
        return 0


def report(staging: Staging, draft: Draft) -> None:
    for line in describe_changes(draft):
        print(f"  {line}")
    for warning in staging.warnings:
        print(f"  warning: {warning}")


def finish(draft: Draft, cwd: Path, written: list[Path]) -> None:
    print(("wrote " + ", ".join(map(str, written))) if written else "the files already hold this setup; nothing "
          "to write")
    print(f"\nStart training (from {cwd}):\n  {start_command(draft, cwd)}")
