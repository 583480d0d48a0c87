"""How adapter keys are named in ComfyUI's layout, as plain data (no torch).

The family table (:mod:`simpletuner.models.registry`) names each family's ComfyUI naming, and config
validation reads it before any model loads, so the naming record and the shared naming presets live
here, apart from the converters in :mod:`simpletuner.models.lora_formats`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

PEFT_SUFFIXES = {"lora_A.weight": "down", "lora_B.weight": "up"}
KOHYA_SUFFIXES = {"lora_down.weight": "down", "lora_up.weight": "up"}


@dataclass(frozen=True)
class ComfyNaming:
    """How a family's adapter keys are named in the layout ComfyUI loads.

    Attributes:
        prefixes: pipeline component name (``unet``, ``transformer``, ``text_encoder``) -> key prefix.
        style: ``kohya``: ``<prefix>_<path with . as _>.lora_down.weight`` / ``.lora_up.weight``;
            ``dotted``: ``<prefix>.<path>.lora_A.weight`` / ``.lora_B.weight``. Both write ``.alpha``.
        renames: ``(diffusers fragment, native fragment)`` pairs applied to module paths, for families
            whose native checkpoint names differ from diffusers' (e.g. Wan's ``attn1.to_q`` ->
            ``self_attn.q``). Applied in order when saving, in reverse when loading.
    """

    prefixes: Mapping[str, str]
    style: str = "kohya"
    renames: tuple[tuple[str, str], ...] = field(default=())
    roots: Mapping[str, str] = field(default_factory=dict)

    def rooted_path(self, component: str, path: str, module) -> str:
        """``path`` under the component's declared root module when the live model lacks that level.

        ComfyUI names CLIP text-encoder weights ``text_model.encoder.layers...``; transformers 5's
        ``CLIPTextModel`` no longer has the ``text_model`` level (``CLIPTextModelWithProjection`` still
        does), so its module paths start at ``encoder.``. The file must carry ComfyUI's names either way.
        """
        root = self.roots.get(component)
        if not root or module is None or hasattr(module, root):
            return path
        return f"{root}.{path}"

    @property
    def suffixes(self) -> dict[str, str]:
        return dict(KOHYA_SUFFIXES) if self.style == "kohya" else dict(PEFT_SUFFIXES)

    def module_key(self, component: str, path: str) -> str:
        for diffusers_name, native_name in self.renames:
            path = path.replace(diffusers_name, native_name)
        prefix = self.prefixes[component]
        return f"{prefix}_{path.replace('.', '_')}" if self.style == "kohya" else f"{prefix}.{path}"


#: CLIP text encoders: ComfyUI's key map names their layers under ``text_model.`` (see ``rooted_path``).
CLIP_ROOTS = {"text_encoder": "text_model", "text_encoder_2": "text_model"}

KOHYA_SD = ComfyNaming({"unet": "lora_unet", "text_encoder": "lora_te"}, roots=CLIP_ROOTS)

#: Wan's diffusers module names -> the original checkpoint's (ComfyUI's) names inside each block. The
#: longer ``to_out.0`` comes before the projections so no rename rewrites another's result.
WAN_NATIVE_NAMES = (
    ("attn1.to_out.0", "self_attn.o"), ("attn1.to_q", "self_attn.q"), ("attn1.to_k", "self_attn.k"),
    ("attn1.to_v", "self_attn.v"), ("attn2.to_out.0", "cross_attn.o"), ("attn2.to_q", "cross_attn.q"),
    ("attn2.to_k", "cross_attn.k"), ("attn2.to_v", "cross_attn.v"), ("attn2.add_k_proj", "cross_attn.k_img"),
    ("attn2.add_v_proj", "cross_attn.v_img"), ("ffn.net.0.proj", "ffn.0"), ("ffn.net.2", "ffn.2"),
)

#: LTX-Video: native block names equal diffusers' (attn1.to_q, ff.net.2, ...); only the patch and
#: timestep embedders differ.
LTX_NATIVE_NAMES = (("proj_in", "patchify_proj"), ("time_embed", "adaln_single"))
