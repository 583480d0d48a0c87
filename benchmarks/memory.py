"""Memory of a quantized base model, and what training a LoRA on top of it costs per step.

Why: users quantize the base to fit a big model on a small GPU. What they need to know is how much
of the weight memory each preset saves and how much slower the LoRA step gets. Absolute numbers
depend on the machine; the ratios against the unquantized model, measured in the same run, are what
the targets apply to.

Two models of about 55M parameters, built from the real diffusers classes with random weights:

* **UNet**: UNet2DConditionModel shaped like SDXL's UNet, narrower: SDXL's channel ratios (1:2:4),
  transformer depths (1, 2, 10), two layers per block and linear projections, at 48/96/192 channels
  with 192-wide cross-attention; 86 % of its parameters are in Linear layers (SDXL: 87 %).
* **MMDiT**: SD3Transformer2DModel with 6 joint blocks of width 512; 99.8 % Linear, like every
  transformer family (SD3, Flux, PixArt, ...).

The share matters: bitsandbytes and torchao quantize Linear layers only (torchao's tensors have no
convolution op, bitsandbytes no 4-bit convolution), so under their presets quantize_module quantizes
the remaining convolutions with optimum-quanto at the matching precision (int8, or int4 for
nf4-bnb); optimum-quanto's own presets quantize them directly. Before that, the UNet's convolutions
(14 % of its parameters) stayed bf16 under torchao and bitsandbytes, which then missed the targets
(0.58 and 0.37 of the bf16 bytes).

1. **Weight memory** of int8-quanto, int4-quanto, int8-torchao and nf4-bnb relative to the bf16
   model: bytes actually stored by parameters and buffers (the packed data and scales inside
   quanto / torchao tensors, and bitsandbytes' per-block statistics), each preset applied to a copy
   of the bf16 model with simpletuner.models.quantize.quantize_module, as the trainer does.
   Targets: int8 <= 0.55, 4-bit <= 0.35.
2. **LoRA step time** on top of each base relative to the unquantized base: PEFT LoRA rank 16 on
   the attention projections (to_q, to_k, to_v, to_out.0), forward + backward + AdamW step, batch 1
   at 16x16 latents with 77 text tokens. Each quantized step alternates with a step of the
   unquantized model, so background load hits both alike; the median of ``--steps`` per-pair ratios
   is reported (after ``--warmup`` unmeasured steps). The compute type is ``--compute-dtype``: fp32
   by default, because bf16 kernels on a CPU are slow and erratic (a bf16 step of the UNet took
   8-30 s here against 1.7 s in fp32), which would make every quantized base look fast; on a GPU
   pass ``--device cuda --compute-dtype bf16`` (autocast, weights held in bf16). Each timed base is
   quantized, on ``--device``, from a copy held in the compute type.

3. **Memory options** (benchmarks/memory_savers.py): measured peak memory of a LoRA step with gradient
   checkpointing, with block swap (the MMDiT's blocks) and with both, relative to without, on the
   same two models in fp32 at batch 2, 256 px. Printed as a table of its own.

4. **Breakdown** (``--breakdown``): where each setting's weight bytes go, by layer kind (Linear,
   Conv2d, norm, ...) and part (quantized data, scales and offsets, unquantized weights, biases,
   buffers), as shares of the bf16 model's bytes (simpletuner.models.quantize.weight_breakdown).
   It shows what caps a preset's saving: the layers and tensors left in high precision, and the
   scales a format adds per row or group. ``--steps 0`` measures weights only (no timing, no
   section 3).

    python benchmarks/memory.py [--steps 3] [--warmup 1] [--device cpu|cuda] [--compute-dtype fp32|bf16]
                                [--models unet,mmdit] [--threads N] [--breakdown] [--json FILE]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PRESETS = ("int8-quanto", "int4-quanto", "int8-torchao", "nf4-bnb")
TARGETS = {"int8-quanto": 0.55, "int8-torchao": 0.55, "int4-quanto": 0.35, "nf4-bnb": 0.35}
UNET_CONFIG = dict(
    sample_size=32, in_channels=4, out_channels=4, block_out_channels=(48, 96, 192), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), cross_attention_dim=192, attention_head_dim=8, norm_num_groups=16,
    use_linear_projection=True,
)
MMDIT_CONFIG = dict(
    sample_size=32, patch_size=2, in_channels=4, out_channels=4, num_layers=6, attention_head_dim=64,
    num_attention_heads=8, joint_attention_dim=512, caption_projection_dim=512, pooled_projection_dim=256,
    pos_embed_max_size=64,
)


def build(name: str):
    """The model (bf16, eval) and a function that calls it on fixed inputs of a dtype."""
    import torch
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel

    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 16, 16, generator=generator)
    timestep = torch.tensor([500])
    if name == "unet":
        model = UNet2DConditionModel(**UNET_CONFIG)
        text = torch.randn(1, 77, UNET_CONFIG["cross_attention_dim"], generator=generator)

        def call(module, dtype, device):
            return module(latents.to(device, dtype), timestep.to(device),
                          encoder_hidden_states=text.to(device, dtype)).sample
    else:
        model = SD3Transformer2DModel(**MMDIT_CONFIG)
        text = torch.randn(1, 77, MMDIT_CONFIG["joint_attention_dim"], generator=generator)
        pooled = torch.randn(1, MMDIT_CONFIG["pooled_projection_dim"], generator=generator)

        def call(module, dtype, device):
            return module(hidden_states=latents.to(device, dtype), encoder_hidden_states=text.to(device, dtype),
                          pooled_projections=pooled.to(device, dtype), timestep=timestep.to(device)).sample
    return model.to(torch.bfloat16).eval(), call


def linear_share(model) -> float:
    import torch

    total = sum(p.numel() for p in model.parameters())
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)) / total


class LoraStepper:
    """A LoRA training step (forward, backward, AdamW) on a model, timed."""

    def __init__(self, model, call, compute_dtype, device):
        import torch
        from peft import LoraConfig

        model.add_adapter(LoraConfig(r=16, lora_alpha=16, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                     init_lora_weights="gaussian"))
        trainable = [p for p in model.parameters() if p.requires_grad]
        for parameter in trainable:
            parameter.data = parameter.data.float()  # adapters train in fp32, as simpletuner's add_lora does
        self.model = model.to(device).train()
        self.device = torch.device(device)
        self.call = call
        self.optimizer = torch.optim.AdamW(trainable, lr=1e-4)
        self.compute_dtype = compute_dtype

    def step(self) -> float:
        import torch

        start = time.perf_counter()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.compute_dtype == torch.bfloat16):
            prediction = self.call(self.model, self.compute_dtype, self.device)
        loss = prediction.float().pow(2).mean()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss {loss.item()}")
        return time.perf_counter() - start


def quantized_base(name: str, args) -> list[dict]:
    """Weight memory and LoRA step time of each preset on one model, relative to the unquantized one."""
    import torch

    from simpletuner.models.quantize import quantize_module, quantized_layers, weight_breakdown, weight_bytes

    compute_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.compute_dtype]
    base, call = build(name)
    timed_base = copy.deepcopy(base).to(compute_dtype)
    reference_bytes = weight_bytes(base)
    print(f"{name}: {type(base).__name__} {sum(p.numel() for p in base.parameters()) / 1e6:.1f}M parameters, "
          f"{100 * linear_share(base):.1f}% in Linear layers, bf16 weights {reference_bytes / 2**20:.1f} MiB",
          flush=True)
    timed = args.steps > 0
    if timed:
        reference = LoraStepper(copy.deepcopy(timed_base), call, compute_dtype, args.device)
        for _ in range(args.warmup):
            reference.step()
    reference_times = []
    rows = [{"model": name, "setting": "unquantized (bf16 weights)", "weight_mib": reference_bytes / 2**20,
             "weight_ratio": 1.0, "step_s": None, "step_ratio": 1.0 if timed else None, "target": None,
             "layers": 0, "breakdown": breakdown_of(weight_breakdown(base)) if args.breakdown else None}]
    for preset in PRESETS:
        model = copy.deepcopy(base)
        quantize_module(model, preset)
        stored = weight_bytes(model)
        layers = quantized_layers(model)
        parts = breakdown_of(weight_breakdown(model)) if args.breakdown else None
        del model
        if not timed:
            rows.append({"model": name, "setting": preset, "weight_mib": stored / 2**20,
                         "weight_ratio": stored / reference_bytes, "step_s": None, "step_ratio": None,
                         "target": TARGETS[preset], "layers": layers, "breakdown": parts})
            print(f"  {preset}: weights {stored / reference_bytes:.3f} of bf16", flush=True)
            continue
        model = copy.deepcopy(timed_base).to(args.device)
        quantize_module(model, preset, via="accelerator")  # quantized where it will run
        stepper = LoraStepper(model, call, compute_dtype, args.device)
        for _ in range(args.warmup):
            stepper.step()
        ratios, times = [], []
        for _ in range(args.steps):  # alternate with the unquantized step: background load hits both alike
            before = reference.step()
            reference_times.append(before)
            times.append(stepper.step())
            ratios.append(times[-1] / before)
        rows.append({"model": name, "setting": preset, "weight_mib": stored / 2**20,
                     "weight_ratio": stored / reference_bytes, "step_s": statistics.median(times),
                     "step_ratio": statistics.median(ratios), "target": TARGETS[preset], "layers": layers,
                     "breakdown": parts})
        print(f"  {preset}: weights {stored / reference_bytes:.3f} of bf16, step {statistics.median(times):.3f} s, "
              f"{statistics.median(ratios):.2f}x the unquantized step", flush=True)
        del model, stepper
    if timed:
        rows[0]["step_s"] = statistics.median(reference_times)
    return rows


def breakdown_of(parts: dict[tuple[str, str], int]) -> dict[str, int]:
    """weight_breakdown's (kind, part) keys as "kind: part" strings, so the rows stay JSON."""
    return {f"{kind}: {part}": count for (kind, part), count in parts.items()}


def quantized_bases(args) -> list[dict]:
    """Sections 1 and 2, for each model of ``--models``."""
    return [row for name in args.models.split(",") for row in quantized_base(name.strip(), args)]


def memory_options(args) -> list[dict]:
    """Section 3: peak memory with gradient checkpointing and with block swap (benchmarks/memory_savers.py)."""
    if args.steps <= 0:  # weights only
        return []
    from benchmarks.memory_savers import memory_options as measure

    return measure(args)


#: Each section returns rows: model, setting, and its measurements (None where not measured).
SECTIONS = [quantized_bases, memory_options]


def print_table(rows: list[dict]) -> None:
    from benchmarks.memory_savers import print_rows

    options = [row for row in rows if row.get("section") == "memory options"]  # section 3 has its own table
    rows = [row for row in rows if row.get("section") != "memory options"]
    print()
    print("| model | setting | quantized layers | weights (MiB) | weights / bf16 | target | LoRA step (s) | "
          "step / unquantized |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        target = row.get("target")
        verdict = "-" if target is None else f"<= {target} {'met' if row['weight_ratio'] <= target else 'MISSED'}"
        step = "-" if row.get("step_s") is None else f"{row['step_s']:.3f}"
        step_ratio = "-" if row.get("step_ratio") is None else f"{row['step_ratio']:.2f}"
        print(f"| {row['model']} | {row['setting']} | {row.get('layers') or '-'} | {row['weight_mib']:.1f} | "
              f"{row['weight_ratio']:.3f} | {verdict} | {step} | {step_ratio} |")
    for model in dict.fromkeys(row["model"] for row in rows if row.get("breakdown")):
        print_breakdown([row for row in rows if row["model"] == model and row.get("breakdown")])
    if options:
        print_rows(options)


def print_breakdown(rows: list[dict]) -> None:
    """Section 4 for one model: each (layer kind: part) as a share of the bf16 model's bytes, one column
    per setting; parts under 0.0005 in every setting are summed into the last line."""
    model = rows[0]["model"]
    reference = rows[0]["weight_mib"] * 2**20
    keys = sorted({key for row in rows for key in row["breakdown"]},
                  key=lambda key: -max(row["breakdown"].get(key, 0) for row in rows))
    shown = [key for key in keys if any(row["breakdown"].get(key, 0) / reference >= 0.0005 for row in rows)]
    small = [key for key in keys if key not in shown]
    settings = [row["setting"].split(" ")[0] for row in rows]
    print()
    print(f"| {model}: share of the bf16 bytes | " + " | ".join(settings) + " |")
    print("| --- |" + " --- |" * len(rows))
    for key in shown:
        print(f"| {key} | " + " | ".join(f"{row['breakdown'].get(key, 0) / reference:.4f}" for row in rows) + " |")
    if small:
        print("| everything else | " + " | ".join(
            f"{sum(row['breakdown'].get(key, 0) for key in small) / reference:.4f}" for row in rows) + " |")
    print("| total | " + " | ".join(f"{row['weight_ratio']:.4f}" for row in rows) + " |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="measured LoRA steps per setting")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured steps first")
    parser.add_argument("--compute-dtype", choices=("fp32", "bf16"), default="fp32",
                        help="type the timed steps compute in (bf16: autocast, for GPUs)")
    parser.add_argument("--models", default="unet,mmdit", help="comma-separated: unet, mmdit")
    parser.add_argument("--device", default="cpu", help="where the timed steps run: cpu or cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--breakdown", action="store_true",
                        help="also print where the weight bytes go, by layer kind and part")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, compute "
          f"{args.compute_dtype}", flush=True)
    rows = [row for section in SECTIONS for row in section(args)]
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
