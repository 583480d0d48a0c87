"""Compilation, threading and distributed-process settings."""

from __future__ import annotations

from simpletuner.options.spec import MAX_PROCESSES, Option

_G = "performance"

OPTIONS: list[Option] = [
    Option(
        name="dynamo_mode",
        kind="str",
        default=None,
        help="torch.compile optimisation mode; unset uses torch's default. "
        "Takes effect when TRAINING_DYNAMO_BACKEND in config.env names a backend.",
        group=_G,
        choices=("default", "reduce-overhead", "max-autotune"),
        implemented=True,
    ),
    Option(
        name="dynamo_fullgraph",
        kind="bool",
        default=False,
        help="Ask torch.compile to capture each compiled module as a single graph, failing instead of falling back on "
        "graph breaks. Takes effect with TRAINING_DYNAMO_BACKEND.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="dynamo_dynamic",
        kind="bool",
        default=None,
        help="Compile for dynamic shapes (true), for each shape seen (false), or let torch decide after the first "
        "recompilation (unset). Takes effect with TRAINING_DYNAMO_BACKEND.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="dynamo_use_regional_compilation",
        kind="bool",
        default=False,
        help="Compile only the repeated blocks of the denoiser (each block class once, reused), leaving the rest "
        "eager: much shorter cold starts on deep transformers. Takes effect with TRAINING_DYNAMO_BACKEND.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="num_processes",
        kind="int",
        default=None,
        minimum=1, maximum=MAX_PROCESSES,
        help="Training processes on all machines together (one per GPU); more than 1 starts them with accelerate. "
        "TRAINING_NUM_PROCESSES in config.env or the environment overrides a config-file value; the command-line "
        "flag overrides both.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="torch_num_threads",
        kind="int",
        default=None,
        minimum=1,
        help="CPU threads PyTorch may use for its own operations (separate from data workers); unset keeps the PyTorch default.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="enable_multiprocessing",
        kind="bool",
        default=False,
        help="Use worker processes rather than threads when caching metadata.",
        group=_G,
    ),
    Option(
        name="accelerator_cache_clear_interval",
        kind="int",
        default=None,
        minimum=1,
        help="Empty the accelerator's memory cache every N steps to fight slow memory growth.",
        group=_G,
        implemented=True,
    ),
    Option(
        name="local_rank",
        kind="int",
        default=None,
        minimum=0,
        help="Process rank on this machine, normally set by the distributed launcher.",
        group=_G,
    ),
]
