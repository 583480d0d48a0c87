"""Flow-matching samplers against their densities (KS), the shift and auto-shift formulas, the spec-004
discrete schedule against its closed form, the DDPM <-> flow conversions as float64 round trips, the
DDPM noise-schedule options, and diff2flow training (loss formula on a fixed batch, end-to-end run)."""

from __future__ import annotations

import json
import math
import os

import pytest

torch = pytest.importorskip("torch")
stats = pytest.importorskip("scipy.stats")
import numpy as np  # noqa: E402

from simpletuner.testing.config import make_config  # noqa: E402
from simpletuner.objectives import flow  # noqa: E402
from simpletuner.objectives.targets import (  # noqa: E402
    alpha_from_flow_sigma, check_diff2flow_schedule, configure_training_scheduler, ddpm_to_flow_point,
    flow_sigma_from_alpha, flow_to_ddpm_point, flow_velocity_to_prediction, inference_scheduler_overrides,
    prediction_to_flow_velocity, prediction_to_x0_eps, x0_eps_to_prediction,
)

N = 20_000
P_MIN = 1e-3


def ks(samples: torch.Tensor, cdf) -> float:
    return stats.kstest(samples.double().numpy(), cdf).pvalue


def logit(x):
    return np.log(x) - np.log1p(-x)


# --- sigma samplers ----------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [1.0, 0.6, 1.7])
def test_logit_normal_sigmas_follow_their_cdf(scale):
    torch.manual_seed(0)
    sigmas = flow.sample_logit_normal(N, scale)
    assert ks(sigmas, lambda s: stats.norm.cdf(logit(s) / scale)) > P_MIN
    assert ks(sigmas, lambda s: stats.norm.cdf(logit(s) / (scale * 1.2))) < 1e-6  # the test has teeth


def test_uniform_sigmas_follow_their_cdf():
    torch.manual_seed(1)
    assert ks(flow.sample_uniform(N), stats.uniform.cdf) > P_MIN


@pytest.mark.parametrize("alpha, beta", [(2.0, 2.0), (0.5, 3.0), (4.0, 1.5)])
def test_beta_sigmas_follow_their_cdf(alpha, beta):
    torch.manual_seed(2)
    sigmas = flow.sample_beta(N, alpha, beta)
    assert ks(sigmas, stats.beta(alpha, beta).cdf) > P_MIN
    generator = torch.Generator().manual_seed(3)
    assert ks(flow.sample_beta(N, alpha, beta, generator=generator), stats.beta(alpha, beta).cdf) > P_MIN


def test_samplers_reject_bad_parameters():
    with pytest.raises(ValueError, match="positive"):
        flow.sample_beta(4, 0.0, 1.0)
    with pytest.raises(ValueError, match="positive"):
        flow.sample_logit_normal(4, scale=-1)
    with pytest.raises(ValueError, match="positive"):
        flow.shift_sigmas(torch.rand(3), 0)


# --- shift and auto-shift ----------------------------------------------------------------------------


def test_shift_formula_identity_inverse_and_endpoints():
    s = torch.linspace(0, 1, 101, dtype=torch.float64)
    for k in (0.5, 1.0, 3.0, 5.0):
        shifted = flow.shift_sigmas(s, k)
        assert torch.allclose(shifted, k * s / (1 + (k - 1) * s), atol=1e-15, rtol=0)
        assert shifted[0] == 0 and shifted[-1] == 1 and torch.all(shifted.diff() > 0)
        assert torch.allclose(flow.shift_sigmas(shifted, 1 / k), s, atol=1e-14, rtol=0)
    assert flow.shift_sigmas(s, None) is s and flow.shift_sigmas(s, 1) is s
    assert torch.all(flow.shift_sigmas(s, 3.0)[1:-1] > s[1:-1])  # k > 1 moves toward noise


def test_shifted_uniform_and_logit_normal_follow_their_cdfs():
    k = 3.0
    torch.manual_seed(4)
    # P(shift_k(U) <= x) = P(U <= shift_{1/k}(x)) = x / (k - (k - 1) x)
    assert ks(flow.shift_sigmas(flow.sample_uniform(N), k), lambda x: x / (k - (k - 1) * x)) > P_MIN
    torch.manual_seed(5)
    shifted = flow.shift_sigmas(flow.sample_logit_normal(N, 1.0).double(), k)
    assert ks(shifted, lambda x: stats.norm.cdf(logit(x / (k - (k - 1) * x)))) > P_MIN


def test_auto_shift_interpolates_mu_linearly():
    assert flow.auto_shift(256) == pytest.approx(math.exp(0.5))
    assert flow.auto_shift(4096) == pytest.approx(math.exp(1.15))
    assert math.log(flow.auto_shift(2176)) == pytest.approx((0.5 + 1.15) / 2)
    assert math.log(flow.auto_shift(8192)) == pytest.approx(0.5 + 0.65 * (8192 - 256) / 3840)  # extrapolated
    lens = torch.tensor([256.0, 4096.0])
    assert torch.allclose(flow.auto_shift(lens), torch.tensor([math.exp(0.5), math.exp(1.15)]))
    assert flow.image_seq_len(128, 128) == 4096  # a 1024 px Flux image: 128x128 latent, 2x2 patches
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    for tokens in (256, 1024, 3000, 4096):
        assert flow.auto_shift_mu(tokens) == pytest.approx(calculate_shift(tokens))


def test_sampler_from_config_picks_distribution_and_shift():
    torch.manual_seed(6)
    beta = flow.FlowSigmaSampler.from_config(make_config(flow_use_beta_schedule=True, flow_beta_schedule_alpha=3.0))
    assert ks(beta(N), stats.beta(3.0, 2.0).cdf) > P_MIN
    shifted = flow.FlowSigmaSampler.from_config(make_config(flow_use_uniform_schedule=True), default_shift=2.0)
    assert ks(shifted(N), lambda x: x / (2 - x)) > P_MIN
    explicit = flow.FlowSigmaSampler.from_config(make_config(flow_schedule_shift=1.0), default_shift=3.0)
    assert explicit.shift == 1.0
    auto = flow.FlowSigmaSampler.from_config(make_config(flow_use_uniform_schedule=True, flow_schedule_auto_shift=True))
    k = flow.auto_shift(1024)
    assert ks(auto(N, seq_len=1024), lambda x: x / (k - (k - 1) * x)) > P_MIN
    with pytest.raises(ValueError, match="sequence length"):
        auto(4)
    with pytest.raises(ValueError, match="cannot both"):
        flow.FlowSigmaSampler.from_config(make_config(flow_use_uniform_schedule=True, flow_use_beta_schedule=True))
    torch.manual_seed(7)
    sigmoid = flow.FlowSigmaSampler.from_config(make_config(flow_sigmoid_scale=0.8))
    assert ks(sigmoid(N), lambda s: stats.norm.cdf(logit(s) / 0.8)) > P_MIN


def test_flow_path_target_and_weighted_loss():
    x0, eps = torch.randn(3, 2, 4, dtype=torch.float64), torch.randn(3, 2, 4, dtype=torch.float64)
    sigmas = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    noisy = flow.flow_noisy_latents(x0, eps, sigmas)
    assert torch.equal(noisy[0], x0[0]) and torch.equal(noisy[2], eps[2])
    assert torch.allclose(noisy[1], 0.7 * x0[1] + 0.3 * eps[1])
    target = flow.flow_velocity_target(x0, eps)
    # the target is the path's derivative: x_sigma = x0 + sigma * (eps - x0)
    assert torch.allclose(noisy, x0 + sigmas.view(-1, 1, 1) * target)
    prediction = torch.zeros_like(target)
    weights = torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64)
    per_sample = target.pow(2).flatten(1).mean(1)
    assert flow.weighted_mse(prediction, target, weights) == pytest.approx(float((per_sample * weights).mean()))
    assert flow.weighted_mse(prediction, target) == pytest.approx(float(per_sample.mean()))


# --- spec 004: shifted discrete schedule -------------------------------------------------------------


def closed_form_table(n: int, shift: float, steps: int = 1000):
    raw = [1 - i / n for i in range(n)]  # linspace(1, 0, n + 1) without its last entry
    sigmas = [shift * r / (1 + (shift - 1) * r) for r in raw]
    timesteps = [s * steps for s in sigmas]
    y = [math.exp(-2 * ((t - steps / 2) / steps) ** 2) for t in timesteps]
    lowered = [v - min(y) for v in y]
    weights = [v * steps / sum(lowered) for v in lowered]
    if n != steps:
        weights = [w * n / steps for w in weights]
        weights = [w + weights[1] for w in weights]
    return sigmas, timesteps, weights


@pytest.mark.parametrize("shift", [5.0, 1.0, 3.0])
def test_discrete_schedule_matches_its_formulas(shift):
    schedule = flow.ShiftedDiscreteSchedule(shift=shift)
    sigmas, timesteps, weights = closed_form_table(1000, shift)
    assert len(schedule) == 1000 and schedule.sigmas.dtype == torch.float64
    assert torch.allclose(schedule.sigmas, torch.tensor(sigmas, dtype=torch.float64), atol=1e-13, rtol=0)
    assert torch.allclose(schedule.timesteps, torch.tensor(timesteps, dtype=torch.float64), atol=1e-10, rtol=0)
    assert torch.allclose(schedule.weights, torch.tensor(weights, dtype=torch.float64), atol=1e-10, rtol=0)
    assert float(schedule.weights.sum()) == pytest.approx(1000, abs=1e-9)
    assert schedule.sigmas[0] == 1 and torch.all(schedule.sigmas.diff() < 0) and schedule.sigmas[-1] > 0
    assert float(schedule.weights.min()) == 0 and torch.all(schedule.weights >= 0)
    # the bell peaks at the entry nearest t = 500
    peak = int(schedule.weights.argmax())
    assert peak == int((schedule.timesteps - 500).abs().argmin())


def test_discrete_schedule_weight_at_500_is_the_specs_value():
    schedule = flow.ShiftedDiscreteSchedule(shift=5.0)  # the Wan template the spec describes
    assert float(schedule.weight_for(torch.tensor(500.0))) == pytest.approx(2.08, abs=0.005)
    table = schedule.weight_for(schedule.timesteps[[0, 10, 500]])
    assert torch.equal(table, schedule.weights[[0, 10, 500]])


def test_short_table_follows_the_empirical_rule():
    schedule = flow.ShiftedDiscreteSchedule(num_timesteps=50, shift=3.0)
    _, _, weights = closed_form_table(50, 3.0)
    assert torch.allclose(schedule.weights, torch.tensor(weights, dtype=torch.float64), atol=1e-12, rtol=0)
    assert torch.all(schedule.weights > 0)


def test_discrete_schedule_samples_indices_uniformly_within_the_boundaries():
    schedule = flow.ShiftedDiscreteSchedule(min_timestep_boundary=0.25, max_timestep_boundary=0.75)
    torch.manual_seed(8)
    drawn = schedule.sample(N)
    assert drawn.indices.min() >= 250 and drawn.indices.max() < 750
    assert torch.equal(drawn.sigmas, schedule.sigmas[drawn.indices])
    assert torch.equal(drawn.timesteps, schedule.timesteps[drawn.indices])
    assert torch.equal(drawn.weights, schedule.weights[drawn.indices])
    jittered = (drawn.indices.double() - 250 + torch.rand(N, dtype=torch.float64)) / 500
    assert ks(jittered, stats.uniform.cdf) > P_MIN
    torch.manual_seed(8)
    assert torch.equal(schedule.sample(N).indices, drawn.indices)  # the global generator decides
    high_noise = flow.ShiftedDiscreteSchedule(max_timestep_boundary=0.4)
    assert float(high_noise.sample(1000).sigmas.min()) >= float(high_noise.sigmas[399])
    for low, high in ((0.5, 0.5), (-0.1, 1.0), (0.2, 1.1)):
        with pytest.raises(ValueError, match="boundar"):
            flow.ShiftedDiscreteSchedule(min_timestep_boundary=low, max_timestep_boundary=high)


def test_loss_weighting_schemes():
    timesteps = torch.tensor([990.0, 500.0, 20.0])
    assert torch.equal(flow.flow_loss_weights("none", timesteps), torch.ones(3, dtype=torch.float64))
    schedule = flow.ShiftedDiscreteSchedule(shift=3.0)
    gaussian = flow.flow_loss_weights("gaussian", timesteps, schedule)
    assert torch.equal(gaussian, schedule.weight_for(timesteps)) and gaussian[1] > gaussian[0]
    with pytest.raises(ValueError, match="unknown flow loss weighting"):
        flow.flow_loss_weights("snr", timesteps)


# --- diff2flow conversions ---------------------------------------------------------------------------


def float64_scheduler(**kwargs):
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, **kwargs)
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()
    return scheduler


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ddpm_flow_conversions_round_trip_in_float64(prediction_type):
    scheduler = float64_scheduler()
    t = torch.tensor([0, 1, 250, 500, 750, 999])
    alpha = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 4, 3, 3, dtype=torch.float64, generator=generator)
    eps = torch.randn(6, 4, 3, 3, dtype=torch.float64, generator=generator)
    x_t = alpha.sqrt() * x0 + (1 - alpha).sqrt() * eps
    assert torch.allclose(x_t, scheduler.add_noise(x0, eps, t), atol=1e-12)
    # the flow point is exactly (1 - s) x0 + s eps
    x_flow, sigma = ddpm_to_flow_point(x_t, alpha)
    assert torch.allclose(x_flow, (1 - sigma) * x0 + sigma * eps, atol=1e-13)
    assert torch.allclose(sigma, (1 - alpha).sqrt() / (alpha.sqrt() + (1 - alpha).sqrt()), atol=0)
    back, alpha_back = flow_to_ddpm_point(x_flow, sigma)
    assert torch.allclose(back, x_t, atol=1e-13) and torch.allclose(alpha_back, alpha, atol=1e-15, rtol=1e-12)
    assert torch.allclose(alpha_from_flow_sigma(flow_sigma_from_alpha(alpha)), alpha, atol=1e-15, rtol=1e-12)
    # prediction -> (x0, eps) -> velocity -> prediction
    prediction = x0_eps_to_prediction(x0, eps, alpha, prediction_type)
    if prediction_type == "v_prediction":
        assert torch.allclose(prediction, scheduler.get_velocity(x0, eps, t), atol=1e-12)
    x0_back, eps_back = prediction_to_x0_eps(prediction, x_t, alpha, prediction_type)
    tolerance = 1e-9 if prediction_type == "sample" else 1e-11  # sample divides by sqrt(1 - a) ~ 0.03 at t=0
    assert torch.allclose(x0_back, x0, atol=tolerance) and torch.allclose(eps_back, eps, atol=tolerance)
    velocity = prediction_to_flow_velocity(prediction, x_t, alpha, prediction_type)
    assert torch.allclose(velocity, eps - x0, atol=tolerance)
    assert torch.allclose(flow_velocity_to_prediction(velocity, x_t, alpha, prediction_type), prediction,
                          atol=tolerance)
    # and the other way round: any velocity at the point maps back to itself
    other = torch.randn(x_t.shape, dtype=torch.float64, generator=generator)
    again = prediction_to_flow_velocity(flow_velocity_to_prediction(other, x_t, alpha, prediction_type), x_t, alpha,
                                        prediction_type)
    assert torch.allclose(again, other, atol=1e-8 if prediction_type == "epsilon" else tolerance)


# --- DDPM noise schedule options ---------------------------------------------------------------------


def test_zero_terminal_snr_and_spacing_reach_the_training_scheduler():
    from diffusers import DDIMScheduler, DDPMScheduler

    base = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    assert configure_training_scheduler(base, make_config()) is base
    assert float(base.alphas_cumprod[-1]) > 1e-3
    zero = configure_training_scheduler(base, make_config(rescale_betas_zero_snr=True,
                                                          training_scheduler_timestep_spacing="trailing"))
    assert isinstance(zero, DDPMScheduler) and zero.config.rescale_betas_zero_snr
    assert float(zero.alphas_cumprod[-1]) == pytest.approx(0, abs=1e-9)
    assert float(zero.alphas_cumprod[0]) == pytest.approx(float(base.alphas_cumprod[0]), rel=1e-6)  # first kept
    assert torch.all(zero.alphas_cumprod.diff() < 0)
    zero.set_timesteps(4)
    assert zero.timesteps.tolist() == [999, 749, 499, 249]  # trailing spacing starts at the last timestep
    assert inference_scheduler_overrides(make_config()) == {}
    inference = DDIMScheduler.from_config(
        zero.config, **inference_scheduler_overrides(make_config(inference_scheduler_timestep_spacing="linspace")))
    assert inference.config.timestep_spacing == "linspace" and inference.config.rescale_betas_zero_snr
    with pytest.raises(ValueError, match="zero SNR"):
        check_diff2flow_schedule(zero, "epsilon")
    check_diff2flow_schedule(zero, "v_prediction")
    check_diff2flow_schedule(base, "epsilon")


# --- diff2flow training ------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_diff2flow_loss_equals_its_formula_on_a_fixed_batch(prediction_type, monkeypatch):
    from simpletuner.methods.sft import SupervisedFineTuning

    scheduler = float64_scheduler(prediction_type=prediction_type)
    generator = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, 4, 2, 2, generator=generator)
    eps = torch.randn(3, 4, 2, 2, generator=generator)
    t = torch.tensor([10, 500, 990])

    class FixedModel:
        weight_dtype = torch.float32

        def __init__(self):
            self.prediction_type = prediction_type

        def noise_scheduler(self):
            return scheduler

        def latents_from_cache(self, cached):
            return cached["latent_mean"]

        def predict(self, noisy, timesteps, text, batch=None):
            return 0.3 * noisy + 0.05 * text["prompt_embeds"].mean()

    config = make_config(diff2flow_enabled=True, diff2flow_loss=True)
    method = SupervisedFineTuning(FixedModel(), caption_dropout_probability=0.0, config=config)
    method.sample_timesteps = lambda batch_size, device: t
    monkeypatch.setattr(torch, "randn_like", lambda like: eps.clone())
    batch = {"latent_mean": x0, "latent_std": torch.zeros_like(x0), "prompt_embeds": torch.ones(3, 2, 2),
             "empty_prompt": {"prompt_embeds": torch.zeros(3, 2, 2)}}
    loss = method.compute_loss(batch, torch.device("cpu")).loss

    # the formula, written out in float64 from the definitions
    a = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    x0d, epsd = x0.double(), eps.double()
    x_t = (a.sqrt() * x0d + (1 - a).sqrt() * epsd).float().double()  # the model sees float32 latents
    output = 0.3 * x_t + 0.05
    if prediction_type == "epsilon":
        x0_hat, eps_hat = (x_t - (1 - a).sqrt() * output) / a.sqrt(), output
    else:
        x0_hat, eps_hat = a.sqrt() * x_t - (1 - a).sqrt() * output, (1 - a).sqrt() * x_t + a.sqrt() * output
    expected = ((eps_hat - x0_hat) - (epsd - x0d)).pow(2).mean()
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    # without diff2flow the same batch regresses the native target instead
    native = SupervisedFineTuning(FixedModel(), 0.0, config=make_config())
    native.sample_timesteps = method.sample_timesteps
    assert float(native.compute_loss(batch, torch.device("cpu")).loss) != pytest.approx(float(loss), rel=1e-3)


@pytest.mark.slow
def test_diff2flow_and_schedule_options_train_end_to_end(tmp_path):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from simpletuner.options.resolve import resolve_run
    from simpletuner.testing.shapes import make_demo_dataset
    from simpletuner.testing.tiny_models import make_tiny_model
    from simpletuner.training.trainer import train

    model = tmp_path / "sd1x"
    make_tiny_model("sd1x", model, seed=0)
    make_demo_dataset(tmp_path / "data", 8, size=64, seed=3)
    datasets = [
        {"id": "shapes", "type": "local", "instance_data_dir": str(tmp_path / "data"), "caption_strategy": "textfile",
         "resolution": 64, "resolution_type": "pixel"},
        {"id": "text", "dataset_type": "text_embeds", "cache_dir": str(tmp_path / "cache" / "text"), "default": True},
    ]
    (tmp_path / "multidatabackend.json").write_text(json.dumps(datasets))

    def run(**overrides):
        values = {"model_family": "sd1x", "pretrained_model_name_or_path": str(model), "model_type": "lora",
                  "output_dir": str(tmp_path / "out"), "data_backend_config": str(tmp_path / "multidatabackend.json"),
                  "cache_dir": str(tmp_path / "cache"), "resolution": "64", "resolution_type": "pixel",
                  "aspect_bucket_alignment": "8", "mixed_precision": "no", "train_batch_size": "4",
                  "max_train_steps": "3", "seed": "7", "learning_rate": "1e-3", "report_to": "none",
                  "optimizer": "optimi-adamw", "diff2flow_enabled": "true", "diff2flow_loss": "true"}
        values.update({k: str(v) for k, v in overrides.items()})
        argv = [token for key, value in values.items() for token in (f"--{key}", value)]
        return train(resolve_run(argv).config, show_progress=False)

    trainer = run()
    assert len(trainer.state.losses) == 3 and all(math.isfinite(loss) for loss in trainer.state.losses)

    trainer = run(output_dir=tmp_path / "zsnr", prediction_type="v_prediction", rescale_betas_zero_snr="true",
                  training_scheduler_timestep_spacing="trailing", inference_scheduler_timestep_spacing="linspace",
                  timestep_bias_strategy="later", timestep_bias_multiplier=3.0)
    assert all(math.isfinite(loss) for loss in trainer.state.losses)
    scheduler = trainer.model.noise_scheduler()
    assert scheduler.config.rescale_betas_zero_snr and scheduler.config.timestep_spacing == "trailing"
    assert float(scheduler.alphas_cumprod[-1]) == pytest.approx(0, abs=1e-9)
    pipeline = trainer.model.build_pipeline()
    assert pipeline.scheduler.config.timestep_spacing == "linspace"
    assert pipeline.scheduler.config.rescale_betas_zero_snr
