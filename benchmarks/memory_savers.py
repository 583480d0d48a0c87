"""Section 3 of benchmarks/memory.py: peak memory of a LoRA training step with gradient checkpointing
and with block swap, relative to the same step without.

Peak memory is measured, not estimated: ``simpletuner.memory.measure.measure_peak`` follows every
tensor an operator creates during one step (forward, backward, optimizer) and reports the peak of the
live bytes, weights, adapter, gradients and optimizer state included. On a CPU-only machine the
"accelerator" is the CPU, so for block swap the swapped blocks' masters (which would sit in host
memory) are subtracted: what remains is what would be resident on the compute device. The swapper
runs with ``copy_on_same_device`` so its copies are real allocations, measured like any other.

The models are those of sections 1-2 (``UNET_CONFIG`` and ``MMDIT_CONFIG`` of benchmarks/memory.py,
about 55M parameters each), here in fp32 with a rank-16 PEFT LoRA on the attention projections, at
batch 2 with 32x32 latents (256 px; the MMDiT sees 256 image + 77 text tokens) so that activations
matter: gradient checkpointing on both; block swap (half the blocks) and both together on the MMDiT
(block swap needs repeated transformer blocks; a UNet has none).

Step times are medians of ``--steps`` steps after ``--warmup``; on the CPU a block swap "transfer" is
a memcpy, so its time says nothing about PCIe.
"""

from __future__ import annotations

import copy
import statistics
import time

BATCH = 2
LATENT_EDGE = 32
TEXT_TOKENS = 77


def _lora(model, targets):
    import torch
    from peft import LoraConfig

    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=16, lora_alpha=16, target_modules=list(targets), init_lora_weights="gaussian"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    for parameter in trainable:
        parameter.data = parameter.data.float()
    return model.train(), torch.optim.AdamW(trainable, lr=1e-4)


def _step(model, optimizer, name: str, configs: dict, device):
    """One LoRA training step on fixed inputs (forward, backward, AdamW)."""
    import torch

    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(BATCH, 4, LATENT_EDGE, LATENT_EDGE, generator=generator).to(device)
    timestep = torch.full((BATCH,), 500, device=device)
    if name == "unet":
        text = torch.randn(BATCH, TEXT_TOKENS, configs["unet"]["cross_attention_dim"], generator=generator).to(device)

        def forward():
            return model(latents, timestep, encoder_hidden_states=text).sample
    else:
        text = torch.randn(BATCH, TEXT_TOKENS, configs["mmdit"]["joint_attention_dim"], generator=generator).to(device)
        pooled = torch.randn(BATCH, configs["mmdit"]["pooled_projection_dim"], generator=generator).to(device)

        def forward():
            return model(hidden_states=latents, encoder_hidden_states=text, pooled_projections=pooled,
                         timestep=timestep).sample

    def step():
        loss = forward().pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def _measure(model, optimizer, step, args, device, subtract: int = 0) -> tuple[float, float]:
    import torch

    from simpletuner.memory.measure import measure_peak

    for _ in range(max(1, args.warmup)):  # the optimizer state exists from the first step on
        step()
    peak = measure_peak(step, [model, optimizer], device=device).total - subtract
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return peak, statistics.median(times)


def memory_options(args) -> list[dict]:
    """Rows: model, section, setting, peak_mib, peak_ratio, step_s, step_ratio."""
    import torch
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel

    from simpletuner.models.block_swap import WeightSwapper, last_blocks

    try:
        from benchmarks.memory import MMDIT_CONFIG, UNET_CONFIG
    except ImportError:  # run from inside benchmarks/
        from memory import MMDIT_CONFIG, UNET_CONFIG
    configs = {"unet": UNET_CONFIG, "mmdit": MMDIT_CONFIG}
    classes = {"unet": UNet2DConditionModel, "mmdit": SD3Transformer2DModel}
    attention = ("to_q", "to_k", "to_v", "to_out.0")
    device = torch.device(getattr(args, "device", "cpu"))
    on_cpu = device.type == "cpu"  # then the swap device is the compute device: copy, and subtract the masters
    rows = []
    for name in [n.strip() for n in getattr(args, "models", "unet,mmdit").split(",")]:
        torch.manual_seed(0)
        base = classes[name](**configs[name])
        blocks = list(getattr(base, "transformer_blocks", []))
        print(f"section 3, {name}: {sum(p.numel() for p in base.parameters()) / 1e6:.1f}M parameters, fp32, LoRA "
              f"rank 16, batch {BATCH} at {LATENT_EDGE}x{LATENT_EDGE} latents", flush=True)

        def run(checkpointing: bool, swap: int, base=base, name=name):
            model, optimizer = _lora(copy.deepcopy(base).to(device), attention)
            if checkpointing:
                model.enable_gradient_checkpointing()
            masters = 0
            if swap:
                named = [(f"transformer_blocks.{i}", block) for i, block in enumerate(model.transformer_blocks)]
                swapper = WeightSwapper(last_blocks(named, swap), model, device, "cpu", copy_on_same_device=on_cpu)
                masters = swapper.swapped_bytes if on_cpu else 0
            return _measure(model, optimizer, _step(model, optimizer, name, configs, device), args, device,
                            subtract=masters)

        settings = [("no memory option", False, 0), ("gradient checkpointing", True, 0)]
        if blocks:
            half = len(blocks) // 2
            settings += [(f"block swap {half} of {len(blocks)} blocks", False, half),
                         (f"block swap {half} + gradient checkpointing", True, half)]
        reference = None
        for setting, checkpointing, swap in settings:
            peak, seconds = run(checkpointing, swap)
            reference = reference or (peak, seconds)
            rows.append({"model": name, "section": "memory options", "setting": setting, "peak_mib": peak / 2**20,
                         "peak_ratio": peak / reference[0], "step_s": seconds, "step_ratio": seconds / reference[1]})
            print(f"  {setting}: peak {peak / 2**20:.1f} MiB ({peak / reference[0]:.2f}x), step {seconds:.2f} s "
                  f"({seconds / reference[1]:.2f}x)", flush=True)
        del base, run
    return rows


def print_rows(rows: list[dict]) -> None:
    print()
    print("| model | memory option | peak (MiB) | peak / without | LoRA step (s) | step / without |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['model']} | {row['setting']} | {row['peak_mib']:.1f} | {row['peak_ratio']:.2f} | "
              f"{row['step_s']:.2f} | {row['step_ratio']:.2f} |")
