"""Text-encoder LoRA must not depend on transformers' PEFT integration.

transformers' ``add_adapter`` refuses to run unless the installed peft is at least the version that
transformers release names (5.24 asked for a peft that was not released yet), so a dependency update
alone used to break every ``--train_text_encoder`` run. simpletuner injects with peft itself.
"""

from __future__ import annotations

import pytest
import torch


def tiny_clip_text_encoder() -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    return CLIPTextModel(CLIPTextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=8))


def test_text_encoder_lora_never_calls_transformers_version_gated_add_adapter(monkeypatch: pytest.MonkeyPatch):
    from transformers import PreTrainedModel

    from simpletuner.models.adapters import add_lora, lora_state_dict
    from simpletuner.training.text_encoder import TEXT_ENCODER_LORA_TARGETS

    def gated(*args, **kwargs):
        raise ValueError("The version of PEFT you are using is not compatible")

    monkeypatch.setattr(PreTrainedModel, "add_adapter", gated)
    encoder = tiny_clip_text_encoder()
    ids = torch.tensor([[1, 2, 3, 4]])
    before = encoder(ids).last_hidden_state.detach()
    add_lora(encoder, TEXT_ENCODER_LORA_TARGETS, rank=2, alpha=2, dropout=0.0)

    trainable = {name for name, p in encoder.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    assert len(trainable) == 2 * 4  # A and B on q, k, v and out of the one layer
    # a fresh LoRA starts as the identity (B = 0) and its weights are collected under PEFT's names
    torch.testing.assert_close(encoder(ids).last_hidden_state, before)
    state = lora_state_dict(encoder)
    assert len(state) == 8 and all(".lora_A." in key or ".lora_B." in key for key in state)
