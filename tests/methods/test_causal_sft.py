"""Causal SFT (``--training_method causal_sft``, spec 000): every frame chunk draws its own sigma,
context chunks sit at exactly ``--context_noise`` and stay out of the loss, and the denoiser gets one
timestep per latent frame. Checked on values with a stand-in 5-D model (it records what it is given),
then through the config rules."""

from __future__ import annotations

import dataclasses
import os
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")
av = pytest.importorskip("av")

from simpletuner.methods.causal_sft import CausalSupervisedFineTuning  # noqa: E402
from simpletuner.methods.registry import build_method  # noqa: E402
from simpletuner.objectives.causal import (chunk_of_frame, noise_per_frame, per_frame_flow_loss,  # noqa: E402
                                           plan_causal_noise)
from simpletuner.objectives.flow import flow_loss_weights  # noqa: E402
from simpletuner.options import ConfigError  # noqa: E402
from simpletuner.testing.config import make_config  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHAPE = (2, 3, 7, 4, 4)  # B, C, F (latent frames), H, W


class FrameModel:
    """A flow-matching video "family" whose denoiser is the identity plus a trainable per-frame
    offset; it records the noisy latents and timesteps of every call."""

    family = "stand_in_video"
    prediction_type = "flow_matching"
    default_flow_shift = None
    flow_patch_size = 2
    weight_dtype = torch.float32

    def __init__(self):
        self.offset = torch.nn.Parameter(torch.zeros(1, 1, SHAPE[2], 1, 1))
        self.calls: list[dict] = []

    def noise_scheduler(self):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)

    def latents_from_cache(self, cached, generator=None):
        return cached["latent_mean"]  # latent_std is 0: the cache is the latents

    def unconditional_text(self, empty):
        return empty

    #: set by a test: which samples keep a clean first frame (an image-to-video family's hook)
    conditioned: torch.Tensor | None = None

    def first_frame_conditioning(self, batch, latents, generator=None):
        from simpletuner.models.base import CleanFirstFrame

        return None if self.conditioned is None else CleanFirstFrame(self.conditioned)

    def predict(self, noisy, timesteps, text, batch=None):
        prediction = (noisy + self.offset).requires_grad_()
        prediction.retain_grad()
        self.calls.append({"noisy": noisy.detach().clone(), "timesteps": timesteps.detach().clone(),
                           "prediction": prediction})
        return prediction


def video_batch(seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(SHAPE, generator=generator)
    embeds = torch.randn(SHAPE[0], 5, 8, generator=generator)
    return {"latent_mean": latents, "latent_std": torch.zeros(SHAPE), "prompt_embeds": embeds,
            "empty_prompt": {"prompt_embeds": torch.zeros(1, 5, 8)}}


def causal(**options) -> CausalSupervisedFineTuning:
    config = make_config(training_method="causal_sft", caption_dropout_probability=0.0, **options)
    return build_method("causal_sft", FrameModel(), config)


def recorded_plans(method):
    """Wrap ``method.plan`` to keep every plan it makes."""
    plans, real = [], method.plan

    def keep(latents):
        plans.append(real(latents))
        return plans[-1]

    method.plan = keep
    return plans


# --- the noise plan ----------------------------------------------------------------------------------


def test_frames_share_their_chunks_sigma_and_context_frames_sit_exactly_at_context_noise():
    draws = torch.tensor([0.9, 0.2, 0.6, 0.35, 0.8, 0.5])  # 2 samples x 3 chunks, in order
    plan = plan_causal_noise(2, 7, 3, 0.05, lambda n: draws[:n], context_chunks=torch.tensor([0, 2]))
    assert chunk_of_frame(7, 3).tolist() == [0, 0, 0, 1, 1, 1, 2]
    assert torch.equal(plan.chunk_sigmas, draws.reshape(2, 3))
    assert torch.equal(plan.frame_sigmas, torch.tensor([[0.9, 0.9, 0.9, 0.2, 0.2, 0.2, 0.6], [0.05] * 6 + [0.5]]))
    assert plan.loss_mask.shape == (2, 1, 7, 1, 1)
    assert plan.loss_mask[:, 0, :, 0, 0].tolist() == [[1] * 7, [0] * 6 + [1]]


def test_a_clip_shorter_than_one_chunk_is_one_chunk_and_always_learnt():
    plan = plan_causal_noise(3, 2, 3, 0.0, lambda n: torch.full((n,), 0.4))
    assert plan.chunk_sigmas.shape == (3, 1)
    assert plan.context_chunks.tolist() == [0, 0, 0]
    assert plan.loss_mask.eq(1).all()


def test_context_lengths_are_uniform_and_never_swallow_the_whole_clip():
    torch.manual_seed(0)
    plan = plan_causal_noise(6000, 7, 3, 0.0, torch.rand)
    counts = torch.bincount(plan.context_chunks, minlength=3).float() / 6000
    assert counts.tolist() == pytest.approx([1 / 3] * 3, abs=0.03)
    assert plan.loss_mask[:, 0, :, 0, 0].sum(dim=1).min() >= 1  # the last chunk is always learnt
    # chunk sigmas are independent draws: no correlation between neighbours
    sigmas = plan.chunk_sigmas
    assert abs(float(torch.corrcoef(torch.stack([sigmas[:, 0], sigmas[:, 1]]))[0, 1])) < 0.05


def test_bad_plans_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="at least one of its 3 chunks is learnt"):
        plan_causal_noise(1, 7, 3, 0.0, torch.rand, context_chunks=torch.tensor([3]))
    with pytest.raises(ValueError, match="context_noise = 1.5"):
        plan_causal_noise(1, 7, 3, 1.5, torch.rand)
    with pytest.raises(ValueError, match="video latents"):
        noise_per_frame(torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 8, 8), torch.zeros(1, 1))


def test_per_frame_loss_counts_only_learnt_frames_and_weights_each_frame():
    target = torch.zeros(SHAPE)
    prediction = torch.zeros(SHAPE)
    prediction[0, :, 0] = 10.0  # a big error on a masked frame
    prediction[0, :, 6] = 2.0   # error 4 per element on the one learnt frame of sample 0
    prediction[1, :, 3] = 1.0   # error 1 per element on frame 3 of sample 1
    mask = torch.ones(2, 1, 7, 1, 1)
    mask[0, :, :6] = 0
    loss = per_frame_flow_loss(prediction, target, mask)
    assert float(loss) == pytest.approx((4.0 + 1.0 / 7) / 2)
    weights = torch.ones(2, 7)
    weights[1, 3] = 3.0
    assert float(per_frame_flow_loss(prediction, target, mask, weights)) == pytest.approx((4.0 + 3.0 / 7) / 2)
    pixel = torch.zeros(2, 1, 8, 8)
    pixel[:, :, :4, :] = 1  # top half of the picture
    prediction[1, :, 3, 2:, :] = 0.0  # sample 1's error only in the top half now
    assert float(per_frame_flow_loss(prediction, target, mask, pixel_mask=pixel)) == pytest.approx((4.0 + 1.0 / 7) / 2)
    assert float(per_frame_flow_loss(prediction, target, torch.zeros(2, 1, 7, 1, 1))) == 0.0


# --- the method on a stand-in model ---------------------------------------------------------------------


def test_the_model_sees_each_frame_noised_at_its_chunks_sigma_with_that_timestep():
    method = causal(causal_chunk_frames=3, context_noise=0.1)
    plans = recorded_plans(method)
    batch = video_batch()
    torch.manual_seed(7)
    method.compute_loss(batch, torch.device("cpu"))
    torch.manual_seed(7)
    noise = torch.randn(SHAPE)  # the method's first draw after the seed is its noise
    plan, call = plans[0], method.model.calls[0]
    assert call["timesteps"].shape == (2, 7)
    assert torch.equal(call["timesteps"], plan.frame_sigmas * 1000)
    sigma = plan.frame_sigmas.view(2, 1, 7, 1, 1)
    torch.testing.assert_close(call["noisy"], (1 - sigma) * batch["latent_mean"] + sigma * noise, rtol=0, atol=1e-6)
    for sample in range(2):
        context = int(plan.context_chunks[sample]) * 3
        assert plan.frame_sigmas[sample, :context].eq(0.1).all()  # exactly the context level
        learnt = plan.frame_sigmas[sample, context:]
        expected = plan.chunk_sigmas[sample, chunk_of_frame(7, 3)[context:]]
        assert torch.equal(learnt, expected)
    assert plan.chunk_sigmas.unique().numel() == 6  # every chunk of every sample drew its own sigma


def test_the_loss_is_the_velocity_error_of_the_learnt_frames_and_context_gets_no_gradient():
    method = causal(causal_chunk_frames=2, context_noise=0.0)
    plans = recorded_plans(method)
    batch = video_batch(1)
    found_context = False
    for seed in range(20):
        torch.manual_seed(seed)
        output = method.compute_loss(batch, torch.device("cpu"))
        torch.manual_seed(seed)
        noise = torch.randn(SHAPE)
        plan, call = plans[-1], method.model.calls[-1]
        expected = per_frame_flow_loss(call["prediction"].detach(), noise - batch["latent_mean"], plan.loss_mask)
        assert output.loss.item() == pytest.approx(float(expected), rel=1e-6)
        output.loss.backward()
        grad = call["prediction"].grad
        frame_grad = grad.abs().sum(dim=(1, 3, 4))  # [B, F]
        learnt = plan.loss_mask[:, 0, :, 0, 0].bool()
        assert frame_grad[~learnt].eq(0).all() and frame_grad[learnt].gt(0).all()
        found_context |= bool((~learnt).any())
    assert found_context  # some draws had context frames


def test_an_image_to_video_familys_clean_first_frame_sits_on_top_of_the_chunks():
    """Sample 0 is conditioned on its first frame: that frame enters clean at timestep 0 and leaves
    the loss, whatever its chunk drew; sample 1 keeps its chunk noise there."""
    method = causal(causal_chunk_frames=3, context_noise=0.3)
    method.model.conditioned = torch.tensor([True, False])
    plans = recorded_plans(method)
    batch = video_batch(2)
    for seed in range(6):
        torch.manual_seed(seed)
        method.compute_loss(batch, torch.device("cpu")).loss.backward()
        plan, call = plans[-1], method.model.calls[-1]
        assert torch.equal(call["noisy"][0, :, 0], batch["latent_mean"][0, :, 0])
        assert call["timesteps"][0, 0] == 0 and torch.equal(call["timesteps"][0, 1:], plan.frame_sigmas[0, 1:] * 1000)
        assert torch.equal(call["timesteps"][1], plan.frame_sigmas[1] * 1000)
        grad = call["prediction"].grad.abs().sum(dim=(1, 3, 4))
        assert grad[0, 0] == 0
        learnt = plan.loss_mask[:, 0, :, 0, 0].bool()
        assert grad[1][learnt[1]].gt(0).all() and grad[1][~learnt[1]].eq(0).all()


def test_gaussian_weighting_weights_each_frame_by_its_own_timestep():
    method = causal(flow_loss_weighting="gaussian", causal_chunk_frames=1)
    plans = recorded_plans(method)
    torch.manual_seed(3)
    method.compute_loss(video_batch(), torch.device("cpu"))
    timesteps = method.model.calls[0]["timesteps"]
    weights = method.frame_weights(timesteps)
    expected = flow_loss_weights("gaussian", timesteps.reshape(-1), method.flow_noising.table).reshape(2, 7)
    torch.testing.assert_close(weights, expected.float())
    assert weights.unique().numel() > 2  # frames at different levels weigh differently
    assert plans[0].chunk_sigmas.shape == (2, 7)


def test_the_stand_in_learns_and_a_draw_replays_exactly():
    method = causal()
    method.model.offset.data.fill_(2.0)  # a wrong start the loss can pull back
    optimizer = torch.optim.SGD([method.model.offset], lr=0.2)
    batch = video_batch()

    def held_out_loss() -> float:  # the same ten draws each time
        with torch.no_grad():
            total = 0.0
            for seed in range(10):
                torch.manual_seed(1000 + seed)
                total += method.compute_loss(batch, torch.device("cpu")).loss.item()
        return total / 10

    before = held_out_loss()
    torch.manual_seed(0)
    for _ in range(20):
        loss = method.compute_loss(batch, torch.device("cpu")).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert held_out_loss() < 0.5 * before
    replay = causal()
    replay.model.offset.data.copy_(method.model.offset.data)
    torch.manual_seed(11)
    first = method.compute_loss(batch, torch.device("cpu")).loss.item()
    torch.manual_seed(11)
    assert replay.compute_loss(batch, torch.device("cpu")).loss.item() == first


def test_image_latents_are_refused_naming_the_family():
    method = causal()
    batch = video_batch()
    batch["latent_mean"] = batch["latent_mean"][:, :, 0]
    batch["latent_std"] = batch["latent_std"][:, :, 0]
    with pytest.raises(ValueError, match=r"stand_in_video gave latents of shape \(2, 3, 4, 4\)"):
        method.compute_loss(batch, torch.device("cpu"))


# --- config rules ----------------------------------------------------------------------------------------


@pytest.fixture
def video_family(monkeypatch):
    """A catalogue entry that lists the causal options, as a family with per-frame timesteps does."""
    from simpletuner.models.registry import FAMILIES
    from simpletuner.options.causal_rules import CAUSAL_SFT_OPTIONS

    entry = dataclasses.replace(FAMILIES["flux"], name="framevideo", options=CAUSAL_SFT_OPTIONS)
    monkeypatch.setitem(FAMILIES, "framevideo", entry)
    return "framevideo"


def check(**options):
    """The generic family-option rule, then the causal rules (which the full rule list includes)."""
    from simpletuner.options.causal_rules import CAUSAL_RULES
    from simpletuner.options.validation import RULES, check_family_options

    assert set(CAUSAL_RULES) <= set(RULES)
    config = make_config(**options)
    for rule in (check_family_options, *CAUSAL_RULES):
        rule(config)


def test_rules_accept_causal_sft_on_a_family_with_frame_timesteps(video_family):
    check(model_family=video_family, training_method="causal_sft", causal_chunk_frames=1, context_noise=0.02)


@pytest.mark.parametrize("options,message", [
    (dict(model_family="flux", training_method="causal_sft"),
     "`--training_method causal_sft` gives every frame chunk its own timestep, but the flux denoiser takes a single "
     "timestep per sample; use a video family whose transformer takes one ({able}), or train with "
     "`--training_method sft`"),
    (dict(model_family="sd1x", training_method="causal_sft"), "but the sd1x denoiser takes a single timestep"),
    (dict(model_family="framevideo", context_noise=0.1),
     "`--context_noise` only applies to `--training_method causal_sft`, but the method is sft; set "
     "`--training_method causal_sft` or remove it"),
    (dict(model_family="framevideo", training_method="causal_sft", scheduled_sampling_max_step_offset=3),
     "cannot be combined: the rollout draws one timestep per sample"),
    (dict(model_family="flux", training_method="causal_sft", causal_chunk_frames=2),
     "`--causal_chunk_frames` only applies to {able}, not to flux; remove it"),
])
def test_rules_refuse_with_one_precise_message(video_family, options, message):
    from simpletuner.options.causal_rules import families_with_frame_timesteps

    able = families_with_frame_timesteps()
    assert video_family in able
    with pytest.raises(ConfigError, match=re.escape(message.format(able=", ".join(able)))):
        check(**options)


# --- through the CLI on the tiny Wan -----------------------------------------------------------------------


def record_wan_calls(monkeypatch) -> list[dict]:
    """Every training call of the Wan family's denoiser: the per-frame timesteps and the noisy input."""
    from simpletuner.models.wan import Wan

    calls, real = [], Wan.predict

    def recording(self, noisy_latents, timesteps, text, batch=None):
        if torch.is_grad_enabled():  # training steps, not validation
            calls.append({"timesteps": timesteps.detach().clone(), "noisy": noisy_latents.detach().clone()})
        return real(self, noisy_latents, timesteps, text, batch=batch)

    monkeypatch.setattr(Wan, "predict", recording)
    return calls


@pytest.mark.slow
@pytest.mark.parametrize("variant, flavour", [("t2v-2.1", "t2v-1.3b-2.1"), ("ti2v-2.2", "ti2v-5b-2.2")])
def test_cli_trains_causal_sft_on_the_tiny_wan_and_validates_with_a_video(tmp_path, monkeypatch, variant, flavour):
    """A few LoRA steps of ``--training_method causal_sft`` through the real CLI on 9-frame clips (3
    latent frames, one chunk each): every step the transformer gets a timestep per latent frame that
    matches the plan (context at exactly --context_noise; TI2V's first frame at 0), the LoRA moves, and
    the validation writes an mp4 PyAV decodes with the requested frames."""
    from accelerate.state import AcceleratorState

    from simpletuner.cli import main
    from simpletuner.testing.clips import write_video_project
    from simpletuner.testing.tiny.wan import make_tiny_wan
    from tests.models.conftest import family_args, keep_trainer

    make_tiny_wan(tmp_path / "model", variant)
    write_video_project(tmp_path, clips=4, frames=9, size=32)
    seen = keep_trainer(monkeypatch)
    calls = record_wan_calls(monkeypatch)
    plans = []
    real_plan = CausalSupervisedFineTuning.plan
    monkeypatch.setattr(CausalSupervisedFineTuning, "plan",
                        lambda self, latents: plans.append(real_plan(self, latents)) or plans[-1])
    clean_first = variant == "ti2v-2.2"
    if clean_first:  # image-to-video validates from a starting picture
        from PIL import Image

        Image.new("RGB", (32, 32), (200, 20, 20)).save(tmp_path / "start.png")
        (tmp_path / "prompts.json").write_text('[{"caption": "a red square moving right", "image_path": "start.png"}]')
        prompts = {"validation_dataset_file": str(tmp_path / "prompts.json")}
    else:
        prompts = {"validation_prompt": "a red square moving right"}
    args = family_args(tmp_path, "wan", "causal", model_flavour=flavour, resolution=32, max_train_steps=3,
                       training_method="causal_sft", causal_chunk_frames=1, context_noise=0.05,
                       validation_step_interval=3, validation_num_video_frames=5, validation_num_inference_steps=2,
                       validation_resolution=32, framerate=8, **prompts)
    try:
        assert main(["train", *args]) == 0
    finally:
        AcceleratorState._reset_state(True)
    trainer = seen["trainer"]
    assert isinstance(trainer.method, CausalSupervisedFineTuning)
    assert len(plans) == len(calls) == 3
    for plan, call in zip(plans, calls):
        assert call["timesteps"].shape == (2, 3) and plan.chunk_sigmas.shape == (2, 3)
        expected = plan.frame_sigmas * 1000
        if clean_first:
            expected[:, 0] = 0.0  # the clean conditioning frame, whatever its chunk drew
        torch.testing.assert_close(call["timesteps"], expected)
        for sample in range(2):
            context = int(plan.context_chunks[sample])
            assert plan.frame_sigmas[sample, :context].eq(0.05).all()
    assert any(int(plan.context_chunks.max()) > 0 for plan in plans)  # some context was trained with
    assert all(np.isfinite(loss) for loss in trainer.state.losses)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "causal" / "pytorch_lora_weights.safetensors"), "pt") as handle:
        lora_b = [handle.get_tensor(key) for key in handle.keys() if ".lora_B." in key]
    assert lora_b and any(bool(tensor.abs().sum() > 0) for tensor in lora_b)  # the LoRA moved from its zero start
    name = "32x32_dataset_00_00.mp4" if clean_first else "32x32_00.mp4"
    video = tmp_path / "causal" / "validation" / "step_3" / name
    with av.open(str(video)) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    assert len(frames) == 5 and frames[0].shape == (32, 32, 3)
