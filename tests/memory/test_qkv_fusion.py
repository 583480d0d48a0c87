"""--fuse_qkv_projections on the real tiny denoisers: the fused model computes what the unfused one
does, a LoRA trained on the fused projections is saved as an exact per-projection LoRA, files merge
back, and a full model is written in the unfused layout."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")

from simpletuner.models.lora_formats import load_peft_state, module_paths  # noqa: E402
from simpletuner.models.qkv_fusion import QkvFusion, QkvFusionError, fusion_of  # noqa: E402

FAMILIES = ("sd1x", "sdxl", "kolors", "pixart_sigma", "flux")


def tiny_denoiser(family: str) -> torch.nn.Module:
    """The family's tiny denoiser with random weights (the same classes and configs the tiny models use)."""
    from diffusers import FluxTransformer2DModel, PixArtTransformer2DModel, UNet2DConditionModel

    torch.manual_seed(0)
    if family == "sd1x":
        from simpletuner.testing.tiny_models import UNET_CONFIG

        return UNet2DConditionModel(**UNET_CONFIG).eval()
    if family == "sdxl":
        from simpletuner.testing.tiny.sdxl import unet_config

        return UNet2DConditionModel(**unet_config(False)).eval()
    if family == "kolors":
        from simpletuner.testing.tiny.kolors import UNET_CONFIG

        return UNet2DConditionModel(**UNET_CONFIG).eval()
    if family == "pixart_sigma":
        from simpletuner.testing.tiny.pixart_sigma import TRANSFORMER_CONFIG

        return PixArtTransformer2DModel(**TRANSFORMER_CONFIG).eval()
    from simpletuner.testing.tiny.flux import TRANSFORMER_CONFIG

    return FluxTransformer2DModel(**TRANSFORMER_CONFIG).eval()


def forward(denoiser: torch.nn.Module) -> torch.Tensor:
    """One deterministic forward pass with inputs shaped for the denoiser's class."""
    g = torch.Generator().manual_seed(1)
    config = denoiser.config
    with torch.no_grad():
        if type(denoiser).__name__ == "UNet2DConditionModel":
            kwargs = {}
            if config.addition_embed_type == "text_time":
                text_width = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
                kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(2, text_width, generator=g),
                                               "time_ids": torch.rand(2, 6, generator=g) * 64}
            return denoiser(torch.randn(2, config.in_channels, 8, 8, generator=g), torch.tensor([10, 700]),
                            encoder_hidden_states=torch.randn(2, 7, config.encoder_hid_dim or config.cross_attention_dim,
                                                                generator=g),
                            **kwargs).sample
        if type(denoiser).__name__ == "PixArtTransformer2DModel":
            return denoiser(torch.randn(2, config.in_channels, 8, 8, generator=g),
                            encoder_hidden_states=torch.randn(2, 5, config.caption_channels, generator=g),
                            timestep=torch.tensor([10, 700]),
                            added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
        tokens, text = 16, 5
        return denoiser(torch.randn(2, tokens, config.in_channels, generator=g),
                        encoder_hidden_states=torch.randn(2, text, config.joint_attention_dim, generator=g),
                        pooled_projections=torch.randn(2, config.pooled_projection_dim, generator=g),
                        timestep=torch.tensor([0.1, 0.7]), guidance=torch.tensor([3.5, 3.5]),
                        img_ids=torch.rand(tokens, 3, generator=g) * 4, txt_ids=torch.zeros(text, 3)).sample


def add_random_lora(denoiser: torch.nn.Module, targets: list[str], rank: int = 4, use_dora: bool = False) -> None:
    """PEFT LoRA with non-zero B (as after training), so the adapter changes the output."""
    from simpletuner.models.adapters import add_lora

    add_lora(denoiser, targets, rank, rank, 0.0, init_lora_weights=True, use_dora=use_dora)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, parameter in denoiser.named_parameters():
            if "lora_B" in name or "lora_magnitude" in name:
                parameter.add_(torch.randn(parameter.shape, generator=g) * 0.2)


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_model_computes_the_same_and_drops_the_replaced_projections(family):
    denoiser = tiny_denoiser(family)
    reference = forward(denoiser)
    parameters = sum(p.numel() for p in denoiser.parameters())
    fusion = QkvFusion.apply(denoiser)
    fused_out = forward(denoiser)
    torch.testing.assert_close(fused_out, reference, atol=2e-5, rtol=1e-4)
    assert sum(p.numel() for p in denoiser.parameters()) == parameters  # the originals are gone, not duplicated
    names = {name for name, _ in denoiser.named_modules()}
    for group in fusion.groups:
        assert group.fused in names and not set(group.parts) & names
    assert fusion_of(denoiser) is fusion and QkvFusion.apply(denoiser) is fusion  # applying twice is a no-op
    kinds = {g.fused.rsplit(".", 1)[1] for g in fusion.groups}
    assert kinds == ({"to_qkv", "to_added_qkv"} if family == "flux" else {"to_qkv", "to_kv"})
    # the names adapter files use are the unfused ones
    assert module_paths(denoiser) >= {part for g in fusion.groups for part in g.parts}


@pytest.mark.parametrize("family,use_dora", [("sd1x", False), ("sdxl", True), ("pixart_sigma", False),
                                             ("flux", False), ("flux", True)])
def test_a_lora_on_fused_projections_is_saved_as_an_exact_per_projection_lora(family, use_dora):
    targets = ["to_q", "to_k", "to_v", "to_out.0"] + (["add_q_proj", "add_k_proj", "add_v_proj"]
                                                      if family == "flux" else [])
    plain = tiny_denoiser(family)
    fused = copy.deepcopy(plain)
    fusion = QkvFusion.apply(fused)
    add_random_lora(fused, fusion.adapter_targets(targets), use_dora=use_dora)
    from simpletuner.models.adapters import lora_state_dict

    fused_state = lora_state_dict(fused)
    split = fusion.split_lora_state(fused_state)
    assert not any(".to_qkv." in k or ".to_kv." in k or ".to_added_qkv." in k for k in split)
    # an unfused model with a LoRA on the separate projections, loaded from the split tensors, matches
    add_lora_targets = targets
    from simpletuner.models.adapters import add_lora

    add_lora(plain, add_lora_targets, 4, 4, 0.0, use_dora=use_dora)
    assert load_peft_state(plain, split, source="test") == []
    torch.testing.assert_close(forward(plain), forward(fused), atol=5e-5, rtol=1e-4)
    # and merging the file back gives the fused tensors exactly
    merged, _ = fusion.merge_lora_state(split)
    assert merged.keys() == fused_state.keys()
    for key, tensor in fused_state.items():
        assert torch.equal(merged[key], tensor), key


def test_merging_fills_unadapted_projections_with_zero_rows_and_rescales_differing_alphas():
    denoiser = tiny_denoiser("sd1x")
    fusion = QkvFusion.apply(denoiser)
    group = next(g for g in fusion.groups if g.fused.endswith("to_qkv"))
    q, k, v = group.parts
    a = torch.randn(4, 32)
    b_q, b_v = torch.randn(group.sizes[0], 4), torch.randn(group.sizes[2], 4)
    state = {f"{q}.lora_A.weight": a, f"{q}.lora_B.weight": b_q, f"{v}.lora_A.weight": a, f"{v}.lora_B.weight": b_v}
    merged, alphas = fusion.merge_lora_state(state, {q: 4.0, v: 8.0})
    b = merged[f"{group.fused}.lora_B.weight"]
    assert torch.equal(b[: group.sizes[0]], b_q)
    assert torch.count_nonzero(b[group.sizes[0]: group.sizes[0] + group.sizes[1]]) == 0  # k: no change
    torch.testing.assert_close(b[-group.sizes[2]:], b_v * 2)  # v's alpha 8 expressed at the group's alpha 4
    assert alphas == {group.fused: 4.0}


def test_merging_refuses_projections_with_different_a_matrices_and_partial_targets():
    denoiser = tiny_denoiser("sd1x")
    fusion = QkvFusion.apply(denoiser)
    group = next(g for g in fusion.groups if g.fused.endswith("to_qkv"))
    state = {f"{part}.lora_{m}.weight": torch.randn(*(size, 4) if m == "B" else (4, 32))
             for part, size in zip(group.parts, group.sizes) for m in "AB"}
    with pytest.raises(QkvFusionError, match="different LoRA A matrices.*remove `--fuse_qkv_projections`"):
        fusion.merge_lora_state(state, source="kohya.safetensors")
    with pytest.raises(QkvFusionError, match="only \\['to_q', 'to_k'\\].*not .*to_v"):
        fusion.adapter_targets(["to_q", "to_k"])
    # targets naming only the self-attention fuse only those layers; cross-attention keeps its to_q
    targets = fusion.adapter_targets(["attn1.to_q", "attn1.to_k", "attn1.to_v"])
    assert all(".attn1.to_qkv" in t for t in targets[3:]) and len(targets) > 3


def test_a_full_model_is_saved_unfused_and_the_fusion_comes_back_unchanged(tmp_path):
    from diffusers import UNet2DConditionModel

    plain = tiny_denoiser("sd1x")
    fused = copy.deepcopy(plain)
    fusion = QkvFusion.apply(fused)
    with torch.no_grad():  # training changed the fused weights
        for group in fusion.groups:
            fused.get_submodule(group.fused).weight.mul_(1.5)
    after_training = forward(fused)
    fused_keys = set(fused.state_dict())
    with fusion.unfused(fused) as unfused:
        assert set(unfused.state_dict()) == set(plain.state_dict())
        unfused.save_pretrained(tmp_path / "unet", safe_serialization=True)
    assert set(fused.state_dict()) == fused_keys
    torch.testing.assert_close(forward(fused), after_training, atol=0, rtol=0)
    reloaded = UNet2DConditionModel.from_pretrained(tmp_path / "unet").eval()
    torch.testing.assert_close(forward(reloaded), after_training, atol=2e-5, rtol=1e-4)


def test_models_without_a_fused_form_are_refused_with_the_reason():
    from simpletuner.testing.tiny.deepfloyd import build_tiny_pipeline

    built = build_tiny_pipeline(0)
    unet = (built[0] if isinstance(built, tuple) else built).unet
    with pytest.raises(QkvFusionError, match="added KV projections"):
        QkvFusion.apply(unet)
    with pytest.raises(QkvFusionError, match="has no fused attention"):
        QkvFusion.apply(torch.nn.Linear(2, 2))


def test_attention_falls_back_to_sdpa_off_hopper_and_names_why(monkeypatch):
    from simpletuner.models import qkv_fusion

    denoiser = tiny_denoiser("flux")
    QkvFusion.apply(denoiser)
    assert qkv_fusion.select_attention(denoiser, torch.device("cpu")) == \
        "PyTorch SDPA (Flash Attention 3 needs a CUDA GPU; training runs on cpu)"
    # on a Hopper GPU with FA3 installed, Flux's dispatcher-based processors are switched over
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    from diffusers.models import attention_dispatch

    monkeypatch.setattr(attention_dispatch, "_CAN_USE_FLASH_ATTN_3", True, raising=False)
    chosen = []
    monkeypatch.setattr(type(denoiser), "set_attention_backend", lambda self, name: chosen.append(name))
    assert qkv_fusion.select_attention(denoiser, torch.device("cuda")) == "Flash Attention 3"
    assert chosen == ["_flash_3"]
    unet = tiny_denoiser("sd1x")
    QkvFusion.apply(unet)
    assert "call SDPA directly" in qkv_fusion.select_attention(unet, torch.device("cuda"))
