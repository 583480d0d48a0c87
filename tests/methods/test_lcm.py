"""Latent consistency distillation (``--training_method lcm``, methods/distillation/lcm.py): the teacher's
solver step against diffusers' DDIM, the boundary conditions against LCMScheduler's, the loss of one batch
against a hand computation on a stand-in model, the config refusal, and a short LoRA run on the tiny sd1x
whose LoRA samples in diffusers with LCMScheduler at 4 steps."""

from __future__ import annotations

import json

import os
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")

from simpletuner.methods.distillation import lcm  # noqa: E402
from simpletuner.methods.distillation.levels import NoiseLevels  # noqa: E402
from simpletuner.methods.distillation.settings import DistillationSettings, lcm_refusal  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SD_BETAS = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


def ddpm_levels(prediction_type: str) -> NoiseLevels:
    from diffusers import DDPMScheduler

    return NoiseLevels(prediction_type, 1000, DDPMScheduler(**SD_BETAS).alphas_cumprod.double())


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_the_teacher_step_is_diffusers_ddim_on_the_skipping_grid(prediction_type):
    """Every grid point, including the first (which lands on timestep 0, DDIM's final alpha), steps
    exactly as DDIMScheduler.step with T // skip inference steps and eta 0."""
    from diffusers import DDIMScheduler

    skip = 20
    grid = lcm.ConsistencyGrid.ddpm(1000, skip)
    assert len(grid.points) == 50 and grid.points[0] == 19 and grid.points[-1] == 999
    assert grid.previous[0] == 0 and grid.previous[-1] == 979
    levels = ddpm_levels(prediction_type)
    ddim = DDIMScheduler(**SD_BETAS, prediction_type=prediction_type, clip_sample=False, set_alpha_to_one=False,
                         timestep_spacing="trailing")
    ddim.set_timesteps(1000 // skip)
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(4, 4, 8, 8, generator=generator)
    output = torch.randn(4, 4, 8, 8, generator=generator)
    points = torch.tensor([19.0, 39.0, 499.0, 999.0])
    previous = torch.tensor([0.0, 19.0, 479.0, 979.0])
    stepped = lcm.solver_step(levels, output, sample, points, previous)
    for row in range(4):
        expected = ddim.step(output[row:row + 1], int(points[row]), sample[row:row + 1], eta=0.0).prev_sample
        torch.testing.assert_close(stepped[row:row + 1], expected, rtol=1e-4, atol=1e-5)


def test_the_flow_teacher_step_is_an_euler_step_of_the_velocity():
    levels = NoiseLevels("flow_matching", 1000)
    generator = torch.Generator().manual_seed(1)
    sample, velocity = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 4, 8, 8, generator=generator)
    sigma, sigma_previous = torch.tensor([0.9, 0.3]), torch.tensor([0.7, 0.0])
    stepped = lcm.solver_step(levels, velocity, sample, sigma * 1000, sigma_previous * 1000)
    expected = sample + (sigma_previous - sigma).view(-1, 1, 1, 1) * velocity
    torch.testing.assert_close(stepped, expected, rtol=1e-5, atol=1e-5)


def test_the_flow_grid_walks_the_schedulers_shifted_sigmas_down_to_zero():
    grid = lcm.ConsistencyGrid.flow([1.0, 0.8, 0.5], 1000)
    assert grid.points == (500.0, 800.0, 1000.0) and grid.previous == (0.0, 500.0, 800.0)


def test_boundary_scalings_are_lcmschedulers_and_the_identity_at_timestep_zero():
    from diffusers import LCMScheduler

    scheduler = LCMScheduler(**SD_BETAS)
    sample = torch.randn(3, 4, 8, 8)
    timesteps = torch.tensor([0.0, 19.0, 999.0])
    c_skip, c_out = lcm.boundary_scalings(timesteps, sample, flow=False)
    for row, timestep in enumerate([0, 19, 999]):
        skip, out = scheduler.get_scalings_for_boundary_condition_discrete(timestep)
        assert c_skip[row].item() == pytest.approx(skip, rel=1e-6) and c_out[row].item() == pytest.approx(out, abs=1e-7)
    output = torch.randn_like(sample)
    zero = torch.zeros(3)
    for prediction_type in ("epsilon", "v_prediction", "sample"):
        torch.testing.assert_close(lcm.consistency_function(ddpm_levels(prediction_type), output, sample, zero), sample)
    flow = NoiseLevels("flow_matching", 1000)
    torch.testing.assert_close(lcm.consistency_function(flow, output, sample, zero), sample)
    # a flow student is its bare clean estimate, what FlowMatchLCMScheduler samples with
    torch.testing.assert_close(lcm.consistency_function(flow, output, sample, torch.full((3,), 400.0)),
                               sample - 0.4 * output)


def test_pseudo_huber_matches_the_formula_on_fixed_numbers():
    prediction, target = torch.tensor([0.0, 1.0, -2.0]), torch.tensor([0.0, 0.0, 1.0])
    c = 0.5
    expected = ((0.0 + 0.25) ** 0.5 - 0.5 + (1.0 + 0.25) ** 0.5 - 0.5 + (9.0 + 0.25) ** 0.5 - 0.5) / 3
    assert lcm.pseudo_huber(prediction, target, c).item() == pytest.approx(expected, rel=1e-6)


# --- the loss of one batch on a stand-in model ----------------------------------------------------------


class ChannelMixer(torch.nn.Module):
    """A denoiser that mixes channels (``proj``, which the LoRA adapts) and adds the prompt's bias."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, sample: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return self.proj(sample.movedim(1, -1)).movedim(-1, 1) + bias.view(-1, 4, 1, 1)


class StandInModel:
    """What the method reads of a family wrapper, around :class:`ChannelMixer` with a student LoRA."""

    prediction_type = "epsilon"
    weight_dtype = torch.float32

    def __init__(self):
        from peft import LoraConfig, inject_adapter_in_model

        torch.manual_seed(3)
        self.denoiser = ChannelMixer()
        inject_adapter_in_model(LoraConfig(r=2, lora_alpha=2, target_modules=["proj"]), self.denoiser)
        with torch.no_grad():
            self.denoiser.proj.lora_B["default"].weight.normal_()  # the student differs from the teacher
        self.timesteps_seen = []

    def noise_scheduler(self):
        from diffusers import DDPMScheduler

        return DDPMScheduler(**SD_BETAS)

    def latents_from_cache(self, cached):
        return cached["latent_mean"]

    def unconditional_text(self, empty_prompt):
        return {"bias": torch.zeros(1, 4)}

    def predict(self, sample, timesteps, text, batch=None):
        self.timesteps_seen.append(timesteps.clone())
        return self.denoiser(sample, text["bias"])


def test_one_batchs_loss_equals_the_hand_computation():
    """Teacher = base weights with CFG, student = base + B A; the loss is recomputed from the formulas with
    the same random draws (grid index, then noise)."""
    model = StandInModel()
    config = SimpleNamespace(validation_guidance=3.0, model_type="lora")
    settings = DistillationSettings(lcm_skip_steps=250, lcm_huber_c=0.01)
    method = lcm.LatentConsistencyDistillation(model, config, settings)
    assert method.grid.points == (249.0, 499.0, 749.0, 999.0)
    latents = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(5))
    bias = torch.tensor([[0.3, -0.2, 0.1, 0.5], [-0.4, 0.0, 0.2, 0.1]])
    batch = {"latent_mean": latents, "latent_std": torch.zeros_like(latents), "bias": bias, "empty_prompt": {"bias": None}}

    torch.manual_seed(11)
    result = method.compute_loss(batch, torch.device("cpu"))

    torch.manual_seed(11)
    index = torch.randint(0, 4, (2,))
    t = torch.tensor([249.0, 499.0, 749.0, 999.0])[index]
    s = t - 250
    noise = torch.randn_like(latents)
    alpha_bar = model.noise_scheduler().alphas_cumprod.double()

    def coefficients(timesteps):
        bar = alpha_bar[timesteps.long()].float().view(-1, 1, 1, 1)
        return bar.sqrt(), (1 - bar).sqrt()

    def mix(weight, x, b):
        return torch.einsum("oc,bchw->bohw", weight, x) + model.denoiser.proj.base_layer.bias.view(1, 4, 1, 1) + b.view(-1, 4, 1, 1)

    layer = model.denoiser.proj
    base = layer.base_layer.weight.detach()
    student = base + layer.lora_B["default"].weight.detach() @ layer.lora_A["default"].weight.detach()

    def consistency(x, eps, timesteps):
        alpha, sigma = coefficients(timesteps)
        scaled = (timesteps * 10.0).view(-1, 1, 1, 1)
        c_skip, c_out = 0.25 / (scaled ** 2 + 0.25), scaled / (scaled ** 2 + 0.25).sqrt()
        return c_skip * x + c_out * (x - sigma * eps) / alpha

    alpha_t, sigma_t = coefficients(t)
    x_t = alpha_t * latents + sigma_t * noise
    teacher = mix(base, x_t, torch.zeros_like(bias)) + 3.0 * (mix(base, x_t, bias) - mix(base, x_t, torch.zeros_like(bias)))
    clean = (x_t - sigma_t * teacher) / alpha_t
    alpha_s, sigma_s = coefficients(s)
    x_s = alpha_s * clean + sigma_s * teacher
    target = consistency(x_s, mix(student, x_s, bias), s)
    prediction = consistency(x_t, mix(student, x_t, bias), t)
    expected = ((prediction - target) ** 2 + 0.01 ** 2).sqrt().sub(0.01).mean()

    assert result.loss.item() == pytest.approx(expected.item(), rel=1e-4)
    assert result.logs == {"lcm": pytest.approx(expected.item(), rel=1e-4)}
    assert result.updates_model
    result.loss.backward()  # only the student's adapter gets a gradient
    assert layer.lora_A["default"].weight.grad is not None and layer.lora_B["default"].weight.grad is not None
    assert layer.base_layer.weight.grad is None
    assert method.trainable_modules() == {} and method.state_dict() == {} and method.encode_text_live is False


def test_validation_samples_with_the_lcm_scheduler_of_the_familys_noise_process():
    method = lcm.LatentConsistencyDistillation(StandInModel(), SimpleNamespace(validation_guidance=5.0, model_type="lora"),
                                               DistillationSettings())
    assert method.validation_defaults() == {"validation_num_inference_steps": 4, "validation_guidance": 1.0,
                                            "sampling_scheduler": "LCMScheduler"}
    assert method.guidance_scale == 5.0  # the teacher's guidance defaults to the run's --validation_guidance


def test_a_skip_larger_than_the_schedule_is_refused_with_the_limit():
    with pytest.raises(ValueError, match="lcm_skip_steps 2000 .* at most 1000"):
        lcm.ConsistencyGrid.ddpm(1000, 2000)


@pytest.mark.parametrize("method_options, config_json, message", [
    ({"training_method": "lcm"}, {"lcm_skip_steps": 10, "lcm_huber_c": 0.01}, None),
    ({"training_method": "lcm"}, None, None),
    ({"training_method": "dmd2"}, {"student_update_freq": 2}, None),
    ({"training_method": "sft", "distillation_method": "lcm"}, {"student_update_freq": 2, "f_div": "kl"},
     "sets student_update_freq, f_div, which only the score-distillation methods"),
    ({"training_method": "lcm"}, {"student_sample_steps": 4}, "sets student_sample_steps, which only"),
])
def test_lcm_refuses_the_settings_of_other_methods_by_name(method_options, config_json, message):
    config = SimpleNamespace(**{"distillation_method": None, **method_options}, distillation_config=config_json)
    refusal = lcm_refusal(config)
    if message is None:
        assert refusal is None
    else:
        assert message in refusal and "lcm_skip_steps" in refusal


# --- a short run on the tiny sd1x -----------------------------------------------------------------------


def run_lcm(tmp_path, monkeypatch, family: str, model_type: str = "lora", steps: int = 3):
    """A short ``--training_method lcm`` run through the CLI on the tiny ``family``, validated after its last
    step; returns the project root, the trainer, and the denoiser's frozen (non-LoRA) and LoRA weights as
    built. Checks that the teacher stepped every step, the losses are finite and validation sampled
    with the family's LCM scheduler at 4 steps without guidance."""
    from accelerate.state import AcceleratorState

    from simpletuner.cli import main
    from simpletuner.testing.projects import make_family_project
    from tests.models.conftest import keep_trainer
    from tests.training.conftest import run_args

    root = make_family_project(tmp_path, family)
    seen = keep_trainer(monkeypatch)
    frozen, adapter, teacher_calls = {}, {}, []
    original_init, original_step = lcm.LatentConsistencyDistillation.__init__, lcm.LatentConsistencyDistillation.teacher_step

    def init_and_snapshot(self, model, config, settings=None):
        original_init(self, model, config, settings)
        for name, parameter in model.denoiser.named_parameters():
            (adapter if "lora_" in name else frozen)[name] = parameter.detach().clone()

    def counted_step(self, *args):
        teacher_calls.append(1)
        return original_step(self, *args)

    monkeypatch.setattr(lcm.LatentConsistencyDistillation, "__init__", init_and_snapshot)
    monkeypatch.setattr(lcm.LatentConsistencyDistillation, "teacher_step", counted_step)
    args = run_args(root, "lcm", model_family=family, model_type=model_type, training_method="lcm",
                    max_train_steps=steps, validation_prompt="a red circle", validation_step_interval=steps,
                    validation_resolution=64,
                    distillation_config='{"guidance_scale": 4.0, "lcm_skip_steps": 50, "lcm_huber_c": 0.001}')
    try:
        assert main(["train", *args]) == 0
    finally:
        AcceleratorState._reset_state(True)
    trainer = seen["trainer"]
    assert isinstance(trainer.method, lcm.LatentConsistencyDistillation)
    assert len(teacher_calls) == steps and trainer.method.guidance_scale == 4.0
    assert all(torch.isfinite(torch.tensor(loss)) for loss in trainer.state.losses)
    expected = "FlowMatchLCMScheduler" if trainer.model.prediction_type == "flow_matching" else "LCMScheduler"
    record = json.loads((root / "lcm" / "validation" / f"step_{steps}" / "validation.json").read_text())
    assert (record["scheduler"], record["num_inference_steps"], record["guidance"]) == (expected, 4, 1.0)
    return root, trainer, frozen, adapter


def changed(before: dict, module: torch.nn.Module) -> list[str]:
    after = dict(module.named_parameters())
    return [name for name, value in before.items() if not torch.equal(after[name].detach().cpu(), value.cpu())]


def assert_lora_file(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        assert handle.keys() and all("lora" in key for key in handle.keys())


def test_a_short_lcm_run_trains_only_the_student_lora_which_samples_with_lcmscheduler(tmp_path, monkeypatch):
    from diffusers import LCMScheduler, StableDiffusionPipeline

    root, trainer, frozen, adapter = run_lcm(tmp_path, monkeypatch, "sd1x")
    denoiser = trainer.accelerator.unwrap_model(trainer.model.denoiser)
    assert changed(frozen, denoiser) == []  # the teacher (the shared base weights) is bit-identical
    assert changed(adapter, denoiser), "the student's LoRA did not train"

    file = root / "lcm" / "pytorch_lora_weights.safetensors"
    assert_lora_file(file)
    pipeline = StableDiffusionPipeline.from_pretrained(root / "model", safety_checker=None)
    pipeline.load_lora_weights(str(file))
    pipeline.scheduler = LCMScheduler.from_config(pipeline.scheduler.config)
    images = pipeline("a red circle", num_inference_steps=4, guidance_scale=1.0, height=64, width=64,
                      output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 64, 64, 3) and bool(torch.isfinite(torch.from_numpy(images)).all())
    assert list(pipeline.scheduler.timesteps) == [999, 759, 499, 259]  # LCM's 4 steps on its 50-point grid
    card = (root / "lcm" / "README.md").read_text()  # the model card says how to sample the student
    assert "LCMScheduler.from_config(pipeline.scheduler.config)" in card
    assert "num_inference_steps=4, guidance_scale=1" in card


def test_a_flow_family_distils_on_its_own_sigmas_and_samples_with_flowmatchlcmscheduler(tmp_path, monkeypatch):
    """SD3 (flow matching): the grid is the family scheduler's shifted sigmas, the teacher steps by Euler,
    validation asks for FlowMatchLCMScheduler, and the saved LoRA samples with it in diffusers."""
    from diffusers import FlowMatchLCMScheduler, StableDiffusion3Pipeline

    root, trainer, frozen, adapter = run_lcm(tmp_path, monkeypatch, "sd3")
    method = trainer.method
    assert method.levels.flow and method.validation_defaults()["sampling_scheduler"] == "FlowMatchLCMScheduler"
    assert len(method.grid.points) == 1000 // 50 and method.grid.previous[0] == 0.0
    scheduler = trainer.model.noise_scheduler()
    assert scheduler.config.shift != 1.0  # the tiny SD3 shifts, so this checks the grid takes the shift
    scheduler.set_timesteps(1000 // 50)
    expected = [float(sigma) * 1000 for sigma in reversed(scheduler.sigmas[:-1])]  # SD3: no resolution shift
    assert method.grid.points == pytest.approx(expected, rel=1e-5) and method.grid.points[-1] == pytest.approx(1000.0)
    denoiser = trainer.accelerator.unwrap_model(trainer.model.denoiser)
    assert changed(frozen, denoiser) == [] and changed(adapter, denoiser)

    file = root / "lcm" / "pytorch_lora_weights.safetensors"
    assert_lora_file(file)
    pipeline = StableDiffusion3Pipeline.from_pretrained(root / "model")
    pipeline.load_lora_weights(str(file))
    pipeline.scheduler = FlowMatchLCMScheduler.from_config(pipeline.scheduler.config)
    images = pipeline("a red circle", num_inference_steps=4, guidance_scale=1.0, height=64, width=64,
                      output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 64, 64, 3) and bool(torch.isfinite(torch.from_numpy(images)).all())


def test_a_full_student_trains_the_denoiser_against_a_frozen_teacher_copy(tmp_path, monkeypatch):
    root, trainer, frozen, _ = run_lcm(tmp_path, monkeypatch, "sd1x", model_type="full", steps=2)
    networks = trainer.method.networks
    assert networks.teacher_copy is not None and not networks.lora_student
    assert changed(frozen, networks.teacher_copy) == []  # the teacher copy never moves
    assert changed(frozen, trainer.accelerator.unwrap_model(trainer.model.denoiser))  # the student does


def test_the_config_rules_refuse_another_methods_key_before_a_model_loads(tmp_path):
    from simpletuner.options import ConfigError
    from simpletuner.testing.projects import make_family_project
    from tests.training.conftest import config_for

    root = make_family_project(tmp_path, "sd1x")
    config = config_for(root, "lcm", distillation_method="lcm", distillation_config='{"lcm_skip_steps": 25}')
    assert config.distillation_method == "lcm" and lcm_refusal(config) is None
    with pytest.raises(ConfigError, match="sets student_update_freq, which only the score-distillation methods"):
        config_for(root, "lcm", training_method="lcm", distillation_config='{"student_update_freq": 3}')
