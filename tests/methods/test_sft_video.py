"""SFT on video latents [B, C, F, H, W]: the flow loss on 5-D tensors, the clean first frame of
image-to-video families (un-noised, timestep 0 per frame, out of the loss; spec 004) and one expert's
noise-level window, all checked on values with a stand-in family that records what it is given."""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")

from simpletuner.methods.sft import SupervisedFineTuning  # noqa: E402
from simpletuner.models.base import CleanFirstFrame  # noqa: E402
from simpletuner.objectives.losses import masked_mean  # noqa: E402
from simpletuner.testing.config import make_config  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHAPE = (2, 3, 4, 2, 2)  # B, C, F (latent frames), H, W


class VideoFamily:
    """A flow-matching video stand-in: the cache is the latents, the "denoiser" returns a fixed tensor,
    and every call's noisy input and timesteps are recorded. ``conditioned`` / ``noise_level`` answer
    ``first_frame_conditioning``; ``window`` answers ``training_sigma_window``."""

    family = "stand_in_video"
    prediction_type = "flow_matching"
    default_flow_shift = None
    flow_patch_size = 1
    weight_dtype = torch.float32

    def __init__(self, conditioned=None, noise_level: float = 0.0, window=None):
        self.conditioned = conditioned
        self.noise_level = noise_level
        self.window = window
        self.output = torch.linspace(-1, 1, torch.Size(SHAPE).numel()).reshape(SHAPE)
        self.calls: list[dict] = []

    def noise_scheduler(self):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)

    def latents_from_cache(self, cached, generator=None):
        return cached["latent_mean"]

    def unconditional_text(self, empty):
        return empty

    def training_sigma_window(self):
        return self.window

    def first_frame_conditioning(self, batch, latents, generator=None):
        if self.conditioned is None:
            return None
        return CleanFirstFrame(torch.tensor(self.conditioned), self.noise_level)

    def predict(self, noisy, timesteps, text, batch=None):
        self.calls.append({"noisy": noisy.detach().clone(), "timesteps": timesteps.detach().clone()})
        return self.output


def batch_of(latents: torch.Tensor) -> dict:
    embeds = torch.ones(latents.shape[0], 3, 4)
    return {"latent_mean": latents, "latent_std": torch.zeros_like(latents), "prompt_embeds": embeds,
            "empty_prompt": {"prompt_embeds": torch.zeros_like(embeds)}}


def method_for(model, **options) -> SupervisedFineTuning:
    return SupervisedFineTuning(model, 0.0, config=make_config(model_family="wan", **options))


def noise_of(noisy: torch.Tensor, latents: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """The noise a flow input was made with: ``x_s = (1 - s) x0 + s eps`` solved for eps."""
    s = sigmas.view(-1, 1, 1, 1, 1)
    return (noisy - (1 - s) * latents) / s


def test_flow_sft_trains_on_5d_clips_with_one_noise_level_per_clip() -> None:
    latents = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    model = VideoFamily()
    torch.manual_seed(0)
    loss = method_for(model).compute_loss(batch_of(latents), torch.device("cpu")).loss
    call = model.calls[0]
    assert call["noisy"].shape == SHAPE and call["timesteps"].shape == (2,)
    sigmas = call["timesteps"] / 1000
    target = noise_of(call["noisy"], latents, sigmas) - latents
    assert loss.item() == pytest.approx(((model.output - target) ** 2).mean().item(), rel=1e-5)


@pytest.mark.parametrize("noise_level", [0.0, 0.2])
def test_a_clean_first_frame_is_unnoised_timed_and_left_out_of_the_loss(noise_level: float) -> None:
    latents = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    model = VideoFamily(conditioned=[True, False], noise_level=noise_level)
    torch.manual_seed(0)
    loss = method_for(model).compute_loss(batch_of(latents), torch.device("cpu")).loss
    call = model.calls[0]
    noisy, frame_timesteps = call["noisy"], call["timesteps"]
    assert frame_timesteps.shape == (2, SHAPE[2])  # one timestep per latent frame
    sigmas = frame_timesteps[:, -1] / 1000  # the clip's own level, on its noisy frames
    torch.manual_seed(0)
    eps = torch.randn(SHAPE)  # the step's first draw is its noise (no caption dropout here)
    assert torch.allclose(noise_of(noisy, latents, sigmas)[:, :, 1:], eps[:, :, 1:], atol=1e-4)
    # sample 0: frame 0 is the clean latent (at the family's level), its timestep that level; sample 1 untouched
    expected_first = (1 - noise_level) * latents[0, :, 0] + noise_level * eps[0, :, 0]
    assert torch.allclose(noisy[0, :, 0], expected_first, atol=1e-6)
    if noise_level == 0:
        assert torch.equal(noisy[0, :, 0], latents[0, :, 0])
    assert frame_timesteps[0, 0].item() == pytest.approx(noise_level * 1000)
    assert torch.allclose(frame_timesteps[0, 1:], sigmas[0] * 1000) and torch.allclose(frame_timesteps[1], sigmas[1] * 1000)
    assert not torch.allclose(noisy[1, :, 0], latents[1, :, 0])
    # the loss: sample 0 over frames 1.. only, sample 1 over every frame, then the batch mean
    error = (model.output - (eps - latents)) ** 2
    expected = (error[0, :, 1:].mean() + error[1].mean()) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_no_conditioned_sample_is_plain_sft() -> None:
    latents = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    plain, none = VideoFamily(), VideoFamily(conditioned=[False, False])
    losses = []
    for model in (plain, none):
        torch.manual_seed(0)
        losses.append(method_for(model).compute_loss(batch_of(latents), torch.device("cpu")).loss)
    assert torch.equal(losses[0], losses[1]) and torch.equal(plain.calls[0]["timesteps"], none.calls[0]["timesteps"])


@pytest.mark.parametrize("window", [(0.875, 1.0), (0.0, 0.875)])
@pytest.mark.parametrize("discrete", [False, True])
def test_one_experts_window_confines_the_noise_levels(window, discrete: bool) -> None:
    model = VideoFamily(window=window)
    method = method_for(model, flow_use_discrete_schedule=discrete, flow_schedule_shift=3.0)
    torch.manual_seed(0)
    sigmas = torch.cat([method.flow_noising.sigmas(torch.zeros(256, *SHAPE[1:])) for _ in range(4)])
    low, high = window
    below = sigmas < high if high < 1 else sigmas <= 1  # the high-noise expert takes pure noise too
    assert bool(((sigmas >= low) & below).all())
    assert float(sigmas.max() - sigmas.min()) > 0.5 * (high - low)  # spread over the window, not stuck at one end
    # the evaluation loss's fixed levels are placed inside the window too
    assert method.flow_noising.into_window(torch.tensor([0.0, 1.0])).tolist() == pytest.approx([low, high])


def test_eval_loss_keeps_the_clean_frame_out_and_is_reproducible() -> None:
    latents = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    model = VideoFamily(conditioned=[True, True])
    method = method_for(model)
    first = method.eval_loss(batch_of(latents), torch.device("cpu"), [0.5], torch.Generator().manual_seed(9))
    second = method.eval_loss(batch_of(latents), torch.device("cpu"), [0.5], torch.Generator().manual_seed(9))
    assert torch.equal(first, second)
    call = model.calls[0]
    assert call["timesteps"][:, 0].tolist() == [0.0, 0.0] and torch.equal(call["noisy"][:, :, 0], latents[:, :, 0])


def test_masked_mean_on_video_takes_the_image_mask_on_every_frame_and_frame_weights() -> None:
    loss = torch.arange(2 * 1 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 1, 3, 2, 2)
    mask = torch.zeros(2, 1, 4, 4)
    mask[:, :, :, :2] = 1  # the left half of every frame (left latent column)
    assert torch.allclose(masked_mean(loss, mask), loss[..., 0].flatten(1).mean(1))
    frames = torch.tensor([0.0, 1.0, 1.0]).view(1, 1, 3, 1, 1)
    assert torch.allclose(masked_mean(loss, None, weights=frames), loss[:, :, 1:].flatten(1).mean(1))
    assert torch.allclose(masked_mean(loss, mask, weights=frames), loss[:, :, 1:, :, 0].flatten(1).mean(1))
