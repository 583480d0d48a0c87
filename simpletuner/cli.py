"""The ``simpletuner`` command: train, configure, options, make-tiny-model, make-demo-dataset, demo,
extract-lora, merge-lora, compare-lora, import-config.

Only the standard library and the options package are imported at start-up; each subcommand imports
what it needs when it runs, so ``simpletuner --help`` and config validation stay fast and torch-free.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from simpletuner.logging_setup import configure_logging, level_from_environment
from simpletuner.options import ConfigError

if TYPE_CHECKING:
    from simpletuner.options.spec import Option

logger = logging.getLogger("simpletuner")

SUBCOMMANDS = {
    "train": "fine-tune a model (all training options: `simpletuner train --help`)",
    "configure": "write or edit config.json, multidatabackend.json and config.env (a wizard, or --non-interactive)",
    "plan-memory": "estimate accelerator memory (per rank when sharded) and host RAM for a config; with "
                   "--memory_budget, the cheapest options that fit",
    "options": "list every option (`--json` for machine-readable, `--write-docs` to regenerate the docs tables)",
    "make-tiny-model": "write a tiny offline model folder built from the real diffusers classes",
    "make-demo-dataset": "write the procedural coloured-shapes dataset (PNG + caption .txt)",
    "demo": "build the tiny model and dataset, train, and score prompt-matching before and after",
    "extract-lora": "write a LoRA holding the difference between a fine-tuned model and its base",
    "merge-lora": "fold a LoRA or LyCORIS file into a base pipeline and save the merged pipeline",
    "compare-lora": "render the same prompts and seeds with two adapters (or one and the base): PSNR, SSIM, a grid",
    "import-config": "write config.json + multidatabackend.json from a kohya, ai-toolkit or OneTrainer config",
}


def top_level_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="simpletuner",
        description="Fine-tune diffusion models with LoRA or full training.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="subcommands:\n" + "\n".join(f"  {name:<18} {text}" for name, text in SUBCOMMANDS.items()),
    )
    parser.add_argument("command", choices=list(SUBCOMMANDS), help="what to do")
    return parser


# --- train ------------------------------------------------------------------------------------------

def cmd_train(argv: Sequence[str]) -> int:
    from simpletuner.options.resolve import resolve_run

    run = resolve_run(argv)
    level = run.launcher.log_level
    if os.environ.get("RANK", "0") != "0" and level != "DEBUG":
        level = "WARNING"  # one process speaks for the run; the others only report problems
    configure_logging(level)
    for warning in run.warnings:
        logger.warning(warning)
    from simpletuner.training.preflight import run_preflight

    # the model, the datasets and the output folder, before anything loads or is written
    report = run_preflight(run, act=not run.dry_run, is_main_process=os.environ.get("RANK", "0") == "0")
    for warning in report.warnings:
        logger.warning(warning)
    notes = [*run.notes, *report.notes]
    if run.dry_run:
        from simpletuner.training.plan import describe_plan

        print(describe_plan(run))
        print("\n".join(notes))
        return 0
    from simpletuner.training.launch import needs_relaunch, relaunch_under_accelerate

    if needs_relaunch(run.launcher):
        return relaunch_under_accelerate(run.launcher, argv, config=run.config)
    from simpletuner.training.checkpoint import CheckpointError
    from simpletuner.training.trainer import train

    try:
        train(report.config, launcher=run.launcher, config_file=run.config_file, dataset_plan=run.dataset_plan,
              notes=notes)
    except KeyboardInterrupt:
        print(f"\ninterrupted. Checkpoints in {run.config.output_dir} are intact; run the same command again to "
              "continue from the newest one.", file=sys.stderr)
        return 130
    except (CheckpointError, FloatingPointError) as error:
        print(f"simpletuner train: {error}", file=sys.stderr)
        return 1
    return 0


# --- configure --------------------------------------------------------------------------------------

def cmd_configure(argv: Sequence[str]) -> int:
    from simpletuner.configure import main as configure_main

    return configure_main(argv)


# --- plan-memory ------------------------------------------------------------------------------------

def cmd_plan_memory(argv: Sequence[str]) -> int:
    """The same arguments as ``train`` (config file, flags, ``--memory_budget``); prints the plan."""
    from simpletuner.options.resolve import resolve_run

    if any(arg in ("-h", "--help") for arg in argv):
        print("usage: simpletuner plan-memory [--config FILE] [train options] [--memory_budget SIZE] [--host_ram SIZE]"
              "\n\n" + SUBCOMMANDS["plan-memory"] + ". Reads the model folder's config.json files and safetensors "
              "headers (no weights). Also prints per-rank memory under FSDP2 / ZeRO and the host RAM plan, compared "
              "with this machine's RAM or --host_ram (planning for another machine); see documentation/MEMORY.md.")
        return 0
    argv, host_ram = _take_host_ram(list(argv))
    run = resolve_run(argv)
    from simpletuner.memory.planner import describe

    print(describe(run.config, dataset_plan=run.dataset_plan, host_ram=host_ram,
                   machines=getattr(run.launcher, "num_machines", 1)))
    return 0


def _take_host_ram(argv: list[str]) -> tuple[list[str], int | None]:
    """``--host_ram SIZE`` (plan-memory only, not a train option) taken out of ``argv`` and parsed."""
    from simpletuner.memory.units import parse_size

    for index, arg in enumerate(argv):
        if arg == "--host_ram" or arg.startswith("--host_ram="):
            value = arg.partition("=")[2] if "=" in arg else (argv[index + 1] if index + 1 < len(argv) else "")
            rest = argv[:index] + argv[index + (1 if "=" in arg else 2):]
            try:
                return rest, parse_size(value)
            except ValueError as error:
                raise SystemExit(f"plan-memory: --host_ram {error}") from None
    return argv, None


# --- options ----------------------------------------------------------------------------------------

OPTIONS_EPILOG = """examples:
  simpletuner options                    every option: name, type, default ('-' = not supported yet)
  simpletuner options ema                the options whose name or help mentions "ema", with their help
  simpletuner options "learning rate"    a phrase works too (case does not matter)
  simpletuner options --json lora        the same search as JSON, for scripts
  simpletuner options --write-docs       regenerate the generated documentation tables

documentation/OPTIONS.md lists every option with its help; documentation/CONFIGURATION.md explains
config files and precedence."""


def options_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="simpletuner options", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=OPTIONS_EPILOG,
        description="List the options of `simpletuner train`, or search them: TERM matches option names, "
                    "deprecated aliases and help texts.")
    parser.add_argument("term", nargs="?", metavar="TERM",
                        help="show only the options whose name, alias or help text contains TERM, each with its "
                             "help, default, allowed values and whether it is implemented")
    parser.add_argument("--json", action="store_true",
                        help="print the options (all, or the matches of TERM) as a JSON list on stdout")
    parser.add_argument("--write-docs", action="store_true",
                        help="regenerate documentation/OPTIONS.md, the supported-values table of "
                             "documentation/CONFIGURATION.md and the key tables of documentation/DATASETS.md")
    return parser


def option_match_rank(option: "Option", term: str) -> int | None:
    """How well ``option`` matches ``term`` (case-insensitive; ``-`` and ``_`` alike in names): 0 its
    name, 1 part of its name or an alias, 2 its help text; None: no match."""
    term = term.lower().lstrip("-")
    spellings = {term, term.replace("-", "_")}
    if option.name in spellings:
        return 0
    if any(spelling in name for spelling in spellings for name in (option.name, *option.aliases)):
        return 1
    return 2 if term in option.help.lower() else None


def option_as_json(option: "Option") -> dict:
    return dict(name=option.name, group=option.group, type=option.kind, default=option.default,
                choices=list(option.choices) if option.choices else None, implemented=option.implemented,
                required=option.required, aliases=list(option.aliases), help=option.help)


def describe_option(option: "Option", partly_supported: dict[str, tuple[tuple, tuple]]) -> str:
    """One search result: the flag, its type and group, its help, then default, allowed values, status.
    ``partly_supported``: per option, its (supported, refused) choices when the trainer refuses some."""
    import textwrap

    lines = [f"--{option.name}  ({option.kind}, group {option.group}"
             + (", required" if option.required else "") + ")"]
    lines += textwrap.wrap(option.help, width=96, initial_indent="    ", subsequent_indent="    ")
    default = "none" if option.default in (None, "") else repr(option.default)
    lines.append(f"    default: {default}")
    if option.name in partly_supported:
        supported, refused = partly_supported[option.name]
        lines.append(f"    choices: {', '.join(map(str, supported))} (declared, refused for now: "
                     f"{', '.join(map(str, refused))})")
    elif option.choices:
        lines.append(f"    choices: {', '.join(map(str, option.choices))}")
    if option.range_text():
        lines.append(f"    allowed: {option.range_text()}")
    if option.aliases:
        lines.append(f"    deprecated aliases: {', '.join('--' + a for a in option.aliases)}")
    lines.append("    implemented: " + ("yes" if option.implemented else
                                       "not yet (setting it to anything but the default is refused)"))
    return "\n".join(lines)


def print_option_search(term: str, as_json: bool) -> int:
    """The options matching ``term``; none: a hint on stderr (closest names) and exit status 1, as grep."""
    from simpletuner.options import all_options, closest_name
    from simpletuner.options.docs import partially_supported_values

    ranked = [(rank, index, option) for index, option in enumerate(all_options())
              if (rank := option_match_rank(option, term)) is not None]
    matches = [option for _, _, option in sorted(ranked, key=lambda entry: entry[:2])]
    if as_json:
        print(json.dumps([option_as_json(o) for o in matches], indent=1))
    elif matches:
        partly_supported = partially_supported_values()
        print("\n\n".join(describe_option(o, partly_supported) for o in matches))
        print(f"\n{len(matches)} option(s) match {term!r}.")
    if not matches:
        close = closest_name(term.lstrip("-").replace("-", "_"))
        hint = f"; did you mean `{close}`?" if close else "; `simpletuner options` lists them all"
        print(f"simpletuner options: no option matches {term!r}{hint}", file=sys.stderr)
        return 1
    return 0


def cmd_options(argv: Sequence[str]) -> int:
    args = options_parser().parse_args(argv)
    from simpletuner.options import all_options

    if args.write_docs:
        from simpletuner.data.schema_docs import write_datasets_markdown
        from simpletuner.options.docs import write_configuration_table, write_options_markdown

        print(f"wrote {write_options_markdown()}")
        print(f"wrote {write_configuration_table()}")
        print(f"wrote {write_datasets_markdown()}")
        return 0
    if args.term is not None:
        return print_option_search(args.term, args.json)
    if args.json:
        print(json.dumps([option_as_json(o) for o in all_options()], indent=1))
        return 0
    for option in all_options():
        mark = " " if option.implemented else "-"
        print(f"{mark} --{option.name:<45} {option.kind:<6} default={option.default!r}")
    print("\n`simpletuner options TERM` shows the help of the options matching TERM")
    print("('-' = declared but not supported yet)")
    return 0


# --- tiny model and demo data -------------------------------------------------------------------------

def cmd_make_tiny_model(argv: Sequence[str]) -> int:
    from simpletuner.testing.tiny_models import tiny_families  # torch-free module

    parser = argparse.ArgumentParser(prog="simpletuner make-tiny-model",
                                     description="Write a tiny offline diffusers pipeline folder.")
    parser.add_argument("--family", required=True, choices=tiny_families(),
                        help="the model family whose diffusers classes the tiny model is built from")
    parser.add_argument("--out", required=True, help="folder to write")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    parser.add_argument("--train-vae-steps", type=int, default=0,
                        help="train the VAE from scratch for N steps instead of using the shipped demo VAE")
    args = parser.parse_args(argv)
    configure_logging()
    from simpletuner.testing.tiny_models import make_tiny_model

    report = make_tiny_model(args.family, args.out, seed=args.seed, vae_train_steps=args.train_vae_steps)
    sizes = ", ".join(f"{name} {count / 1e6:.2f}M" for name, count in report.parameters.items())
    print(f"wrote {report.family} tiny model to {report.path} ({sizes} parameters)")
    if report.vae_psnr_db is not None:
        print(f"VAE {report.vae_source}; reconstruction PSNR on demo images: {report.vae_psnr_db:.1f} dB")
    else:
        print(f"VAE {report.vae_source}")
    return 0


def positive_int(text: str) -> int:
    """argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def cmd_make_demo_dataset(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="simpletuner make-demo-dataset",
        description="Write a folder of coloured-shape PNGs, each with a caption .txt beside it "
                    "(\"a red circle on a white background\"): 6 colours x 3 shapes, equally often. "
                    "Point a local dataset with caption_strategy textfile at the folder to train on it.")
    parser.add_argument("--out", required=True,
                        help="folder to write the images and captions into (created if missing)")
    parser.add_argument("--count", type=positive_int, default=1000, help="how many images to draw (default 1000)")
    parser.add_argument("--size", type=positive_int, default=64,
                        help="width and height of each square image, in pixels (default 64)")
    parser.add_argument("--seed", type=int, default=0,
                        help="random seed of the shuffle and the shapes' positions and sizes; the same seed "
                             "writes the same images (default 0)")
    args = parser.parse_args(argv)
    from simpletuner.testing.shapes import make_demo_dataset

    paths = make_demo_dataset(args.out, args.count, size=args.size, seed=args.seed)
    print(f"wrote {len(paths)} images with captions to {args.out}")
    return 0


def cmd_demo(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="simpletuner demo", description=SUBCOMMANDS["demo"])
    parser.add_argument("--out", default="demo-output", help="working folder (model, data, run)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the demo config's)")
    parser.add_argument("--samples", type=int, default=None, help="images generated to score before/after")
    args = parser.parse_args(argv)
    configure_logging()
    from simpletuner.testing.demo import run_demo

    run_demo(Path(args.out), steps=args.steps, samples=args.samples)
    return 0


# --- LoRA extraction and merging ----------------------------------------------------------------------

def _lora_tool_parser(name: str) -> argparse.ArgumentParser:
    """The options both LoRA tools share: the base, the tensor type and replacing an existing output."""
    parser = argparse.ArgumentParser(prog=f"simpletuner {name}",
                                     description=SUBCOMMANDS[name] + " (documentation/LORA_TOOLS.md).")
    parser.add_argument("--base", required=True, help="base pipeline folder (extract-lora: or the denoiser's folder)")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                        help="dtype of the written tensors (merge-lora: the pipeline is loaded and merged in it)")
    parser.add_argument("--overwrite", action="store_true", help="replace the output if it exists")
    return parser


def _run_lora_tool(name: str, run, error_type) -> int:
    """Run a LoRA tool; its own errors become one line on stderr and exit status 2."""
    configure_logging(level_from_environment("WARNING"))
    try:
        result = run()
    except error_type as error:
        print(f"simpletuner {name}: {error}", file=sys.stderr)
        return 2
    print(result.describe())
    return 0


def cmd_extract_lora(argv: Sequence[str]) -> int:
    parser = _lora_tool_parser("extract-lora")
    parser.add_argument("--ft", required=True, help="fine-tuned pipeline folder (or model folder) of the same architecture")
    parser.add_argument("--out", required=True, help="adapter file to write (.safetensors)")
    parser.add_argument("--rank", type=int, default=None, help="LoRA rank (at least 1)")
    parser.add_argument("--full-rank", action="store_true", help="keep every layer's full rank: an exact copy")
    parser.add_argument("--component", choices=["unet", "transformer"], default=None,
                        help="the denoiser component (default: detected from model_index.json)")
    args = parser.parse_args(argv)
    if args.full_rank == (args.rank is not None):
        parser.error("give exactly one of --rank R and --full-rank")
    from simpletuner.tools.lora_extract import ExtractError, extract_lora

    return _run_lora_tool("extract-lora", lambda: extract_lora(
        args.base, args.ft, args.out, None if args.full_rank else args.rank, component=args.component,
        dtype=args.dtype, overwrite=args.overwrite), ExtractError)


def cmd_merge_lora(argv: Sequence[str]) -> int:
    parser = _lora_tool_parser("merge-lora")
    parser.add_argument("--adapter", required=True, help="LoRA (diffusers/kohya) or LyCORIS .safetensors file")
    parser.add_argument("--output", required=True, help="folder for the merged pipeline")
    parser.add_argument("--scale", type=float, default=1.0, help="adapter strength folded into the weights")
    args = parser.parse_args(argv)
    from simpletuner.tools.lora_merge import MergeError, merge_lora

    return _run_lora_tool("merge-lora", lambda: merge_lora(
        args.base, args.adapter, args.output, scale=args.scale, overwrite=args.overwrite, dtype=args.dtype),
        MergeError)


def cmd_compare_lora(argv: Sequence[str]) -> int:
    parser = _lora_tool_parser("compare-lora")
    parser.add_argument("--adapter", required=True, help="side A: a LoRA (diffusers/kohya/ComfyUI) or LyCORIS file")
    parser.add_argument("--other", default=None, help="side B: a second adapter file (default: the base alone)")
    parser.add_argument("--output", required=True, help="folder for compare_grid.png and compare_scores.json")
    parser.add_argument("--prompt", action="append", required=True, help="a prompt to render (repeat for more)")
    parser.add_argument("--seed", type=int, action="append", default=None, help="a generator seed (repeat; default 0)")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps per image")
    parser.add_argument("--size", type=int, default=None, help="image height and width (default: the pipeline's)")
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the pipeline's)")
    parser.add_argument("--scale", type=float, default=1.0, help="adapter strength on both sides")
    args = parser.parse_args(argv)
    from simpletuner.tools.lora_compare import CompareError, compare_lora

    return _run_lora_tool("compare-lora", lambda: compare_lora(
        args.base, args.adapter, args.output, args.prompt, other=args.other, seeds=args.seed or [0],
        steps=args.steps, size=args.size, guidance=args.guidance, scale=args.scale, dtype=args.dtype,
        overwrite=args.overwrite), CompareError)


def cmd_import_config(argv: Sequence[str]) -> int:
    """Translate another trainer's config; print (and write to import-report.md) what was not carried over."""
    parser = argparse.ArgumentParser(prog="simpletuner import-config", description=SUBCOMMANDS["import-config"])
    parser.add_argument("file", help="a kohya TOML or command line (.sh/.txt), an ai-toolkit YAML, a OneTrainer JSON")
    parser.add_argument("--output-dir", default="config", help="where the files are written (default: config/)")
    parser.add_argument("--format", choices=["kohya", "ai-toolkit", "onetrainer"], default=None,
                        help="the tool that wrote FILE (default: told from the file)")
    parser.add_argument("--model-family", default=None, help="our model family, when the file does not say")
    parser.add_argument("--overwrite", action="store_true", help="replace files already in --output-dir")
    args = parser.parse_args(argv)
    from simpletuner.importers import read_foreign_config
    from simpletuner.importers.writer import write_import

    configure_logging(level_from_environment("WARNING"))
    imported = read_foreign_config(Path(args.file), args.format, args.model_family)
    written = write_import(imported, Path(args.file), Path(args.output_dir), overwrite=args.overwrite)
    print(written.report, end="")
    print(f"wrote {written.config_path}, {written.datasets_path}"
          + (f", {written.prompts_path}" if written.prompts_path else "") + f" and {written.report_path}")
    return 0


COMMANDS = {
    "train": cmd_train,
    "configure": cmd_configure,
    "plan-memory": cmd_plan_memory,
    "options": cmd_options,
    "make-tiny-model": cmd_make_tiny_model,
    "make-demo-dataset": cmd_make_demo_dataset,
    "demo": cmd_demo,
    "extract-lora": cmd_extract_lora,
    "merge-lora": cmd_merge_lora,
    "compare-lora": cmd_compare_lora,
    "import-config": cmd_import_config,
}


#: The exit status of a command whose reader went away, as a shell reports a process that SIGPIPE ended.
BROKEN_PIPE_EXIT_STATUS = 128 + 13


def stop_writing_to_stdout() -> None:
    """Point stdout at the null device, so the interpreter's last flush at exit does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):  # stdout without a descriptor
        pass


def quiet_on_broken_pipe(command_main: Callable[..., int]) -> Callable[..., int]:
    """``simpletuner options | head``: once the reader has what it wants and closes the pipe, the next
    write raises BrokenPipeError. That is how a pipe ends, not an error: stop quietly with status 141
    instead of a traceback. stdout is flushed inside the handler, so output still buffered at the end
    (or a ``--help`` that argparse ends with SystemExit) fails here too, not at interpreter exit."""

    @functools.wraps(command_main)
    def run(argv: Sequence[str] | None = None) -> int:
        try:
            try:
                return command_main(argv)
            finally:
                if sys.stdout is not None and not sys.stdout.closed:
                    sys.stdout.flush()
        except BrokenPipeError:
            stop_writing_to_stdout()
            return BROKEN_PIPE_EXIT_STATUS

    return run


@quiet_on_broken_pipe
def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        top_level_parser().print_help()
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        top_level_parser().parse_args([command])  # prints the choices and exits 2
    from simpletuner.training.cpu_runtime import apply_cpu_runtime_defaults

    apply_cpu_runtime_defaults()  # before anything imports torch: idle CPU threads spin only briefly
    try:
        return COMMANDS[command](rest)
    except ConfigError as error:
        from simpletuner.options.messages import one_line
        from simpletuner.options.secrets import redact_urls_in_text

        # one line, however long or multi-line the value a message echoes: the user reads it at a glance;
        # URLs in it cut to their host, as a webhook URL echoed with a bad value holds its token
        print(f"simpletuner {command}: configuration error: {one_line(redact_urls_in_text(str(error)))}",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
