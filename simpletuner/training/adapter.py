"""The trained adapter of a ``--model_type lora`` run: built from the config, saved, loaded back.

Two implementations behind one small interface (``attach``, ``save``, ``load_checkpoint``,
``init_from``, ``validation_strength``):

* :class:`PeftAdapter` (``--lora_type standard``): PEFT LoRA on the family's targets (its preset,
  ``--peft_lora_target_modules`` or the slider targets), with DoRA, the PEFT initialisations
  (``--lora_init_type``) and SingLoRA (``--peft_lora_mode singlora``, see models/singlora.py).
* :class:`LycorisAdapter` (``--lora_type lycoris``): a LyCORIS network from ``--lycoris_config``,
  registered inside the denoiser so the optimizer, DDP, EMA and train/eval switching see it.

Files are written in ``--lora_format`` (diffusers or comfyui; models/lora_formats.py) and read back
in whatever layout they are in. Everything goes through the family contract (``denoiser``,
``denoiser_name``, ``lora_target_modules()``, ``save_lora()``), so no family file knows about it.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
from pathlib import Path
from typing import Any, Callable

import torch

from simpletuner.models import lora_formats as formats
from simpletuner.models.qkv_fusion import QkvFusionError, fusion_of

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "pytorch_lora_weights.safetensors"  # the name diffusers' load_lora_weights looks for
SINGLORA_STATE_FILE = "singlora_state.safetensors"  # SingLoRA's own matrices, what a resume needs

#: ``--lora_init_type`` -> PEFT's ``init_lora_weights``. Unset keeps the Gaussian A (std 1/r) that
#: diffusers' LoRA training examples use; ``default`` is PEFT's own default (Kaiming-uniform A).
PEFT_INIT = {None: "gaussian", "gaussian": "gaussian", "default": True, "loftq": "loftq", "olora": "olora",
             "pissa": "pissa"}
#: Initialisations that move part of the base weight into the adapter (W₀ becomes W - s·B₀A₀). Their
#: files are written as a rank-2r LoRA of the *original* base (A' = [A; A₀], B' = [B, -B₀], alpha 2α),
#: as PEFT's ``path_initial_model_for_weight_conversion`` does, so they load on an untouched model.
MUTATING_INITS = ("pissa", "olora")
DEFAULT_SINGLORA_RAMP_STEPS = 1000

#: Slider targets (Concept Sliders: self-attention, convolutions in/out and the time embedding; no
#: cross-attention, so the text features stay as they are). Names absent from a model are skipped; a
#: family may define ``slider_lora_target_modules()`` to replace the list.
SLIDER_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "proj_in", "proj_out", "conv_in",
                  "conv_out", "time_embedding.linear_1", "time_embedding.linear_2")


class AdapterError(RuntimeError):
    """An adapter that cannot be built or loaded as configured; the message names the flag and the fix."""


def attach_adapter(model, config, current_step: Callable[[], int] | None = None):
    """Freeze ``model.denoiser`` and attach the configured adapter; ``--init_lora`` seeds it.

    ``current_step`` returns the number of optimizer steps taken (the SingLoRA ramp reads it).
    The adapter is also left on ``model.adapter`` for the validation runner.
    """
    kind = LycorisAdapter if config.lora_type == "lycoris" else PeftAdapter
    adapter = kind(model, config, current_step or (lambda: 0))
    adapter.attach()
    if config.init_lora:
        adapter.init_from(Path(config.init_lora))
    model.adapter = adapter
    return adapter


@contextlib.contextmanager
def validation_strength(model):
    """While sampling: the adapter at its validation strength (``--validation_lycoris_strength``)."""
    adapter = getattr(model, "adapter", None)
    with adapter.validation_strength() if adapter is not None else contextlib.nullcontext():
        yield


def _naming(config) -> formats.ComfyNaming | None:
    return formats.comfyui_naming(config.model_family)


def _matches(name: str, target: str) -> bool:
    """PEFT's rule for a target name: the module's full name or its dotted suffix."""
    return name == target or name.endswith("." + target)


def resolve_target_modules(model, config) -> list[str]:
    """The module names the LoRA adapts: ``--peft_lora_target_modules``, the slider targets, or the
    family's preset; each must name at least one module of the denoiser."""
    from simpletuner.options.adapter_rules import parse_target_modules

    denoiser = model.denoiser
    names = [name for name, _ in denoiser.named_modules() if name]
    fusion = fusion_of(denoiser)
    if fusion is not None:  # targets name the projections a user knows (to_q, ...), fused or not
        names = sorted(fusion.unfused_paths(set(names)))
    if config.peft_lora_target_modules:
        targets = parse_target_modules(config.peft_lora_target_modules)
        missing = [t for t in targets if not any(_matches(n, t) for n in names)]
        if missing:
            raise AdapterError(f"`--peft_lora_target_modules`: {missing} name no module of the {config.model_family} "
                               f"{model.denoiser_name} (e.g. {names[:3]})")
        return targets
    if config.slider_lora_target:
        custom = getattr(model, "slider_lora_target_modules", None)
        candidates = list(custom()) if callable(custom) else list(SLIDER_TARGETS)
        targets = [t for t in candidates if any(_matches(n, t) for n in names)]
        if not targets:
            raise AdapterError(f"`--slider_lora_target`: none of {candidates} is a module of the "
                               f"{config.model_family} {model.denoiser_name}")
        return targets
    return list(model.lora_target_modules())


def _targeted_modules(denoiser, targets: list[str]) -> dict[str, torch.nn.Module]:
    return {name: module for name, module in denoiser.named_modules()
            if name and any(_matches(name, t) for t in targets)}


class PeftAdapter:
    """PEFT LoRA (optionally DoRA, a PEFT initialisation, or SingLoRA) on the family's denoiser."""

    def __init__(self, model, config, current_step: Callable[[], int]):
        self.model = model
        self.config = config
        self.current_step = current_step
        self.denoiser = model.denoiser
        self.init = PEFT_INIT[config.lora_init_type]
        self.singlora = config.peft_lora_mode == "singlora"
        self.initial: dict[str, torch.Tensor] | None = None  # A₀/B₀ of a mutating init
        self.lora_config: dict[str, Any] = {}
        self.fusion = fusion_of(self.denoiser)  # --fuse_qkv_projections (models/qkv_fusion.py)

    # --- building ----------------------------------------------------------------------------------

    def attach(self) -> None:
        from simpletuner.models.adapters import add_lora, lora_state_dict

        config = self.config
        targets = resolve_target_modules(self.model, config)
        layer_targets = targets
        if self.fusion is not None:
            try:
                layer_targets = self.fusion.adapter_targets(targets)
            except QkvFusionError as error:
                raise AdapterError(str(error)) from None
        self._check_targets(layer_targets)
        options: dict[str, Any] = {}
        if config.use_dora:
            options["use_dora"] = True
        if self.init == "loftq":
            if not torch.cuda.is_available():
                raise AdapterError("`--lora_init_type loftq` quantizes with bitsandbytes on a CUDA device; none is "
                                   "available here")
            options["loftq_config"] = {"loftq_bits": 4, "loftq_iter": 1}
        if self.singlora:
            from simpletuner.models.singlora import SingLoraLinear

            options["custom_modules"] = {torch.nn.Linear: SingLoraLinear}
        self.lora_config = add_lora(self.denoiser, layer_targets, config.lora_rank, config.lora_alpha,
                                    config.lora_dropout, init_lora_weights=self.init, **options)
        self.lora_config["target_modules"] = sorted(targets)  # files hold the unfused projections
        if self.singlora:
            from simpletuner.models.singlora import ramp_schedule, set_ramp

            steps = config.singlora_ramp_up_steps or DEFAULT_SINGLORA_RAMP_STEPS
            count = set_ramp(self.denoiser, ramp_schedule(steps, self.current_step))
            logger.info("SingLoRA on %d layers, ramped in over %d steps", count, steps)
        if self.init in MUTATING_INITS:
            self.initial = {k: v.clone() for k, v in lora_state_dict(self.denoiser).items()}

    def _check_targets(self, targets: list[str]) -> None:
        modules = _targeted_modules(self.denoiser, targets)
        if not modules:
            raise AdapterError(f"the LoRA targets {targets} name no module of the {self.config.model_family} "
                               f"{self.model.denoiser_name}")
        if self.init in MUTATING_INITS or self.init == "loftq" or self.singlora:
            others = sorted(name for name, m in modules.items() if not isinstance(m, torch.nn.Linear))
            if others:
                what = ("`--peft_lora_mode singlora`" if self.singlora
                        else f"`--lora_init_type {self.config.lora_init_type}`")
                raise AdapterError(f"{what} works on Linear layers only; these targets are not: {others[:4]}. "
                                   "Narrow `--peft_lora_target_modules` (or drop `--slider_lora_target`)")

    # --- what files hold -----------------------------------------------------------------------------

    def export_config(self) -> dict[str, Any]:
        """The adapter config a loader needs to rebuild the saved (standard LoRA) layers."""
        exported = dict(self.lora_config)
        if self.init in MUTATING_INITS:
            exported["r"] = 2 * exported["r"]
            exported["lora_alpha"] = 2 * exported["lora_alpha"]
        if self.init in MUTATING_INITS or self.init == "loftq" or self.singlora:
            exported["init_lora_weights"] = "gaussian"  # loaders must not re-run the initialisation
        return exported

    def export_state(self) -> dict[str, torch.Tensor]:
        """The adapter as standard LoRA tensors (PEFT layout, keys relative to the denoiser)."""
        from simpletuner.models.adapters import lora_state_dict

        if self.singlora:
            from simpletuner.models.singlora import singlora_to_lora

            return singlora_to_lora(self.denoiser)
        state = lora_state_dict(self.denoiser)
        if self.initial is not None:
            for key, initial in self.initial.items():
                if key.endswith("lora_A.weight"):
                    state[key] = torch.cat([state[key], initial.to(state[key].dtype)], dim=0)
                elif key.endswith("lora_B.weight"):
                    state[key] = torch.cat([state[key], -initial.to(state[key].dtype)], dim=1)
        return self.fusion.split_lora_state(state) if self.fusion is not None else state

    def _undo_export(self, state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
        """A rank-2r file of a mutating init -> the rank-r trained factors (checking the A₀/B₀ half)."""
        rank = self.config.lora_rank
        restored = {}
        for key, tensor in state.items():
            initial = self.initial.get(key)
            if initial is None:
                restored[key] = tensor
                continue
            if key.endswith("lora_A.weight"):
                trained, saved_initial = tensor[:rank], tensor[rank:]
            else:
                trained, saved_initial = tensor[:, :rank], -tensor[:, rank:]
            if saved_initial.shape != initial.shape or not torch.allclose(saved_initial.float(), initial.float(),
                                                                          atol=1e-5, rtol=1e-4):
                raise AdapterError(f"{source}: the {self.config.lora_init_type} initialisation recorded in the file "
                                   "differs from the one computed now; the base model changed since it was saved")
            restored[key] = trained
        return restored

    # --- saving and loading ------------------------------------------------------------------------

    def save(self, folder: Path, text_encoders=None, provenance: dict[str, str] | None = None) -> Path:
        from safetensors.torch import save_file

        from simpletuner.models.adapters import add_file_metadata

        folder.mkdir(parents=True, exist_ok=True)
        config = self.config
        state = self.export_state()
        exported = self.export_config()
        fmt = formats.resolved_lora_format(config)
        metadata = {formats.META_ADAPTER: "peft", formats.META_FORMAT: fmt,
                    formats.META_CONFIG: json.dumps(exported), **(provenance or {})}
        te_states = text_encoders.lora_states() if text_encoders is not None else {}
        name = self.model.denoiser_name
        if fmt == "comfyui":
            alphas = {name: exported["lora_alpha"],
                      **{n: text_encoders.lora_configs[n]["lora_alpha"] for n in te_states}}
            modules = {name: self.denoiser, **(text_encoders.encoders if te_states else {})}
            tensors = formats.peft_to_comfyui({name: state, **te_states}, alphas, _naming(config), modules)
            file = folder / WEIGHTS_FILE
            save_file(tensors, str(file), metadata=metadata)
        else:
            if te_states:
                file = self.model.save_lora(folder, state, {
                    "lora_config": exported,
                    "text_encoder_lora_config": next(iter(text_encoders.lora_configs.values()), None)},
                    text_encoder_states=te_states)
            else:
                file = self.model.save_lora(folder, state, {"lora_config": exported})
            add_file_metadata(file, metadata)
        if self.singlora:
            from simpletuner.models.singlora import singlora_raw_state

            save_file(singlora_raw_state(self.denoiser), str(folder / SINGLORA_STATE_FILE),
                      metadata={"ramp_step": str(self.current_step())})
        return file

    def _read_state(self, file: Path) -> tuple[dict[str, torch.Tensor], dict[str, float], list[str]]:
        lora_file = formats.LoraFile.read(file)
        name = self.model.denoiser_name
        # a denoiser made of several pipeline components (Wan 2.2's two experts) is read per component,
        # each under its key prefix, which is also its path inside the denoiser
        parts = self.model.lora_components()
        components = parts if list(parts) != [name] else {name: self.denoiser}
        try:
            states, alphas, leftover = formats.peft_state_from_file(lora_file, components, _naming(self.config))
        except formats.LoraFormatError as error:
            raise AdapterError(str(error)) from None
        if not states:
            raise AdapterError(f"{file} holds no adapter weights for the {name} (layout {lora_file.format})")
        if list(components) == [name]:
            state, layer_alphas = states[name], alphas.get(name, {})
        else:
            state = {f"{part}.{key}": value for part, part_state in states.items() for key, value in part_state.items()}
            layer_alphas = {f"{part}.{path}": alpha for part, part_alphas in alphas.items()
                            for path, alpha in part_alphas.items()}
        if self.fusion is not None:
            try:
                state, layer_alphas = self.fusion.merge_lora_state(state, layer_alphas, source=str(file))
            except QkvFusionError as error:
                raise AdapterError(str(error)) from None
        return state, layer_alphas, leftover

    def load_checkpoint(self, file: Path) -> None:
        """Resume: the adapter exactly as it was saved (SingLoRA from its own matrices)."""
        from simpletuner.models.singlora import load_singlora_raw_state

        if self.singlora:
            from safetensors.torch import load_file

            raw = file.parent / SINGLORA_STATE_FILE
            if not raw.is_file():
                raise AdapterError(f"{file.parent} has no {SINGLORA_STATE_FILE}: it was not saved by a SingLoRA run")
            load_singlora_raw_state(self.denoiser, load_file(str(raw)))
            return
        state, alphas, _ = self._read_state(file)
        if self.initial is not None:
            state = self._undo_export(state, str(file))
            alphas = {}  # the file's alpha is 2α for rank 2r; the trained half is this run's own rank and alpha
        try:
            missing = formats.load_peft_state(self.denoiser, state, alphas, source=str(file))
        except formats.LoraFormatError as error:
            raise AdapterError(str(error)) from None
        if missing:
            raise AdapterError(f"{file} lacks weights for {len(missing)} adapter layer(s), e.g. {missing[:3]}; it was "
                               "saved with other LoRA targets")

    def init_from(self, file: Path) -> None:
        """``--init_lora``: start from a saved LoRA (any layout); layers it does not cover keep their init."""
        state, alphas, leftover = self._read_state(file)
        if leftover:
            logger.warning("--init_lora %s: ignoring %d tensors of other components (e.g. %s)", file, len(leftover),
                           leftover[0])
        try:
            missing = formats.load_peft_state(self.denoiser, state, alphas, source=f"`--init_lora` {file}")
        except formats.LoraFormatError as error:
            raise AdapterError(str(error)) from None
        logger.info("--init_lora: adapter initialised from %s (%d layers loaded, %d left at their initial values)",
                    file, len({k.rsplit('.lora_', 1)[0] for k in state}), len(missing))

    @contextlib.contextmanager
    def validation_strength(self):
        yield


# --- LyCORIS ---------------------------------------------------------------------------------------------

_LYCORIS_CLASS_STATE = ("ENABLE_CONV", "TARGET_REPLACE_MODULE", "TARGET_REPLACE_NAME", "LORA_PREFIX", "MODULE_ALGO_MAP",
                        "NAME_ALGO_MAP", "USE_FNMATCH", "TARGET_EXCLUDE_NAME")
_lycoris_defaults: dict[str, Any] | None = None


def _reset_lycoris_presets() -> None:
    """LyCORIS keeps its preset in class attributes; start every network from the library's defaults so
    one run's ``apply_preset`` never leaks into the next (tests run many in one process)."""
    from lycoris import LycorisNetwork

    global _lycoris_defaults
    if _lycoris_defaults is None:
        _lycoris_defaults = {name: copy.deepcopy(getattr(LycorisNetwork, name)) for name in _LYCORIS_CLASS_STATE}
    for name, value in _lycoris_defaults.items():
        setattr(LycorisNetwork, name, copy.deepcopy(value))


def match_quantized_layers(network_class, denoiser: torch.nn.Module) -> None:
    """LyCORIS picks leaf layers by class name (``"Linear"``, ``"Conv2d"``); a quantized base holds
    subclasses under other names (quanto's ``QLinear``/``QConv2d``, bitsandbytes' ``Linear4bit``).
    Where the preset names the plain class, name the quantized subclasses in the denoiser as well, so
    a LyCORIS network adapts the same layers on a quantized base as on an unquantized one."""
    targets = list(network_class.TARGET_REPLACE_MODULE)
    for layer in denoiser.modules():
        for plain in (torch.nn.Linear, torch.nn.Conv2d):
            name = type(layer).__name__
            if isinstance(layer, plain) and plain.__name__ in targets and name not in targets:
                targets.append(name)
    network_class.TARGET_REPLACE_MODULE = targets


def init_lokr_perturbed_normal(network, scale: float) -> int:
    """``--init_lokr_norm``: LoKr starts from a small perturbation instead of a zero update.

    ``w1`` becomes all ones and ``w2`` a normal draw with the mean and spread of the layer's own
    weight, times ``scale`` (so the initial update is ``kron(1, w2)``, a scaled weight-like noise).
    Needs full ``w2`` matrices (``full_matrix: true`` or a large ``linear_dim``). Returns the layer count.
    """
    from lycoris.modules.lokr import LokrModule

    count = 0
    with torch.no_grad():
        for lora in network.loras:
            if not isinstance(lora, LokrModule):
                continue
            if not isinstance(getattr(lora, "lokr_w2", None), torch.nn.Parameter):
                raise AdapterError("`--init_lokr_norm` needs full LoKr w2 matrices; add \"full_matrix\": true (or a "
                                   "linear_dim at least half the layer width) to `--lycoris_config`")
            if isinstance(getattr(lora, "lokr_w1", None), torch.nn.Parameter):
                lora.lokr_w1.fill_(1.0)
            else:  # w1 = w1_a @ w1_b: constant factors whose product is all ones
                rank = lora.lokr_w1_b.shape[0]
                lora.lokr_w1_a.fill_(rank ** -0.5)
                lora.lokr_w1_b.fill_(rank ** -0.5)
            weight = lora.org_weight.detach().float()
            noise = torch.randn(lora.lokr_w2.shape, device=weight.device)
            noise = (noise - noise.mean()) / noise.std().clamp_min(1e-12) * weight.std() + weight.mean()
            lora.lokr_w2.copy_((noise * scale).to(lora.lokr_w2.dtype))
            count += 1
    return count


class LycorisAdapter:
    """A LyCORIS network (lora, locon, loha, lokr, full, ia3, ...) over the denoiser."""

    def __init__(self, model, config, current_step: Callable[[], int]):
        self.model = model
        self.config = config
        self.denoiser = model.denoiser
        self.network = None
        from simpletuner.options.adapter_rules import parse_lycoris_config

        self.raw_config = dict(parse_lycoris_config(config.lycoris_config))
        self.lora_config = {"lycoris_config": self.raw_config}

    def attach(self) -> None:
        from lycoris import LycorisNetwork, create_lycoris

        settings = copy.deepcopy(self.raw_config)
        _reset_lycoris_presets()
        preset = settings.pop("apply_preset", None)
        if preset:
            LycorisNetwork.apply_preset(preset)
        match_quantized_layers(LycorisNetwork, self.denoiser)
        multiplier = float(settings.pop("multiplier", 1.0))
        linear_dim = int(settings.pop("linear_dim", 4))
        linear_alpha = float(settings.pop("linear_alpha", 1.0))
        self.denoiser.requires_grad_(False)
        network = create_lycoris(self.denoiser, multiplier, linear_dim=linear_dim, linear_alpha=linear_alpha,
                                 warn_on_unmatched=False, **settings)
        if not network.loras:
            raise AdapterError(f"`--lycoris_config` adapts no module of the {self.config.model_family} "
                               f"{self.model.denoiser_name}; check its apply_preset targets")
        if self.config.init_lokr_norm:
            count = init_lokr_perturbed_normal(network, self.config.init_lokr_norm)
            logger.info("--init_lokr_norm %g: %d LoKr layers start perturbed", self.config.init_lokr_norm, count)
        network.apply_to()
        device = next(self.denoiser.parameters()).device
        network.to(device)
        for parameter in network.parameters():
            parameter.data = parameter.data.float()  # adapters train in fp32 even on a bf16 base
            parameter.requires_grad_(True)
        # a submodule of the denoiser: parameters(), DDP, EMA, .to() and train()/eval() all reach it
        self.denoiser.add_module(formats.LYCORIS_ATTRIBUTE, network)
        self.network = network
        logger.info("LyCORIS %s: %d modules, %s", self.raw_config.get("algo", "lora"), len(network.loras),
                    dict(network.algo_table) if hasattr(network, "algo_table") else "")

    def save(self, folder: Path, text_encoders=None, provenance: dict[str, str] | None = None) -> Path:
        """LyCORIS' own file (``save_weights``, with ``lycoris_config`` in the metadata); in the comfyui
        layout the ``lycoris_`` names carry the family's kohya prefix instead."""
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        fmt = formats.resolved_lora_format(self.config)
        metadata = {"lycoris_config": json.dumps(self.raw_config), formats.META_ADAPTER: "lycoris",
                    formats.META_FORMAT: fmt, **(provenance or {})}
        file = folder / WEIGHTS_FILE
        if fmt == "comfyui":
            prefix = _naming(self.config).prefixes[self.model.denoiser_name]
            state = {prefix + key[len("lycoris"):]: tensor.detach().to("cpu").contiguous()
                     for key, tensor in self.network.state_dict().items()}
            save_file(state, str(file), metadata=metadata)
        else:
            self.network.save_weights(str(file), None, metadata)
        return file

    def _read_state(self, file: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
        lora_file = formats.LoraFile.read(file)
        if lora_file.format == "diffusers":
            raise AdapterError(f"{file} is a PEFT/diffusers LoRA; it loads with `--lora_type standard`, not into a "
                               "LyCORIS network")
        naming = _naming(self.config)
        prefixes = ["lycoris"] + ([naming.prefixes[self.model.denoiser_name]] if naming else [])
        state, leftover = {}, []
        for key, tensor in lora_file.tensors.items():
            prefix = next((p for p in prefixes if key.startswith(p + "_")), None)
            if prefix is None:
                leftover.append(key)
            else:
                state["lycoris" + key[len(prefix):]] = tensor
        return state, leftover

    def _load(self, state: dict[str, torch.Tensor], source: str) -> list[str]:
        try:
            missing, unexpected = self.network.load_state_dict(state, strict=False)
        except RuntimeError as error:
            raise AdapterError(f"{source} does not fit the network `--lycoris_config` builds (another algo or "
                               f"dimensions?): {str(error).splitlines()[0]}") from None
        if unexpected:
            raise AdapterError(f"{source}: {len(unexpected)} tensors match no module of the LyCORIS network, e.g. "
                               f"{unexpected[:3]}")
        return list(missing)

    def load_checkpoint(self, file: Path) -> None:
        state, leftover = self._read_state(file)
        missing = self._load(state, str(file))
        if missing or leftover:
            raise AdapterError(f"{file} does not match this run's LyCORIS network: missing {missing[:3]}, "
                               f"unexpected {leftover[:3]}")

    def init_from(self, file: Path) -> None:
        state, leftover = self._read_state(file)
        if leftover:
            logger.warning("--init_lora %s: ignoring %d tensors of other components (e.g. %s)", file, len(leftover),
                           leftover[0])
        missing = self._load(state, f"`--init_lora` {file}")
        logger.info("--init_lora: LyCORIS network initialised from %s (%d tensors, %d left at their initial values)",
                    file, len(state), len(missing))

    @contextlib.contextmanager
    def validation_strength(self):
        """``--validation_lycoris_strength``: the network's multiplier while sampling, restored after."""
        strength = self.config.validation_lycoris_strength
        if strength is None:
            yield
            return
        previous = self.network.multiplier
        self.network.set_multiplier(strength)
        try:
            yield
        finally:
            self.network.set_multiplier(previous)
