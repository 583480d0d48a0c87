"""Host RAM: the planner's host section against the measured peak resident memory of real runs.

Why: ``simpletuner plan-memory`` prints what a run keeps in CPU memory (memory/host.py); this checks
those numbers against the kernel's own count, the peak resident set size (``ru_maxrss``) of a fresh
process per case, so nothing one case allocated is still there for the next.

The model: the tiny Flux pipeline of simpletuner.testing with its transformer widened to 8 heads of
64 (about 71M parameters, 272 MiB in fp32) so the weights, not the interpreter, dominate the peak.

Two kinds of case:

* **Host phases measured alone** (the planner's host plan is the whole prediction):
  ``load`` reads the model through the trainer's loader (``load_model`` on the CPU) and then reads
  every weight once, as the copy to an accelerator does; planned: the ``load`` phase (process
  baseline + every component's stored bytes). ``quantize`` does the same with
  ``--base_model_precision int8-quanto --quantize_via cpu``; planned: the larger of the ``load`` and
  ``quantize`` phases.
* **Whole training runs** (LoRA rank 4, fp32, batch 1 at 64 px, two steps, eight images): ``plain``,
  ``blockswap`` (6 blocks swapped; the CPU run copies each block for its use, as a GPU run would),
  ``groupoffload`` (text encoders and VAE), ``prefetch`` (queue of 10). On this CPU-only machine the
  "accelerator" is host memory too, so a run holds both plans: the process baseline, plus the larger
  of the load phase and (the accelerator estimate's training peak + the host terms of the training
  phase). The two plans are disjoint by construction (the accelerator estimate leaves out what the
  options park on the CPU), so each option should move the total by what the plans say; the
  absolute error of these rows is mostly the accelerator estimate's (fitted to tensor bytes, not to
  the CPU allocator's resident pages).

On a GPU machine the host peak is the host plan alone (``--device cuda`` is not implemented here: no
GPU was available when this was written).

    python benchmarks/host_memory.py [--cases load,quantize,plain,blockswap,groupoffload,prefetch] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CASES = {
    "load": {},
    "quantize": {"base_model_precision": "int8-quanto", "quantize_via": "cpu"},
    "plain": {},
    "blockswap": {"musubi_blocks_to_swap": 6},
    "groupoffload": {"enable_group_offload": "true"},
    "prefetch": {"dataloader_prefetch": "true", "dataloader_prefetch_qlen": 10},
}
#: Cases that only load the model (the rest train).
LOAD_ONLY = ("load", "quantize")
#: The widened transformer (same class as the tiny one; joint/pooled widths match the tiny encoders).
WIDE_TRANSFORMER = dict(num_attention_heads=8, attention_head_dim=64, axes_dims_rope=[16, 24, 24], num_layers=4,
                        num_single_layers=8)


def make_project(root: Path) -> Path:
    """The tiny Flux project with its transformer widened (seeded weights)."""
    import diffusers
    import torch

    from simpletuner.testing.projects import make_family_project

    make_family_project(root, "flux")
    folder = root / "model" / "transformer"
    config = json.loads((folder / "config.json").read_text())
    settings = {key: value for key, value in config.items() if not key.startswith("_")}
    torch.manual_seed(1)
    model = getattr(diffusers, config["_class_name"])(**{**settings, **WIDE_TRANSFORMER})
    shutil.rmtree(folder)
    model.save_pretrained(folder)
    return root


def case_argv(root: Path, flags: dict) -> list[str]:
    values = {
        "model_family": "flux", "pretrained_model_name_or_path": str(root / "model"), "model_type": "lora",
        "output_dir": str(root / "out"), "data_backend_config": str(root / "multidatabackend.json"),
        "cache_dir": str(root / "cache"), "resolution": 64, "resolution_type": "pixel",
        "aspect_bucket_alignment": 8, "mixed_precision": "no", "train_batch_size": 1, "max_train_steps": 2,
        "seed": 7, "learning_rate": 1e-3, "report_to": "none", "disable_benchmark": "true",
        "optimizer": "optimi-adamw", "lora_rank": 4, "validation_disable": "true", "checkpointing_steps": 1000,
        **flags,
    }
    return [token for key, value in values.items() for token in (f"--{key}", str(value))]


def planned(argv: list[str], load_only: bool) -> dict:
    """The plan of the case: host phases, the accelerator training peak, and the prediction for this run."""
    from simpletuner.memory import host, planner
    from simpletuner.options.resolve import resolve_run

    run = resolve_run(argv)
    inventory = planner.read_inventory(run.config)
    settings = planner.PlanSettings.from_config(run.config, run.dataset_plan)
    estimate = planner.estimate(inventory, settings)
    plan = host.plan_host(inventory, settings, run.config, run.dataset_plan)
    load = max(plan.phase_total("load"), plan.phase_total("quantize"))
    training = plan.phase_total("training") + estimate.training_peak
    return {"host_load": load, "host_training": plan.phase_total("training"),
            "accelerator_peak": 0.0 if load_only else estimate.training_peak,
            "prediction": load if load_only else max(load, training)}


def load_and_read(argv: list[str]) -> None:
    """What the trainer does up to placement, on the CPU, then one read of every weight (an accelerator
    copy reads each byte once; safetensors maps the files, so a page counts only once read). The
    modules a training process imports before it loads are imported first, so the baseline is a
    trainer's."""
    import accelerate  # noqa: F401  (what a training process has imported when it loads)
    import peft  # noqa: F401
    import torch

    import simpletuner.data.build  # noqa: F401
    import simpletuner.training.trainer  # noqa: F401
    from simpletuner.models.quantize import load_model
    from simpletuner.models.registry import load_family_class
    from simpletuner.options.resolve import resolve_run

    config = resolve_run(argv).config
    model = load_family_class(config.model_family)(config, torch.device("cpu"), torch.float32)
    load_model(model, config)
    total = 0.0
    for module in (model.denoiser, model.vae, *model.text_encoder_modules().values()):
        for tensor in (*module.parameters(), *module.buffers()):
            data = tensor.dequantize() if hasattr(tensor, "dequantize") else tensor
            total += float(data.detach().float().sum())


def child(case: str, root: Path) -> None:
    """One case in this (fresh) process: plan it, run it, print the peak RSS and the plan as JSON."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(1)
    argv = case_argv(root, CASES[case])
    plan = planned(argv, case in LOAD_ONLY)
    if case in LOAD_ONLY:
        load_and_read(argv)
    else:
        from simpletuner.options.resolve import resolve_run
        from simpletuner.training.offload import MemorySavers
        from simpletuner.training.trainer import train

        if case == "blockswap":
            MemorySavers.copy_on_same_device = True  # a real copy per use, as on a GPU
        run = resolve_run(argv)
        train(run.config, show_progress=False, dataset_plan=run.dataset_plan)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"case": case, "measured_peak": peak, **plan}))


def measure(case: str, root: Path) -> dict:
    output = subprocess.run([sys.executable, __file__, "--child", case, "--root", str(root)], capture_output=True,
                            text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}, check=False)
    lines = [line for line in output.stdout.splitlines() if line.startswith("{")]
    if output.returncode or not lines:
        raise RuntimeError(f"case {case} failed:\n{output.stderr[-3000:]}")
    result = json.loads(lines[-1])
    result["error"] = result["prediction"] / result["measured_peak"] - 1
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, Path(args.root))
        return
    results = []
    with tempfile.TemporaryDirectory() as folder:
        root = make_project(Path(folder) / "project")
        for case in args.cases.split(","):
            shutil.rmtree(root / "cache", ignore_errors=True)
            shutil.rmtree(root / "out", ignore_errors=True)
            results.append(measure(case, root))
    mib = 2**20
    plain = next((r for r in results if r["case"] == "plain"), None)
    print(f"{'case':<13} {'measured peak':>13} {'planned':>9} {'error':>7}  {'change vs plain':>22}  "
          "(host load / host training + accelerator)")
    for r in results:
        change = ""
        if plain is not None and r["case"] not in LOAD_ONLY and r is not plain:
            change = (f"{(r['measured_peak'] - plain['measured_peak']) / mib:+.0f} MiB, planned "
                      f"{(r['prediction'] - plain['prediction']) / mib:+.0f}")
        print(f"{r['case']:<13} {r['measured_peak'] / mib:>9.0f} MiB {r['prediction'] / mib:>5.0f} MiB "
              f"{100 * r['error']:>+6.1f}%  {change:>22}  ({r['host_load'] / mib:.0f} / {r['host_training'] / mib:.0f} "
              f"+ {r['accelerator_peak'] / mib:.0f} MiB)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
