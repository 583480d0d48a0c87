"""LoRA file layouts, converted by module name so every family gets them from one table.

Three layouts exist:

* ``diffusers``: what a family's pipeline writes with ``save_lora_weights``:
  ``<component>.<module path>.lora_A.weight`` / ``.lora_B.weight`` (``.lora_magnitude_vector`` with
  DoRA), the adapter config (rank, alpha, targets) in the ``lora_adapter_metadata`` of the file.
* ``comfyui``: what ComfyUI's own loader maps completely. Its names differ per family, so each family
  declares a :class:`ComfyNaming` in its ``FamilyInfo.comfy_naming`` (the family table). For UNet families that is kohya's layout
  (``lora_unet_<module path, dots as underscores>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``,
  text encoders ``lora_te_`` or ``lora_te1_``/``lora_te2_``), which diffusers' ``load_lora_weights`` reads
  too. ``diffusion_model.`` + diffusers module names is *not* such a layout: ComfyUI maps native names
  under that prefix, not diffusers ones.
* ``lycoris``: LyCORIS' own ``lycoris_<module path with underscores>.<algo tensors>`` (``hada_w1_a``,
  ``lokr_w1``, ...), written and read by the lycoris package.

With ``--lora_format`` unset, families whose ComfyUI layout also loads in diffusers (``loads_everywhere``) write the ``comfyui`` layout, the one
file both diffusers and ComfyUI load completely at the trained strength; the others write ``diffusers``.

The converters only ever look names up in the live model's module tree: a key that names no module is
an error, never silently dropped. This module imports torch lazily; :data:`COMFYUI_NAMING` and
:func:`read_safetensors_header` are usable from torch-free config validation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from simpletuner.models.lora_naming import (CLIP_ROOTS, KOHYA_SD, KOHYA_SUFFIXES, PEFT_SUFFIXES,  # noqa: F401
                                          WAN_NATIVE_NAMES, ComfyNaming)
from simpletuner.models.registry import FAMILIES

LORA_FORMATS = ("diffusers", "comfyui")

#: Safetensors metadata keys this project writes into every adapter file.
META_ADAPTER = "simpletuner_adapter"  # "peft" | "lycoris"
META_FORMAT = "simpletuner_lora_format"  # "diffusers" | "comfyui"
META_CONFIG = "simpletuner_lora_config"  # JSON: the adapter config (rank, alpha, targets, ...)

#: Tensor-name endings only LyCORIS writes (LoHa, LoKr, full, IA3, norms).
LYCORIS_MARKERS = (".hada_", ".lokr_", ".diff", ".diff_b", ".on_input", ".w_norm", ".b_norm", ".oft_", ".scalar")


class LoraFormatError(ValueError):
    """A LoRA file that does not fit the model (unknown keys, wrong layout); the message names the file."""


#: Family -> its ComfyUI naming, derived from the family table (``FamilyInfo.comfy_naming``). A family
#: without one cannot use ``--lora_format comfyui`` (config validation says so). Code that must see the
#: live table (tests that register a family) calls :func:`comfyui_naming`.
COMFYUI_NAMING: dict[str, ComfyNaming] = {name: info.comfy_naming for name, info in FAMILIES.items()
                                          if info.comfy_naming is not None}


def comfyui_naming(family: str | None) -> ComfyNaming | None:
    """The ComfyUI naming the family table gives ``family`` (None: no ComfyUI layout)."""
    info = FAMILIES.get(family or "")
    return info.comfy_naming if info is not None else None


def loads_everywhere(family: str | None) -> bool:
    """Whether the family's ComfyUI-layout file also loads completely in diffusers (alpha included), so
    it is the default layout (``FamilyInfo.comfy_loads_in_diffusers``; checked in
    tests/adapters/test_load_everywhere.py against diffusers and ComfyUI's recorded key map)."""
    info = FAMILIES.get(family or "")
    return bool(info is not None and info.comfy_naming is not None and info.comfy_loads_in_diffusers)


#: The families :func:`loads_everywhere` is true for, derived from the family table.
LOADS_EVERYWHERE = frozenset(name for name in FAMILIES if loads_everywhere(name))


def default_lora_format(family: str | None, lora_type: str | None = "standard", use_dora: bool = False) -> str:
    """The layout used when ``--lora_format`` is unset: ``comfyui`` where that file also loads in diffusers.

    DoRA magnitudes have no place in the ComfyUI layout, and LyCORIS files keep LyCORIS' own names
    (diffusers reads no LyCORIS at all), so both stay ``diffusers``.
    """
    if loads_everywhere(family) and not use_dora and (lora_type or "standard") != "lycoris":
        return "comfyui"
    return "diffusers"


def resolved_lora_format(config) -> str:
    """``--lora_format`` if given, else the family's default layout (:func:`default_lora_format`)."""
    return config.lora_format or default_lora_format(config.model_family, config.lora_type, bool(config.use_dora))


# --- reading files -------------------------------------------------------------------------------------


def read_safetensors_header(path: str | Path) -> tuple[list[str], dict[str, str]]:
    """Tensor names and metadata of a safetensors file, without loading a tensor.

    safetensors' ``safe_open`` reads only the header; the numpy framework keeps torch out of config
    validation, which calls this.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="numpy") as handle:
            return list(handle.keys()), dict(handle.metadata() or {})
    except (SafetensorError, OSError) as error:
        raise LoraFormatError(f"{path}: not a safetensors file or not readable ({error})") from None


def detect_format(keys: list[str], metadata: Mapping[str, str] | None = None) -> str:
    """``lycoris``, ``comfyui`` or ``diffusers`` for a file's tensor names (and our own metadata)."""
    metadata = metadata or {}
    if metadata.get(META_ADAPTER) == "lycoris" or "lycoris_config" in metadata:
        return "lycoris"
    if any(marker in key for key in keys for marker in LYCORIS_MARKERS) or any(k.startswith("lycoris_") for k in keys):
        return "lycoris"
    if metadata.get(META_FORMAT) in LORA_FORMATS:
        return metadata[META_FORMAT]
    if any(key.endswith(tuple(KOHYA_SUFFIXES)) for key in keys):
        return "comfyui"
    return "diffusers"


@dataclass
class LoraFile:
    """A LoRA/LyCORIS file in memory."""

    path: Path
    format: str
    tensors: dict[str, Any]
    metadata: dict[str, str]

    @classmethod
    def read(cls, path: str | Path) -> "LoraFile":
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise LoraFormatError(f"{path}: no such adapter file")
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        return cls(path, detect_format(list(tensors), metadata), tensors, metadata)


# --- module names ---------------------------------------------------------------------------------------

#: Attribute under which a LyCORIS network is registered inside the denoiser (see training/adapter.py).
LYCORIS_ATTRIBUTE = "lycoris_network"


def module_paths(module) -> set[str]:
    """Names of the model's own modules, without the adapter layers PEFT or LyCORIS added; with
    fused attention projections (models/qkv_fusion.py), the names of the unfused ones, which is
    what adapter files hold."""
    from simpletuner.models.qkv_fusion import fusion_of

    paths = set()
    for name, _ in module.named_modules():
        parts = name.split(".") if name else []
        if not parts or parts[0] == LYCORIS_ATTRIBUTE:
            continue
        if any(part == "base_layer" or part.startswith("lora_") for part in parts):
            continue
        paths.add(name)
    fusion = fusion_of(module)
    return fusion.unfused_paths(paths) if fusion is not None else paths


def _key_index(naming: ComfyNaming, modules: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    """ComfyUI module key -> (component, module path), refusing names that two modules would share."""
    index: dict[str, tuple[str, str]] = {}
    clashes = set()
    for component, module in modules.items():
        if component not in naming.prefixes:
            continue
        for path in module_paths(module):
            # ComfyUI's name first; the bare path too, for files written before the root was added
            for key in dict.fromkeys((naming.module_key(component, naming.rooted_path(component, path, module)),
                                      naming.module_key(component, path))):
                if key in index and index[key] != (component, path):
                    clashes.add(key)
                index[key] = (component, path)
    for key in clashes:
        del index[key]
    return index


def _split_key(key: str, suffixes: Mapping[str, str]) -> tuple[str, str] | None:
    """``(module key, role)`` where role is ``down``, ``up`` or ``alpha``."""
    for suffix, role in suffixes.items():
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], role
    if key.endswith(".alpha"):
        return key[: -len(".alpha")], "alpha"
    return None


# --- conversions ------------------------------------------------------------------------------------------


def peft_to_comfyui(states: Mapping[str, Mapping[str, Any]], alphas: Mapping[str, float], naming: ComfyNaming,
                    modules: Mapping[str, Any]) -> dict[str, Any]:
    """PEFT-layout adapter states (per component, keys relative to it) -> one ComfyUI-layout dict.

    ``alphas`` holds each component's ``lora_alpha``. Every module key is checked against the live
    module tree, so the file never names a module the model does not have.
    """
    import torch

    out: dict[str, Any] = {}
    for component, state in states.items():
        if component not in naming.prefixes:
            raise LoraFormatError(f"the ComfyUI layout of this family has no name for the {component!r} component")
        known = module_paths(modules[component])
        suffix_for = {role: suffix for suffix, role in naming.suffixes.items()}
        for key, tensor in state.items():
            parts = _split_key(key, PEFT_SUFFIXES)
            if parts is None:
                raise LoraFormatError(f"{component}.{key}: the ComfyUI layout has no place for this tensor "
                                      "(DoRA magnitudes and other extras cannot be written in it)")
            path, role = parts
            if path not in known:
                raise LoraFormatError(f"{component}.{key}: {path!r} is not a module of the model")
            base = naming.module_key(component, naming.rooted_path(component, path, modules[component]))
            out[f"{base}.{suffix_for[role]}"] = tensor.detach().to("cpu").contiguous()
            if role == "down":
                out[f"{base}.alpha"] = torch.tensor(float(alphas[component]))
    return out


def comfyui_to_peft(tensors: Mapping[str, Any], naming: ComfyNaming, modules: Mapping[str, Any], source: str = "file"
                    ) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, float]]]:
    """A ComfyUI-layout dict -> (PEFT-layout states per component, alpha per component and module path).

    Raises :class:`LoraFormatError` listing keys that name no module of ``modules``.
    """
    index = _key_index(naming, modules)
    states: dict[str, dict[str, Any]] = {}
    alphas: dict[str, dict[str, float]] = {}
    unknown = []
    peft_suffix = {"down": "lora_A.weight", "up": "lora_B.weight"}
    for key, tensor in tensors.items():
        parts = _split_key(key, naming.suffixes)
        if parts is None or parts[0] not in index:
            unknown.append(key)
            continue
        module_key, role = parts
        component, path = index[module_key]
        if role == "alpha":
            alphas.setdefault(component, {})[path] = float(tensor.item())
        else:
            states.setdefault(component, {})[f"{path}.{peft_suffix[role]}"] = tensor
    if unknown:
        raise LoraFormatError(f"{source}: {len(unknown)} key(s) name no module of the model, e.g. {sorted(unknown)[:3]}")
    return states, alphas


def diffusers_to_peft(tensors: Mapping[str, Any], components: list[str], metadata: Mapping[str, str] | None = None
                      ) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, float]], list[str]]:
    """A diffusers-layout dict -> (PEFT states per component, alphas per component and path, leftover keys).

    Alphas come from diffusers' ``lora_adapter_metadata`` (``<component>.lora_alpha``) or from ``.alpha``
    tensors; a component without either gets none (its alpha is taken to equal the rank, as diffusers does).
    """
    from diffusers.utils import convert_unet_state_dict_to_peft

    states: dict[str, dict[str, Any]] = {}
    alphas: dict[str, dict[str, float]] = {}
    leftover = []
    for key, tensor in tensors.items():
        component = next((c for c in components if key.startswith(c + ".")), None)
        if component is None:
            leftover.append(key)
            continue
        inner = key[len(component) + 1:]
        if inner.endswith(".alpha"):
            alphas.setdefault(component, {})[inner[: -len(".alpha")]] = float(tensor.item())
        else:
            states.setdefault(component, {})[inner] = tensor
    states = {c: convert_unet_state_dict_to_peft(dict(s)) for c, s in states.items()}
    packed = {}
    try:
        packed = json.loads((metadata or {}).get("lora_adapter_metadata", "{}"))
    except ValueError:
        pass
    for component, state in states.items():
        alpha = packed.get(f"{component}.lora_alpha")
        if alpha is not None:
            for key in state:
                if key.endswith("lora_A.weight"):
                    alphas.setdefault(component, {}).setdefault(key[: -len(".lora_A.weight")], float(alpha))
    return states, alphas, leftover


def peft_state_from_file(lora_file: LoraFile, modules: Mapping[str, Any], naming: ComfyNaming | None
                         ) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, float]], list[str]]:
    """Any LoRA file (auto-detected layout) -> PEFT-layout states for the given components.

    Returns (states, alphas, leftover keys of components not in ``modules``). LyCORIS files are refused:
    they load into a LyCORIS network, not into PEFT layers.
    """
    if lora_file.format == "lycoris":
        raise LoraFormatError(f"{lora_file.path} is a LyCORIS file; it loads with `--lora_type lycoris`")
    if lora_file.format == "diffusers":
        return diffusers_to_peft(lora_file.tensors, list(modules), lora_file.metadata)
    naming = naming or guess_naming(list(lora_file.tensors), list(modules))
    if naming is None:
        raise LoraFormatError(f"{lora_file.path}: kohya/ComfyUI-style keys, but no known naming matches them")
    wanted = {c: m for c, m in modules.items() if c in naming.prefixes}
    own_prefixes = tuple(naming.prefixes[c] for c in wanted)
    other = {k: v for k, v in lora_file.tensors.items() if not _has_prefix(k, own_prefixes, naming.style)}
    mine = {k: v for k, v in lora_file.tensors.items() if k not in other}
    states, alphas = comfyui_to_peft(mine, naming, wanted, source=str(lora_file.path))
    return states, alphas, sorted(other)


def _has_prefix(key: str, prefixes: tuple[str, ...], style: str) -> bool:
    separator = "_" if style == "kohya" else "."
    return any(key.startswith(prefix + separator) for prefix in prefixes)


def guess_naming(keys: list[str], components: list[str]) -> ComfyNaming | None:
    """The declared ComfyUI naming whose prefixes for ``components`` match the most keys."""
    best, best_hits = None, 0
    namings = (info.comfy_naming for info in FAMILIES.values() if info.comfy_naming is not None)
    for naming in {id(n): n for n in namings}.values():
        prefixes = tuple(naming.prefixes[c] for c in components if c in naming.prefixes)
        hits = sum(_has_prefix(k, prefixes, naming.style) for k in keys) if prefixes else 0
        if hits > best_hits:
            best, best_hits = naming, hits
    return best


def load_peft_state(module, state: Mapping[str, Any], alphas: Mapping[str, float] | None = None,
                    source: str = "file", adapter_name: str = "default") -> list[str]:
    """Put PEFT-layout weights into ``module``'s LoRA layers; returns the adapter modules the state
    did not cover (they keep their initial values).

    A file's alpha may differ from the layer's: its ``lora_B`` is rescaled so that the layer computes
    what the file means (``alpha_file / rank`` times ``B A``). Keys naming no LoRA layer are an error.
    """
    import torch
    from peft.tuners.lora import LoraLayer
    from peft.utils import set_peft_model_state_dict

    layers = {name: layer for name, layer in module.named_modules() if isinstance(layer, LoraLayer)}
    state = dict(state)
    for path, alpha in (alphas or {}).items():
        layer = layers.get(path)
        key = f"{path}.lora_B.weight"
        if layer is None or key not in state or adapter_name not in layer.r:
            continue
        rank = state[f"{path}.lora_A.weight"].shape[0]
        wanted, actual = alpha / rank, layer.scaling[adapter_name]
        if abs(wanted - actual) > 1e-12 * max(1.0, abs(actual)):
            state[key] = state[key].to(torch.float32) * (wanted / actual)
    for path, layer in layers.items():  # shapes first: a rank mismatch is a config mistake, say so plainly
        key = f"{path}.lora_A.weight"
        if key in state and adapter_name in layer.lora_A:
            expected = layer.lora_A[adapter_name].weight.shape
            if tuple(state[key].shape) != tuple(expected):
                raise LoraFormatError(f"{source}: {path} has rank {state[key].shape[0]} (shape {tuple(state[key].shape)}) "
                                      f"but the adapter was built with rank {expected[0]} ({tuple(expected)}); set "
                                      "`--lora_rank` to the file's rank")
    result = set_peft_model_state_dict(module, dict(state), adapter_name=adapter_name)
    unexpected = list(getattr(result, "unexpected_keys", None) or [])
    if unexpected:
        raise LoraFormatError(f"{source}: adapter keys that match no LoRA layer of the model: {unexpected[:5]}")
    covered = {key.rsplit(".lora_", 1)[0] for key in state}
    return sorted(path for path in layers if path not in covered)
