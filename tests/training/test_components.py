"""Optimizers, LR schedules, targets, caption dropout and EMA, checked against their formulas."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")

from simpletuner.methods.sft import SupervisedFineTuning  # noqa: E402
from simpletuner.testing.config import make_config  # noqa: E402
from simpletuner.training.ema import EmaSettings, EmaWeights  # noqa: E402
from simpletuner.training.lr import build_lr_scheduler  # noqa: E402
from simpletuner.objectives.targets import training_target  # noqa: E402
from simpletuner.training.optim import build_optimizer  # noqa: E402


def optimizer_config(**overrides):
    return make_config(**{"optimizer": "optimi-adamw", "learning_rate": 0.1, "adam_weight_decay": 0.0,
                          "lr_end": 0.01, "lr_power": 2.0, **overrides})


def lr_curve(config, steps: int) -> list[float]:
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = build_optimizer(config, [parameter])
    schedule = build_lr_scheduler(config, optimizer, steps)
    values = []
    for _ in range(steps):
        values.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    return values


def test_schedules_follow_their_formulas():
    base = 0.1
    assert lr_curve(optimizer_config(lr_scheduler="constant", lr_warmup_steps=5), 10) == [base] * 10
    warm = lr_curve(optimizer_config(lr_scheduler="constant_with_warmup", lr_warmup_steps=4), 8)
    assert warm[:5] == pytest.approx([0.0, 0.025, 0.05, 0.075, 0.1]) and warm[-1] == pytest.approx(base)
    cosine = lr_curve(optimizer_config(lr_scheduler="cosine", lr_warmup_steps=2), 12)
    for step in range(2, 12):
        progress = (step - 2) / 10
        assert cosine[step] == pytest.approx(base * 0.5 * (1 + math.cos(math.pi * progress)))
    linear = lr_curve(optimizer_config(lr_scheduler="linear"), 10)
    assert linear == pytest.approx([base * (10 - s) / 10 for s in range(10)])
    poly = lr_curve(optimizer_config(lr_scheduler="polynomial"), 10)
    assert poly == pytest.approx([(base - 0.01) * (1 - s / 10) ** 2 + 0.01 for s in range(10)])


def test_unknown_optimizer_lists_the_available_ones():
    with pytest.raises(ValueError, match="adamw_bf16"):
        build_optimizer(optimizer_config(optimizer="lion"), [torch.nn.Parameter(torch.zeros(1))])


def test_adamw_bf16_keeps_tiny_updates_on_bf16_weights():
    """Plain bf16 AdamW rounds 1e-4-sized updates of a weight of 1.0 away; Kahan summation keeps them."""
    weight = torch.nn.Parameter(torch.ones(64, dtype=torch.bfloat16))
    optimizer = build_optimizer(optimizer_config(optimizer="adamw_bf16", learning_rate=1e-4), [weight])
    for _ in range(100):
        weight.grad = torch.ones_like(weight)
        optimizer.step()
    assert float(weight.float().mean()) == pytest.approx(1 - 100 * 1e-4, abs=2e-3)
    assert float(weight.float().mean()) < 0.995


def test_targets_match_the_ddpm_formulas_in_float64():
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()
    latents = torch.randn(3, 4, 2, 2, dtype=torch.float64)
    noise = torch.randn_like(latents)
    t = torch.tensor([0, 500, 999])
    alpha = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.equal(training_target(scheduler, latents, noise, t, "epsilon"), noise)
    expected_v = alpha.sqrt() * noise - (1 - alpha).sqrt() * latents
    assert torch.allclose(training_target(scheduler, latents, noise, t, "v_prediction"), expected_v, atol=1e-12)
    with pytest.raises(ValueError, match="unknown prediction type"):
        training_target(scheduler, latents, noise, t, "flow")


def test_caption_dropout_swaps_in_the_empty_prompt():
    model = SimpleNamespace(noise_scheduler=lambda: SimpleNamespace(config=SimpleNamespace(num_train_timesteps=1000)),
                            prediction_type="epsilon", unconditional_text=lambda empty: empty)
    batch = {"prompt_embeds": torch.ones(8, 3, 2), "empty_prompt": {"prompt_embeds": torch.zeros(8, 3, 2)}}
    config = make_config()
    always = SupervisedFineTuning(model, 1.0, config).text_conditioning(batch, torch.device("cpu"))
    never = SupervisedFineTuning(model, 0.0, config).text_conditioning(batch, torch.device("cpu"))
    assert torch.equal(always["prompt_embeds"], torch.zeros(8, 3, 2))
    assert torch.equal(never["prompt_embeds"], torch.ones(8, 3, 2))
    torch.manual_seed(0)
    half = SupervisedFineTuning(model, 0.5, config).text_conditioning(
        {"prompt_embeds": torch.ones(4000, 1, 1), "empty_prompt": {"prompt_embeds": torch.zeros(4000, 1, 1)}},
        torch.device("cpu"))
    assert 0.45 < 1 - float(half["prompt_embeds"].mean()) < 0.55


def test_ema_averages_and_restores_live_weights():
    weight = torch.nn.Parameter(torch.zeros(2))
    ema = EmaWeights([weight], decay=0.5)
    with torch.no_grad():
        weight.fill_(1.0)
    for _ in range(50):
        ema.update()
    with ema.applied():
        averaged = weight.detach().clone()
    assert 0.95 < float(averaged.mean()) <= 1.0
    assert torch.equal(weight.detach(), torch.ones(2))
    restored = EmaWeights([weight], decay=0.5)
    restored.load_state_dict(ema.state_dict())
    with restored.applied():
        assert torch.equal(weight.detach(), averaged)


def test_restart_schedules_repeat_each_cycle():
    restarts = lr_curve(optimizer_config(lr_scheduler="cosine_with_restarts", lr_num_cycles=2), 20)
    for step in range(20):
        within = (step / 20 * 2) % 1.0
        assert restarts[step] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * within)))
    sine = lr_curve(optimizer_config(lr_scheduler="sine", lr_warmup_steps=2, lr_num_cycles=1), 12)
    assert sine[:2] == pytest.approx([0.0, 0.05])
    for step in range(2, 12):
        assert sine[step] == pytest.approx(0.1 * math.sin(math.pi / 2 * (1 - (step - 2) / 10)))
    assert sine[3] > lr_curve(optimizer_config(lr_scheduler="cosine", lr_warmup_steps=2), 12)[3]


def test_ema_update_interval_and_storage_device():
    weight = torch.nn.Parameter(torch.zeros(3))
    every_third = EmaWeights([weight], settings=EmaSettings(decay=0.5, update_interval=3, device="cpu"))
    every_step = EmaWeights([weight], settings=EmaSettings(decay=0.5, update_interval=1, device="accelerator"))
    with torch.no_grad():
        weight.fill_(1.0)
    for _ in range(2):
        every_third.update()
        every_step.update()
    with every_third.applied():
        assert torch.equal(weight.detach(), torch.zeros(3)), "no blend before the third step"
    with every_step.applied():
        assert float(weight.mean()) > 0
    every_third.update()
    with every_third.applied():
        assert float(weight.mean()) > 0
    assert every_third.storage_device == torch.device("cpu")
    assert every_third.state_dict()["updates_seen"] == 3


@pytest.mark.parametrize("settings", [EmaSettings(decay=0.9, device="cpu", cpu_only=True),
                                      EmaSettings(decay=0.9, device="cpu", foreach=False),
                                      EmaSettings(decay=0.9, device="accelerator")])
def test_ema_variants_give_the_same_average(settings):
    torch.manual_seed(0)
    values = [torch.randn(4) for _ in range(6)]
    weight = torch.nn.Parameter(torch.zeros(4))
    reference = EmaWeights([weight], settings=EmaSettings(decay=0.9))
    variant = EmaWeights([weight], settings=settings)
    for value in values:
        with torch.no_grad():
            weight.copy_(value)
        reference.update()
        variant.update()
    with reference.applied():
        expected = weight.detach().clone()
    with variant.applied():
        assert torch.allclose(weight.detach(), expected)
