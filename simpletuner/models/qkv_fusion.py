"""``--fuse_qkv_projections``: one matmul for an attention layer's query, key and value.

Why: three small GEMMs over the same input cost more launches and memory reads than one GEMM three
times as wide; with Flash Attention 3 on Hopper GPUs the attention itself is fast enough for that
difference to show. diffusers can fuse (``fuse_qkv_projections()`` on UNets and transformers), but
it keeps the original ``to_q/to_k/to_v`` next to the new ``to_qkv`` and never splits anything back,
which is fine for inference and wrong for training: the originals would sit in memory unused, a
full fine-tune would save stale weights, and a LoRA would be saved under names no loader knows.

So training with fused projections works like this:

* :meth:`QkvFusion.apply` lets diffusers fuse, records each group (fused module -> its parts and
  their output sizes), and deletes the parts. It runs right after loading, before quantization,
  because a quantized weight cannot be concatenated.
* A LoRA asked for on ``to_q``, ``to_k`` and ``to_v`` goes on ``to_qkv`` instead
  (:meth:`~QkvFusion.adapter_targets`). One LoRA on the fused matrix is ``B A`` with ``B`` of shape
  ``(3d, r)``: its three row blocks are exact LoRAs of the three projections sharing one ``A``. That
  is how the adapter is written (:meth:`~QkvFusion.split_lora_state`), so every saved file is a
  plain per-projection LoRA for an unfused model; reading one back merges the blocks again
  (:meth:`~QkvFusion.merge_lora_state`), exactly when the parts share ``A``.
* A full fine-tune is saved from a temporarily unfused module tree (:meth:`~QkvFusion.unfused`).

The sharing of ``A`` is the one thing users see: a fused LoRA has fewer parameters than three
separate ones of the same rank.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import torch

#: Attribute of the denoiser holding its :class:`QkvFusion` (a plain attribute, not a submodule).
FUSION_ATTRIBUTE = "qkv_fusion"
#: diffusers' fused module names -> the projections each replaces, in concatenation order.
FUSED_LAYOUTS = {
    "to_qkv": ("to_q", "to_k", "to_v"),
    "to_kv": ("to_k", "to_v"),
    "to_added_qkv": ("add_q_proj", "add_k_proj", "add_v_proj"),
}
#: LoRA tensors whose rows follow the layer's output features (split / concatenated with them).
ROW_TENSORS = ("lora_B.weight", "lora_B.bias", "lora_magnitude_vector")


class QkvFusionError(ValueError):
    """Projections that cannot be fused, or an adapter that cannot be mapped onto fused ones."""


@dataclass(frozen=True)
class FusedGroup:
    """One fused projection: its module path, the paths of the projections it replaced (relative
    to the denoiser, in concatenation order) and their output sizes."""

    fused: str
    parts: tuple[str, ...]
    sizes: tuple[int, ...]

    def row_ranges(self) -> list[tuple[int, int]]:
        """Where each part's output rows sit in the fused layer."""
        ranges, start = [], 0
        for size in self.sizes:
            ranges.append((start, start + size))
            start += size
        return ranges


def fusion_of(denoiser: torch.nn.Module) -> "QkvFusion | None":
    """The fusion applied to ``denoiser``, if any."""
    return getattr(denoiser, FUSION_ATTRIBUTE, None)


def _matches(name: str, target: str) -> bool:
    """PEFT's rule for a target name: the module's full name or a dotted suffix of it."""
    return name == target or name.endswith("." + target)


def _split_path(path: str) -> tuple[str, str]:
    parent, _, leaf = path.rpartition(".")
    return parent, leaf


class QkvFusion:
    """The fused groups of one denoiser and the translations between fused and unfused names."""

    def __init__(self, groups: list[FusedGroup]):
        self.groups = groups
        self.by_fused = {group.fused: group for group in groups}
        self.by_part = {part: group for group in groups for part in group.parts}

    # --- fusing ----------------------------------------------------------------------------------------

    @classmethod
    def apply(cls, denoiser: torch.nn.Module) -> "QkvFusion":
        """Fuse ``denoiser``'s projections in place (diffusers' own fusion, its fused attention
        processors), delete the replaced projections, and remember the layout on the denoiser."""
        if fusion_of(denoiser) is not None:
            return fusion_of(denoiser)
        fuse = getattr(denoiser, "fuse_qkv_projections", None)
        if not callable(fuse):
            raise QkvFusionError(f"{type(denoiser).__name__} has no fused attention in diffusers; remove "
                                 "`--fuse_qkv_projections`")
        try:
            fuse()
        except ValueError as error:  # diffusers refuses attention with added key/value projections
            raise QkvFusionError(f"`--fuse_qkv_projections`: {error}") from None
        groups = []
        for path, module in list(denoiser.named_modules()):
            for fused_name, part_names in FUSED_LAYOUTS.items():
                parts = [getattr(module, name, None) for name in part_names]
                if not isinstance(getattr(module, fused_name, None), torch.nn.Linear):
                    continue
                if not all(isinstance(part, torch.nn.Linear) for part in parts):
                    continue
                prefix = f"{path}." if path else ""
                groups.append(FusedGroup(f"{prefix}{fused_name}", tuple(prefix + name for name in part_names),
                                         tuple(part.out_features for part in parts)))
                for name in part_names:
                    delattr(module, name)
        if not groups:
            raise QkvFusionError(f"`--fuse_qkv_projections`: {type(denoiser).__name__} has no projections to fuse")
        fusion = cls(groups)
        setattr(denoiser, FUSION_ATTRIBUTE, fusion)
        return fusion

    # --- names -------------------------------------------------------------------------------------------

    def unfused_paths(self, paths: set[str]) -> set[str]:
        """The module paths an unfused model has, given the fused model's ``paths``."""
        return (set(paths) - set(self.by_fused)) | set(self.by_part)

    def adapter_targets(self, targets: list[str]) -> list[str]:
        """LoRA target names for the fused model: ``targets`` plus every fused projection whose
        parts they all name. A target naming only some parts of a group cannot be honoured (the
        fused layer takes one adapter), so that is an error."""
        fused = []
        for group in self.groups:
            named = [part for part in group.parts if any(_matches(part, target) for target in targets)]
            if len(named) == len(group.parts):
                fused.append(group.fused)
            elif named:
                missing = sorted(set(group.parts) - set(named))
                raise QkvFusionError(
                    f"`--fuse_qkv_projections` puts one LoRA on {group.fused}, but the targets name only "
                    f"{[p.rsplit('.', 1)[-1] for p in named]} of its projections (not {missing[0]}); target all of "
                    f"{[p.rsplit('.', 1)[-1] for p in group.parts]} or remove `--fuse_qkv_projections`")
        return [*targets, *fused]

    # --- adapter tensors ---------------------------------------------------------------------------------

    def split_lora_state(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """PEFT-layout LoRA tensors of the fused model -> the same adapter on the unfused projections
        (each part gets ``A`` and its own rows of ``B``; exact)."""
        out: dict[str, torch.Tensor] = {}
        for key, tensor in state.items():
            group, role = self._owner(key, self.by_fused)
            if group is None:
                out[key] = tensor
                continue
            for part, (start, end) in zip(group.parts, group.row_ranges()):
                out[f"{part}.{role}"] = tensor[start:end].clone() if role in ROW_TENSORS else tensor.clone()
        return out

    def merge_lora_state(self, state: Mapping[str, torch.Tensor], alphas: Mapping[str, float] | None = None,
                         source: str = "file") -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Per-projection LoRA tensors (a file) -> tensors for the fused layers, with their alphas.

        Exact when the parts of a group share one ``A`` (every file this trainer writes); a part the
        file does not adapt gets zero rows of ``B``. Parts with different ``A`` matrices would need
        three times the rank, which the fused adapter does not have: that is an error naming the layer.
        """
        alphas = dict(alphas or {})
        out: dict[str, torch.Tensor] = {}
        pending: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
        for key, tensor in state.items():
            group, role = self._owner(key, self.by_part)
            if group is None:
                out[key] = tensor
                continue
            part = key[: -len(role) - 1]
            pending.setdefault(group.fused, {}).setdefault(part, {})[role] = tensor
        merged_alphas = {path: alpha for path, alpha in alphas.items() if path not in self.by_part}
        for fused, parts in pending.items():
            group = self.by_fused[fused]
            tensors, alpha = self._merge_group(group, parts, alphas, source)
            out.update({f"{fused}.{role}": tensor for role, tensor in tensors.items()})
            if alpha is not None:
                merged_alphas[fused] = alpha
        return out, merged_alphas

    def _merge_group(self, group: FusedGroup, parts: dict[str, dict[str, torch.Tensor]], alphas: Mapping[str, float],
                     source: str) -> tuple[dict[str, torch.Tensor], float | None]:
        present = [part for part in group.parts if part in parts]
        first = parts[present[0]]
        shared_a = first.get("lora_A.weight")
        if shared_a is None:
            raise QkvFusionError(f"{source}: {present[0]} has no lora_A weight")
        for part in present[1:]:
            other = parts[part].get("lora_A.weight")
            if other is None or other.shape != shared_a.shape or not torch.equal(other.to(shared_a.dtype), shared_a):
                raise QkvFusionError(
                    f"{source}: {present[0]} and {part} have different LoRA A matrices, so they cannot become one LoRA "
                    f"on the fused {group.fused} at the same rank; remove `--fuse_qkv_projections` to use this file")
        alpha = alphas.get(present[0])
        tensors = {"lora_A.weight": shared_a}
        for role in ROW_TENSORS:
            if not any(role in parts[part] for part in present):
                continue
            blocks = []
            for part, size in zip(group.parts, group.sizes):
                block = parts.get(part, {}).get(role)
                if block is None:
                    if role != "lora_B.weight":  # a missing B is "no change"; a missing magnitude is not
                        raise QkvFusionError(f"{source}: {part} has no {role} but {present[0]} does; the fused "
                                             f"{group.fused} needs it for every projection")
                    block = torch.zeros(size, shared_a.shape[0], dtype=shared_a.dtype)
                elif role.startswith("lora_B") and alpha is not None and alphas.get(part, alpha) != alpha:
                    block = block.float() * (alphas[part] / alpha)  # one alpha for the fused layer: rescale B
                blocks.append(block.to(torch.promote_types(block.dtype, shared_a.dtype)))
            tensors[role] = torch.cat(blocks, dim=0)
        return tensors, alpha

    @staticmethod
    def _owner(key: str, groups: Mapping[str, FusedGroup]) -> tuple[FusedGroup | None, str]:
        """The group whose module ``key`` belongs to (looked up in ``groups``), and the tensor role."""
        path, sep, role = key.partition(".lora_")
        group = groups.get(path) if sep else None
        if group is None:
            return None, ""
        role = "lora_" + role
        if not (role.startswith("lora_A.") or role in ROW_TENSORS):
            raise QkvFusionError(f"{key}: a LoRA tensor of a fused projection that cannot be split ({role})")
        return group, role

    # --- full weights ------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def unfused(self, denoiser: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """While saving a full model: the original projections back (CPU copies of the fused rows),
        the fused ones removed, so ``state_dict()`` and ``save_pretrained`` see the unfused layout.
        Nothing runs the model inside; on exit the fused layers are back exactly as they were."""
        removed: list[tuple[FusedGroup, torch.nn.Module, torch.nn.Module]] = []
        try:
            for group in self.groups:
                parent_path, fused_name = _split_path(group.fused)
                parent = denoiser.get_submodule(parent_path)
                fused = getattr(parent, fused_name)
                removed.append((group, parent, fused))
                for part, (start, end) in zip(group.parts, group.row_ranges()):
                    setattr(parent, _split_path(part)[1], _linear_rows(fused, start, end))
                delattr(parent, fused_name)
            yield denoiser
        finally:
            for group, parent, fused in removed:
                for part in group.parts:
                    name = _split_path(part)[1]
                    if hasattr(parent, name):
                        delattr(parent, name)
                setattr(parent, _split_path(group.fused)[1], fused)


def _linear_rows(layer: torch.nn.Linear, start: int, end: int) -> torch.nn.Linear:
    """A CPU ``nn.Linear`` holding output rows ``start:end`` of ``layer``."""
    weight = layer.weight.detach()
    part = torch.nn.Linear(weight.shape[1], end - start, bias=layer.bias is not None, device="cpu", dtype=weight.dtype)
    with torch.no_grad():
        part.weight.copy_(weight[start:end])
        if layer.bias is not None:
            part.bias.copy_(layer.bias.detach()[start:end])
    return part


def describe(fusion: QkvFusion) -> dict[str, Any]:
    """Counts for the startup log."""
    kinds: dict[str, int] = {}
    for group in fusion.groups:
        leaf = group.fused.rsplit(".", 1)[-1]
        kinds[leaf] = kinds.get(leaf, 0) + 1
    return kinds


def select_attention(denoiser: torch.nn.Module, device: torch.device) -> str:
    """Flash Attention 3 for the fused model where diffusers can route its attention there (a Hopper
    GPU, the ``flash_attn_interface`` package, processors that go through diffusers' dispatcher, as
    Flux's do); otherwise the processors' own PyTorch SDPA. Returns what was chosen and why, for the
    startup log."""
    reason = _flash_3_unavailable(denoiser, device)
    if reason:
        return f"PyTorch SDPA ({reason})"
    denoiser.set_attention_backend("_flash_3")
    return "Flash Attention 3"


def _flash_3_unavailable(denoiser: torch.nn.Module, device: torch.device) -> str:
    if device.type != "cuda":
        return f"Flash Attention 3 needs a CUDA GPU; training runs on {device.type}"
    major, minor = torch.cuda.get_device_capability(device)
    if major != 9:
        return f"Flash Attention 3 needs a Hopper GPU (compute capability 9.x); this one is {major}.{minor}"
    from diffusers.models import attention_dispatch

    if not getattr(attention_dispatch, "_CAN_USE_FLASH_ATTN_3", False):
        return "the flash_attn_interface package (Flash Attention 3) is not installed"
    processors = getattr(denoiser, "attn_processors", {}).values()
    if not callable(getattr(denoiser, "set_attention_backend", None)) or not any(
            hasattr(processor, "_attention_backend") for processor in processors):
        return f"{type(denoiser).__name__}'s attention processors call SDPA directly"
    return ""
