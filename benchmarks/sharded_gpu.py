"""Sharded engines on GPUs: FSDP2, HSDP and DeepSpeed ZeRO, compared as the CPU tests compare them.

Run on a machine with GPUs:

    .venv/bin/python benchmarks/sharded_gpu.py [--gpus N] [--steps 4] [--engines fsdp2,hsdp,zero2,zero3,zero-offload]

It builds the tiny SD 1.x project the CPU tests use (tests/training/test_fsdp.py, test_zero.py), trains a
LoRA with N sharded processes (``simpletuner train`` with TRAINING_NUM_PROCESSES=N, as a user would),
then one plain process with the same global batch (accumulation N), and prints the largest difference
of the final LoRA files. A difference above 1e-4 (fp32, the tolerance of summation order on GPUs) is
reported as FAILED and the exit status is 1.

- ``fsdp2``, ``zero2``, ``zero3``: need 2 or more GPUs (NCCL refuses two processes on one GPU).
- ``hsdp``: a 2 x N/2 mesh, needs 4 or more GPUs.
- ``zero-offload``: one process with ZeRO-2 and the optimizer state in CPU memory
  (``offload_optimizer``), against one plain process; runs on a single GPU.

Engines the machine cannot run are skipped with a line saying why. Why a script and not a test: the CI
machines have no GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run(root: Path, *argv: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "SIMPLETUNER_LAUNCHED"):
        env.pop(key, None)
    command = [str(Path(sys.executable).with_name("simpletuner")), "train", *argv]
    result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=1800)
    if result.returncode:
        sys.stderr.write((result.stdout + result.stderr)[-6000:])
        raise SystemExit(f"{' '.join(command)} failed in {root}")
    return result.stdout + result.stderr


def largest_difference(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    first, second = load_file(str(a)), load_file(str(b))
    if first.keys() != second.keys():
        raise SystemExit(f"{a} and {b} hold different keys")
    return max(float((first[k].float() - second[k].float()).abs().max()) for k in first)


#: engine -> (GPUs it needs, the options it adds, the processes it runs with given N GPUs)
ENGINES = {
    "fsdp2": (2, {"fsdp_enable": True}, None),
    "hsdp": (4, {"fsdp_enable": True, "hsdp_replicate_dim": 2}, None),
    "zero2": (2, {"zero_stage": 2}, None),
    "zero3": (2, {"zero_stage": 3}, None),
    "zero-offload": (1, {"zero_stage": 2, "deepspeed_config": {"zero_optimization": {
        "offload_optimizer": {"device": "cpu", "pin_memory": True}}}}, 1),
}


def compare(scratch: Path, model: Path, name: str, gpus: int, steps: int) -> tuple[float, str]:
    """Train ``name`` on ``gpus`` processes and one plain process with the same global batch; the
    largest difference of their final LoRA files."""
    from tests.training.test_multiprocess import make_project

    needed, options, processes = ENGINES[name]
    processes = processes or gpus
    options = dict(options)
    if name == "hsdp":
        options["hsdp_shard_dim"] = processes // 2
    root = make_project(scratch / name, model, f"TRAINING_NUM_PROCESSES={processes}\n",
                        max_train_steps=steps, validation_disable=True, **options)
    run(root)
    reference = make_project(scratch / f"{name}-ref", model, "TRAINING_NUM_PROCESSES=1\n", max_train_steps=steps,
                             validation_disable=True, gradient_accumulation_steps=processes)
    run(reference)
    difference = largest_difference(root / "out" / "pytorch_lora_weights.safetensors",
                                    reference / "out" / "pytorch_lora_weights.safetensors")
    return difference, "ok" if difference <= 1e-4 else "FAILED"


def main() -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=torch.cuda.device_count())
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--engines", default=",".join(ENGINES), help="comma-separated, from: " + ", ".join(ENGINES))
    args = parser.parse_args()
    from simpletuner.testing.tiny_models import make_tiny_model

    failed = False
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        model = scratch / "model"
        make_tiny_model("sd1x", model, seed=0)
        for name in [engine.strip() for engine in args.engines.split(",") if engine.strip()]:
            if name not in ENGINES:
                raise SystemExit(f"--engines: unknown engine {name!r}; choose from {', '.join(ENGINES)}")
            needed = ENGINES[name][0]
            if args.gpus < needed:
                print(json.dumps({"engine": name, "skipped": f"needs {needed} GPUs, this machine has {args.gpus}"}))
                continue
            difference, verdict = compare(scratch, model, name, args.gpus, args.steps)
            failed |= verdict != "ok"
            print(json.dumps({"engine": name, "gpus": args.gpus, "max_lora_difference": difference,
                              "verdict": verdict}))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
