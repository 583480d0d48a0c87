"""Validation-only adapters (``--validation_adapter_path`` / ``_name`` / ``_strength`` / ``_mode`` /
``--validation_adapter_config``): sample with extra LoRA files on top of the model being trained, to
compare the run with and without them.

An extra LoRA is merged into the denoiser's weights for the duration of one sampling pass and the
touched weights are then copied back from a saved copy, bit for bit. Merging (rather than loading the
file as a second PEFT adapter) leaves the module tree untouched, so it works the same on a full
fine-tune, a PEFT LoRA or a LyCORIS run, and nothing of it can leak into the next training step or the
saved checkpoint. The parsing half is torch-free: the config rules use it.
"""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

#: ``--validation_adapter_mode`` when an adapter is given and the mode is not.
DEFAULT_MODE = "comparison"
#: File looked for inside a folder or a hub repo when no file name is given.
DEFAULT_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w./-]+\.safetensors)?$")


@dataclass(frozen=True)
class ExtraAdapter:
    #: local file or folder, ``org/repo`` or ``org/repo:file.safetensors``
    path: str
    name: str
    strength: float = 1.0


@dataclass(frozen=True)
class AdapterRun:
    """One sampling pass with one or more extra adapters merged in; ``label`` names its folder."""

    label: str
    adapters: tuple[ExtraAdapter, ...]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "adapter"


def _looks_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or Path(path).expanduser().exists() or not _HUB_ID.match(path)


def check_adapter_source(path: str, where: str) -> None:
    """A local path must exist; anything else must read as a hub id (``org/repo[:file.safetensors]``)."""
    if not isinstance(path, str) or not path:
        raise ValueError(f"{where}: the adapter path must be a non-empty string")
    if _looks_local(path) and not Path(path).expanduser().exists():
        raise ValueError(f"{where}: {path!r} is neither an existing file or folder nor a hub id such as "
                         "org/repo or org/repo:file.safetensors")


def _adapter(entry, where: str, default_strength: float) -> ExtraAdapter:
    if isinstance(entry, str):
        entry = {"path": entry}
    if not isinstance(entry, dict) or "path" not in entry:
        raise ValueError(f"{where}: each adapter is a path or an object with a \"path\" (and optional "
                         "\"adapter_name\", \"strength\")")
    unknown = sorted(set(entry) - {"path", "adapter_name", "strength", "label"})
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; use path, adapter_name, strength")
    check_adapter_source(entry["path"], where)
    strength = entry.get("strength", default_strength)
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or strength <= 0:
        raise ValueError(f"{where}: strength {strength!r} must be a number above 0")
    name = entry.get("adapter_name") or _slug(Path(entry["path"].split(":")[0]).stem)
    return ExtraAdapter(entry["path"], str(name), float(strength))


def runs_from_config(config) -> list[AdapterRun]:
    """The adapter passes a validation makes besides (or instead of) the plain one; ValueError with
    the entry at fault for a malformed ``--validation_adapter_config``."""
    if config.validation_adapter_config is not None:
        spec = config.validation_adapter_config
        entries = spec.get("runs") if isinstance(spec, dict) else spec
        if not isinstance(entries, list) or not entries:
            raise ValueError("expected a non-empty JSON list of runs, or an object with a non-empty \"runs\" list")
        runs = []
        for index, entry in enumerate(entries):
            where = f"run {index}"
            if not isinstance(entry, dict):
                entry = {"path": entry}
            many = entry.get("adapters", entry.get("paths"))
            strength = entry.get("strength", 1.0)
            listed = many if many is not None else [{k: v for k, v in entry.items() if k != "label"}]
            if not isinstance(listed, list) or not listed:
                raise ValueError(f"{where}: \"adapters\" must be a non-empty list")
            adapters = tuple(_adapter(item, where, strength) for item in listed)
            label = _slug(str(entry.get("label") or "+".join(adapter.name for adapter in adapters)))
            runs.append(AdapterRun(label, adapters))
        labels = [run.label for run in runs]
        if len(set(labels)) != len(labels):
            raise ValueError(f"two runs share a label ({', '.join(sorted({l for l in labels if labels.count(l) > 1}))}); "
                             "give each a distinct \"label\"")
        return runs
    if config.validation_adapter_path:
        adapter = _adapter({"path": config.validation_adapter_path,
                            "adapter_name": config.validation_adapter_name,
                            "strength": config.validation_adapter_strength or 1.0}, "--validation_adapter_path", 1.0)
        return [AdapterRun(_slug(adapter.name), (adapter,))]
    return []


def adapter_mode(config) -> str:
    return config.validation_adapter_mode or DEFAULT_MODE


def resolve_file(path: str) -> Path:
    """The safetensors file an adapter path names: a file, a folder's ``pytorch_lora_weights.safetensors``
    (or its only ``.safetensors``), or a hub repo's file from the local cache / the hub."""
    local = Path(path).expanduser()
    if _looks_local(path):
        if local.is_file():
            return local
        candidates = [local / DEFAULT_WEIGHT_NAME] if (local / DEFAULT_WEIGHT_NAME).is_file() \
            else sorted(local.glob("*.safetensors"))
        if len(candidates) != 1:
            raise ValueError(f"validation adapter {path!r}: expected {DEFAULT_WEIGHT_NAME} or exactly one "
                             f".safetensors file in the folder, found {len(candidates)}")
        return candidates[0]
    from huggingface_hub import hf_hub_download

    repo, _, file_name = path.partition(":")
    return Path(hf_hub_download(repo, file_name or DEFAULT_WEIGHT_NAME))


def _weight_of(denoiser, path: str):
    """The weight tensor a LoRA on module ``path`` changes (inside a PEFT wrapper: its base layer's)."""
    module = denoiser.get_submodule(path)
    module = getattr(module, "base_layer", module)
    return module.weight


def _delta(down, up, alpha: float | None, weight):
    """``up @ down`` shaped like ``weight`` (linear or convolution), times ``alpha / rank``."""
    import torch

    rank = down.shape[0]
    product = up.flatten(1).to(torch.float32) @ down.flatten(1).to(torch.float32)
    scale = (alpha / rank) if alpha is not None else 1.0
    return (product * scale).reshape(weight.shape)


def read_adapter(model, adapter: ExtraAdapter) -> tuple[dict, dict]:
    """The adapter's PEFT-layout LoRA state and alphas for the denoiser, whatever the file's layout."""
    from simpletuner.models import lora_formats as formats

    file = resolve_file(adapter.path)
    lora_file = formats.LoraFile.read(file)
    name = model.denoiser_name
    states, alphas, leftover = formats.peft_state_from_file(lora_file, {name: model.denoiser}, None)
    if not states.get(name):
        raise ValueError(f"validation adapter {adapter.path!r} ({file}) holds no LoRA weights for the {name} "
                         f"(layout {lora_file.format})")
    if leftover:
        logger.warning("validation adapter %s: %d keys for other components (text encoders) are not applied; only "
                       "the %s part is", adapter.name, len(leftover), name)
    return states[name], alphas.get(name, {})


@contextlib.contextmanager
def merged(model, run: AdapterRun, loaded: dict):
    """Inside the block the denoiser computes with ``run``'s adapters merged in at their strengths;
    on exit every touched weight gets its saved value back exactly. ``loaded`` caches files read."""
    import torch

    from simpletuner.training.distributed import unwrap_parallel

    denoiser = unwrap_parallel(model.denoiser)
    saved: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            for adapter in run.adapters:
                if adapter.path not in loaded:
                    loaded[adapter.path] = read_adapter(model, adapter)
                state, alphas = loaded[adapter.path]
                for key, down in state.items():
                    if not key.endswith(".lora_A.weight"):
                        continue
                    path = key[: -len(".lora_A.weight")]
                    try:
                        weight = _weight_of(denoiser, path)
                    except AttributeError:
                        raise ValueError(f"validation adapter {adapter.path!r}: module {path} is not in the "
                                         f"{model.family} {model.denoiser_name}; is it made for this model?") from None
                    if not weight.dtype.is_floating_point:
                        raise ValueError(f"validation adapter {adapter.name}: {path} is quantized "
                                         f"({weight.dtype}); extra adapters merge into float weights only")
                    if path not in saved:
                        saved[path] = weight.detach().to("cpu", copy=True)  # off the accelerator
                    delta = _delta(down, state[f"{path}.lora_B.weight"], alphas.get(path), weight)
                    weight.add_((delta * adapter.strength).to(device=weight.device, dtype=weight.dtype))
        logger.info("validation adapter run %s: %s merged into %d layers", run.label,
                    ", ".join(f"{a.name} x{a.strength:g}" for a in run.adapters), len(saved))
        yield
    finally:
        with torch.no_grad():
            for path, original in saved.items():
                _weight_of(denoiser, path).copy_(original)

