"""Validation rules CREPA and U-REPA share (they declare the same teacher and schedule options under
their own prefix). Torch-free.

A tuning option refines a switch; while that switch is off the option would be ignored, so it is
refused instead (decay options need a decaying schedule, the power the polynomial one, the threshold's
options a threshold).
"""

from __future__ import annotations

from pathlib import Path

from simpletuner.options import ConfigError

#: ``--crepa_model`` / ``--urepa_model`` short names and the hub repositories of those DINOv2s.
DINOV2_HUB_IDS = {
    "dinov2_vits14": "facebook/dinov2-small",
    "dinov2_vitb14": "facebook/dinov2-base",
    "dinov2_vitg14": "facebook/dinov2-giant",
}
ENCODER_NAMES = tuple(DINOV2_HUB_IDS)


def _set(config, name: str) -> bool:
    return name in config.explicit and getattr(config, name) is not None


def refuse_unless(config, names: tuple[str, ...], condition: bool, needs: str) -> None:
    """Refuse the first of ``names`` the user set while ``condition`` (described by ``needs``) is false."""
    if condition:
        return
    for name in names:
        if _set(config, name):
            raise ConfigError(f"`--{name}` has no effect without {needs}; add it or remove `--{name}`")


def check_encoder(config, prefix: str) -> None:
    """``--<prefix>_model`` is a known DINOv2 name or a folder."""
    model = getattr(config, f"{prefix}_model")
    if model not in ENCODER_NAMES and not Path(model).is_dir():
        raise ConfigError(f"`--{prefix}_model` {model!r} is neither {', '.join(ENCODER_NAMES)} nor a folder holding a "
                          "Dinov2Model (config.json and weights); fix the name or the path")


def check_schedule(config, prefix: str) -> None:
    """The weight schedule's options agree with ``--<prefix>_scheduler`` and the similarity threshold."""
    scheduler = getattr(config, f"{prefix}_scheduler")
    decaying = scheduler != "constant"
    refuse_unless(config, (f"{prefix}_decay_steps", f"{prefix}_lambda_end"), decaying,
                  f"a decaying `--{prefix}_scheduler` (linear, cosine or polynomial)")
    refuse_unless(config, (f"{prefix}_power",), scheduler == "polynomial", f"`--{prefix}_scheduler polynomial`")
    refuse_unless(config, (f"{prefix}_similarity_ema_decay", f"{prefix}_threshold_mode"),
                  getattr(config, f"{prefix}_similarity_threshold") is not None, f"`--{prefix}_similarity_threshold`")
    if decaying and not getattr(config, f"{prefix}_decay_steps") and not config.max_train_steps:
        raise ConfigError(f"`--{prefix}_scheduler {scheduler}` decays over `--{prefix}_decay_steps`, or over "
                          "the whole run when that is 0, which needs `--max_train_steps`; set one of them")


def _uses_teacher(config) -> bool:
    """A DINOv2 teacher runs: U-REPA, or CREPA without ``--crepa_use_backbone_features``."""
    return bool(config.urepa_enabled) or (bool(config.crepa_enabled) and not config.crepa_use_backbone_features)


def check_teacher_features(config) -> None:
    """``--alignment_teacher_features`` needs a DINOv2 teacher; the Tiny AutoEncoder only decodes live features."""
    refuse_unless(config, ("alignment_teacher_features",), _uses_teacher(config),
                  "a DINOv2 teacher (`--urepa_enabled`, or `--crepa_enabled` without `--crepa_use_backbone_features`)")
    if config.urepa_enabled and config.urepa_use_tae and config.alignment_teacher_features != "live":
        raise ConfigError("`--urepa_use_tae` decodes latents for the teacher every step, but the teacher's features are "
                          "cached once per image from the original pixels (`--alignment_teacher_features cached`), so "
                          "no decoder runs; add `--alignment_teacher_features live` or remove `--urepa_use_tae`")
    refuse_unless(config, ("tiny_autoencoder_path",),
                  bool(config.urepa_enabled and config.urepa_use_tae) or bool(config.validation_preview),
                  "`--urepa_use_tae true` or `--validation_preview` (the users of the Tiny AutoEncoder)")
    path = config.tiny_autoencoder_path
    if path and (path.startswith((".", "/", "~")) or Path(path).exists()) and not Path(path).expanduser().is_dir():
        raise ConfigError(f"`--tiny_autoencoder_path` {path!r} is not a folder; give the folder holding a diffusers "
                          "AutoencoderTiny (config.json and weights) or a hub id")


ALIGNMENT_RULES = (check_teacher_features,)
