"""Stand-alone model tools behind ``simpletuner`` subcommands (LoRA extraction and merging).

Each module imports torch and diffusers only inside its functions, so the CLI can list and parse
these subcommands without loading them.
"""
