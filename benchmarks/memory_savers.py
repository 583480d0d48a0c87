"""Section 3 of benchmarks/memory.py: peak memory of a LoRA training step with gradient checkpointing
and with block swap, relative to the same step without.

Peak memory is measured, not estimated: ``simpletuner.memory.measure.measure_peak`` follows every
tensor an operator creates during one step (forward, backward, optimizer) and reports the peak of the
live bytes, weights, adapter, gradients and optimizer state included. On a CPU-only machine the
"accelerator" is the CPU, so for block swap the swapped blocks' masters (which would sit in host
memory) are subtracted: what remains is what would be resident on the compute device. The swapper
runs with ``copy_on_same_device`` so its copies are real allocations, measured like any other.

Two models, both real diffusers classes built from configs with seeded random weights:

- the SDXL-shaped UNet of sections 1-2 (about 55M parameters), in fp32, batch 2 at 32x32 latents
  (256 px): gradient checkpointing. Block swap does not apply to UNets.
- a FLUX-shaped transformer (FluxTransformer2DModel, hidden 384, 4 double + 8 single blocks, about
  40M parameters), fp32, batch 2 at 256 px (256 image tokens) with 64 text tokens: gradient
  checkpointing, block swap of half the blocks, and both.

Step times are medians of ``--steps`` steps after ``--warmup``; on the CPU a block swap "transfer" is
a memcpy, so its time says nothing about PCIe.
"""

from __future__ import annotations

import copy
import statistics
import time

FLUX_CONFIG = dict(patch_size=1, in_channels=64, num_layers=4, num_single_layers=8, attention_head_dim=64,
                   num_attention_heads=6, joint_attention_dim=256, pooled_projection_dim=128, guidance_embeds=True,
                   axes_dims_rope=(16, 24, 24))
FLUX_TEXT_TOKENS = 64
FLUX_IMAGE_TOKENS = 256  # 256 px: 32x32 latents packed 2x2


def _lora(model, targets):
    import torch
    from peft import LoraConfig

    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=16, lora_alpha=16, target_modules=list(targets), init_lora_weights="gaussian"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    for parameter in trainable:
        parameter.data = parameter.data.float()
    return model.train(), torch.optim.AdamW(trainable, lr=1e-4)


def _unet_step(model, optimizer, batch: int = 2):
    import torch

    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(batch, 4, 32, 32, generator=generator)
    text = torch.randn(batch, 77, 192, generator=generator)

    def step():
        loss = model(latents, torch.full((batch,), 500), encoder_hidden_states=text).sample.pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def _flux_step(model, optimizer, batch: int = 2):
    import torch

    generator = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(batch, FLUX_IMAGE_TOKENS, 64, generator=generator),
                  encoder_hidden_states=torch.randn(batch, FLUX_TEXT_TOKENS, 256, generator=generator),
                  pooled_projections=torch.randn(batch, 128, generator=generator), timestep=torch.full((batch,), 0.5),
                  img_ids=torch.zeros(FLUX_IMAGE_TOKENS, 3), txt_ids=torch.zeros(FLUX_TEXT_TOKENS, 3),
                  guidance=torch.full((batch,), 3.5), return_dict=False)

    def step():
        loss = model(**inputs)[0].pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def _measure(model, optimizer, step, args, subtract: int = 0) -> tuple[float, float]:
    from simpletuner.memory.measure import measure_peak

    for _ in range(max(1, args.warmup)):  # the optimizer state exists from the first step on
        step()
    peak = measure_peak(step, [model, optimizer]).total - subtract
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return peak, statistics.median(times)


def memory_options(args) -> list[dict]:
    """Rows: section, setting, peak_mib, peak_ratio, step_s, step_ratio."""
    import torch
    from diffusers import FluxTransformer2DModel

    from simpletuner.models.block_swap import WeightSwapper, last_blocks

    try:
        from benchmarks.memory import build_unet
    except ImportError:  # run as a script from benchmarks/
        from memory import build_unet

    rows = []

    def add(model_name, setting, peak, seconds, reference):
        rows.append({"section": "memory options", "setting": f"{model_name}: {setting}", "peak_mib": peak / 2**20,
                     "peak_ratio": peak / reference[0], "step_s": seconds, "step_ratio": seconds / reference[1]})
        print(f"  {model_name}, {setting}: peak {peak / 2**20:.1f} MiB ({peak / reference[0]:.2f}x), "
              f"step {seconds:.2f} s ({seconds / reference[1]:.2f}x)", flush=True)

    attention = ("to_q", "to_k", "to_v", "to_out.0")
    base_unet = build_unet().float()
    print(f"section 3: UNet {sum(p.numel() for p in base_unet.parameters()) / 1e6:.1f}M parameters, fp32, "
          "LoRA rank 16, batch 2 at 32x32 latents", flush=True)
    model, optimizer = _lora(copy.deepcopy(base_unet), attention)
    reference = _measure(model, optimizer, _unet_step(model, optimizer), args)
    add("unet", "no memory option", *reference, reference)
    model, optimizer = _lora(copy.deepcopy(base_unet), attention)
    model.enable_gradient_checkpointing()
    add("unet", "gradient checkpointing", *_measure(model, optimizer, _unet_step(model, optimizer), args), reference)
    del base_unet, model, optimizer

    torch.manual_seed(0)
    base_flux = FluxTransformer2DModel(**FLUX_CONFIG)
    blocks = [*base_flux.transformer_blocks, *base_flux.single_transformer_blocks]
    print(f"section 3: FLUX-shaped transformer {sum(p.numel() for p in base_flux.parameters()) / 1e6:.1f}M "
          f"parameters ({len(blocks)} blocks), fp32, LoRA rank 16, batch 2, {FLUX_IMAGE_TOKENS} image + "
          f"{FLUX_TEXT_TOKENS} text tokens", flush=True)

    def flux(checkpointing: bool, swap: int):
        model, optimizer = _lora(copy.deepcopy(base_flux), attention)
        if checkpointing:
            model.enable_gradient_checkpointing()
        masters = 0
        if swap:
            named = ([(f"transformer_blocks.{i}", b) for i, b in enumerate(model.transformer_blocks)]
                     + [(f"single_transformer_blocks.{i}", b) for i, b in enumerate(model.single_transformer_blocks)])
            swapper = WeightSwapper(last_blocks(named, swap), model, "cpu", "cpu", copy_on_same_device=True)
            masters = swapper.swapped_bytes
        return _measure(model, optimizer, _flux_step(model, optimizer), args, subtract=masters)

    half = len(blocks) // 2
    reference = flux(False, 0)
    add("flux", "no memory option", *reference, reference)
    add("flux", "gradient checkpointing", *flux(True, 0), reference)
    add("flux", f"block swap {half} of {len(blocks)}", *flux(False, half), reference)
    add("flux", f"block swap {half} + checkpointing", *flux(True, half), reference)
    return rows


def print_rows(rows: list[dict]) -> None:
    print()
    print("| setting | peak (MiB) | peak / without | step (s) | step / without |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['setting']} | {row['peak_mib']:.1f} | {row['peak_ratio']:.2f} | {row['step_s']:.2f} | "
              f"{row['step_ratio']:.2f} |")
