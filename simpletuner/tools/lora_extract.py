"""Extract a LoRA adapter from the difference between a fine-tuned denoiser and its base.

For every Linear and Conv2d layer whose weight changed, the difference ``W_ft - W_base`` is factored
with a truncated SVD into ``lora_B @ lora_A``; the adapter is written in the diffusers PEFT layout
(``<component>.<module path>.lora_A.weight`` / ``.lora_B.weight`` plus the adapter config in the
``lora_adapter_metadata`` of the file), which the family pipelines load with ``load_lora_weights``.

Splitting the singular values: ``lora_B = U_r * sqrt(S_r)`` and ``lora_A = sqrt(S_r) * V_r^T``. Both
factors then carry the same norm, so casting the file to fp16/bf16 or training the adapter further
does not start from one tiny and one huge factor (putting all of ``S`` on ``B`` would leave ``A``
orthonormal and ``B`` holding the whole magnitude of the change).

Every layer's ``lora_alpha`` equals its rank, so the scale PEFT applies is 1 and ``B @ A`` is the
weight difference itself. Changed tensors a LoRA cannot hold (biases, norms, embeddings, other layer
types) are reported, never silently dropped. torch and diffusers are imported inside the functions.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

DENOISER_COMPONENTS = ("unet", "transformer")
ADAPTER_FILE_NAME = "pytorch_lora_weights.safetensors"
#: Metadata key diffusers reads the adapter config from (``diffusers.loaders.lora_base``).
LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"


class ExtractError(ValueError):
    """The inputs cannot give an adapter (unreadable folder, different architectures, bad rank)."""


# --- results ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerFactors:
    """One extracted layer: its factors and how much of its change they keep.

    ``energy_total`` is ``||W_ft - W_base||_F^2``; ``energy_kept`` the part the kept singular values
    account for (the sum of their squares), so ``energy_kept / energy_total`` is 1 for an exact copy.
    """

    path: str
    kind: str  # "linear" | "conv"
    rank: int
    lora_A: "torch.Tensor"
    lora_B: "torch.Tensor"
    energy_total: float
    energy_kept: float

    @property
    def kept_fraction(self) -> float:
        return self.energy_kept / self.energy_total if self.energy_total > 0 else 1.0


@dataclass(frozen=True)
class Unextractable:
    """A changed tensor no LoRA layer can carry: its name, why, how many values changed, the largest change."""

    name: str
    reason: str
    changed_values: int
    max_abs_change: float


@dataclass
class ExtractionSummary:
    """What one extraction did; :meth:`describe` is the per-run report the CLI prints."""

    component: str
    rank: int | None  # None: --full-rank
    layers: list[LayerFactors] = field(default_factory=list)
    unchanged: int = 0
    unextractable: list[Unextractable] = field(default_factory=list)
    file: Path | None = None
    file_bytes: int = 0

    @property
    def energy_kept_fraction(self) -> float:
        """Share of the total weight-difference energy (squared Frobenius norm) over all extracted layers kept."""
        total = sum(layer.energy_total for layer in self.layers)
        kept = sum(layer.energy_kept for layer in self.layers)
        return kept / total if total > 0 else 1.0

    @property
    def worst_layer(self) -> LayerFactors | None:
        return min(self.layers, key=lambda layer: layer.kept_fraction, default=None)

    def describe(self) -> str:
        rank = "full rank" if self.rank is None else f"rank {self.rank}"
        kinds = Counter(layer.kind for layer in self.layers)
        lines = [
            f"extracted {len(self.layers)} {self.component} layers at {rank} "
            f"({kinds.get('linear', 0)} Linear, {kinds.get('conv', 0)} Conv2d); "
            f"skipped {self.unchanged} unchanged layers",
            f"energy of the weight difference kept: {self.energy_kept_fraction:.6f} overall",
        ]
        worst = self.worst_layer
        if worst is not None:
            lines.append(f"  worst layer: {worst.path} keeps {worst.kept_fraction:.6f} (rank {worst.rank})")
            if self.energy_kept_fraction < 0.999:
                lines.append("  (below 1: this rank drops part of the fine-tune; a higher --rank or "
                             "--full-rank keeps more)")
        if self.unextractable:
            values = sum(item.changed_values for item in self.unextractable)
            largest = max(self.unextractable, key=lambda item: item.max_abs_change)
            lines.append(f"NOT extracted: {len(self.unextractable)} changed tensors a LoRA cannot hold "
                         f"({values} values; largest change {largest.max_abs_change:.3g} in {largest.name}):")
            for item in sorted(self.unextractable, key=lambda item: -item.max_abs_change)[:20]:
                lines.append(f"  {item.name} ({item.reason}): {item.changed_values} values, "
                             f"max |change| {item.max_abs_change:.3g}")
            if len(self.unextractable) > 20:
                lines.append(f"  ... and {len(self.unextractable) - 20} more")
        if self.file is not None:
            lines.append(f"wrote {self.file} ({self.file_bytes / 1e6:.2f} MB)")
        return "\n".join(lines)


# --- finding and loading the denoisers ----------------------------------------------------------------


def _read_json(file: Path) -> dict[str, Any]:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ExtractError(f"cannot read {file}: {error}") from error


def resolve_denoiser(path: str | Path, component: str | None = None) -> tuple[Path, str]:
    """The denoiser folder inside ``path`` and its pipeline component name (``unet``/``transformer``).

    ``path`` is a pipeline folder (``model_index.json``; the denoiser is found from it unless
    ``component`` names it) or a model folder holding the denoiser's ``config.json`` itself.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise ExtractError(f"{folder}: not a folder (expected a diffusers pipeline or model folder)")
    if (folder / "model_index.json").is_file():
        index = _read_json(folder / "model_index.json")
        candidates = [component] if component else [c for c in DENOISER_COMPONENTS if c in index]
        found = [c for c in candidates if (folder / c / "config.json").is_file()]
        if not found:
            wanted = component or " or ".join(DENOISER_COMPONENTS)
            raise ExtractError(f"{folder}: the pipeline has no readable {wanted} folder with a config.json")
        return folder / found[0], found[0]
    if (folder / "config.json").is_file():
        class_name = str(_read_json(folder / "config.json").get("_class_name", ""))
        if not class_name:
            raise ExtractError(f"{folder}/config.json has no `_class_name`: not a diffusers model folder")
        return folder, component or ("unet" if "unet" in class_name.lower() else "transformer")
    raise ExtractError(f"{folder}: neither model_index.json nor config.json found")


def load_denoiser(folder: Path) -> "torch.nn.Module":
    """The model in ``folder``, built from the diffusers class its config names, in fp32 on the CPU
    (the difference of two bf16 models is best taken, and factored, at full precision)."""
    import diffusers
    import torch

    class_name = _read_json(folder / "config.json").get("_class_name")
    model_class = getattr(diffusers, str(class_name), None)
    if model_class is None:
        raise ExtractError(f"{folder}: `_class_name` {class_name!r} is not a diffusers model class")
    try:
        model = model_class.from_pretrained(str(folder), torch_dtype=torch.float32)
    except (OSError, ValueError, RuntimeError) as error:
        raise ExtractError(f"cannot load {class_name} from {folder}: {error}") from error
    return model.to("cpu").eval()


def comparable_config(folder: Path) -> dict[str, Any]:
    """The model config without bookkeeping keys (``_diffusers_version``, ``_name_or_path``, ...)."""
    config = _read_json(folder / "config.json")
    kept = {key: value for key, value in config.items() if not key.startswith("_")}
    return {**kept, "_class_name": config.get("_class_name")}


def check_same_architecture(base_folder: Path, ft_folder: Path, base_state: dict, ft_state: dict) -> None:
    """Refuse two models whose configs, weight names or shapes differ: their difference is no fine-tune."""
    base_config, ft_config = comparable_config(base_folder), comparable_config(ft_folder)
    differing = sorted(k for k in base_config.keys() | ft_config.keys() if base_config.get(k) != ft_config.get(k))
    if differing:
        shown = ", ".join(f"{k}: {base_config.get(k)!r} vs {ft_config.get(k)!r}" for k in differing[:5])
        raise ExtractError(f"different architectures: the configs of {base_folder} and {ft_folder} differ in "
                           f"{len(differing)} keys ({shown})")
    missing, extra = sorted(base_state.keys() - ft_state.keys()), sorted(ft_state.keys() - base_state.keys())
    if missing or extra:
        raise ExtractError(f"different architectures: the fine-tuned model lacks {len(missing)} weights "
                           f"{missing[:5]} and has {len(extra)} extra {extra[:5]}")
    shapes = [k for k in base_state if tuple(base_state[k].shape) != tuple(ft_state[k].shape)]
    if shapes:
        raise ExtractError(f"different architectures: {len(shapes)} weights differ in shape, e.g. {shapes[0]} "
                           f"{tuple(base_state[shapes[0]].shape)} vs {tuple(ft_state[shapes[0]].shape)}")


# --- the factorisation --------------------------------------------------------------------------------


def low_rank_factors(delta: "torch.Tensor", rank: int | None) -> tuple["torch.Tensor", "torch.Tensor", float, float]:
    """``delta`` (2-D) ~= ``B @ A`` with at most ``rank`` columns in B (all of them when ``rank`` is None).

    Returns ``(B, A, energy_kept, energy_total)``. The SVD runs in float64: the singular values of a
    small fine-tuning change can span many orders of magnitude, and the energy figures sum them.
    """
    import torch

    matrix = delta.to(torch.float64)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    keep = s.numel() if rank is None else min(rank, s.numel())
    root = s[:keep].sqrt()
    up = (u[:, :keep] * root).to(torch.float32).contiguous()
    down = (root[:, None] * vh[:keep]).to(torch.float32).contiguous()
    energy = s.square()
    return up, down, float(energy[:keep].sum()), float(energy.sum())


def extractable_layers(model: "torch.nn.Module") -> dict[str, tuple[str, "torch.nn.Module"]]:
    """Module path -> (kind, module) for the layers PEFT's LoRA reproduces exactly: Linear, and Conv2d
    without groups, dilation or non-zero padding modes (PEFT's ``lora_A`` conv copies only the kernel
    size, stride and padding of the layer, so such a change would come back as a different one)."""
    import torch

    layers = {}
    for path, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            layers[path] = ("linear", module)
        elif (isinstance(module, torch.nn.Conv2d) and module.groups == 1 and tuple(module.dilation) == (1, 1)
              and module.padding_mode == "zeros"):
            layers[path] = ("conv", module)
    return layers


def factor_layer(path: str, kind: str, base_weight: "torch.Tensor", ft_weight: "torch.Tensor",
                 rank: int | None) -> LayerFactors:
    """One layer's LoRA: Linear ``(out, in)`` as is; Conv2d reshaped to ``(out, in*k*k)``, giving a
    ``k x k`` conv ``in -> r`` (lora_A) followed by a ``1 x 1`` conv ``r -> out`` (lora_B), PEFT's layout."""
    import torch

    delta = ft_weight.to(torch.float32) - base_weight.to(torch.float32)
    out_channels = delta.shape[0]
    up, down, kept, total = low_rank_factors(delta.reshape(out_channels, -1), rank)
    if kind == "conv":
        down = down.reshape(down.shape[0], *delta.shape[1:])
        up = up.reshape(out_channels, up.shape[1], 1, 1)
    return LayerFactors(path=path, kind=kind, rank=int(down.shape[0]), lora_A=down, lora_B=up,
                        energy_total=total, energy_kept=kept)


def _change(base: "torch.Tensor", ft: "torch.Tensor") -> tuple[int, float]:
    difference = (ft.float() - base.float()).abs()
    return int((difference > 0).sum()), float(difference.max()) if difference.numel() else 0.0


def extract(base_path: str | Path, ft_path: str | Path, rank: int | None,
            component: str | None = None) -> ExtractionSummary:
    """Compare the two denoisers and factor every changed Linear/Conv2d weight; nothing is written.

    ``rank`` None is ``--full-rank``: each layer keeps all its singular values, an exact copy.
    """
    import torch

    if rank is not None and rank < 1:
        raise ExtractError(f"--rank must be at least 1 (got {rank}); use --full-rank for an exact copy")
    base_folder, base_component = resolve_denoiser(base_path, component)
    ft_folder, _ = resolve_denoiser(ft_path, component or base_component)
    # configs first: loading a mismatched model may fail on its own with a less clear message
    base_config, ft_config = comparable_config(base_folder), comparable_config(ft_folder)
    if base_config != ft_config:
        check_same_architecture(base_folder, ft_folder, {}, {})
    base, ft = load_denoiser(base_folder), load_denoiser(ft_folder)
    base_state, ft_state = base.state_dict(), ft.state_dict()
    check_same_architecture(base_folder, ft_folder, base_state, ft_state)

    summary = ExtractionSummary(component=base_component, rank=rank)
    covered: set[str] = set()
    with torch.no_grad():
        for path, (kind, _) in extractable_layers(base).items():
            key = f"{path}.weight"
            covered.add(key)
            if torch.equal(base_state[key], ft_state[key]):
                summary.unchanged += 1
                continue
            summary.layers.append(factor_layer(path, kind, base_state[key], ft_state[key], rank))
        layer_types = {f"{path}.": type(module).__name__ for path, module in base.named_modules() if path}
        for key, base_tensor in base_state.items():
            if key in covered or torch.equal(base_tensor, ft_state[key]):
                continue
            owner = max((prefix for prefix in layer_types if key.startswith(prefix)), key=len, default="")
            reason = f"{layer_types.get(owner, 'model')} {key.rsplit('.', 1)[-1]}"
            count, largest = _change(base_tensor, ft_state[key])
            summary.unextractable.append(Unextractable(key, reason, count, largest))
    return summary


# --- writing the file ---------------------------------------------------------------------------------


def adapter_config(layers: list[LayerFactors]) -> dict[str, Any]:
    """The PEFT ``LoraConfig`` arguments diffusers rebuilds the adapter from (metadata wins over the
    shapes): the most common rank as ``r``, the others in ``rank_pattern``; alpha = rank everywhere,
    so each layer adds exactly ``B @ A``. Pattern keys are anchored and escaped module paths, so a
    pattern for ``proj_out`` cannot also match ``blocks.0.proj_out``."""
    ranks = {layer.path: layer.rank for layer in layers}
    main_rank = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {f"^{re.escape(path)}": rank for path, rank in sorted(ranks.items()) if rank != main_rank}
    return {
        "r": main_rank, "lora_alpha": main_rank, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
        "target_modules": sorted(ranks), "lora_dropout": 0.0, "init_lora_weights": True, "use_dora": False,
        "lora_bias": False,
    }


def write_adapter(summary: ExtractionSummary, out: str | Path, provenance: dict[str, Any] | None = None,
                  dtype: str = "float32", overwrite: bool = False) -> Path:
    """Write the extracted layers as ``<component>.<path>.lora_A/B.weight`` with the packed adapter
    config; written to a temporary file first so an interrupted run leaves no half file."""
    import torch
    from safetensors.torch import save_file

    from simpletuner.models.lora_formats import META_ADAPTER, META_CONFIG, META_FORMAT

    if not summary.layers:
        raise ExtractError("no Linear or Conv2d weight differs between the two models: there is nothing to extract")
    file = Path(out)
    if file.is_dir():
        file = file / ADAPTER_FILE_NAME
    if file.exists() and not overwrite:
        raise ExtractError(f"{file} exists; pass --overwrite to replace it")
    file.parent.mkdir(parents=True, exist_ok=True)
    save_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    prefix = summary.component
    tensors = {}
    for layer in summary.layers:
        tensors[f"{prefix}.{layer.path}.lora_A.weight"] = layer.lora_A.to(save_dtype).contiguous()
        tensors[f"{prefix}.{layer.path}.lora_B.weight"] = layer.lora_B.to(save_dtype).contiguous()
    config = adapter_config(summary.layers)
    metadata = {
        "format": "pt",
        LORA_ADAPTER_METADATA_KEY: json.dumps({f"{prefix}.{k}": v for k, v in config.items()}, sort_keys=True),
        META_ADAPTER: "peft", META_FORMAT: "diffusers", META_CONFIG: json.dumps(config, sort_keys=True),
        "simpletuner_extracted": json.dumps({"rank": summary.rank or "full", **(provenance or {})}, sort_keys=True),
    }
    temp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(temp), metadata=metadata)
        temp.replace(file)
    finally:
        temp.unlink(missing_ok=True)
    summary.file, summary.file_bytes = file, file.stat().st_size
    return file


def extract_lora(base: str | Path, ft: str | Path, out: str | Path, rank: int | None, component: str | None = None,
                 dtype: str = "float32", overwrite: bool = False) -> ExtractionSummary:
    """:func:`extract` then :func:`write_adapter`: the whole ``simpletuner extract-lora`` run."""
    if rank is not None and rank < 1:
        raise ExtractError(f"--rank must be at least 1 (got {rank}); use --full-rank for an exact copy")
    target = Path(out)
    target = target / ADAPTER_FILE_NAME if target.is_dir() else target
    if target.exists() and not overwrite:  # before minutes of loading and SVDs
        raise ExtractError(f"{target} exists; pass --overwrite to replace it")
    summary = extract(base, ft, rank, component)
    write_adapter(summary, out, provenance={"base": str(base), "ft": str(ft)}, dtype=dtype, overwrite=overwrite)
    return summary
