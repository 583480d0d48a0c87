"""Compilation, threading and distributed-process settings."""

from __future__ import annotations

from simpletuner.options.spec import Option

_G = "performance"

OPTIONS: list[Option] = [
    Option(
        name="dynamo_mode",
        kind="str",
        default=None,
        help="torch.compile optimisation mode, e.g. max-autotune; unset lets Accelerate decide. "
        "Takes effect when a dynamo backend is configured.",
        group=_G,
    ),
    Option(
        name="dynamo_fullgraph",
        kind="bool",
        default=False,
        help="Ask torch.compile to capture each model as a single graph, failing instead of falling back on graph breaks.",
        group=_G,
    ),
    Option(
        name="dynamo_use_regional_compilation",
        kind="bool",
        default=False,
        help="Compile repeated blocks once and reuse the result, shortening cold starts on deep transformers.",
        group=_G,
    ),
    Option(
        name="torch_num_threads",
        kind="int",
        default=None,
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
        help="Empty the accelerator's memory cache every N steps to fight slow memory growth.",
        group=_G,
    ),
    Option(
        name="local_rank",
        kind="int",
        default=None,
        help="Process rank on this machine, normally set by the distributed launcher.",
        group=_G,
    ),
]
