"""Optimizers: the registry, --optimizer_config, shared settings, lr scaling, clipping, schedule-free
modes, prodigy_steps, and short real runs of one optimizer per family through the CLI."""

from __future__ import annotations

import logging
import math

import pytest

torch = pytest.importorskip("torch")

from simpletuner.cli import main  # noqa: E402
from simpletuner.options import ConfigError  # noqa: E402
from simpletuner.options.resolve import resolve_run  # noqa: E402
from simpletuner.testing.config import make_config  # noqa: E402
from simpletuner.training.optim import (  # noqa: E402
    OPTIMIZERS, build_optimizer, clip_gradients, effective_learning_rate, optimizer_mode, parse_optimizer_config,
)
from simpletuner.training.trainer import Trainer, train  # noqa: E402
from tests.conftest import write_minimal_dataset_list  # noqa: E402
from tests.training.conftest import Interrupted, crash_after_step, run_args  # noqa: E402


def settings(**overrides):
    """A TrainConfig for optimizer tests; ``overrides`` are what the "user" set (``explicit``)."""
    return make_config(**{"optimizer": "optimi-adamw", "learning_rate": 1e-3, "train_batch_size": 4,
                          "gradient_accumulation_steps": 2, "max_grad_norm": 1.0, **overrides})


def group_of(optimizer) -> dict:
    return optimizer.param_groups[0]


def betas_of(optimizer) -> tuple:
    """torch-optimi keeps betas as beta1, beta2(, beta3); the other packages as a betas tuple."""
    group = group_of(optimizer)
    if "betas" in group:
        return tuple(group["betas"])
    return tuple(group[key] for key in ("beta1", "beta2", "beta3") if key in group)


def step_quadratic(optimizer, params, steps: int, target: float = 1.0) -> None:
    for _ in range(steps):
        optimizer.zero_grad()
        loss = sum(((p.float() - target) ** 2).sum() for p in params)
        loss.backward()
        optimizer.step()


# --- optimizer_config -----------------------------------------------------------------------------------

def test_optimizer_config_values_get_their_types():
    parsed = parse_optimizer_config(
        " d_coef=0.5, slice_p=11,decouple=true, safeguard_warmup=False,betas=0.9:0.99, beta3=none,"
        "growth_rate=inf, eps=1e-7, data_format=channels_last, shape=(1,2.5), other=[3]")
    assert parsed == {"d_coef": 0.5, "slice_p": 11, "decouple": True, "safeguard_warmup": False,
                      "betas": (0.9, 0.99), "beta3": None, "growth_rate": math.inf, "eps": 1e-7,
                      "data_format": "channels_last", "shape": (1, 2.5), "other": (3,)}
    assert type(parsed["slice_p"]) is int and type(parsed["d_coef"]) is float
    assert parse_optimizer_config(None) == {} and parse_optimizer_config("") == {}
    assert parse_optimizer_config({"d_coef": 2}) == {"d_coef": 2}


@pytest.mark.parametrize("text, message", [
    ("d_coef", "expected key=value, got 'd_coef'"),
    ("betas=0.9,0.99", "expected key=value, got '0.99'"),
    ("d_coef=1,d_coef=2", "`d_coef` is given twice"),
    ("2x=1", "'2x' is not a valid argument name"),
    ("d_coef=", "`d_coef` has an empty value"),
    ("betas=(0.9:0.99", "`betas=(0.9:0.99` has unbalanced brackets"),
    ("lr=1", "`lr` cannot be set here; use `--learning_rate`"),
])
def test_optimizer_config_errors_name_the_key(text, message):
    with pytest.raises(ConfigError, match=__import__("re").escape(message)):
        parse_optimizer_config(text)


def test_unknown_optimizer_config_key_lists_what_the_optimizer_takes():
    with pytest.raises(ConfigError, match=r"optimi.AdamW \(optimi-adamw\) has no argument `d_coef`; it takes: betas"):
        build_optimizer(settings(optimizer_config="d_coef=2"), [torch.nn.Parameter(torch.zeros(2))])


def test_unknown_optimizer_name_lists_the_registry():
    with pytest.raises(ConfigError, match="choose one of: adamw_bf16, adamw_schedulefree"):
        build_optimizer(settings(optimizer="adafactor"), [torch.nn.Parameter(torch.zeros(2))])


# --- shared settings and their precedence ---------------------------------------------------------------

def test_adam_settings_then_optimizer_config_then_optimizer_betas():
    p = [torch.nn.Parameter(torch.zeros(2))]
    optimizer = build_optimizer(settings(adam_beta1=0.8, adam_beta2=0.95, adam_weight_decay=0.3, adam_epsilon=1e-5), p)
    group = group_of(optimizer)
    assert (betas_of(optimizer), group["weight_decay"], group["eps"]) == ((0.8, 0.95), 0.3, 1e-5)
    optimizer = build_optimizer(settings(optimizer_config="betas=0.7:0.9,weight_decay=0.05"), p)
    assert (betas_of(optimizer), group_of(optimizer)["weight_decay"]) == ((0.7, 0.9), 0.05)
    optimizer = build_optimizer(settings(optimizer_config="betas=0.7:0.9", optimizer_beta2=0.5), p)
    assert betas_of(optimizer) == (0.7, 0.5)


def test_lion_adan_and_soap_keep_their_own_betas_unless_optimizer_betas_are_set():
    p = [torch.nn.Parameter(torch.zeros(4, 4))]
    assert betas_of(build_optimizer(settings(optimizer="optimi-lion"), p)) == (0.9, 0.99)
    assert betas_of(build_optimizer(settings(optimizer="optimi-adan"), p)) == (0.98, 0.92, 0.99)
    assert betas_of(build_optimizer(settings(optimizer="optimi-adan", optimizer_beta1=0.5), p)) == (0.5, 0.92, 0.99)
    assert betas_of(build_optimizer(settings(optimizer="soap"), p)) == (0.95, 0.95)
    assert betas_of(build_optimizer(settings(optimizer="bnb-ademamix", adam_beta1=0.8), p)) == (0.8, 0.999, 0.9999)


def test_betas_for_an_optimizer_without_betas_is_an_error():
    with pytest.raises(ConfigError, match="`--optimizer_beta1` does not apply to `--optimizer optimi-sgd`"):
        build_optimizer(settings(optimizer="optimi-sgd", optimizer_beta1=0.9), [torch.nn.Parameter(torch.zeros(2))])


def test_schedulefree_presets_yield_to_explicit_options():
    p = [torch.nn.Parameter(torch.zeros(2))]
    base = group_of(build_optimizer(settings(optimizer="adamw_schedulefree"), p))
    aggressive = group_of(build_optimizer(settings(optimizer="adamw_schedulefree+aggressive"), p))
    assert (base["weight_decay"], base["eps"]) == (1e-2, 1e-8)
    assert (aggressive["weight_decay"], aggressive["eps"]) == (1e-3, 1e-6)
    chosen = group_of(build_optimizer(settings(optimizer="adamw_schedulefree+aggressive", adam_weight_decay=0.2), p))
    assert (chosen["weight_decay"], chosen["eps"]) == (0.2, 1e-6)


# --- every optimizer on this machine --------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_optimizer_steps_on_the_cpu(name, caplog):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(64, 80)), torch.nn.Parameter(torch.randn(8))]
    before = [p.detach().clone() for p in params]
    lr = 1.0 if name == "prodigy" else 1e-2
    with caplog.at_level(logging.WARNING, logger="simpletuner"):
        optimizer = build_optimizer(settings(optimizer=name, learning_rate=lr), params)
        step_quadratic(optimizer, params, 3)
    assert all(torch.isfinite(p).all() for p in params)
    assert all(not torch.equal(a, p.detach()) for a, p in zip(before, params))
    assert type(optimizer).__name__ == OPTIMIZERS[name].attr
    if OPTIMIZERS[name].paged:
        assert "paged optimizer memory needs CUDA; on cpu bitsandbytes runs the non-paged version" in caplog.text


@pytest.mark.parametrize("name", ["optimi-adamw", "optimi-stableadamw", "optimi-lion", "optimi-sgd", "optimi-adan"])
def test_optimi_keeps_tiny_updates_on_bf16_weights(name):
    """Kahan summation (on by itself for bf16 in torch-optimi): 100 updates of 1e-4 on a weight of 1.0 survive."""
    weight = torch.nn.Parameter(torch.ones(64, dtype=torch.bfloat16))
    optimizer = build_optimizer(settings(optimizer=name, learning_rate=1e-4, adam_weight_decay=0.0), [weight])
    for _ in range(100):
        weight.grad = torch.ones_like(weight)
        optimizer.step()
    assert float(weight.detach().float().mean()) < 0.995


def test_schedulefree_kahan_variants_refuse_bf16_weights():
    weight = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    for name in ("adamw_schedulefree", "adamw_schedulefree+aggressive"):
        with pytest.raises(ConfigError, match=r"no Kahan summation and the trainable weights are torch.bfloat16"):
            build_optimizer(settings(optimizer=name), [weight])
    build_optimizer(settings(optimizer="adamw_schedulefree+no_kahan"), [weight])


# --- learning-rate scaling ------------------------------------------------------------------------------

def test_lr_scale_multiplies_by_the_images_per_step_or_its_square_root():
    config = settings(learning_rate=1e-4, train_batch_size=4, gradient_accumulation_steps=2)
    assert effective_learning_rate(config, 3) == (1e-4, None)
    lr, how = effective_learning_rate(settings(learning_rate=1e-4, lr_scale=True), 3)
    assert lr == pytest.approx(1e-4 * 24) and "(4 batch x 2 accumulation x 3 processes)" in how
    lr, _ = effective_learning_rate(settings(learning_rate=1e-4, lr_scale=True, lr_scale_sqrt=True), 3)
    assert lr == pytest.approx(1e-4 * math.sqrt(24))
    optimizer = build_optimizer(settings(learning_rate=1e-4, lr_scale=True), [torch.nn.Parameter(torch.zeros(2))],
                                num_processes=3)
    assert group_of(optimizer)["lr"] == pytest.approx(2.4e-3)


# --- gradient clipping ----------------------------------------------------------------------------------

def test_clip_by_value_clamps_each_element_and_by_norm_scales_the_whole():
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([3.0, -4.0, 0.5])
    assert clip_gradients(accelerator, [p], settings(grad_clip_method="value", max_grad_norm=1.0)) is None
    assert p.grad.tolist() == [1.0, -1.0, 0.5]
    p.grad = torch.tensor([3.0, -4.0, 0.0])
    norm = clip_gradients(accelerator, [p], settings(grad_clip_method="norm", max_grad_norm=1.0))
    assert float(norm) == pytest.approx(5.0)
    assert torch.allclose(p.grad, torch.tensor([0.6, -0.8, 0.0]), atol=1e-5)
    p.grad = torch.tensor([3.0, -4.0, 0.0])
    assert clip_gradients(accelerator, [p], settings(max_grad_norm=0.0)) is None
    assert p.grad.tolist() == [3.0, -4.0, 0.0]


# --- schedule-free modes and prodigy_steps ----------------------------------------------------------------

def test_schedulefree_eval_swaps_in_the_averaged_weights_and_train_swaps_back():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(16))
    optimizer = build_optimizer(settings(optimizer="adamw_schedulefree", learning_rate=0.05), [p])
    assert group_of(optimizer)["train_mode"] is True
    step_quadratic(optimizer, [p], 5)
    training_point = p.detach().clone()
    with optimizer_mode(optimizer, "eval"):
        assert group_of(optimizer)["train_mode"] is False
        averaged = p.detach().clone()
        assert not torch.allclose(averaged, training_point)
        # the averaged point x: y = (1 - beta1) z + beta1 x
        z = optimizer.state[p]["z"]
        assert torch.allclose(training_point, 0.1 * z + 0.9 * averaged, atol=1e-6)
    assert group_of(optimizer)["train_mode"] is True
    assert torch.allclose(p.detach(), training_point, atol=1e-6)


def test_optimizer_mode_leaves_other_optimizers_alone():
    p = torch.nn.Parameter(torch.randn(4))
    optimizer = build_optimizer(settings(), [p])
    step_quadratic(optimizer, [p], 2)
    before = p.detach().clone()
    with optimizer_mode(optimizer, "eval"):
        assert torch.equal(p.detach(), before)
    assert torch.equal(p.detach(), before)


def test_prodigy_steps_freezes_the_step_size_estimate():
    def d_history(prodigy_steps):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(32))
        optimizer = build_optimizer(settings(optimizer="prodigy", learning_rate=1.0, prodigy_steps=prodigy_steps), [p])
        history = []
        for _ in range(12):
            step_quadratic(optimizer, [p], 1, target=5.0)
            history.append(group_of(optimizer)["d"])
        return history

    adapting, frozen = d_history(None), d_history(4)
    assert frozen[:4] == adapting[:4]
    assert adapting[11] > adapting[3] * 1.5, "prodigy's d must still be growing for this test to mean anything"
    assert frozen[4:] == [frozen[3]] * 8


def test_prodigy_steps_only_applies_to_prodigy():
    with pytest.raises(ConfigError, match="`--prodigy_steps` only applies to `--optimizer prodigy`"):
        build_optimizer(settings(prodigy_steps=3), [torch.nn.Parameter(torch.zeros(2))])


# --- config validation (before anything loads) ------------------------------------------------------------

@pytest.mark.parametrize("flags, message", [
    (["--optimizer_config", "d_coef"], "`--optimizer_config`: expected key=value"),
    (["--optimizer", "prodigy", "--optimizer_config", "lr=2"], "`lr` cannot be set here"),
    (["--prodigy_steps", "5"], "`--prodigy_steps` only applies to `--optimizer prodigy`, but `--optimizer adamw_bf16`"),
    (["--optimizer", "prodigy", "--prodigy_steps", "0"], "`--prodigy_steps` = 0 must be at least 1"),
    (["--lr_scale_sqrt", "true"], "`--lr_scale_sqrt` only changes how `--lr_scale` scales"),
    (["--grad_clip_method", "value", "--max_grad_norm", "0"], "`--grad_clip_method value` has no effect while"),
    (["--optimizer", "bnb-adagrad8bit", "--optimizer_beta2", "0.9"], "`--optimizer_beta2` does not apply to"),
    (["--optimizer_beta1", "1.5"], "`--optimizer_beta1` = 1.5 must be at least 0 and below 1"),
    (["--adam_epsilon", "-1"], "`--adam_epsilon` = -1.0 must not be negative"),
])
def test_validation_rejects_optimizer_mistakes(tmp_path, flags, message):
    argv = ["--model_family", "sd1x", "--output_dir", str(tmp_path / "out"),
            "--data_backend_config", str(write_minimal_dataset_list(tmp_path)), *flags]
    with pytest.raises(ConfigError) as error:
        resolve_run(argv, environ={}, root=tmp_path)
    assert message in str(error.value)


def test_validation_warns_about_schedules_for_schedulefree_and_a_small_prodigy_lr(tmp_path):
    argv = ["--model_family", "sd1x", "--output_dir", str(tmp_path / "out"),
            "--data_backend_config", str(write_minimal_dataset_list(tmp_path))]
    run = resolve_run(argv + ["--optimizer", "adamw_schedulefree", "--lr_scheduler", "cosine"], environ={}, root=tmp_path)
    assert any("needs no decay schedule" in w for w in run.warnings)
    run = resolve_run(argv + ["--optimizer", "prodigy"], environ={}, root=tmp_path)
    assert any("0.0001 will barely move the weights" in w for w in run.warnings)


# --- real runs on the tiny sd1x model -----------------------------------------------------------------------

FAMILIES = {
    "torch-optimi": dict(optimizer="optimi-stableadamw", grad_clip_method="value", max_grad_norm=0.01),
    "kahan": dict(optimizer="adamw_bf16", mixed_precision="bf16", model_type="full"),
    "schedulefree": dict(optimizer="adamw_schedulefree+no_kahan", set_grads_to_none="true"),
    "prodigy": dict(optimizer="prodigy", learning_rate=1.0, prodigy_steps=2, optimizer_config="d_coef=2"),
    "soap": dict(optimizer="soap"),
    "torchao": dict(optimizer="ao-adamw8bit"),
    "bitsandbytes": dict(optimizer="bnb-lion8bit", learning_rate=1e-4),
}


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_three_steps_through_the_cli_train_the_weights(project, monkeypatch, family):
    import simpletuner.training.trainer as trainer_module

    seen = {}
    original_setup = Trainer.setup
    original_clip = trainer_module.clip_gradients
    clipped = []

    def clip_and_record(accelerator, params, config):
        norm = original_clip(accelerator, params, config)
        clipped.append((norm, max(float(p.grad.abs().max()) for p in params if p.grad is not None)))
        return norm

    monkeypatch.setattr(trainer_module, "clip_gradients", clip_and_record)

    def setup_and_snapshot(self):
        original_setup(self)
        seen["trainer"] = self
        seen["before"] = [p.detach().float().clone() for p in self.trainable]

    monkeypatch.setattr(Trainer, "setup", setup_and_snapshot)
    assert main(["train", *run_args(project, f"out-{family}", **FAMILIES[family])]) == 0
    trainer = seen["trainer"]
    assert len(trainer.state.losses) == 3 and all(math.isfinite(loss) for loss in trainer.state.losses)
    moved = [not torch.equal(a, p.detach().float()) for a, p in zip(seen["before"], trainer.trainable)]
    assert sum(moved) / len(moved) > 0.9, f"{family}: only {sum(moved)} of {len(moved)} trainable tensors changed"
    inner = trainer.optimizer.optimizer
    assert type(inner).__name__ == OPTIMIZERS[FAMILIES[family]["optimizer"]].attr
    grads = [p.grad for p in trainer.trainable]
    if family == "schedulefree":
        assert all(g is None for g in grads)  # --set_grads_to_none
        assert group_of(inner)["train_mode"] is False  # left on the averaged weights after saving
    else:
        assert all(g is not None and not g.any() for g in grads)  # zero-filled, the default
    if family == "prodigy":
        assert group_of(inner)["growth_rate"] == 1.0 and group_of(inner)["d_coef"] == 2
    assert len(clipped) == 3
    if family == "torch-optimi":  # --grad_clip_method value --max_grad_norm 0.01: every element clamped
        assert all(norm is None and largest <= 0.01 for norm, largest in clipped)
    else:  # the default: clipped by total norm (2.0), which is returned for logging
        assert all(norm is not None for norm, _ in clipped)


@pytest.mark.slow
def test_loss_falls_over_thirty_steps(project):
    config = resolve_run(run_args(project, "out-30", max_train_steps=30, model_type="full", learning_rate=3e-4,
                                  optimizer="optimi-adamw", train_batch_size=4)).config
    losses = train(config, show_progress=False).state.losses
    assert len(losses) == 30
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.8 * first, f"loss did not fall: first 10 steps {first:.4f}, last 10 {last:.4f}"


@pytest.mark.slow
@pytest.mark.parametrize("optimizer, extra", [
    ("adamw_schedulefree", dict(learning_rate=1e-3)),
    ("prodigy", dict(learning_rate=1.0, prodigy_steps=4)),
    ("optimi-adamw", dict(use_ema="true", ema_update_interval=1, lr_scheduler="cosine", lr_warmup_steps=2)),
])
def test_resume_reproduces_the_loss_sequence(project, monkeypatch, optimizer, extra):
    overrides = dict(optimizer=optimizer, max_train_steps=6, checkpoint_step_interval=3, **extra)
    config = lambda output, **more: resolve_run(run_args(project, output, **overrides, **more)).config  # noqa: E731
    modes = []
    original_save = Trainer.save_checkpoint

    def save_and_record_mode(self, **kwargs):
        modes.append(group_of(self.optimizer.optimizer).get("train_mode"))
        return original_save(self, **kwargs)

    monkeypatch.setattr(Trainer, "save_checkpoint", save_and_record_mode)
    reference = train(config(f"ref-{optimizer}"), show_progress=False)
    assert len(reference.state.losses) == 6
    if optimizer == "adamw_schedulefree":
        assert modes == [False, False]  # checkpoints hold the averaged weights

    with crash_after_step(4), pytest.raises(Interrupted):
        train(config(f"cut-{optimizer}"), show_progress=False)
    resumed = train(config(f"cut-{optimizer}", resume_from_checkpoint="latest"), show_progress=False)
    assert resumed.resumed_from.name == "checkpoint-3"
    assert resumed.state.losses == reference.state.losses[3:]
    assert resumed.lr_scheduler.get_last_lr() == reference.lr_scheduler.get_last_lr()
    if reference.ema is not None:  # the EMA weights continue exactly too
        for ours, theirs in zip(resumed.ema.state_dict()["shadow_params"], reference.ema.state_dict()["shadow_params"]):
            assert torch.equal(ours, theirs)
