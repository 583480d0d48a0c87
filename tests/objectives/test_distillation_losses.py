"""The distillation loss math (spec 003, issue 17) against independent reference computations on fixed
tensors: the DMD gradient and its surrogate loss, every f-divergence weighting (checked against f''(r) r^2
taken by autograd from the f in the docstring), ratio clipping, the GAN losses and both R1 penalties."""

from __future__ import annotations

import math

import pytest
import torch

from simpletuner.objectives.distillation import (F_DIVERGENCES, approximate_r1_penalty, discriminator_gan_loss,
                                                 dmd_gradient, dmd_loss, f_divergence_weights, generator_gan_loss,
                                                 r1_penalty, timestep_bins)

# Two samples of 4 elements, values chosen so every mean below is easy to do by hand.
GENERATED = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0]]).reshape(2, 1, 2, 2)
REAL_X0 = torch.tensor([[0.0, 2.0, 5.0, 4.0], [1.0, -1.0, 1.0, -1.0]]).reshape(2, 1, 2, 2)
FAKE_X0 = torch.tensor([[1.0, 1.0, 1.0, 1.0], [3.0, 1.0, 2.0, 0.0]]).reshape(2, 1, 2, 2)
LOGITS = torch.tensor([-1.5, -0.25, 0.0, 0.7, 2.0])


def test_dmd_gradient_is_teacher_gap_divided_by_each_samples_mean_distance():
    # sample 0: |gen - real| = 1, 0, 2, 0 -> mean 0.75; sample 1: all 1 -> mean 1
    expected = torch.stack([(FAKE_X0[0] - REAL_X0[0]) / 0.75, (FAKE_X0[1] - REAL_X0[1]) / 1.0])
    gradient = dmd_gradient(GENERATED, REAL_X0, FAKE_X0)
    torch.testing.assert_close(gradient, expected)
    assert gradient[0, 0, 0].tolist() == pytest.approx([4 / 3, -4 / 3])


def test_dmd_gradient_floors_the_normaliser_and_clears_non_finite_values():
    same = torch.zeros(1, 3)
    fake = torch.tensor([[2e-6, float("nan"), float("inf")]])
    gradient = dmd_gradient(same, same, fake)
    assert gradient[0, 0].item() == pytest.approx(2.0)  # 2e-6 / 1e-6
    assert torch.isfinite(gradient).all()


def test_dmd_gradient_does_float32_math_on_low_precision_inputs():
    gradient = dmd_gradient(GENERATED.bfloat16(), REAL_X0.bfloat16(), FAKE_X0.bfloat16())
    assert gradient.dtype == torch.float32
    torch.testing.assert_close(gradient, dmd_gradient(GENERATED, REAL_X0, FAKE_X0))


@pytest.mark.parametrize("weights", [None, torch.tensor([0.5, 2.0])])
def test_dmd_loss_backpropagates_exactly_the_weighted_gradient(weights):
    generated = GENERATED.clone().requires_grad_(True)
    gradient = dmd_gradient(GENERATED, REAL_X0, FAKE_X0)
    loss = dmd_loss(generated, gradient, weights)
    loss.backward()
    w = torch.ones(2) if weights is None else weights
    numel, batch = 4, 2
    expected = w.reshape(2, 1, 1, 1) * gradient / (numel * batch)
    torch.testing.assert_close(generated.grad, expected, rtol=1e-6, atol=1e-7)
    # value: 0.5 * mean_b(w_b * mean(gradient**2))
    expected_value = 0.5 * (w * gradient.reshape(2, -1).pow(2).mean(dim=1)).mean()
    assert loss.item() == pytest.approx(expected_value.item(), rel=1e-6)


def test_a_step_on_dmd_loss_moves_the_sample_towards_the_teacher_side():
    generated = GENERATED.clone().requires_grad_(True)
    dmd_loss(generated, dmd_gradient(GENERATED, REAL_X0, FAKE_X0)).backward()
    step = -generated.grad
    # descending moves the sample along real_x0 - fake_x0 (what the teacher sees minus what the student makes)
    assert (step * (REAL_X0 - FAKE_X0) >= 0).all()
    assert (step * (REAL_X0 - FAKE_X0)).sum() > 0


def test_dmd_loss_refuses_weights_that_are_not_one_per_sample():
    with pytest.raises(ValueError, match=r"sample_weights has shape \(3,\).*\(2,\)"):
        dmd_loss(GENERATED, GENERATED, torch.ones(3))


# f exactly as written in the docstring table; h is checked against f''(r) * r**2 taken by autograd.
F_OF_R = {
    "rkl": lambda r: -torch.log(r),
    "kl": lambda r: r * torch.log(r),
    "js": lambda r: 0.5 * (r * torch.log(r) - (1 + r) * torch.log((1 + r) / 2)),
    "sh": lambda r: (torch.sqrt(r) - 1) ** 2,
    "neyman": lambda r: (1 - r) ** 2 / r,
    "jf": lambda r: (r - 1) * torch.log(r),
    "sf": lambda r: (1 + r) * torch.log((1 + r) / (2 * r)),
}


def second_derivative(f, r: torch.Tensor) -> torch.Tensor:
    r = r.double().requires_grad_(True)
    (first,) = torch.autograd.grad(f(r).sum(), r, create_graph=True)
    (second,) = torch.autograd.grad(first.sum(), r)
    return second


@pytest.mark.parametrize("kind", F_DIVERGENCES)
def test_raw_weights_are_f_second_derivative_times_r_squared(kind):
    f = F_OF_R[kind]
    assert f(torch.tensor(1.0, dtype=torch.float64)).item() == pytest.approx(0.0, abs=1e-12)  # a divergence
    r = LOGITS.double().exp()
    expected = second_derivative(f, r) * r**2
    assert (second_derivative(f, r) > 0).all()  # f convex
    weights = f_divergence_weights(kind, LOGITS, normalise=False)
    torch.testing.assert_close(weights.double(), expected, rtol=1e-5, atol=1e-6)


# Normalised weights by hand, in the constant-free forms (FastGen writes them this way).
HAND_H = {
    "rkl": lambda r: [1.0 for _ in r],
    "kl": lambda r: list(r),
    "js": lambda r: [x / (1 + x) for x in r],
    "sh": lambda r: [math.sqrt(x) for x in r],
    "neyman": lambda r: [1 / x for x in r],
    "jf": lambda r: [1 + x for x in r],
    "sf": lambda r: [1 / (1 + x) for x in r],
}


@pytest.mark.parametrize("kind", F_DIVERGENCES)
def test_normalised_weights_have_mean_one_and_match_the_hand_computation(kind):
    ratios = [math.exp(x) for x in LOGITS.tolist()]
    h = HAND_H[kind](ratios)
    expected = [x / (sum(h) / len(h)) for x in h]
    weights = f_divergence_weights(kind, LOGITS)
    assert weights.tolist() == pytest.approx(expected, rel=1e-5)
    assert weights.mean().item() == pytest.approx(1.0, rel=1e-6)


def test_reverse_kl_weights_are_exactly_one():
    assert torch.equal(f_divergence_weights("rkl", LOGITS), torch.ones(5))
    assert torch.equal(f_divergence_weights("rkl", LOGITS, 0.1, 20.0, normalise=False), torch.ones(5))


def test_ratio_is_clipped_on_both_sides_before_h():
    logits = torch.tensor([-4.0, 0.0, 5.0])  # r = 0.018, 1, 148.4
    weights = f_divergence_weights("kl", logits, ratio_lower=0.5, ratio_upper=20.0, normalise=False)
    assert weights.tolist() == pytest.approx([0.5, 1.0, 20.0])
    neyman = f_divergence_weights("neyman", logits, ratio_lower=0.5, ratio_upper=20.0, normalise=False)
    assert neyman.tolist() == pytest.approx([4.0, 2.0, 0.1])  # 2 / r with r clipped
    only_upper = f_divergence_weights("jf", logits, ratio_upper=2.0, normalise=False)
    assert only_upper.tolist() == pytest.approx([1 + math.exp(-4.0), 2.0, 3.0])


def test_extreme_logits_stay_finite_and_several_logits_per_sample_are_averaged():
    huge = f_divergence_weights("kl", torch.tensor([500.0, -500.0]), normalise=False)
    assert huge.tolist() == pytest.approx([math.exp(10.0), math.exp(-10.0)])
    per_head = torch.tensor([[0.0, 2.0], [-1.0, -1.0]])  # means 1.0 and -1.0
    weights = f_divergence_weights("kl", per_head, normalise=False)
    assert weights.tolist() == pytest.approx([math.e, 1 / math.e])


def test_ratios_are_divided_by_their_noise_level_groups_mean_after_clipping():
    logits = torch.tensor([0.0, math.log(3.0), math.log(2.0), math.log(8.0), 5.0])  # r = 1, 3, 2, 8, 148
    groups = torch.tensor([4, 4, 7, 7, 7])
    weights = f_divergence_weights("kl", logits, ratio_upper=20.0, normalise=False, ratio_groups=groups)
    # group 4: mean(1, 3) = 2; group 7: mean(2, 8, 20) = 10 (148 clipped to 20 first)
    assert weights.tolist() == pytest.approx([0.5, 1.5, 0.2, 0.8, 2.0])


def test_timestep_bins_split_the_range_evenly_and_keep_the_ends():
    timesteps = torch.tensor([0.0, 249.0, 250.0, 999.9, 1000.0])
    assert timestep_bins(timesteps, 0.0, 1000.0, 4).tolist() == [0, 0, 1, 3, 3]
    with pytest.raises(ValueError, match="t_max > t_min"):
        timestep_bins(timesteps, 1.0, 1.0, 4)


def test_weights_are_constants_even_from_a_differentiable_discriminator():
    logits = LOGITS.clone().requires_grad_(True)
    assert not f_divergence_weights("js", logits).requires_grad


def test_unknown_divergence_and_inverted_bounds_are_refused_with_the_choices():
    with pytest.raises(ValueError, match="unknown f-divergence 'tv'; choose one of rkl, kl, js, sh, neyman, jf, sf"):
        f_divergence_weights("tv", LOGITS)
    with pytest.raises(ValueError, match="ratio_lower = 5.0 is above ratio_upper = 2.0"):
        f_divergence_weights("kl", LOGITS, 5.0, 2.0)


def softplus_by_hand(x: float) -> float:
    return math.log1p(math.exp(x))


def test_logistic_gan_losses_match_the_hand_computation():
    real, fake = torch.tensor([[2.0], [-1.0]]), torch.tensor([[0.5], [-3.0], [1.0]])
    assert generator_gan_loss(fake).item() == pytest.approx(
        sum(softplus_by_hand(-x) for x in [0.5, -3.0, 1.0]) / 3, rel=1e-6
    )
    real_term = sum(softplus_by_hand(-x) for x in [2.0, -1.0]) / 2
    expected = real_term + sum(softplus_by_hand(x) for x in [0.5, -3.0, 1.0]) / 3
    assert discriminator_gan_loss(real, fake).item() == pytest.approx(expected, rel=1e-6)


def test_hinge_gan_losses_match_the_hand_computation():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-0.5, -2.0, 1.0])
    assert generator_gan_loss(fake, kind="hinge").item() == pytest.approx(0.5)  # -(-0.5 - 2 + 1) / 3
    # relu(1 - real): 0, 0.5 -> 0.25; relu(1 + fake): 0.5, 0, 2 -> 2.5 / 3
    assert discriminator_gan_loss(real, fake, kind="hinge").item() == pytest.approx(0.25 + 2.5 / 3)
    with pytest.raises(ValueError, match="unknown GAN loss kind 'wgan'; choose one of logistic, hinge"):
        generator_gan_loss(fake, kind="wgan")


class LinearDiscriminator(torch.nn.Module):
    """D(x) = <w, x> + b per sample: its input gradient is w everywhere, so R1 = ||w||^2."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.tensor([[1.0, -2.0], [0.5, 3.0]]))
        self.bias = torch.nn.Parameter(torch.tensor(0.25))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.weight).flatten(1).sum(dim=1) + self.bias


def test_r1_of_a_linear_discriminator_is_its_squared_weight_norm_and_trains_it():
    disc = LinearDiscriminator()
    inputs = torch.randn(3, 2, 2, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    penalty = r1_penalty(disc(inputs), inputs)
    assert penalty.item() == pytest.approx(1 + 4 + 0.25 + 9)
    penalty.backward()  # create_graph: d ||w||^2 / dw = 2w reaches the discriminator
    torch.testing.assert_close(disc.weight.grad, 2 * disc.weight.detach())


def test_r1_of_a_quadratic_discriminator_uses_each_samples_own_gradient():
    inputs = torch.tensor([[1.0, 2.0], [0.0, -3.0]], requires_grad=True)
    logits = (inputs**2).sum(dim=1, keepdim=True)  # gradient 2x -> ||.||^2 = 20 and 36
    assert r1_penalty(logits, inputs).item() == pytest.approx((20 + 36) / 2)


def test_r1_refuses_inputs_without_grad_or_outside_the_graph():
    inputs = torch.ones(2, 2)
    with pytest.raises(ValueError, match="real_inputs does not require grad; call real_inputs.requires_grad_"):
        r1_penalty(inputs.sum(dim=1), inputs)
    unrelated = torch.ones(2, 2, requires_grad=True)
    with pytest.raises(ValueError, match="not computed from real_inputs"):
        r1_penalty(torch.ones(2, requires_grad=True) * 2, unrelated)


def test_approximate_r1_is_the_finite_difference_and_trains_the_discriminator():
    disc = LinearDiscriminator()
    inputs = torch.randn(3, 2, 2, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(3, 2, 2, generator=torch.Generator().manual_seed(2))
    penalty = approximate_r1_penalty(disc, inputs, 0.1, noise=noise)
    expected = (0.1 * (noise * disc.weight.detach()).flatten(1).sum(dim=1)).pow(2).mean()
    assert penalty.item() == pytest.approx(expected.item(), rel=1e-5)
    penalty.backward()
    assert disc.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="sigma = 0"):
        approximate_r1_penalty(disc, inputs, 0)


def test_approximate_r1_averages_to_sigma_squared_times_exact_r1():
    torch.manual_seed(3)
    disc = LinearDiscriminator()
    inputs = torch.zeros(8192, 2, 2)
    real_logits = disc(inputs)  # reused, as a method passes the logits of its GAN loss
    approx = approximate_r1_penalty(disc, inputs, 0.05, real_logits=real_logits)
    marked = inputs.clone().requires_grad_(True)
    exact = r1_penalty(disc(marked), marked)  # ||w||^2 = 14.25
    assert approx.item() == pytest.approx(0.05**2 * exact.item(), rel=0.1)
