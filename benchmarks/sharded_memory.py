"""Per-rank memory under FSDP2 and DeepSpeed ZeRO 1/2/3: what each process holds around its optimizer
steps, against what ``plan-memory`` plans for it (simpletuner/memory/sharding.py).

Why: sharding is chosen to make a model fit, so the per-rank plan has to be right where it divides the
training state. What sharding divides does not depend on the device: the bytes each process keeps of
the denoiser's weights, the gradients, the optimizer state, DeepSpeed's fp32 master weights and its
buffers are the same on 2 gloo CPU processes as on 2 GPUs. So this runs on the CPU: ``simpletuner
train`` as a user starts it (2 processes, the same accelerate command line), with the census of
simpletuner/training/shard_census.py counting every rank's bytes by category at several moments of
the first two optimizer steps (per storage, once, padding included). What needs a GPU is not measured
here: activations, the blocks FSDP2 / ZeRO-3 gather whole while they run, and the CUDA allocator.

The model is the tiny FLUX.1 of simpletuner.testing, widened to 256 (8 heads of 32) with 2 double and 4
single blocks (about 9.2M parameters), so that its attention projections (65,536 elements) fall under
ZeRO-3's default persistence threshold (100,000 elements) and its feed-forward layers above it, as the
norms and the large layers of a real model do. Two steps at 64 px, batch 1, optimi-adamw.

For every case the table prints rank 0's parts, measured, planned, and measured/planned (flagged when
more than 10% off), and rank 1's measurement relative to rank 0's. The optimizer state and master
weights are taken after the second step; weights, gradients and reduce buckets at their largest count
(late in the backward pass, after it, or around the base optimizer's step), so that the weights
include ZeRO-3's small parameters, which it gathers at the end of every step, from the first on.
DeepSpeed buffers the plan has no part for are listed on their own.

    python benchmarks/sharded_memory.py [--cases fsdp2-full,zero1-full,...] [--mixed-precision no|bf16]
                                        [--work DIR] [--json FILE]

Case names are ``<engine>-<full|lora>``, engines fsdp2, zero1, zero2, zero3. A case takes about 10 s on
two CPU cores (two processes starting and two steps; the first case also builds the model and caches).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ALL_CASES = ("fsdp2-full", "zero1-full", "zero2-full", "zero3-full",
             "fsdp2-lora", "zero1-lora", "zero2-lora", "zero3-lora")
ENGINE_FLAGS = {"fsdp2": ["--fsdp_enable", "true"], "zero1": ["--zero_stage", "1"], "zero2": ["--zero_stage", "2"],
                "zero3": ["--zero_stage", "3"]}
#: The tiny FLUX transformer, widened (see the module docstring); the rotary axes must sum to the head size.
WIDER_FLUX = dict(num_attention_heads=8, attention_head_dim=32, axes_dims_rope=[8, 12, 12], num_layers=2,
                  num_single_layers=4)
#: The plan's parts next to the census categories they are compared with.
COMPARED = ("weights", "gradients", "optimizer state", "fp32 master weights", "reduce buckets")
TARGET = 0.10


# --- the model and the project -----------------------------------------------------------------------

def make_model(folder: Path) -> Path:
    """The tiny FLUX.1 pipeline with its transformer rebuilt wider (seeded weights)."""
    if (folder / "model_index.json").is_file():
        return folder
    import diffusers
    import torch

    from simpletuner.testing.tiny_models import make_tiny_model

    make_tiny_model("flux", folder, seed=0)
    settings = json.loads((folder / "transformer" / "config.json").read_text())
    settings = {key: value for key, value in settings.items() if not key.startswith("_")}
    torch.manual_seed(1)
    transformer = diffusers.FluxTransformer2DModel(**{**settings, **WIDER_FLUX})
    shutil.rmtree(folder / "transformer")
    transformer.save_pretrained(folder / "transformer")
    return folder


def make_project(root: Path, model: Path) -> Path:
    """A project folder (dataset, dataset list, config.json, config.env for 2 processes)."""
    from simpletuner.testing.shapes import make_demo_dataset

    root.mkdir(parents=True, exist_ok=True)
    if not (root / "data").is_dir():
        make_demo_dataset(root / "data", 4, size=64, seed=3)
    (root / "config").mkdir(exist_ok=True)
    (root / "multidatabackend.json").write_text(json.dumps([
        {"id": "shapes", "type": "local", "instance_data_dir": str(root / "data"), "caption_strategy": "textfile",
         "resolution": 64, "resolution_type": "pixel"},
        {"id": "text", "dataset_type": "text_embeds", "cache_dir": str(root / "cache" / "text"), "default": True},
    ]))
    config = {"model_family": "flux", "pretrained_model_name_or_path": str(model), "output_dir": str(root / "out"),
              "data_backend_config": str(root / "multidatabackend.json"), "cache_dir": str(root / "cache"),
              "resolution": 64, "resolution_type": "pixel", "aspect_bucket_alignment": 8, "mixed_precision": "no",
              "train_batch_size": 1, "max_train_steps": 2, "seed": 7, "learning_rate": 1e-4,
              "optimizer": "optimi-adamw", "tokenizer_max_length": 32, "report_to": "none",
              "validation_disable": True, "disable_benchmark": True}
    (root / "config" / "config.json").write_text(json.dumps(config, indent=1))
    (root / "config" / "config.env").write_text("TRAINING_NUM_PROCESSES=2\n")
    return root


def case_argv(case: str, output: Path, precision: str = "no") -> list[str]:
    engine, model_type = case.split("-")
    rank = ["--lora_rank", "4"] if model_type == "lora" else []
    return [*ENGINE_FLAGS[engine], "--model_type", model_type, *rank, "--mixed_precision", precision,
            "--output_dir", str(output)]


# --- running a case ------------------------------------------------------------------------------------

def run_case(project: Path, case: str, census: Path, precision: str) -> float:
    """Train two steps of ``case`` on 2 processes with ``simpletuner train``, as a user would; the trainer
    installs the census (training/shard_census.py) because SIMPLETUNER_MEASURE_SHARDS is set, and every
    rank writes its census into ``census``."""
    shutil.rmtree(census, ignore_errors=True)
    argv = case_argv(case, project / f"out-{case}", precision)
    env = {key: value for key, value in os.environ.items()
           if key not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "SIMPLETUNER_LAUNCHED")}
    env.update(HF_HUB_OFFLINE="1", SIMPLETUNER_MEASURE_SHARDS=str(census))
    command = [str(Path(sys.executable).with_name("simpletuner")), "train", *argv]
    started = time.perf_counter()
    result = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True, timeout=900)
    if result.returncode != 0 or len(list(census.glob("rank-*.json"))) != 2:
        raise RuntimeError(f"{case} failed (exit {result.returncode}):\n{(result.stdout + result.stderr)[-6000:]}")
    return time.perf_counter() - started


# --- the plan and the comparison ----------------------------------------------------------------------

def planned(project: Path, case: str, precision: str) -> dict[str, float]:
    """``plan_sharding``'s per-rank parts for the case, built as ``plan-memory`` builds them."""
    from simpletuner.memory import planner
    from simpletuner.memory.sharding import plan_sharding
    from simpletuner.options.resolve import resolve_run

    run = resolve_run(case_argv(case, project / f"out-{case}", precision), environ={}, root=project)
    config = run.config.replace(num_processes=run.launcher.num_processes)
    inventory = planner.read_inventory(config)
    settings = planner.PlanSettings.from_config(config, run.dataset_plan)
    plan = plan_sharding(planner.estimate(inventory, settings), inventory, config)
    parts = dict(plan.per_rank)
    parts["weights"] = sum(parts.get(name, 0.0) for name in
                           ("denoiser weights", "adapter weights", "persistent weights (ZeRO-3)"))
    return parts


def measured(record: dict) -> dict[str, float]:
    """The census of one rank in the plan's terms: optimizer state and master weights after the last
    step; weights (with ZeRO-3's persistent ones), gradients and buckets at their largest count."""
    moments = record["moments"]
    last = moments[f"{max(int(key.split('/')[0]) for key in moments)}/after step"]

    def largest(*categories: str) -> int:
        return max(sum(moment.get(name, 0) for name in categories) for moment in moments.values())

    parts = {"weights": largest("trained weights", "frozen weights", "persistent weights"),
             "gradients": largest("gradients"),
             "optimizer state": last.get("optimizer state", 0),
             "fp32 master weights": last.get("master weights", 0),
             "reduce buckets": largest("reduce buckets")}
    for name in ("gathered weights", "engine buffers"):
        if largest(name):
            parts[name] = largest(name)
    return parts


def compare(project: Path, case: str, census: Path, precision: str) -> dict:
    ranks = [json.loads((census / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
    got = [measured(record) for record in ranks]
    plan = planned(project, case, precision)
    rows = []
    for part in COMPARED:
        want, have = plan.get(part, 0.0), got[0][part]
        ratio = have / want if want else (1.0 if not have else float("inf"))
        rows.append({"part": part, "measured": have, "planned": want, "ratio": ratio,
                     "rank1_measured": got[1][part]})
    extra = {name: got[0][name] for name in ("gathered weights", "engine buffers") if name in got[0]}
    return {"case": case, "precision": precision, "rows": rows, "unplanned": extra,
            "engine_buffers": ranks[0].get("engine_buffers", {}), "records": ranks}


def mib(value: float) -> str:
    return f"{value / 2**20:9.2f} MiB"


def print_table(results: list[dict]) -> None:
    print(f"{'case':<17} {'part':<22} {'measured':>13} {'planned':>13} {'ratio':>7}  rank 1 / rank 0")
    for result in results:
        label = f"{result['case']} {result['precision']}"
        for row in result["rows"]:
            if not row["measured"] and not row["planned"]:
                continue
            balance = row["rank1_measured"] / row["measured"] if row["measured"] else 1.0
            flag = "" if abs(row["ratio"] - 1) <= TARGET else "  <-- off"
            print(f"{label:<17} {row['part']:<22} {mib(row['measured'])} {mib(row['planned'])} "
                  f"{row['ratio']:7.3f}  {balance:.3f}{flag}")
        for name, value in result["unplanned"].items():
            print(f"{label:<17} {name + ' (not planned)':<22}{mib(value)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(ALL_CASES), help="comma-separated, from " + ", ".join(ALL_CASES))
    parser.add_argument("--work", type=Path, help="folder for the model and project (default: a temporary one)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--mixed-precision", default="no", choices=("no", "bf16"),
                        help="--mixed_precision of the runs (bf16 steps are slow on a CPU, but the bytes are real)")
    args = parser.parse_args()
    cases = [case.strip() for case in args.cases.split(",") if case.strip()]
    unknown = [case for case in cases if case not in ALL_CASES]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(ALL_CASES)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = args.work or Path(tempfile.mkdtemp(prefix="sharded-memory-"))
    project = make_project(work / "project", make_model(work / "flux-wide"))
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)
    results = []
    for case in cases:
        census = work / "census" / f"{case}-{args.mixed_precision}"
        seconds = run_case(project, case, census, args.mixed_precision)
        results.append({**compare(project, case, census, args.mixed_precision), "seconds": round(seconds, 1)})
        print(f"{case}: {seconds:.0f} s", flush=True)
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
