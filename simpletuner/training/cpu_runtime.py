"""How long torch's idle CPU threads spin before they sleep, chosen before torch is imported.

torch's OpenMP runtime (GNU libgomp in the Linux wheels) lets a worker thread that has finished its
share of an op spin for a while, expecting the next parallel region to start soon. On a machine whose
cores are all busy (other jobs, a package install) the operating system deschedules one thread of the
team; the others then burn their time slices spinning for it, and every op pays. On this project's
2-core machine a demo step went from 0.2 s quiet to 3.8 s under that kind of load.

Two cures were measured (benchmarks/step_overhead.py ``--load``; tiny UNet, batch 32, 2 competing
torch jobs; see documentation/BENCHMARKS.md): ``OMP_WAIT_POLICY=PASSIVE`` (threads sleep at once) cut
the loaded step from 2.19 s to 0.57 s but slowed the quiet step by half (0.14 s to 0.21 s), since each
op then waits for sleeping threads to wake; a bounded spin, ``GOMP_SPINCOUNT=100000``, loaded 0.59 s
and quiet unchanged (0.14 s). simpletuner uses the bounded spin. With two competitors each wanting
every core, a third of the CPU (3x the quiet step) is the fair share, so little more is to be had.

The runtime reads these variables once, when it starts, so they must be in the environment before the
first ``import torch``: ``simpletuner``'s entry point calls :func:`apply_cpu_runtime_defaults` first
thing, and processes started under ``accelerate launch`` inherit them. A user who sets either
variable (or ``OMP_WAIT_POLICY``) keeps their own choice. ``--torch_num_threads`` sets the number of
threads.
"""

from __future__ import annotations

import os
from typing import MutableMapping

#: What simpletuner sets when the user has chosen none of :data:`USER_CHOICES`.
CPU_RUNTIME_DEFAULTS = {"GOMP_SPINCOUNT": "100000"}
#: Variables through which a user chooses the waiting behaviour themselves.
USER_CHOICES = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")


def apply_cpu_runtime_defaults(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set the defaults unless the user chose a waiting behaviour; returns what was set."""
    environ = os.environ if environ is None else environ
    if any(name in environ for name in USER_CHOICES):
        return {}
    environ.update(CPU_RUNTIME_DEFAULTS)
    return dict(CPU_RUNTIME_DEFAULTS)
