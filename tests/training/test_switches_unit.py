"""The trainer's switches as formulas: snr_weight, masked loss, fp32 gradient accumulation, run length,
TF32, per-device seeds, BitFit, text-encoder layer freezing, gradient checkpointing and the flow branch
of the SFT loss."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")

from simpletuner.methods.sft import FlowNoising, SupervisedFineTuning  # noqa: E402
from simpletuner.testing.config import make_config  # noqa: E402
from simpletuner.objectives.flow import ShiftedDiscreteSchedule  # noqa: E402
from simpletuner.training.freezing import apply_bitfit, freeze_encoder_layers, frozen_layer_indices  # noqa: E402
from simpletuner.objectives.losses import LossSettings, diffusion_loss, masked_mean, snr_loss_weights  # noqa: E402
from simpletuner.training.precision import Fp32GradientAccumulator, configure_tf32  # noqa: E402
from simpletuner.training.trainer import planned_max_steps  # noqa: E402

# --- losses ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_snr_weight_blends_min_snr_with_the_unweighted_loss(prediction_type):
    snr = torch.tensor([0.01, 0.5, 1.0, 4.0, 50.0], dtype=torch.float64)
    full = snr_loss_weights(LossSettings(snr_gamma=5.0), snr, prediction_type)
    assert torch.allclose(snr_loss_weights(LossSettings(snr_gamma=5.0, snr_weight=0.0), snr, prediction_type),
                          torch.ones_like(snr))
    half = snr_loss_weights(LossSettings(snr_gamma=5.0, snr_weight=0.5), snr, prediction_type)
    assert torch.allclose(half, (1 + full) / 2)
    expected_full = {"epsilon": torch.clamp(snr, max=5) / snr, "v_prediction": torch.clamp(snr, max=5) / (snr + 1),
                     "sample": torch.clamp(snr, max=5)}[prediction_type]
    assert torch.allclose(full, expected_full)


def test_masked_mean_counts_only_the_masked_region():
    loss = torch.zeros(2, 4, 8, 8)
    loss[:, :, :, 4:] = 3.0  # the right half is wrong
    mask = torch.zeros(2, 1, 64, 64)
    mask[0, :, :, :32] = 1  # sample 0 learns only the left half (where the loss is 0)
    mask[1, :, :, 32:] = 1  # sample 1 only the right half
    assert torch.allclose(masked_mean(loss, mask), torch.tensor([0.0, 3.0]))
    assert torch.allclose(masked_mean(loss, None), torch.tensor([1.5, 1.5]))
    assert torch.equal(masked_mean(loss, torch.zeros(2, 1, 64, 64)), torch.zeros(2))  # empty mask: 0, not NaN


def test_a_partly_masked_latent_cell_counts_by_its_masked_area():
    loss = torch.tensor([[[[1.0, 5.0]]]])  # 1 x 1 x 1 x 2 latent
    mask = torch.tensor([[[[1.0, 1.0, 1.0, 0.0]]]])  # the second cell is half masked
    assert torch.allclose(masked_mean(loss, mask), torch.tensor([(1.0 * 1 + 5.0 * 0.5) / 1.5]))


def test_diffusion_loss_with_a_mask_ignores_errors_outside_it():
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler()
    target = torch.randn(2, 4, 8, 8)
    prediction = target.clone()
    prediction[..., 4:] += 10  # wrong only on the right half
    mask = torch.zeros(2, 1, 64, 64)
    mask[..., :32] = 1
    timesteps = torch.tensor([10, 900])
    assert diffusion_loss(LossSettings(), scheduler, prediction, target, timesteps, "epsilon", mask=mask) == 0
    assert diffusion_loss(LossSettings(), scheduler, prediction, target, timesteps, "epsilon") == pytest.approx(50.0)


def test_masked_loss_probability_applies_the_mask_on_that_share_of_steps():
    model = SimpleNamespace(noise_scheduler=lambda: SimpleNamespace(config=SimpleNamespace(num_train_timesteps=1000)),
                            prediction_type="epsilon")
    config = make_config(masked_loss_probability=0.3, disable_segmented_timestep_sampling=True)
    method = SupervisedFineTuning(model, 0.0, config=config)
    batch = {"mask": torch.ones(1, 1, 8, 8)}
    torch.manual_seed(0)
    used = sum(method.loss_mask(batch, torch.device("cpu")) is not None for _ in range(4000)) / 4000
    assert 0.27 < used < 0.33
    assert method.loss_mask({}, torch.device("cpu")) is None  # no mask data: plain loss


# --- precision ------------------------------------------------------------------------------------------


def test_fp32_gradient_accumulation_keeps_small_contributions_a_bf16_sum_drops():
    """Gradients 1, then seven times 2^-9: a bf16 running sum stays at 1.0 (each addition is below half an
    ulp), the fp32 sum 1 + 7 * 2^-9 rounds once to the nearest bf16, 1 + 2^-6."""
    contributions = [1.0] + [2.0**-9] * 7

    def accumulate(use_fp32: bool) -> float:
        weight = torch.nn.Parameter(torch.zeros(1, dtype=torch.bfloat16))
        accumulator = Fp32GradientAccumulator([weight]) if use_fp32 else None
        for value in contributions:
            (weight * torch.tensor([value], dtype=torch.bfloat16)).sum().backward()
        if accumulator:
            assert accumulator.active and weight.grad is None  # nothing summed in bf16 meanwhile
            accumulator.write_back()
        return float(weight.grad)

    assert accumulate(False) == 1.0
    assert accumulate(True) == 1.0 + 2.0**-6


def test_fp32_gradient_accumulator_ignores_fp32_weights():
    assert not Fp32GradientAccumulator([torch.nn.Parameter(torch.zeros(2))]).active


def test_disable_tf32_switches_the_backend_flags():
    configure_tf32(disable=True)
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    configure_tf32(disable=False)
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32


def test_seed_for_each_device_offsets_the_seed_by_the_process_index(monkeypatch):
    import accelerate.utils.random as accelerate_random
    from accelerate.utils import set_seed

    monkeypatch.setattr(accelerate_random, "AcceleratorState", lambda: SimpleNamespace(process_index=3))
    set_seed(7, device_specific=True)
    assert torch.initial_seed() == 10
    set_seed(7, device_specific=False)
    assert torch.initial_seed() == 7


# --- run length -----------------------------------------------------------------------------------------


def run_length(max_train_steps, num_train_epochs=None, ignore=False):
    """Steps of a run with 4 batches per epoch; ``num_train_epochs=None``: the user left it at its default."""
    epochs = {} if num_train_epochs is None else {"num_train_epochs": num_train_epochs}
    config = make_config(max_train_steps=max_train_steps, ignore_final_epochs=ignore, **epochs)
    return planned_max_steps(config, steps_per_epoch=4)


def test_run_length_from_steps_epochs_and_ignore_final_epochs():
    assert run_length(0, 3) == 12  # epochs alone
    assert run_length(10) == 10  # steps alone (epochs at their default)
    assert run_length(10, 2) == 8  # both set: the first to come
    assert run_length(10, 2, ignore=True) == 10  # the step count wins
    assert run_length(6, 2) == 6


# --- which weights train --------------------------------------------------------------------------------


def test_bitfit_leaves_only_bias_terms_trainable():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2, bias=False))
    count = apply_bitfit(model)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["0.bias", "1.bias"] and count == 8


@pytest.mark.parametrize("strategy, before, after, frozen", [
    ("before", 2, None, [0, 1]),
    ("after", None, 2, [3, 4]),
    ("between", 1, 3, [1, 2, 3]),
])
def test_freeze_encoder_strategies_pick_layers_by_index(strategy, before, after, frozen):
    from transformers import CLIPTextConfig, CLIPTextModel

    assert frozen_layer_indices(5, strategy, before, after) == frozen
    encoder = CLIPTextModel(CLIPTextConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=5,
                                           num_attention_heads=2, vocab_size=50, max_position_embeddings=16))
    assert freeze_encoder_layers(encoder, strategy, before, after) == frozen
    layers = encoder.encoder.layers  # transformers 5: no text_model wrapper any more
    for index, layer in enumerate(layers):
        assert all(p.requires_grad != (index in frozen) for p in layer.parameters())
    assert encoder.final_layer_norm.weight.requires_grad


def test_gradient_checkpointing_interval_selects_blocks_and_keeps_gradients_exact():
    from diffusers import UNet2DConditionModel

    from simpletuner.models.sd1x import StableDiffusion1x
    from simpletuner.testing.tiny_models import UNET_CONFIG

    def gradients(interval: int | None) -> tuple[int, list[torch.Tensor]]:
        torch.manual_seed(0)
        family = StableDiffusion1x.__new__(StableDiffusion1x)
        family.denoiser = UNet2DConditionModel(**UNET_CONFIG)
        family.denoiser.train()
        blocks = family.enable_gradient_checkpointing(interval) if interval else 0
        torch.manual_seed(1)
        sample = torch.randn(1, 4, 8, 8)
        context = torch.randn(1, 8, family.denoiser.config.cross_attention_dim)
        family.denoiser(sample, torch.tensor([10]), encoder_hidden_states=context).sample.square().mean().backward()
        return blocks, [p.grad.clone() for p in family.denoiser.parameters()]

    _, plain = gradients(None)
    every, checkpointed = gradients(1)
    half, sparse = gradients(2)
    assert every >= 2 and half == (every + 1) // 2
    for reference, other in ((plain, checkpointed), (plain, sparse)):
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(reference, other))


# --- the flow-matching branch of the SFT loss -----------------------------------------------------------


class ZeroFlowModel:
    """A flow-matching "family" whose denoiser outputs zeros and records what it was given."""

    prediction_type = "flow_matching"
    weight_dtype = torch.float32
    default_flow_shift = 3.0

    def noise_scheduler(self):
        return SimpleNamespace(config=SimpleNamespace(num_train_timesteps=1000))

    def latents_from_cache(self, cached):
        return cached["latent_mean"]

    def predict(self, noisy, timesteps, text, batch=None):
        self.seen = (noisy, timesteps)
        return torch.zeros_like(noisy)


def flow_batch():
    latents = torch.randn(6, 4, 8, 8)
    return {"latent_mean": latents, "latent_std": torch.zeros_like(latents), "prompt_embeds": torch.zeros(6, 2, 3),
            "empty_prompt": {"prompt_embeds": torch.zeros(6, 2, 3)}}


def test_flow_loss_regresses_the_velocity_on_the_straight_path():
    model = ZeroFlowModel()
    method = SupervisedFineTuning(model, 0.0, config=make_config())
    batch = flow_batch()
    torch.manual_seed(5)
    loss = method.compute_loss(batch, torch.device("cpu")).loss
    noisy, timesteps = model.seen
    sigma = (timesteps / 1000).view(-1, 1, 1, 1)
    latents = batch["latent_mean"]
    noise = (noisy - (1 - sigma) * latents) / sigma  # the noise implied by the noisy input
    assert torch.allclose(loss, (noise - latents).square().mean(), atol=1e-5)
    assert (timesteps > 0).all() and (timesteps < 1000).all()


def test_flow_default_shift_comes_from_the_family():
    noising = FlowNoising(ZeroFlowModel(), make_config(flow_use_uniform_schedule=True), 1000)
    torch.manual_seed(0)
    sigmas = torch.cat([noising.sigmas(torch.zeros(1000, 4, 8, 8)) for _ in range(10)])
    # uniform sigmas shifted by k = 3: P(sigma < 0.5) = P(u < 1/(1 + k)) = 0.25
    assert abs(float((sigmas < 0.5).float().mean()) - 0.25) < 0.02


def test_discrete_schedule_draws_table_entries_inside_the_boundaries_with_gaussian_weights():
    config = make_config(flow_use_discrete_schedule=True, flow_schedule_shift=5.0, flow_max_timestep_boundary=0.4,
                         flow_loss_weighting="gaussian")
    model = ZeroFlowModel()
    noising = FlowNoising(model, config, 1000)
    table = ShiftedDiscreteSchedule(shift=5.0, max_timestep_boundary=0.4)
    torch.manual_seed(0)
    sigmas = noising.sigmas(torch.zeros(2000, 4, 8, 8)).double()
    allowed = table.sigmas[:400]
    nearest = (sigmas.view(-1, 1) - allowed.view(1, -1)).abs().min(dim=1).values
    assert float(nearest.max()) < 1e-6  # every draw is an entry of the noisy 40 % of the table
    method = SupervisedFineTuning(model, 0.0, config=config)
    batch = flow_batch()
    torch.manual_seed(3)
    loss = method.compute_loss(batch, torch.device("cpu")).loss
    noisy, timesteps = model.seen
    sigma = (timesteps / 1000).view(-1, 1, 1, 1)
    noise = (noisy - (1 - sigma) * batch["latent_mean"]) / sigma
    per_sample = (noise - batch["latent_mean"]).square().flatten(1).mean(1)
    weights = table.weight_for(timesteps.double()).float()
    assert torch.allclose(loss, (per_sample * weights).mean(), atol=1e-4)
