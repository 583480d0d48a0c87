"""Step time with ``--fuse_qkv_projections`` relative to the same model unfused, measured in one run.

Why: fusing is only worth its constraints (one LoRA ``A`` shared by q, k and v) if the step gets
faster on the hardware at hand. Two models of about 50M parameters from the real diffusers classes:
the SDXL-shaped UNet of benchmarks/memory.py and a Flux-shaped transformer (3 double and 6 single
blocks, width 512). For each, a LoRA step (rank 16 on q/k/v/out, AdamW) and a full fine-tuning step
(AdamW on every weight) of the fused model alternate with the same step of the unfused one, so
background load hits both alike; the median of the per-pair ratios is printed. Fused models are
built with simpletuner.models.qkv_fusion exactly as the trainer builds them.

    python benchmarks/qkv_fusion.py [--steps 5] [--warmup 1] [--device cpu|cuda] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FLUX_CONFIG = dict(
    patch_size=1, in_channels=64, num_layers=3, num_single_layers=6, attention_head_dim=64, num_attention_heads=8,
    joint_attention_dim=512, pooled_projection_dim=256, guidance_embeds=False, axes_dims_rope=(8, 28, 28),
)
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj"]


def build(name: str):
    """(fp32 model, function calling it on fixed inputs)."""
    import torch
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    from benchmarks.memory import UNET_CONFIG

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    if name == "unet":
        model = UNet2DConditionModel(**UNET_CONFIG)
        latents, text = torch.randn(1, 4, 32, 32, generator=g), torch.randn(1, 77, 192, generator=g)

        def call(module, device):
            return module(latents.to(device), torch.tensor([500], device=device),
                          encoder_hidden_states=text.to(device)).sample
    else:
        model = FluxTransformer2DModel(**FLUX_CONFIG)
        tokens = torch.randn(1, 256, 64, generator=g)
        text, pooled = torch.randn(1, 77, 512, generator=g), torch.randn(1, 256, generator=g)
        img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(16.0), torch.arange(16.0),
                                             indexing="ij"), -1).reshape(-1, 3)

        def call(module, device):
            return module(tokens.to(device), encoder_hidden_states=text.to(device),
                          pooled_projections=pooled.to(device), timestep=torch.tensor([0.5], device=device),
                          img_ids=img_ids.to(device), txt_ids=torch.zeros(77, 3, device=device)).sample
    return model.eval(), call


class Stepper:
    """Forward, backward and AdamW on a LoRA (``lora=True``) or on every weight, timed."""

    def __init__(self, model, call, device: str, lora: bool, fused: bool):
        import torch

        from simpletuner.models.adapters import add_lora
        from simpletuner.models.qkv_fusion import QkvFusion

        names = {name for name, _ in model.named_modules()}
        targets = [t for t in LORA_TARGETS if any(n.endswith("." + t) for n in names)]
        if fused:
            targets = QkvFusion.apply(model).adapter_targets(targets)
        if lora:
            add_lora(model, targets, 16, 16, 0.0)
        else:
            model.requires_grad_(True)
        self.model, self.call, self.device = model.to(device).train(), call, torch.device(device)
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step(self) -> float:
        import torch

        start = time.perf_counter()
        loss = self.call(self.model, self.device).float().pow(2).mean()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start


def measure(name: str, lora: bool, args) -> dict:
    base, call = build(name)
    plain = Stepper(copy.deepcopy(base), call, args.device, lora, fused=False)
    fused = Stepper(copy.deepcopy(base), call, args.device, lora, fused=True)
    for _ in range(args.warmup):
        plain.step(), fused.step()
    plain_times, fused_times = [], []
    for _ in range(args.steps):
        plain_times.append(plain.step())
        fused_times.append(fused.step())
    ratios = [f / p for f, p in zip(fused_times, plain_times)]
    trainable = sum(p.numel() for p in fused.model.parameters() if p.requires_grad)
    trainable_plain = sum(p.numel() for p in plain.model.parameters() if p.requires_grad)
    return {"model": name, "training": "LoRA r16" if lora else "full", "unfused_s": statistics.median(plain_times),
            "fused_s": statistics.median(fused_times), "ratio": statistics.median(ratios),
            "trainable_ratio": trainable / trainable_plain}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="measured step pairs per setting")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured step pairs first")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, fp32", flush=True)
    rows = [measure(name, lora, args) for name in ("unet", "flux") for lora in (True, False)]
    print("\n| model | training | unfused step (s) | fused step (s) | fused / unfused | trainable fused / unfused |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['model']} | {row['training']} | {row['unfused_s']:.3f} | {row['fused_s']:.3f} | "
              f"{row['ratio']:.3f} | {row['trainable_ratio']:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
