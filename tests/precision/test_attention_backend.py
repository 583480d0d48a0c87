"""``--attention_mechanism`` through diffusers' attention dispatcher: the backend each attention processor
reports, the same numbers as SDPA on CPU, and the precise refusals (missing package, wrong hardware, a
denoiser that bypasses the dispatcher)."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from simpletuner.options import ConfigError  # noqa: E402
from simpletuner.training.precision import apply_attention_backend, attention_backends_in_use  # noqa: E402


@pytest.fixture(autouse=True)
def restore_dispatcher_default():
    """set_attention_backend also changes diffusers' process-wide active backend: put SDPA back."""
    yield
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    _AttentionBackendRegistry.set_active_backend(AttentionBackendName.NATIVE)


def tiny_flux():
    from diffusers import FluxTransformer2DModel

    from simpletuner.testing.tiny.flux import TRANSFORMER_CONFIG

    torch.manual_seed(0)
    return FluxTransformer2DModel(**TRANSFORMER_CONFIG).eval()


def flux_inputs(model) -> dict:
    config = model.config
    generator = torch.Generator().manual_seed(1)
    tokens, text = 16, 8
    return dict(
        hidden_states=torch.randn(1, tokens, config.in_channels, generator=generator),
        encoder_hidden_states=torch.randn(1, text, config.joint_attention_dim, generator=generator),
        pooled_projections=torch.randn(1, config.pooled_projection_dim, generator=generator),
        timestep=torch.tensor([0.5]), img_ids=torch.zeros(tokens, 3), txt_ids=torch.zeros(text, 3),
        guidance=torch.tensor([3.5]) if config.guidance_embeds else None, return_dict=False,
    )


def test_default_leaves_the_dispatcher_on_sdpa() -> None:
    model = tiny_flux()
    assert apply_attention_backend(model, "diffusers", torch.device("cpu")) is None
    assert attention_backends_in_use(model) == {"default"}


@pytest.mark.parametrize("mechanism, backend", [("native-math", "_native_math"), ("native-flash", "_native_flash")])
def test_a_cpu_backend_is_set_on_every_attention_processor_and_trains_the_same(mechanism: str, backend: str) -> None:
    """The same attention computed by another SDPA kernel: same output, same gradients."""

    def output_and_gradients(model):
        output = model(**flux_inputs(model))[0]
        output.square().mean().backward()
        return output.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    reference = output_and_gradients(tiny_flux().train())
    model = tiny_flux().train()
    assert apply_attention_backend(model, mechanism, torch.device("cpu")) == backend
    assert attention_backends_in_use(model) == {backend}
    for got, expected in zip(output_and_gradients(model), reference):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-4)


def test_flex_is_refused_on_cpu_where_it_has_no_backward() -> None:
    with pytest.raises(ConfigError) as error:
        apply_attention_backend(tiny_flux(), "flex", torch.device("cpu"))
    assert str(error.value) == ("`--attention_mechanism flex`: PyTorch's FlexAttention has no backward pass on CPU, so "
                                "it cannot train here; use diffusers, native-math or native-flash on CPU, and flex on a "
                                "GPU")


def test_gpu_only_backends_are_refused_on_cpu() -> None:
    with pytest.raises(ConfigError) as error:
        apply_attention_backend(tiny_flux(), "cudnn", torch.device("cpu"))
    assert str(error.value) == ("`--attention_mechanism cudnn` runs only on NVIDIA GPUs, and this run is on cpu; use "
                                "`--attention_mechanism diffusers`, native-math or native-flash")


def test_a_unet_that_bypasses_the_dispatcher_is_refused(project: Path) -> None:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(project / "model", subfolder="unet")
    with pytest.raises(ConfigError) as error:
        apply_attention_backend(unet, "native-math", torch.device("cpu"))
    assert "UNet2DConditionModel call PyTorch SDPA directly, not diffusers' attention dispatcher" in str(error.value)


def test_the_trainer_sets_the_backend_on_the_loaded_denoiser(tmp_path: Path) -> None:
    from simpletuner.options.resolve import resolve_run
    from simpletuner.testing.projects import make_family_project
    from simpletuner.training.trainer import Trainer

    root = make_family_project(tmp_path, "flux", images=2)
    args = {"model_family": "flux", "pretrained_model_name_or_path": str(root / "model"), "model_type": "lora",
            "output_dir": str(root / "out"), "data_backend_config": str(root / "multidatabackend.json"),
            "cache_dir": str(root / "cache"), "resolution": 64, "resolution_type": "pixel",
            "aspect_bucket_alignment": 64, "mixed_precision": "no", "train_batch_size": 1, "max_train_steps": 1,
            "report_to": "none", "disable_benchmark": "true", "attention_mechanism": "native-math"}
    config = resolve_run([token for key, value in args.items() for token in (f"--{key}", str(value))]).config
    trainer = Trainer(config, show_progress=False)
    trainer.setup()
    try:
        assert attention_backends_in_use(trainer.model.denoiser) == {"_native_math"}
    finally:
        trainer.data.close()
