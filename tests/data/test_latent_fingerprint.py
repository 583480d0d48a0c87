"""The latent cache key follows every option that changes what the VAE encodes (--vae_dtype, tiling)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from simpletuner.models.base import ModelFamily
from tests.data.fake_model import make_config


def latent_parts(root: Path, **options) -> dict[str, str]:
    """``ModelFamily.latent_fingerprint_parts`` for a resolved config, without loading any weights."""
    stand_in = SimpleNamespace(config=make_config(root, **options),
                               _encoder_identity=lambda: {"family": "sd1x", "model": "tiny"})
    return ModelFamily.latent_fingerprint_parts(stand_in)


def test_fingerprint_keeps_old_key_when_vae_dtype_is_left_at_default(tmp_path: Path) -> None:
    never_set = latent_parts(tmp_path)
    assert latent_parts(tmp_path, vae_dtype="default") == never_set == {"family": "sd1x", "model": "tiny"}


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_fingerprint_changes_with_an_explicit_vae_dtype(tmp_path: Path, dtype: str) -> None:
    parts = latent_parts(tmp_path, vae_dtype=dtype)
    assert parts["vae_dtype"] == dtype
    assert parts != latent_parts(tmp_path)


def test_fingerprint_tells_vae_dtypes_apart_and_combines_with_tiling(tmp_path: Path) -> None:
    assert latent_parts(tmp_path, vae_dtype="fp16") != latent_parts(tmp_path, vae_dtype="bf16")
    both = latent_parts(tmp_path, vae_dtype="bf16", vae_enable_tiling=True)
    assert both["vae_dtype"] == "bf16" and both["vae_tiling"] == "on"
