"""Probe: what FSDP2 (torch's ``fully_shard``) does with gloo on 2 CPU processes on this machine.

Run:  .venv/bin/python benchmarks/fsdp_probe.py        (starts 2 processes itself, prints one line per check)
      PROBE_CHECKS=lora,dcp runs only those; PROBE_TRACEBACK=1 prints the tracebacks of failures.

Each check runs in both processes and prints ``ok`` or the exception. Checks:
  full      fully_shard a tiny MLP stack, forward + backward + AdamW step, compared with one process
  lora      the same with a peft LoRA (base frozen, only adapters trained)
  state     get_model_state_dict(full_state_dict=True) gathers the same values as the unsharded model;
            set_model_state_dict loads them back
  dcp       torch.distributed.checkpoint save + load of the sharded model and optimizer state
  hsdp      a 2-D mesh (replicate=1 x shard=2 and replicate=2 x shard=1) with fully_shard
  accel     what accelerate does with FullyShardedDataParallelPlugin(fsdp_version=2) on CPU processes
            (finding: it stays MULTI_CPU and ignores the plugin; "ok" only means nothing raised)
  accel-forced  the same with the state marked FSDP afterwards (what simpletuner/training/fsdp.py does):
            accelerate's prepare, save_state/load_state (DCP) and get_state_dict on the CPU
Why a probe: the issue asks to prove on the CPU what can be proven before building on it.
"""

from __future__ import annotations

import copy
import os
import sys
import tempfile
import traceback

import torch
import torch.distributed as dist


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(16, 16)

        def forward(self, x):
            return x + torch.tanh(self.proj(x))

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList(Block() for _ in range(3))
            self.head = torch.nn.Linear(16, 4)

        def forward(self, x):
            for block in self.blocks:
                x = block(x)
            return self.head(x)

    return Net()


def shard(model: torch.nn.Module, mesh=None) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def batches(rank: int, world: int):
    generator = torch.Generator().manual_seed(1)
    data = [torch.randn(4, 16, generator=generator) for _ in range(2 * world)]
    return data[rank::world], data


def train_steps(model, optimizer, local):
    losses = []
    for x in local:
        loss = model(x).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def reference_after(model, all_batches, world):
    """One process: each step averages the gradients of the world's batches (what sharded DP computes)."""
    model = copy.deepcopy(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(len(all_batches) // world):
        for x in all_batches[step * world:(step + 1) * world]:
            (model(x).pow(2).mean() / world).backward()
        optimizer.step()
        optimizer.zero_grad()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def full_state(model):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def compare(full, reference) -> float:
    """Largest difference; the full state dict (cpu_offload) exists on rank 0 only, other ranks get 0."""
    if not full:
        return 0.0
    assert full.keys() == reference.keys(), (sorted(full)[:4], sorted(reference)[:4])
    return max(float((full[k] - reference[k]).abs().max()) for k in full)


def check_full(rank, world):
    base = tiny_model()
    local, everything = batches(rank, world)
    expected = reference_after(base, everything, world)
    model = shard(copy.deepcopy(base))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_steps(model, optimizer, local)
    return f"max |sharded - 1 process| = {compare(full_state(model), expected):.2e}"


def lora_model():
    from peft import LoraConfig, get_peft_model

    base = tiny_model()
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["proj"], init_lora_weights="gaussian"))
    return model


def check_lora(rank, world):
    model = lora_model()
    local, everything = batches(rank, world)
    expected = reference_after(model, everything, world)
    from torch.distributed.fsdp import fully_shard

    inner = model.base_model.model
    for block in inner.blocks:
        fully_shard(block)
    fully_shard(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    train_steps(model, optimizer, local)
    return f"max |sharded - 1 process| = {compare(full_state(model), expected):.2e}"


def check_state(rank, world):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    base = tiny_model()
    model = shard(copy.deepcopy(base))
    target = {k: v + 1 for k, v in base.state_dict().items()}
    # set_model_state_dict replaces the dict's values by DTensor shards: give it a copy
    set_model_state_dict(model, dict(target), options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))
    return f"round trip max diff = {compare(full_state(model), target):.2e}"


def check_dcp(rank, world, folder):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    local, _ = batches(rank, world)
    model = shard(tiny_model())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_steps(model, optimizer, local[:1])
    msd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=folder)
    continued = train_steps(model, optimizer, local[1:])
    fresh = shard(tiny_model())
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    msd, osd = get_state_dict(fresh, fresh_opt)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=folder)
    set_state_dict(fresh, fresh_opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    resumed = train_steps(fresh, fresh_opt, local[1:])
    assert resumed == continued, (resumed, continued)
    return f"resumed losses equal: {resumed}"


def check_hsdp(rank, world):
    from torch.distributed.device_mesh import init_device_mesh

    results = []
    for shape in ((1, world), (world, 1)):
        mesh = init_device_mesh("cpu", shape, mesh_dim_names=("replicate", "shard"))
        base = tiny_model()
        local, everything = batches(rank, world)
        expected = reference_after(base, everything, world)
        model = shard(copy.deepcopy(base), mesh=mesh)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        train_steps(model, optimizer, local)
        results.append(f"{shape[0]}x{shape[1]}: {compare(full_state(model), expected):.2e}")
    return ", ".join(results)


def check_accelerate(rank, world):
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, reshard_after_forward=True,
                                            auto_wrap_policy="transformer_based_wrap",
                                            transformer_cls_names_to_wrap=["Block"],
                                            state_dict_type="SHARDED_STATE_DICT")
    accelerator = Accelerator(fsdp_plugin=plugin, cpu=False)
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    local, _ = batches(rank, world)
    loss = model(local[0]).pow(2).mean()
    accelerator.backward(loss)
    optimizer.step()
    from torch.distributed.tensor import DTensor

    sharded = sum(isinstance(p, DTensor) for p in model.parameters())
    return (f"distributed_type={accelerator.distributed_type} device={accelerator.device} "
            f"DTensor params={sharded}/{len(list(model.parameters()))} is FSDP={accelerator.distributed_type == DistributedType.FSDP}")


def check_accelerate_forced(rank, world, folder):
    """accelerate's own FSDP2 code (prepare, save_state/load_state with DCP, get_state_dict) on the CPU, by
    marking the state FSDP after construction (accelerate leaves MULTI_CPU otherwise)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    AcceleratorState._reset_state(True)
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, reshard_after_forward=True,
                                            auto_wrap_policy="transformer_based_wrap",
                                            transformer_cls_names_to_wrap=["Block"],
                                            state_dict_type="SHARDED_STATE_DICT")
    accelerator = Accelerator(fsdp_plugin=plugin)
    state = AcceleratorState()
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    state.fsdp_plugin = plugin
    base = tiny_model()
    local, everything = batches(rank, world)
    expected = reference_after(base, everything, world)
    model = copy.deepcopy(base)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    from torch.distributed.tensor import DTensor

    sharded = sum(isinstance(p, DTensor) for p in model.parameters())
    losses = []
    for i, x in enumerate(local):
        loss = model(x).pow(2).mean()
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if i == 0:
            accelerator.save_state(os.path.join(folder, "acc"))
    full = accelerator.get_state_dict(model)
    difference = compare(full if rank == 0 else {}, expected)
    accelerator.load_state(os.path.join(folder, "acc"))
    resumed = []
    for x in local[1:]:
        loss = model(x).pow(2).mean()
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        resumed.append(loss.item())
    files = sorted(os.listdir(os.path.join(folder, "acc")))
    return (f"DTensor params={sharded}/{len(list(model.parameters()))}, gathered vs 1 process {difference:.2e}, "
            f"resume equal={resumed == losses[1:]}, files={files}")


def worker(rank: int, world: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), ACCELERATE_USE_CPU="1")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    checks = [("full", lambda: check_full(rank, world)), ("lora", lambda: check_lora(rank, world)),
              ("state", lambda: check_state(rank, world)), ("dcp", lambda: check_dcp(rank, world, folder)),
              ("hsdp", lambda: check_hsdp(rank, world)), ("accel", lambda: check_accelerate(rank, world)),
              ("accel-forced", lambda: check_accelerate_forced(rank, world, folder))]
    wanted = os.environ.get("PROBE_CHECKS", "").split(",") if os.environ.get("PROBE_CHECKS") else None
    for name, check in checks:
        if wanted and name not in wanted:
            continue
        try:
            result = "ok " + check()
        except Exception as error:  # the probe reports every failure and goes on
            result = f"FAILED {type(error).__name__}: {error}".splitlines()[0][:300]
            if os.environ.get("PROBE_TRACEBACK"):
                traceback.print_exc()
        if rank == 0:
            print(f"{name:6s} {result}", flush=True)
        dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    import socket

    import accelerate
    import peft
    import torch.multiprocessing as mp

    print(f"torch {torch.__version__}, accelerate {accelerate.__version__}, peft {peft.__version__}, "
          f"python {sys.version.split()[0]}, backend gloo, 2 CPU processes", flush=True)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(worker, args=(2, port, folder), nprocs=2, join=True)


if __name__ == "__main__":
    main()
