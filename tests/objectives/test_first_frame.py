"""The clean first frame of image-to-video training (spec 004), checked on values: which entries
are noised, which are masked out of the loss, which timestep each frame and token carries."""

from __future__ import annotations

import pytest
import torch

from simpletuner.objectives.first_frame import (apply_clean_first_frame, conditioned_samples, first_frame_mask,
                                                frame_timesteps, token_timesteps)

SHAPE = (3, 2, 4, 4, 6)  # B, C, F, H, W


def clips():
    generator = torch.Generator().manual_seed(0)
    clean = torch.randn(SHAPE, generator=generator)
    noise = torch.randn(SHAPE, generator=generator)
    noisy = 0.3 * clean + 0.7 * noise
    return clean, noise, noisy


def test_mask_is_zero_exactly_on_the_first_frame_of_every_sample():
    mask = first_frame_mask(SHAPE)
    assert mask.shape == (3, 1, 4, 1, 1)
    assert mask[:, 0, :, 0, 0].tolist() == [[0, 1, 1, 1]] * 3


def test_mask_follows_the_per_sample_switch_and_the_clean_frame_count():
    mask = first_frame_mask(SHAPE, conditioned=torch.tensor([True, False, True]), clean_frames=2)
    assert mask[:, 0, :, 0, 0].tolist() == [[0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 1, 1]]
    assert first_frame_mask(SHAPE, clean_frames=0).eq(1).all()


def test_clean_first_frame_replaces_frame_zero_and_leaves_everything_else_bit_for_bit():
    clean, _, noisy = clips()
    out = apply_clean_first_frame(noisy, clean)
    assert torch.equal(out[:, :, 0], clean[:, :, 0])
    assert torch.equal(out[:, :, 1:], noisy[:, :, 1:])
    assert not torch.equal(noisy[:, :, 0], clean[:, :, 0])  # the replacement did something


def test_unconditioned_samples_keep_their_noisy_first_frame():
    clean, _, noisy = clips()
    out = apply_clean_first_frame(noisy, clean, conditioned=torch.tensor([False, True, False]))
    assert torch.equal(out[0], noisy[0]) and torch.equal(out[2], noisy[2])
    assert torch.equal(out[1, :, 0], clean[1, :, 0]) and torch.equal(out[1, :, 1:], noisy[1, :, 1:])


def test_partial_noise_puts_the_conditioning_frame_at_that_sigma_on_the_flow_path():
    clean, noise, noisy = clips()
    out = apply_clean_first_frame(noisy, clean, noise=noise, noise_level=0.05)
    torch.testing.assert_close(out[:, :, 0], 0.95 * clean[:, :, 0] + 0.05 * noise[:, :, 0], rtol=0, atol=1e-6)
    assert torch.equal(out[:, :, 1:], noisy[:, :, 1:])
    with pytest.raises(ValueError, match="needs the noise"):
        apply_clean_first_frame(noisy, clean, noise_level=0.05)


def test_a_masked_loss_ignores_whatever_the_model_predicts_for_the_conditioning_frame():
    clean, noise, _ = clips()
    target = noise - clean
    prediction = target.clone()
    prediction[:, :, 0] += 100.0  # wrong only on the conditioning frame
    mask = first_frame_mask(SHAPE)
    elementwise = (prediction - target).pow(2) * mask
    assert elementwise.sum().item() == 0.0
    assert ((prediction - target).pow(2)).sum().item() > 0


def test_frame_timesteps_are_zero_on_the_clean_frame_and_the_sample_timestep_elsewhere():
    mask = first_frame_mask(SHAPE, conditioned=torch.tensor([True, False, True]))
    timesteps = torch.tensor([900.0, 500.0, 10.0])
    assert frame_timesteps(timesteps, mask).tolist() == [[0, 900, 900, 900], [500] * 4, [0, 10, 10, 10]]
    per_frame = torch.tensor([[1.0, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]])
    assert frame_timesteps(per_frame, mask, clean_timestep=50.0).tolist() == [
        [50, 2, 3, 4], [5, 6, 7, 8], [50, 10, 11, 12]]


def test_token_timesteps_match_diffusers_wan22_first_frame_map():
    """diffusers' Wan 2.2 TI2V pipeline: ``(mask[0][0][:, ::2, ::2] * t).flatten()`` with a mask of
    ones and zeros on latent frame 0; ours must give the same sequence."""
    shape = (1, 2, 3, 4, 6)
    t = torch.tensor([700.0])
    diffusers_mask = torch.ones(1, 1, 3, 4, 6)
    diffusers_mask[:, :, 0] = 0
    expected = (diffusers_mask[0][0][:, ::2, ::2] * t).flatten()
    ours = token_timesteps(frame_timesteps(t, first_frame_mask(shape)), shape, patch_size=(1, 2, 2))
    assert torch.equal(ours[0], expected)
    assert ours.shape == (1, 3 * 2 * 3)


def test_token_timesteps_order_is_frame_major():
    shape = (1, 1, 2, 2, 2)
    ours = token_timesteps(torch.tensor([[1.0, 2.0]]), shape, patch_size=(1, 1, 1))
    assert ours.tolist() == [[1, 1, 1, 1, 2, 2, 2, 2]]
    with pytest.raises(ValueError, match="do not split"):
        token_timesteps(torch.tensor([[1.0, 2.0]]), (1, 1, 2, 3, 2), patch_size=(1, 2, 2))


def test_wan_transformer_reads_the_token_timesteps_like_a_scalar_when_they_are_uniform():
    """A real (tiny) WanTransformer3DModel gives the same output for ``timestep=[t]`` and for the
    per-token map of a uniform t: the map is in the order the transformer expects."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
                                  out_channels=4, text_dim=16, freq_dim=32, ffn_dim=32, num_layers=1,
                                  rope_max_seq_len=32).eval()
    shape = (1, 4, 3, 4, 4)
    hidden = torch.randn(shape)
    text = torch.randn(1, 5, 16)
    t = torch.tensor([600.0])
    with torch.no_grad():
        scalar = model(hidden, t, text, return_dict=False)[0]
        tokens = token_timesteps(torch.full((1, 3), 600.0), shape)
        mapped = model(hidden, tokens, text, return_dict=False)[0]
        first_clean = model(hidden, token_timesteps(frame_timesteps(t, first_frame_mask(shape)), shape), text,
                            return_dict=False)[0]
    torch.testing.assert_close(mapped, scalar, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(first_clean[:, :, 0], scalar[:, :, 0], atol=1e-4)  # frame 0 now reads timestep 0


def test_conditioned_samples_draw_only_when_the_probability_is_between_zero_and_one():
    state = torch.random.get_rng_state()
    assert conditioned_samples(4, 1.0).tolist() == [True] * 4
    assert conditioned_samples(4, 0.0).tolist() == [False] * 4
    assert torch.equal(torch.random.get_rng_state(), state)  # no random number consumed
    drawn = conditioned_samples(10_000, 0.3, generator=torch.Generator().manual_seed(1))
    assert 0.27 < drawn.float().mean().item() < 0.33
    with pytest.raises(ValueError, match="between 0 and 1"):
        conditioned_samples(2, 1.5)


def test_image_latents_are_refused_with_the_shape_named():
    with pytest.raises(ValueError, match=r"\[B, C, F, H, W\].*\(2, 4, 8, 8\)"):
        first_frame_mask((2, 4, 8, 8))


def test_noise_levels_may_differ_per_sample():
    clean, noise, noisy = clips()
    levels = torch.tensor([0.0, 0.2, 0.5])
    out = apply_clean_first_frame(noisy, clean, noise=noise, noise_level=levels)
    for sample, level in enumerate(levels.tolist()):
        expected = (1 - level) * clean[sample, :, 0] + level * noise[sample, :, 0]
        torch.testing.assert_close(out[sample, :, 0], expected, rtol=0, atol=1e-6)
    assert torch.equal(out[0, :, 0], clean[0, :, 0])  # level 0 is exactly clean
    mask = first_frame_mask(SHAPE)
    assert frame_timesteps(torch.tensor([900.0, 500.0, 100.0]), mask, clean_timestep=levels * 1000)[:, 0].tolist() \
        == [0, 200, 500]
    with pytest.raises(ValueError, match="between 0 and 1"):
        apply_clean_first_frame(noisy, clean, noise=noise, noise_level=torch.tensor([0.0, 1.2, 0.1]))
