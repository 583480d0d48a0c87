"""The per-rank plan under DeepSpeed ZeRO (memory/sharding.py), part by part, as 2-process runs measured
it (benchmarks/sharded_memory.py): every size here is computed from the model files themselves, not
from the planner's own helpers, and the last test re-measures a few real runs.

What the measurements showed, and these tests pin: DeepSpeed keeps an fp32 master copy of each rank's
partition of the trained weights at every precision, its optimizer state is that of fp32 weights, it
casts the whole model (LoRA adapters too) to bf16, the gradient at the step is the master's fp32
gradient (ZeRO-3 beside its own partition), ZeRO-3 keeps parameters below its persistence threshold
whole on every rank, and the reduce buckets have a fixed size however small the model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from simpletuner.memory import planner, sharding

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "sharded_memory.py"
ADAM_STATE = 8  # two fp32 moments per parameter


def denoiser_tensors(config) -> dict:
    from safetensors.torch import load_file

    folder = Path(config.pretrained_model_name_or_path) / "transformer"
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def adapter_matrices(tensors: dict, rank: int) -> list[int]:
    """Elements of each LoRA A and B matrix on the default targets (the attention projections)."""
    targets = ("to_q", "to_k", "to_v", "to_out.0")
    sizes = []
    for name, tensor in tensors.items():
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and tensor.dim() == 2 and any(module.endswith("." + t) for t in targets):
            out_features, in_features = tensor.shape
            sizes += [rank * in_features, out_features * rank]
    return sizes


@pytest.fixture
def zero_plan(memory_config):
    """``zero_plan(stage, processes, deepspeed_config=None, **flags)``: (plan, model tensors) for the tiny Flux."""

    def build(stage: int, processes: int = 2, deepspeed_config: dict | None = None, **flags):
        config = memory_config("flux", **flags)
        inventory = planner.read_inventory(config)
        result = planner.estimate(inventory, planner.PlanSettings.from_config(config))
        sharded = config.replace(zero_stage=stage, num_processes=processes, deepspeed_config=deepspeed_config)
        return sharding.plan_sharding(result, inventory, sharded), denoiser_tensors(config)

    return build


FULL_BF16 = dict(model_type="full", lora_rank=None, mixed_precision="bf16")


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_master_weights_and_optimizer_state_are_fp32_at_every_precision(zero_plan, stage):
    plan, tensors = zero_plan(stage, processes=4, **FULL_BF16)
    count = sum(t.numel() for t in tensors.values())
    assert plan.per_rank["fp32 master weights"] == count * 4 / 4
    assert plan.per_rank["optimizer state"] == count * ADAM_STATE / 4  # not bf16 moments: they follow the masters
    lora, tensors = zero_plan(stage)
    adapters = sum(adapter_matrices(tensors, 4))
    assert lora.per_rank["fp32 master weights"] == adapters * 4 / 2  # cloned although the adapters are fp32
    assert lora.per_rank["optimizer state"] == adapters * ADAM_STATE / 2


def test_fsdp2_full_training_in_bf16_keeps_fp32_slices(memory_config):
    """accelerate upcasts the trained weights to fp32 before FSDP2 shards them (measured: fsdp2-full bf16)."""
    config = memory_config("flux", **FULL_BF16)
    inventory = planner.read_inventory(config)
    result = planner.estimate(inventory, planner.PlanSettings.from_config(config))
    plan = sharding.plan_sharding(result, inventory, config.replace(fsdp_enable=True, num_processes=2))
    count = sum(t.numel() for t in denoiser_tensors(config).values())
    assert plan.per_rank["denoiser weights"] == count * 4 / 2
    assert plan.per_rank["gradients"] == count * 4 / 2 and plan.per_rank["optimizer state"] == count * ADAM_STATE / 2
    assert plan.per_rank["gathered blocks"] < plan.per_rank["denoiser weights"]  # gathered in bf16 to compute


def test_bf16_casts_the_adapters_too(zero_plan):
    plan, tensors = zero_plan(2, mixed_precision="bf16")
    assert plan.per_rank["adapter weights"] == sum(adapter_matrices(tensors, 4)) * 2


@pytest.mark.parametrize(("precision", "element"), [("no", 4), ("bf16", 2)])
def test_gradients_whole_in_stage_1_then_the_fp32_gradient_of_the_partition(zero_plan, precision, element):
    count = None
    planned = {}
    for stage in (1, 2, 3):
        plan, tensors = zero_plan(stage, processes=4, **{**FULL_BF16, "mixed_precision": precision})
        count = sum(t.numel() for t in tensors.values())
        planned[stage] = plan.per_rank["gradients"]
    assert planned[1] == count * element  # every gradient until the end of the backward pass
    assert planned[2] == count * 4 / 4  # the master partition's fp32 gradient at the step
    assert planned[3] == count * (element + 4) / 4  # its own partition of the gradients, and that one


def test_zero3_keeps_parameters_under_the_persistence_threshold_whole(zero_plan):
    threshold = 1000
    plan, tensors = zero_plan(3, deepspeed_config={"zero_optimization": {
        "stage3_param_persistence_threshold": threshold}})
    small = sum(t.numel() for t in tensors.values() if t.numel() <= threshold)
    assert 0 < small < sum(t.numel() for t in tensors.values())  # the threshold splits this model
    small_adapters = sum(n for n in adapter_matrices(tensors, 4) if n <= threshold)
    assert plan.per_rank["persistent weights (ZeRO-3)"] == (small + small_adapters) * 4
    assert plan.per_rank["denoiser weights"] == sum(t.numel() for t in tensors.values()) * 4 / 2
    assert any("stage3_param_persistence_threshold" in note for note in plan.notes)
    # DeepSpeed's default (100,000 elements) keeps every tensor of this tiny model whole
    default, _ = zero_plan(3)
    assert default.per_rank["persistent weights (ZeRO-3)"] == (
        sum(t.numel() for t in tensors.values()) + sum(adapter_matrices(tensors, 4))) * 4
    below_three, _ = zero_plan(2)
    assert "persistent weights (ZeRO-3)" not in below_three.per_rank


@pytest.mark.parametrize(("zero", "stage", "expected"), [
    ({}, 2, 500_000_000 * 4),  # DeepSpeed's default bucket, however small the model
    ({"reduce_bucket_size": "auto"}, 1, 500_000_000 * 4),  # accelerate cannot fill "auto" for a denoiser
    ({"reduce_bucket_size": 1_000_000, "overlap_comm": True}, 2, 2 * 1_000_000 * 4),  # double-buffered
    ({"reduce_bucket_size": 1_000_000, "overlap_comm": True}, 3, 1_000_000 * 4),  # stage 3: one bucket
    ({"contiguous_gradients": False}, 2, None),
])
def test_reduce_buckets_follow_the_deepspeed_config(zero_plan, zero, stage, expected):
    plan, _ = zero_plan(stage, deepspeed_config={"zero_optimization": zero})
    assert plan.per_rank.get("reduce buckets") == expected
    if expected:
        assert plan.training_peak >= expected  # counted in the peak per rank
    bf16, _ = zero_plan(stage, deepspeed_config={"zero_optimization": zero}, mixed_precision="bf16")
    assert bf16.per_rank.get("reduce buckets") == (expected // 2 if expected else None)


def test_optimizer_offload_leaves_only_stage_1s_whole_gradients_on_the_rank(zero_plan):
    offload = {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}
    planned = {stage: zero_plan(stage, deepspeed_config=offload, **FULL_BF16)[0].per_rank for stage in (1, 2, 3)}
    _, tensors = zero_plan(1, **FULL_BF16)
    assert planned[1]["gradients"] == sum(t.numel() for t in tensors.values()) * 2  # before the reduction
    assert planned[2]["gradients"] == planned[3]["gradients"] == 0  # partitions and masters on the host
    assert all(part["fp32 master weights"] == part["optimizer state"] == 0 for part in planned.values())


def test_plan_lines_name_the_new_parts_and_compare_with_one_process(zero_plan):
    from simpletuner.memory.units import format_size

    plan, _ = zero_plan(3, **FULL_BF16)
    text = "\n".join(plan.lines())
    for part in ("fp32 master weights", "reduce buckets", "persistent weights (ZeRO-3)"):
        assert part in text, part
    weights, gradients = plan.full["denoiser weights"], plan.full["gradients"]
    assert f"(1/2 of {format_size(weights)})" in text  # divided
    assert f"(one process: {format_size(gradients)})" in text  # 3/2 of it: not a fraction to print as one


# --- the census (simpletuner/training/shard_census.py) --------------------------------------------


def test_census_counts_each_storage_once_and_freed_storage_not_at_all():
    import torch

    from simpletuner.training.shard_census import Ledger

    ledger = Ledger()
    flat = torch.zeros(100)
    ledger.add("weights", flat[:10])  # a view: the whole flat buffer, padding included
    ledger.add("weights", flat[10:])
    ledger.add("gradients", flat)  # already counted, under the first category that saw it
    freed = torch.zeros(50)
    freed.untyped_storage().resize_(0)  # how FSDP2 and DeepSpeed free a gathered tensor
    ledger.add("weights", freed)
    ledger.add("weights", None)
    assert ledger.bytes == {"weights": 400}


def test_census_of_a_plain_step_finds_weights_gradients_and_adam_state(tmp_path):
    import torch

    from simpletuner.training.shard_census import Census

    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    model[1].requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    census = Census(model, optimizer, tmp_path, rank=0, context={"engine": "test"})
    census.install()
    for _ in range(3):
        model(torch.randn(2, 8)).sum().backward()
        optimizer.step()
    record = json.loads((tmp_path / "rank-0.json").read_text())
    assert set(record["moments"]) == {"1/before step", "1/after step", "2/before step", "2/after step"}
    trained, frozen = (8 * 16 + 16) * 4, (16 * 4 + 4) * 4
    assert record["moments"]["2/after step"] == {
        "trained weights": trained, "frozen weights": frozen, "gradients": trained,
        "optimizer state": 2 * trained + 2 * 4}  # two moments per weight, and each one's step count
    assert record["moments"]["1/before step"] == {"trained weights": trained, "frozen weights": frozen,
                                                  "gradients": trained}


# --- measured --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_measured_per_rank_parts_within_10_percent_of_the_plan(tmp_path):
    """Two steps on 2 gloo processes per case (about 10-15 s each here), in bf16: FSDP2 full training,
    whose trained slices accelerate keeps in fp32; ZeRO-3 LoRA, where the master weights, the buckets,
    the persistent parameters and the whole-model cast show. (The fp32 cases and the other stages are in
    the benchmark's table in documentation/MEMORY.md; their arithmetic is pinned above.)"""
    result = tmp_path / "result.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, str(BENCHMARK), "--cases", "fsdp2-full,zero3-lora", "--mixed-precision",
                          "bf16", "--work", str(tmp_path / "work"), "--json", str(result)],
                         capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, (run.stdout + run.stderr)[-6000:]
    cases = json.loads(result.read_text())
    assert [case["case"] for case in cases] == ["fsdp2-full", "zero3-lora"]
    for case in cases:
        parts = {row["part"]: row for row in case["rows"] if row["planned"] or row["measured"]}
        expected = {"weights", "gradients", "optimizer state"}
        if case["case"].startswith("zero"):
            expected |= {"fp32 master weights", "reduce buckets"}
        assert set(parts) == expected, case["case"]
        for part, row in parts.items():
            assert abs(row["ratio"] - 1) <= 0.10, (case["case"], part, row)
            assert row["rank1_measured"] == pytest.approx(row["measured"], rel=0.10), (case["case"], part)
