"""The loss math of distribution-matching distillation (spec 003): DMD2, f-distill and LADD.

Pure tensor functions, no model code; the methods in ``simpletuner/methods/distillation/`` run the
networks and call these. All arithmetic is done in float32 whatever the input dtype, because the
quantities involved (per-sample normalisers, density ratios, squared gradients) lose too much in
bf16/fp16.

* :func:`dmd_gradient` / :func:`dmd_loss`: the distribution-matching (VSD) gradient of DMD (Yin et
  al. 2024) and a scalar surrogate whose autograd gradient is exactly that direction.
* :func:`f_divergence_weights`: the per-sample weights of f-distill (Xu et al. 2025, "One-step diffusion
  models with f-divergence distribution matching"), computed from the discriminator's density ratio.
* :func:`generator_gan_loss` / :func:`discriminator_gan_loss`: the adversarial terms, logistic
  (non-saturating, as DMD2 and f-distill use) or hinge (as ADD, and LADD after it, use).
* :func:`r1_penalty` (exact, double backward) and :func:`approximate_r1_penalty` (finite differences,
  as in Lin et al. 2025 "Diffusion adversarial post-training", which needs no double backward through
  a frozen teacher that produces the discriminator's features).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

F_DIVERGENCES: tuple[str, ...] = ("rkl", "kl", "js", "sh", "neyman", "jf", "sf")
GAN_LOSS_KINDS: tuple[str, ...] = ("logistic", "hinge")

NORMALISER_FLOOR = 1e-6
# exp() of a log ratio beyond +-10 (r outside [4.5e-5, 2.2e4]) only produces overflow or weights of
# 1e4 and more; the discriminator logits are clamped there before any ratio clipping.
LOG_RATIO_LIMIT = 10.0


def _per_sample_mean(values: torch.Tensor) -> torch.Tensor:
    """``[B]``: the mean over every non-batch dimension (a ``[B]`` input is returned as is)."""
    return values.reshape(values.shape[0], -1).mean(dim=1)


def _broadcast_per_sample(per_sample: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``[B]`` reshaped to ``[B, 1, 1, ...]`` so it multiplies a tensor shaped like ``like``."""
    return per_sample.reshape(-1, *([1] * (like.ndim - 1)))


def dmd_gradient(generated: torch.Tensor, real_x0: torch.Tensor, fake_x0: torch.Tensor) -> torch.Tensor:
    """The distribution-matching gradient on the student's sample, per element, in float32.

    ``(fake_x0 - real_x0) / normaliser``: the teacher's ("real") and the fake-score network's x0
    predictions of the re-noised student sample differ exactly where the student's distribution
    departs from the teacher's, and descending along this difference moves the sample towards the
    teacher. The normaliser is, per sample, the mean of ``|generated - real_x0|`` over all non-batch
    dims (floored at 1e-6): it makes the step size independent of how far that sample currently is
    from the teacher, so early, very wrong samples do not get huge steps and nearly right ones still
    learn. NaN / inf (a diverged fake score) become finite numbers rather than poisoning the step.
    """
    generated32, real32, fake32 = generated.float(), real_x0.float(), fake_x0.float()
    distance = _per_sample_mean((generated32 - real32).abs()).clamp_min(NORMALISER_FLOOR)
    gradient = (fake32 - real32) / _broadcast_per_sample(distance, fake32)
    return torch.nan_to_num(gradient.detach())


def dmd_loss(
    generated: torch.Tensor, gradient: torch.Tensor, sample_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """A scalar whose gradient w.r.t. ``generated`` is ``w_b * gradient / (numel_per_sample * batch)``.

    ``0.5 * mean_b(w_b * mean_elements((generated - (generated - gradient).detach())**2))``: the
    target is the sample moved one step against the gradient and held constant, so the loss only
    carries the given direction into the student's backward pass. ``sample_weights`` (``[B]``, e.g.
    :func:`f_divergence_weights`) scale each sample's step and are treated as constants.
    """
    generated32 = generated.float()
    target = (generated32 - gradient.float()).detach()
    per_sample = _per_sample_mean((generated32 - target) ** 2)
    if sample_weights is not None:
        if sample_weights.shape != per_sample.shape:
            raise ValueError(
                f"dmd_loss: sample_weights has shape {tuple(sample_weights.shape)}, expected one weight "
                f"per sample, shape {tuple(per_sample.shape)}"
            )
        per_sample = per_sample * sample_weights.detach().float()
    return 0.5 * per_sample.mean()


def _h_of_ratio(kind: str, ratio: torch.Tensor) -> torch.Tensor:
    """``h(r) = f''(r) * r**2`` for each divergence; see :func:`f_divergence_weights` for each f."""
    if kind == "rkl":
        return torch.ones_like(ratio)
    if kind == "kl":
        return ratio
    if kind == "js":
        return ratio / (2.0 * (1.0 + ratio))
    if kind == "sh":
        return 0.5 * ratio.sqrt()
    if kind == "neyman":
        return 2.0 / ratio
    if kind == "jf":
        return 1.0 + ratio
    if kind == "sf":
        return 1.0 / (1.0 + ratio)
    raise ValueError(f"unknown f-divergence {kind!r}; choose one of {', '.join(F_DIVERGENCES)}")


def f_divergence_weights(
    kind: str,
    log_ratio: torch.Tensor,
    ratio_lower: float | None = None,
    ratio_upper: float | None = None,
    *,
    normalise: bool = True,
    ratio_groups: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample weights ``[B]`` of f-distill's distribution-matching gradient, as constants.

    f-distill minimises ``D_f(p || q) = E_q[f(r)]`` with ``p`` the teacher, ``q`` the student and
    ``r = p / q``. Its gradient is DMD's (which is the reverse-KL case) scaled per sample by
    ``h(r) = f''(r) * r**2``. ``r`` comes from the discriminator, trained with the logistic loss
    with the teacher side as "real": at its optimum the logit is ``log(p / q)``, so ``r = exp(logit)``.
    ``log_ratio`` is that logit; with several logits per sample (``[B, ...]``, e.g. one per feature
    head) their mean is used. The logit is clamped to +-10, then ``r`` is clipped to
    ``[ratio_lower, ratio_upper]`` (either may be None) *before* ``h`` is computed, as NVlabs' FastGen
    does, so a clipped sample gets the weight of the bound.

    Each kind, with ``f`` (``f(1) = 0``, convex) and ``h = f''(r) r**2``:

    ========  =================================================  ==================
    kind      f(r)                                               h(r)
    ========  =================================================  ==================
    rkl       ``-log r``  (reverse KL, KL(q||p): plain DMD)       ``1``
    kl        ``r log r``  (forward KL, KL(p||q))                 ``r``
    js        ``(r log r - (1 + r) log((1 + r) / 2)) / 2``        ``r / (2 (1 + r))``
    sh        ``(sqrt(r) - 1)**2``  (squared Hellinger)           ``sqrt(r) / 2``
    neyman    ``(1 - r)**2 / r``  (Neyman chi-squared)            ``2 / r``
    jf        ``(r - 1) log r``  (Jeffreys, KL(p||q) + KL(q||p))  ``1 + r``
    sf        ``(1 + r) log((1 + r) / (2 r))``                    ``1 / (1 + r)``
    ========  =================================================  ==================

    "sf" is the softened reverse KL: ``E_q[f(r)] = 2 KL(m || p)`` with ``m = (p + q) / 2``, reverse KL
    with the student's density mixed half-and-half with the teacher's. Its weight ``1 / (1 + r)`` stays
    near 1 where the teacher finds the student's sample unlikely and fades where the teacher already
    agrees, the opposite tilt to kl / js, which favour samples the teacher finds likely.

    With ``normalise`` (the default, as f-distill and FastGen do) the weights are divided by their
    batch mean, so their average is 1, the learning rate keeps its DMD meaning whatever the divergence,
    and the constant factors above drop out (js becomes ``r / (1 + r)``, sh ``sqrt(r)``, neyman
    ``1 / r``). With several processes this is each process's own batch mean. ``normalise=False``
    returns ``h`` exactly as in the table.

    ``ratio_groups`` (``[B]`` integer ids, e.g. :func:`timestep_bins`) adds f-distill's first
    normalisation: after clipping, each ratio is divided by the mean ratio of the batch samples in its
    group, so the discriminator's noise-level-dependent bias in ``r`` does not decide the weights
    (FastGen's ``ratio_normalization`` with its default ``ratio_ema_rate = 0``).
    """
    if kind not in F_DIVERGENCES:
        raise ValueError(f"unknown f-divergence {kind!r}; choose one of {', '.join(F_DIVERGENCES)}")
    if ratio_lower is not None and ratio_upper is not None and ratio_lower > ratio_upper:
        raise ValueError(f"f-distill ratio clipping: ratio_lower = {ratio_lower} is above ratio_upper = {ratio_upper}")
    logit = _per_sample_mean(log_ratio.detach().float()).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    ratio = logit.exp()
    if ratio_lower is not None or ratio_upper is not None:
        ratio = ratio.clamp(min=ratio_lower, max=ratio_upper)
    if ratio_groups is not None:
        ratio = ratio / _group_means(ratio, ratio_groups)
    weights = _h_of_ratio(kind, ratio)
    if normalise:
        weights = weights / weights.mean().clamp_min(NORMALISER_FLOOR)
    return weights


def timestep_bins(timesteps: torch.Tensor, t_min: float, t_max: float, bin_count: int) -> torch.Tensor:
    """``[B]`` ids of ``bin_count`` equal-width bins over ``[t_min, t_max]`` (ends included in the outer bins)."""
    if bin_count < 1 or not t_max > t_min:
        raise ValueError(f"timestep_bins: need bin_count >= 1 and t_max > t_min, got {bin_count}, [{t_min}, {t_max}]")
    width = (t_max - t_min) / bin_count
    return ((timesteps.double() - t_min) / width).floor().long().clamp(0, bin_count - 1)


def _group_means(values: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """``[B]``: for every sample, the mean of ``values`` over the samples sharing its group id."""
    if groups.shape != values.shape:
        raise ValueError(
            f"ratio_groups has shape {tuple(groups.shape)}, expected one id per sample {tuple(values.shape)}"
        )
    _, index = torch.unique(groups, return_inverse=True)
    sums = torch.zeros(int(index.max()) + 1, dtype=values.dtype, device=values.device).index_add_(0, index, values)
    counts = torch.bincount(index).to(values.dtype)
    return (sums / counts)[index]


def _check_gan_kind(kind: str) -> None:
    if kind not in GAN_LOSS_KINDS:
        raise ValueError(f"unknown GAN loss kind {kind!r}; choose one of {', '.join(GAN_LOSS_KINDS)}")


def generator_gan_loss(fake_logits: torch.Tensor, kind: str = "logistic") -> torch.Tensor:
    """The student's adversarial loss on the discriminator's logits for its samples.

    ``logistic``: the non-saturating ``mean(softplus(-logits))`` (DMD2, f-distill, and FastGen's LADD);
    ``hinge``: ``-mean(logits)`` (ADD; LADD keeps ADD's adversarial formulation).
    """
    _check_gan_kind(kind)
    logits = fake_logits.float()
    if kind == "hinge":
        return -logits.mean()
    return F.softplus(-logits).mean()


def discriminator_gan_loss(
    real_logits: torch.Tensor, fake_logits: torch.Tensor, kind: str = "logistic"
) -> torch.Tensor:
    """The discriminator's loss: teacher / real side labelled 1, student side 0.

    ``logistic``: ``mean(softplus(-real)) + mean(softplus(fake))``, whose optimum logit is
    ``log(p_real / p_fake)``, the density ratio f-distill needs; ``hinge``:
    ``mean(relu(1 - real)) + mean(relu(1 + fake))``. The two means are taken separately so the real
    and fake batches may differ in size.
    """
    _check_gan_kind(kind)
    real, fake = real_logits.float(), fake_logits.float()
    if kind == "hinge":
        return F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()
    return F.softplus(-real).mean() + F.softplus(fake).mean()


def r1_penalty(real_logits: torch.Tensor, real_inputs: torch.Tensor) -> torch.Tensor:
    """Exact R1 (Mescheder et al. 2018): ``mean_b ||d sum(real_logits) / d real_inputs[b]||**2``.

    The gradient is taken with ``create_graph=True`` so the penalty itself trains the discriminator
    (it flattens the discriminator around real data). Multiply by the run's weight (often
    ``gamma / 2``) outside. ``real_inputs`` are what the discriminator saw (latents, or teacher
    features for a discriminator head) and must have been marked ``requires_grad`` before the
    forward pass.
    """
    if not real_inputs.requires_grad:
        raise ValueError(
            "r1_penalty: real_inputs does not require grad; call real_inputs.requires_grad_(True) before "
            "the discriminator's forward pass so the logits can be differentiated w.r.t. the inputs"
        )
    (gradient,) = torch.autograd.grad(real_logits.float().sum(), real_inputs, create_graph=True, allow_unused=True)
    if gradient is None:
        raise ValueError("r1_penalty: real_logits were not computed from real_inputs (no path in the graph)")
    return gradient.float().pow(2).reshape(gradient.shape[0], -1).sum(dim=1).mean()


def approximate_r1_penalty(
    discriminate: Callable[[torch.Tensor], torch.Tensor],
    real_inputs: torch.Tensor,
    sigma: float,
    *,
    real_logits: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """R1 by finite differences: ``mean((D(x) - D(x + sigma * eps))**2)``, eps ~ N(0, I).

    To first order ``D(x + sigma eps) - D(x) = sigma eps . grad D(x)``, whose square has expectation
    ``sigma**2 ||grad D(x)||**2``: the same flattening as R1 (scaled by ``sigma**2``) without a second
    backward pass, which through a large frozen teacher that feeds the discriminator would cost as
    much memory as training it. Both logits keep their graph, so the penalty trains the discriminator.
    ``real_logits`` may pass ``D(x)`` already computed for the GAN loss; ``noise`` fixes eps.
    """
    if sigma <= 0:
        raise ValueError(f"approximate_r1_penalty: sigma = {sigma} must be positive")
    if real_logits is None:
        real_logits = discriminate(real_inputs)
    if noise is None:
        noise = torch.randn_like(real_inputs)
    perturbed_logits = discriminate(real_inputs.detach() + sigma * noise.to(real_inputs.dtype))
    return (real_logits.float() - perturbed_logits.float()).pow(2).mean()
