"""The ``simpletuner`` command: train, configure, options, make-tiny-model, make-demo-dataset, demo,
extract-lora, merge-lora.

Only the standard library and the options package are imported at start-up; each subcommand imports
what it needs when it runs, so ``simpletuner --help`` and config validation stay fast and torch-free.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

from simpletuner.options import ConfigError

logger = logging.getLogger("simpletuner")

SUBCOMMANDS = {
    "train": "fine-tune a model (all training options: `simpletuner train --help`)",
    "configure": "write or edit config.json, multidatabackend.json and config.env (a wizard, or --non-interactive)",
    "plan-memory": "estimate accelerator memory for a config; with --memory_budget, the cheapest options that fit",
    "options": "list every option (`--json` for machine-readable, `--write-docs` to regenerate the docs tables)",
    "make-tiny-model": "write a tiny offline model folder built from the real diffusers classes",
    "make-demo-dataset": "write the procedural coloured-shapes dataset (PNG + caption .txt)",
    "demo": "build the tiny model and dataset, train, and score prompt-matching before and after",
    "extract-lora": "write a LoRA holding the difference between a fine-tuned model and its base",
    "merge-lora": "fold a LoRA or LyCORIS file into a base pipeline and save the merged pipeline",
}


#: Libraries that speak only at WARNING (INFO with ``--log_level DEBUG``). botocore's DEBUG lines quote
#: request headers, the S3 access key id among them, so they never reach the log.
QUIET_LIBRARIES = ("diffusers", "transformers", "torchao", "accelerate", "bitsandbytes", "PIL",
                   "botocore", "boto3", "s3transfer", "urllib3")


def configure_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in QUIET_LIBRARIES:
        logging.getLogger(noisy).setLevel(logging.WARNING if level.upper() != "DEBUG" else logging.INFO)


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
    if run.dry_run:
        from simpletuner.training.plan import describe_plan

        print(describe_plan(run))
        return 0
    from simpletuner.training.launch import needs_relaunch, relaunch_under_accelerate

    if needs_relaunch(run.launcher):
        return relaunch_under_accelerate(run.launcher, argv, config=run.config)
    from simpletuner.training.checkpoint import CheckpointError
    from simpletuner.training.trainer import train

    try:
        train(run.config, launcher=run.launcher, config_file=run.config_file, dataset_plan=run.dataset_plan)
    except KeyboardInterrupt:
        print(f"\ninterrupted. Checkpoints in {run.config.output_dir} are intact; continue with "
              "`--resume_from_checkpoint latest`.", file=sys.stderr)
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
        print("usage: simpletuner plan-memory [--config FILE] [train options] [--memory_budget SIZE]\n\n"
              + SUBCOMMANDS["plan-memory"] + ". Reads the model folder's config.json files and safetensors headers "
              "(no weights); see documentation/MEMORY.md.")
        return 0
    run = resolve_run(argv)
    from simpletuner.memory.planner import describe

    print(describe(run.config, dataset_plan=run.dataset_plan))
    return 0


# --- options ----------------------------------------------------------------------------------------

def cmd_options(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="simpletuner options", description="List every option of the table.")
    parser.add_argument("--json", action="store_true", help="print every option as JSON")
    parser.add_argument("--write-docs", action="store_true",
                        help="regenerate documentation/OPTIONS.md and the key tables of documentation/DATASETS.md")
    args = parser.parse_args(argv)
    from simpletuner.options import all_options

    if args.write_docs:
        from simpletuner.data.schema_docs import write_datasets_markdown
        from simpletuner.options.docs import write_options_markdown

        print(f"wrote {write_options_markdown()}")
        print(f"wrote {write_datasets_markdown()}")
        return 0
    if args.json:
        rows = [
            dict(name=o.name, group=o.group, type=o.kind, default=o.default,
                 choices=list(o.choices) if o.choices else None, implemented=o.implemented,
                 required=o.required, aliases=list(o.aliases), help=o.help)
            for o in all_options()
        ]
        print(json.dumps(rows, indent=1))
        return 0
    for option in all_options():
        mark = " " if option.implemented else "-"
        print(f"{mark} --{option.name:<45} {option.kind:<6} default={option.default!r}")
    print("\n('-' = declared but not supported yet)")
    return 0


# --- tiny model and demo data -------------------------------------------------------------------------

def cmd_make_tiny_model(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="simpletuner make-tiny-model",
                                     description="Write a tiny offline diffusers pipeline folder.")
    parser.add_argument("--family", required=True,
                        choices=["sd1x", "sd2x", "sdxl", "kolors", "deepfloyd", "sd3", "flux", "pixart_sigma"])
    parser.add_argument("--out", required=True, help="folder to write")
    parser.add_argument("--seed", type=int, default=0)
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


def cmd_make_demo_dataset(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="simpletuner make-demo-dataset",
                                     description="Write coloured-shape PNGs with caption .txt files.")
    parser.add_argument("--out", required=True)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
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
    configure_logging("WARNING")
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
}


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
