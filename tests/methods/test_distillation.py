"""Score distillation (DMD2, f-distill, LADD; simpletuner/methods/distillation/): the student's timesteps and
rollout match the scheduler diffusers samples it with; the three networks share one base; per step the right
parameters move; a resumed DMD2 run continues exactly; the saved student loads in diffusers with the sampling its
model card names; the combinations that cannot work are refused before a model loads."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from simpletuner.methods.distillation.levels import (NoiseLevels, StudentSchedule, rollout,  # noqa: E402
                                                     trailing_timesteps)
from simpletuner.options import ConfigError  # noqa: E402
from tests.training.conftest import Interrupted, crash_after_step, run_args  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    from simpletuner.testing.projects import make_family_project

    return make_family_project(tmp_path_factory.mktemp("distil-sd1x"), "sd1x")


def distil_config(root: Path, output: str, method: str = "dmd2", settings: dict | None = None, **overrides):
    from simpletuner.options.resolve import resolve_run

    values = {"training_method": method, "max_train_steps": 2, "optimizer": "optimi-adamw",
              "distillation_config": json.dumps(settings or {}), **overrides}
    return resolve_run(run_args(root, output, **values)).config


def ddpm_levels(prediction: str = "epsilon") -> NoiseLevels:
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    return NoiseLevels(prediction, 1000, scheduler.alphas_cumprod.double())


# --- timesteps and rollout --------------------------------------------------------------------------


def test_student_timesteps_are_diffusers_trailing_spacing():
    from diffusers import DDIMScheduler

    assert trailing_timesteps(1, 1000) == [999]
    assert trailing_timesteps(4, 1000) == [999, 749, 499, 249]
    for steps in (1, 2, 3, 4, 8):
        scheduler = DDIMScheduler(timestep_spacing="trailing")
        scheduler.set_timesteps(steps)
        assert trailing_timesteps(steps, 1000) == scheduler.timesteps.tolist()


def test_ddpm_rollout_is_the_euler_scheduler_path_validation_samples():
    """The student's training rollout (DDIM, x0 at the end) equals diffusers' EulerDiscreteScheduler stepped at
    the same timesteps, which is how validation and the model card sample the student."""
    from diffusers import EulerDiscreteScheduler

    levels = ddpm_levels()
    schedule = StudentSchedule([999.0, 749.0, 499.0, 249.0])
    weight = torch.randn(4, 4, 1, 1) * 0.3

    def model(sample, timesteps):  # a fixed epsilon predictor that depends on the input and the timestep
        return torch.nn.functional.conv2d(sample, weight) * (1 + timesteps.view(-1, 1, 1, 1) / 1000)

    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = rollout(noise, schedule, levels, exit_step=3, predict=model)
    from diffusers import DDIMScheduler

    shipped = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                            timestep_spacing="leading", clip_sample=False, set_alpha_to_one=False)  # as SD ships it
    scheduler = EulerDiscreteScheduler.from_config(shipped.config)  # what validation and the model card do
    scheduler.set_timesteps(timesteps=[999, 749, 499, 249])
    sample = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(sample, t)
        sample = scheduler.step(model(model_input, t.expand(2)), t, sample).prev_sample
    torch.testing.assert_close(ours, sample, rtol=1e-4, atol=1e-4)


def test_flow_rollout_is_the_flow_euler_path():
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    levels = NoiseLevels("flow_matching", 1000)
    from simpletuner.methods.distillation.levels import flow_inference_sigmas

    sigmas = flow_inference_sigmas(scheduler, 3, image_tokens=64)
    schedule = StudentSchedule([s * 1000 for s in sigmas])
    weight = torch.randn(4, 4, 1, 1) * 0.3

    def model(sample, timesteps):
        return torch.nn.functional.conv2d(sample, weight) + timesteps.view(-1, 1, 1, 1) / 1000

    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    ours = rollout(noise, schedule, levels, exit_step=2, predict=model)
    scheduler.set_timesteps(3)
    sample = noise
    for t in scheduler.timesteps:
        sample = scheduler.step(model(sample, t.expand(2)), t, sample).prev_sample
    torch.testing.assert_close(ours, sample, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample", "flow_matching"])
def test_clean_estimate_inverts_the_noising(prediction):
    levels = NoiseLevels("flow_matching", 1000) if prediction == "flow_matching" else ddpm_levels(prediction)
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    timesteps = torch.tensor([100.0, 500.0, 900.0])
    noisy = levels.noised(x0, noise, timesteps)
    target = levels.training_target(x0, noise, timesteps)  # what a perfect model outputs
    torch.testing.assert_close(levels.clean_estimate(target, noisy, timesteps), x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(levels.noise_estimate(x0, noisy, timesteps), noise, rtol=1e-4, atol=1e-4)


def test_generator_surrogate_has_the_value_and_the_gradient():
    from simpletuner.methods.distillation.score_distillation import value_with_gradient

    sample = torch.randn(2, 3, requires_grad=True)
    gradient = torch.randn(2, 3)
    surrogate = value_with_gradient(sample * 2, gradient, torch.tensor(0.75))
    surrogate.backward()
    assert float(surrogate) == pytest.approx(0.75)
    torch.testing.assert_close(sample.grad, 2 * gradient)


# --- the networks ----------------------------------------------------------------------------------


def trainer_for(project: Path, output: str, **overrides):
    from simpletuner.training.trainer import Trainer

    trainer = Trainer(distil_config(project, output, **overrides), show_progress=False)
    trainer.setup()
    return trainer


def fixed_inputs(method):
    sample = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        text = method.model.text_conditioning(["a red circle"])
    return sample, torch.tensor([500.0]), text


def predictions(method):
    """Student, teacher and fake score outputs on one fixed input."""
    sample, timesteps, text = fixed_inputs(method)
    with torch.no_grad():
        student = method._predict(sample, timesteps, text, {})
        with method.networks.teacher():
            teacher = method._predict(sample, timesteps, text, {})
        with method.networks.fake_score():
            fake = method._predict(sample, timesteps, text, {})
    return student, teacher, fake


def base_prediction(method, denoiser):
    """The output with every adapter switched off by hand (the base model)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in denoiser.modules() if isinstance(m, BaseTunerLayer)]
    flags = {p: p.requires_grad for p in denoiser.parameters()}
    for layer in layers:
        layer.enable_adapters(False)
    try:
        sample, timesteps, text = fixed_inputs(method)
        with torch.no_grad():
            return method._predict(sample, timesteps, text, {})
    finally:
        for layer in layers:
            layer.enable_adapters(True)
            layer.set_adapter("default")
        for parameter, flag in flags.items():
            parameter.requires_grad_(flag)


def test_lora_student_fake_score_and_teacher_share_one_base(project):
    trainer = trainer_for(project, "networks")
    method = trainer.method
    denoiser = trainer.model.denoiser.eval()  # no LoRA dropout: outputs comparable
    assert method.networks.teacher_copy is None  # one copy of the base weights
    student, teacher, fake = predictions(method)
    torch.testing.assert_close(fake, teacher)  # the fake score's adapter starts at zero: it starts as the teacher
    with torch.no_grad():  # move the student's and the fake score's adapters apart
        for name, parameter in denoiser.named_parameters():
            if "lora_B.default" in name:
                parameter.add_(0.05)
            if "lora_B.fake_score" in name:
                parameter.sub_(0.05)
    student, teacher, fake = predictions(method)
    torch.testing.assert_close(teacher, base_prediction(method, denoiser))
    assert not torch.allclose(student, teacher) and not torch.allclose(fake, teacher)
    assert not torch.allclose(fake, student)
    # the contexts leave both adapters trainable and the student answering
    assert all(p.requires_grad for n, p in denoiser.named_parameters() if "lora_" in n)
    again, _, _ = predictions(method)
    torch.testing.assert_close(again, student)


# --- what moves each step -------------------------------------------------------------------------


def snapshot(denoiser, part: str) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in denoiser.named_parameters() if part in n}


def changed(before: dict, denoiser) -> bool:
    now = dict(denoiser.named_parameters())
    return any(not torch.equal(value, now[name]) for name, value in before.items())


@pytest.mark.parametrize("method_name, settings, extra", [
    # gradient checkpointing recomputes blocks at backward time with whichever adapter is then active
    ("dmd2", {"student_update_freq": 2, "gan_loss_weight_gen": 0.01}, {"gradient_checkpointing": "true"}),
    ("f_distill", {"student_update_freq": 2, "f_div": "js", "ratio_lower": 0.1, "ratio_upper": 20.0}, {}),
    ("ladd", {"student_update_freq": 2, "gan_r1_reg_weight": 0.1}, {}),
])
def test_student_moves_every_update_freq_steps_and_the_critic_every_step(project, method_name, settings, extra):
    trainer = trainer_for(project, f"steps-{method_name}", method=method_name, settings=settings, max_train_steps=3,
                          **extra)
    denoiser, method = trainer.model.denoiser, trainer.method
    base = {n: p.detach().clone() for n, p in denoiser.named_parameters() if "lora_" not in n}
    logged = []
    for step in range(3):
        student, fake = snapshot(denoiser, "lora_A.default"), snapshot(denoiser, "fake_score")
        head = [p.detach().clone() for p in method.critic.head.parameters()] if method.critic.head else None
        loss, _, terms = trainer.optimization_step()
        assert (loss is None) == (step % 2 == 1), step  # a critic-only step computes no student loss to log
        trainer.state.global_step += 1
        logged.append(terms)
        assert changed(student, denoiser) == (step % 2 == 0), f"student at step {step}"
        if method_name != "ladd":
            assert changed(fake, denoiser), f"fake score at step {step}"
        if head is not None:
            assert any(not torch.equal(a, b) for a, b in zip(head, method.critic.head.parameters()))
    assert method.critic.steps == 3 and method.student_updates == 2
    assert all(torch.equal(p, base[n]) for n, p in denoiser.named_parameters() if n in base)  # the teacher is intact
    expected = {"dmd2": {"dmd", "gan_gen", "fake_score", "gan_disc"}, "f_distill": {"dmd", "f_weight_mean", "fake_score"},
                "ladd": {"gan_gen", "gan_disc", "r1"}}[method_name]
    assert expected <= set(logged[0]) and "dmd" not in logged[1] and "gan_gen" not in logged[1]


def test_full_student_keeps_a_frozen_teacher_copy_with_the_fake_score_on_it(project):
    trainer = trainer_for(project, "full", model_type="full", settings={"student_update_freq": 1})
    method = trainer.method
    copy = method.networks.teacher_copy
    assert copy is not None and copy is not trainer.model.denoiser
    frozen = {n: p.detach().clone() for n, p in copy.named_parameters() if "fake_score" not in n}
    student = {n: p.detach().clone() for n, p in trainer.model.denoiser.named_parameters()}
    trainer.optimization_step()
    assert all(torch.equal(p, frozen[n]) for n, p in copy.named_parameters() if n in frozen)
    assert any(not torch.equal(p, student[n]) for n, p in trainer.model.denoiser.named_parameters())
    assert not any("fake_score" in n for n in trainer.model.denoiser.state_dict())


# --- resume, saving, sampling -------------------------------------------------------------------------


def test_dmd2_resumes_exactly(project):
    from simpletuner.training.trainer import train

    settings = {"student_update_freq": 2, "gan_loss_weight_gen": 0.01, "fake_score_warmup_steps": 3}

    def config(output, **extra):
        return distil_config(project, output, settings=settings, max_train_steps=4, checkpoint_step_interval=2, **extra)

    reference = train(config("ref"), show_progress=False)
    assert (project / "ref" / "checkpoint-2" / "method.pt").is_file()
    with crash_after_step(3), pytest.raises(Interrupted):
        train(config("cut"), show_progress=False)
    resumed = train(config("cut", resume_from_checkpoint="latest"), show_progress=False)
    # losses of the student's steps only (1 and 3; steps 2 and 4 train the critic alone): step 3's after the resume
    assert len(reference.state.losses) == 2 and resumed.state.losses == reference.state.losses[1:]
    mine, theirs = resumed.method, reference.method
    assert mine.critic.steps == theirs.critic.steps == 4 and mine.student_updates == theirs.student_updates == 2
    for name, value in theirs.networks.fake_score_state().items():
        assert torch.equal(mine.networks.fake_score_state()[name], value)
    for a, b in zip(mine.critic.head.parameters(), theirs.critic.head.parameters()):
        assert torch.equal(a, b)
    assert mine.critic.optimizer.param_groups[1]["lr"] == theirs.critic.optimizer.param_groups[1]["lr"]
    from safetensors.torch import load_file

    assert load_file(project / "ref" / "pytorch_lora_weights.safetensors").keys() == \
        load_file(project / "cut" / "pytorch_lora_weights.safetensors").keys()
    for key, value in load_file(project / "ref" / "pytorch_lora_weights.safetensors").items():
        assert torch.equal(value, load_file(project / "cut" / "pytorch_lora_weights.safetensors")[key])


def test_saved_student_loads_in_diffusers_and_its_card_names_the_sampling(project):
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
    from safetensors.torch import load_file

    from simpletuner.training.trainer import train

    settings = {"student_sample_steps": 2, "student_update_freq": 1}
    train(distil_config(project, "saved", settings=settings, validation_prompt="a red circle",
                        validation_step_interval=2, validation_resolution=64), show_progress=False)
    output = project / "saved"
    assert not any("fake_score" in key for key in load_file(output / "pytorch_lora_weights.safetensors"))
    card = (output / "README.md").read_text()
    assert "**2 steps**" in card and "timesteps=[999, 499]" in card and "EulerDiscreteScheduler" in card
    record = json.loads((output / "validation" / "step_2" / "validation.json").read_text())  # sampled as the student
    assert (record["scheduler"], record["num_inference_steps"], record["guidance"], record["timesteps"]) == \
        ("EulerDiscreteScheduler", 2, 1.0, [999, 499])
    pipeline = StableDiffusionPipeline.from_pretrained(project / "model", safety_checker=None)
    pipeline.load_lora_weights(output, weight_name="pytorch_lora_weights.safetensors")
    pipeline.scheduler = EulerDiscreteScheduler.from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    image = pipeline("a red circle", num_inference_steps=2, guidance_scale=1.0, timesteps=[999, 499], height=64,
                     width=64, output_type="np", generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (64, 64, 3) and float(image.std()) > 0


# --- refused before a model loads ----------------------------------------------------------------------


@pytest.mark.parametrize("overrides, fragment", [
    ({"distillation_method": "perflow"}, "not built"),
    ({"distillation_method": "dcm"}, "not built"),
    ({"distillation_method": "dmd", "training_method": "ladd"}, "keep one of them"),
    ({"training_method": "sft", "distillation_config": '{"student_sample_steps": 2}'}, "only read by the distillation"),
    ({"training_method": "dmd2", "distillation_config": '{"studnet_sample_steps": 2}'}, "unknown keys"),
    ({"training_method": "dmd2", "distillation_config": '{"f_div": "js"}'}, "f-distill's"),
    ({"training_method": "dmd2", "distillation_config": '{"gan_r1_reg_weight": 1}'}, "LADD's R1"),
    ({"training_method": "f_distill", "distillation_config": '{"f_div": "tv"}'}, "not one of"),
    ({"training_method": "f_distill", "distillation_config": '{"ratio_lower": 5, "ratio_upper": 1}'}, "ratio_lower <"),
    ({"training_method": "dmd2", "distillation_config": '{"student_sample_steps": 2, "student_timesteps": [999]}'},
     "one per step"),
    ({"training_method": "dmd2", "num_processes": 2}, "one process"),
    ({"training_method": "dmd2", "mixed_precision": "fp16"}, "loss scaler"),
    ({"training_method": "dmd2", "lora_type": "lycoris"}, "LyCORIS"),
    ({"training_method": "dmd2", "model_family": "deepfloyd"}, "learned variance"),
    ({"training_method": "dmd2", "model_family": "wan"}, "video family"),
    ({"training_method": "ladd", "crepa_enabled": "true"}, "--crepa_enabled"),
    ({"training_method": "dmd2", "eval_steps_interval": 10}, "eval_loss_disable"),
    ({"training_method": "ladd", "distillation_config": '{"guidance_scale": 3}'}, "never samples the teacher"),
    ({"training_method": "ladd", "distillation_config": '{"gan_r1_reg_alpha": 0.2}'}, "R1 penalty is off"),
    ({"training_method": "dmd2", "distillation_config": '{"gan_loss_weight_disc": 0.1}'}, "no discriminator"),
])
def test_impossible_distillation_settings_are_refused(tmp_path, overrides, fragment):
    from simpletuner.options.resolve import resolve_run

    with pytest.raises(ConfigError, match=fragment):
        resolve_run(run_args(tmp_path, "out", **overrides))


def test_distillation_method_dmd_runs_dmd2_and_lcm_runs_lcm(project):
    from simpletuner.methods.registry import method_of
    from simpletuner.options.resolve import resolve_run

    assert method_of(resolve_run(run_args(project, "out", distillation_method="dmd")).config) == "dmd2"
    assert method_of(resolve_run(run_args(project, "out", distillation_method="lcm")).config) == "lcm"


def test_the_f_divergence_lists_agree():
    from simpletuner.methods.distillation.settings import F_DIVERGENCES
    from simpletuner.objectives.distillation import F_DIVERGENCES as IMPLEMENTED

    assert set(F_DIVERGENCES) == set(IMPLEMENTED)


def test_gradient_checkpointing_gives_the_student_the_same_step(project):
    """With checkpointing, blocks are recomputed at backward time with whichever adapter is active then; the
    generator's GAN gradient is taken inside the method so the student's step is the same with or without it."""
    settings = {"student_update_freq": 1, "gan_loss_weight_gen": 0.5}
    plain = trainer_for(project, "gc-off", settings=settings, lora_dropout=0.0, max_train_steps=1)
    plain.optimization_step()
    checkpointed = trainer_for(project, "gc-on", settings=settings, lora_dropout=0.0, max_train_steps=1,
                               gradient_checkpointing="true")
    checkpointed.optimization_step()
    theirs = dict(plain.model.denoiser.named_parameters())
    for name, parameter in checkpointed.model.denoiser.named_parameters():
        if "lora_" in name:
            torch.testing.assert_close(parameter, theirs[name], rtol=1e-5, atol=1e-6)


def test_regularisation_datasets_are_refused_for_a_distillation_method(project, tmp_path):
    from simpletuner.data.config import load_dataset_plan
    from simpletuner.methods.prior_preservation import with_prior_preservation

    entries = json.loads((project / "multidatabackend.json").read_text())
    entries.insert(1, {**entries[0], "id": "prior", "is_regularisation_data": True})
    datasets = tmp_path / "datasets.json"
    datasets.write_text(json.dumps(entries))
    config = distil_config(project, "prior", data_backend_config=str(datasets))
    with pytest.raises(ValueError, match="learns from the teacher"):
        with_prior_preservation(object(), None, config, load_dataset_plan(config.data_backend_config))


def test_an_explicit_validation_guidance_is_warned_about(project):
    from simpletuner.options.resolve import resolve_run

    run = resolve_run(run_args(project, "out", training_method="dmd2", validation_guidance=5))
    assert any("guidance_scale" in warning for warning in run.warnings)
    assert not resolve_run(run_args(project, "out", training_method="dmd2")).warnings


def test_a_flow_shift_named_flow_shift_reaches_the_euler_student_schedule():
    """Wan's UniPC scheduler names its shift ``flow_shift``; the student's Euler sigmas (and validation's Euler
    scheduler, built the same way) must keep it."""
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    from simpletuner.methods.distillation.levels import flow_inference_sigmas

    unipc = UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction")
    euler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    euler.set_timesteps(4)
    assert flow_inference_sigmas(unipc, 4, image_tokens=64) == pytest.approx([float(s) for s in euler.sigmas[:4]])
