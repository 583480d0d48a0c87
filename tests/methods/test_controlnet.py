"""ControlNet training (``--controlnet``, methods/controlnet.py): a ControlNet trained a few steps on the
tiny sd1x, SDXL and SD3 models loads in the diffusers ControlNet pipeline and steers its output by the control
image; a resumed run continues exactly; the impossible combinations are refused before a model loads."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from simpletuner.options import ConfigError  # noqa: E402
from simpletuner.options.controlnet_rules import CONTROLNET_RULES, check_controlnet_datasets  # noqa: E402
from simpletuner.testing.config import make_config  # noqa: E402
from tests.training.conftest import Interrupted, crash_after_step, run_args  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def controlnet_project(root: Path, family: str) -> Path:
    """The tiny ``family`` project with a ``controlnet`` conditioning dataset: every shape's colours inverted."""
    from PIL import Image, ImageOps

    from simpletuner.testing.projects import make_family_project

    make_family_project(root, family)
    controls = root / "controls"
    controls.mkdir()
    for image in sorted((root / "data").glob("*.png")):
        ImageOps.invert(Image.open(image).convert("RGB")).save(controls / image.name)
    datasets = json.loads((root / "multidatabackend.json").read_text())
    datasets[0]["conditioning_data"] = ["controls"]
    datasets.insert(1, {"id": "controls", "type": "local", "dataset_type": "conditioning",
                        "instance_data_dir": str(controls), "conditioning_type": "controlnet"})
    (root / "multidatabackend.json").write_text(json.dumps(datasets))
    return root


def controlnet_config(root: Path, output: str, family: str, **overrides):
    from simpletuner.options.resolve import resolve_run

    values = {"model_family": family, "model_type": "full", "controlnet": "true", "optimizer": "optimi-adamw",
              "learning_rate": 1e-2, "max_train_steps": 4, **overrides}
    return resolve_run(run_args(root, output, **values)).config


@pytest.fixture(scope="module")
def sd1x_project(tmp_path_factory) -> Path:
    return controlnet_project(tmp_path_factory.mktemp("controlnet-sd1x"), "sd1x")


@pytest.fixture(scope="module")
def sdxl_project(tmp_path_factory) -> Path:
    return controlnet_project(tmp_path_factory.mktemp("controlnet-sdxl"), "sdxl")


@pytest.fixture(scope="module")
def flux_project(tmp_path_factory) -> Path:
    return controlnet_project(tmp_path_factory.mktemp("control-flux"), "flux")


@pytest.fixture(scope="module")
def sd3_project(tmp_path_factory) -> Path:
    return controlnet_project(tmp_path_factory.mktemp("controlnet-sd3"), "sd3")


def control_image(colour: tuple[int, int, int], size: int = 64):
    """A control picture: a square of ``colour`` on black."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size))
    ImageDraw.Draw(image).rectangle([size // 4, size // 4, 3 * size // 4, 3 * size // 4], fill=colour)
    return image


def sample(pipeline, image, argument: str) -> np.ndarray:
    """One 64 px image from a fixed seed, as floats."""
    generator = torch.Generator().manual_seed(0)
    result = pipeline("a red square", num_inference_steps=3, generator=generator, height=64, width=64,
                      output_type="np", **{argument: image})
    return np.asarray(result.images[0], dtype=np.float64)


# --- trained, saved, loaded in diffusers ------------------------------------------------------------------

FAMILIES = {
    # family: (ControlNet class, ControlNet pipeline class, the pipeline's control-image argument)
    "sd1x": ("ControlNetModel", "StableDiffusionControlNetPipeline", "image"),
    "sdxl": ("ControlNetModel", "StableDiffusionXLControlNetPipeline", "image"),
    "sd3": ("SD3ControlNetModel", "StableDiffusion3ControlNetPipeline", "control_image"),
}


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_trained_controlnet_loads_in_the_diffusers_pipeline_and_steers_it(family, request):
    import diffusers

    from simpletuner.training.trainer import train

    root = request.getfixturevalue(f"{family}_project")
    trainer = train(controlnet_config(root, "run", family, validation_prompt="a red square",
                                      validation_step_interval=4, validation_resolution=64,
                                      validation_num_inference_steps=2), show_progress=False)
    output = root / "run"
    # the base model did not move; the ControlNet did
    base = diffusers.DiffusionPipeline.from_pretrained(str(root / "model"))
    denoiser = trainer._unwrapped_denoiser()
    for name, tensor in getattr(base, trainer.model.denoiser_name).state_dict().items():
        assert torch.equal(tensor, denoiser.state_dict()[name]), name
    assert (output / "validation" / "step_4" / "64x64_00.png").is_file()
    card = (output / "README.md").read_text()
    assert "This is a ControlNet" in card and "ControlNet (all ControlNet weights; the base model stays frozen)" in card

    model_name, pipeline_name, argument = FAMILIES[family]
    model_class, pipeline_class = getattr(diffusers, model_name), getattr(diffusers, pipeline_name)
    trained = model_class.from_pretrained(str(output / "controlnet"))
    components = dict(base.components)
    pipeline = pipeline_class(**{k: v for k, v in components.items()
                                 if k in pipeline_class._get_signature_keys(pipeline_class)[0]}, controlnet=trained)
    pipeline.set_progress_bar_config(disable=True)
    red, blue = control_image((255, 0, 0)), control_image((0, 0, 255))
    with_red, with_blue = sample(pipeline, red, argument), sample(pipeline, blue, argument)
    assert np.abs(with_red - with_blue).mean() > 1e-5  # the control image changes the output

    untrained = trainer.model.controlnet_from_denoiser(None)  # zero-initialised residuals: no effect yet
    pipeline.controlnet = untrained
    assert np.abs(sample(pipeline, red, argument) - with_red).mean() > 1e-5  # training changed what it does
    assert np.abs(sample(pipeline, red, argument) - sample(pipeline, blue, argument)).max() < 1e-6


@pytest.mark.slow
def test_a_resumed_control_run_continues_exactly(flux_project):
    """``--control`` (flux): a full run, interrupted and resumed, gives the uninterrupted run's losses."""
    from simpletuner.training.trainer import train

    options = dict(controlnet="false", control="true", checkpointing_steps=2)
    straight = train(controlnet_config(flux_project, "straight", "flux", **options), show_progress=False)
    with pytest.raises(Interrupted), crash_after_step(2):
        train(controlnet_config(flux_project, "resumed", "flux", **options), show_progress=False)
    resumed = train(controlnet_config(flux_project, "resumed", "flux", resume_from_checkpoint="latest", **options),
                    show_progress=False)
    assert len(straight.state.losses) == 4 and resumed.state.losses == straight.state.losses[2:]


@pytest.mark.slow
def test_a_resumed_controlnet_run_continues_exactly(sd1x_project):
    from safetensors.torch import load_file

    from simpletuner.training.trainer import train

    straight = train(controlnet_config(sd1x_project, "straight", "sd1x", checkpointing_steps=2), show_progress=False)
    with pytest.raises(Interrupted), crash_after_step(2):
        train(controlnet_config(sd1x_project, "resumed", "sd1x", checkpointing_steps=2), show_progress=False)
    assert (sd1x_project / "resumed" / "checkpoint-2" / "method.pt").is_file()
    assert not (sd1x_project / "resumed" / "checkpoint-2" / "denoiser.safetensors").exists()  # the base is frozen
    resumed = train(controlnet_config(sd1x_project, "resumed", "sd1x", checkpointing_steps=2,
                                      resume_from_checkpoint="latest"), show_progress=False)
    assert resumed.state.losses == straight.state.losses[2:]
    first = load_file(str(sd1x_project / "straight" / "controlnet" / "diffusion_pytorch_model.safetensors"))
    second = load_file(str(sd1x_project / "resumed" / "controlnet" / "diffusion_pytorch_model.safetensors"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_custom_config_and_an_earlier_controlnet(sd3_project, tmp_path):
    """``--controlnet_custom_config`` shapes the new ControlNet; ``--controlnet_model_name_or_path``
    starts from a saved one, weights and all; an unknown setting is named."""
    from simpletuner.methods.controlnet import build
    from simpletuner.models.registry import load_family_class

    config = controlnet_config(sd3_project, "custom", "sd3", controlnet_custom_config='{"num_layers": 1}')
    model = load_family_class("sd3")(config, torch.device("cpu"), torch.float32)
    model.load()
    method = build(model, config)
    assert method.controlnet.config.num_layers == 1 and len(method.controlnet.transformer_blocks) == 1
    assert torch.equal(method.controlnet.transformer_blocks[0].attn.to_q.weight,
                       model.denoiser.transformer_blocks[0].attn.to_q.weight)  # copied from the transformer
    assert float(method.controlnet.pos_embed_input.proj.weight.abs().sum()) == 0.0  # starts silent
    with torch.no_grad():
        method.controlnet.controlnet_blocks[0].weight.fill_(0.5)
    method.controlnet.save_pretrained(str(tmp_path / "saved"))

    again = controlnet_config(sd3_project, "again", "sd3", controlnet_model_name_or_path=str(tmp_path / "saved"))
    loaded = build(model, again).controlnet
    assert loaded.config.num_layers == 1 and float(loaded.controlnet_blocks[0].weight.mean()) == 0.5

    from simpletuner.models.controlnet import new_controlnet

    with pytest.raises(ValueError, match="SD3ControlNetModel has no setting 'num_blocks'"):
        new_controlnet(type(loaded), dict(loaded.config), model.denoiser, {"num_blocks": 2})


@pytest.mark.slow
def test_flux_control_trains_a_widened_transformer_that_flux_control_pipeline_loads(flux_project):
    """``--control``: the saved pipeline is a FluxControlPipeline folder whose transformer takes twice the
    latent channels; trained, the control image changes the output; widened but untrained, it cannot."""
    import diffusers

    from simpletuner.models.flux_control import widen_input_embedding
    from simpletuner.training.trainer import train

    root = flux_project
    config = controlnet_config(root, "run", "flux", controlnet="false", control="true",
                               validation_prompt="a red square", validation_step_interval=4,
                               validation_resolution=64, validation_num_inference_steps=2)
    train(config, show_progress=False)
    assert (root / "run" / "validation" / "step_4" / "64x64_00.png").is_file()
    index = json.loads((root / "run" / "pipeline" / "model_index.json").read_text())
    assert index["_class_name"] == "FluxControlPipeline"
    pipeline = diffusers.FluxControlPipeline.from_pretrained(str(root / "run" / "pipeline"))
    pipeline.set_progress_bar_config(disable=True)
    assert pipeline.transformer.x_embedder.in_features == 2 * pipeline.transformer.config.out_channels
    red, blue = control_image((255, 0, 0)), control_image((0, 0, 255))
    with_red = sample(pipeline, red, "control_image")
    assert np.abs(with_red - sample(pipeline, blue, "control_image")).mean() > 1e-5

    untrained = diffusers.FluxTransformer2DModel.from_pretrained(str(root / "model"), subfolder="transformer")
    assert widen_input_embedding(untrained) and not widen_input_embedding(untrained)  # once only
    pipeline.transformer = untrained
    assert np.abs(sample(pipeline, red, "control_image") - with_red).mean() > 1e-5
    assert np.abs(sample(pipeline, red, "control_image") - sample(pipeline, blue, "control_image")).max() < 1e-6


# --- refusals --------------------------------------------------------------------------------------------

def _refusal(config) -> str:
    for rule in CONTROLNET_RULES:
        rule(config)
    raise AssertionError("no rule refused")


@pytest.mark.parametrize("options, message", [
    (dict(model_family="flux", controlnet=True, model_type="full"),
     "`--controlnet` is not available for flux; the families that can train a ControlNet are: sd1x, sd2x, sdxl, sd3"),
    (dict(model_family="sdxl", model_flavour="refiner-1.0", controlnet=True, model_type="full"),
     "diffusers has no ControlNet pipeline for the SDXL refiner"),
    (dict(model_family="sd1x", controlnet=True, model_type="lora"),
     "`--controlnet` with `--model_type lora`: a LoRA on the ControlNet is not available; set `--model_type full`"),
    (dict(model_family="sd1x", controlnet=True, model_type="full", use_ema=True),
     "`--controlnet` and `--use_ema` cannot be combined"),
    (dict(model_family="sd1x", controlnet=True, model_type="full", train_text_encoder=True),
     "`--controlnet` and `--train_text_encoder` cannot be combined"),
    (dict(model_family="sd1x", controlnet=True, model_type="full", training_method="causal_sft"),
     "`--controlnet` trains with the standard denoising loss, but `--training_method causal_sft` is set"),
    (dict(model_family="sd3", controlnet=True, model_type="full", tread_config={"routes": []}),
     "`--controlnet` and `--tread_config` cannot be combined: TREAD drops tokens inside the base model"),
    (dict(model_family="flux", control=True, model_type="full", validation_using_datasets=True),
     "`--control` validates with the family's control pipeline and the first control image, which has no img2img"),
    (dict(model_family="sd1x", controlnet_custom_config={"num_layers": 2}),
     "`--controlnet_custom_config` only applies to ControlNet training; set `--controlnet true` or remove it"),
    (dict(model_family="sd3", controlnet=True, model_type="full", controlnet_custom_config={"num_layers": 2},
          controlnet_model_name_or_path="some/controlnet"),
     "`--controlnet_custom_config` shapes a new ControlNet, but `--controlnet_model_name_or_path` loads an existing"),
    (dict(model_family="sd1x", controlnet=True, model_type="full", base_model_precision="int8-quanto"),
     "a new ControlNet is initialised from the base model's weights"),
    (dict(model_family="sd3", control=True, model_type="full"),
     "`--control` (control latents concatenated to the denoiser's input channels) is not available for sd3; it is "
     "for: flux"),
    (dict(model_family="flux", control=True, controlnet=True, model_type="full"),
     "`--control` and `--controlnet` are two ways to feed the control image; choose one"),
    (dict(model_family="flux", control=True, model_type="lora"),
     "`--control` with `--model_type lora`"),
    (dict(model_family="flux", control=True, model_type="full", validation_negative_prompt="blurry"),
     "`--control` validates with diffusers' FluxControlPipeline, which takes no negative prompt"),
    (dict(model_family="sd1x", controlnet=True, model_type="full", ramtorch_controlnet=True),
     "`--ramtorch_controlnet` cannot work: RamTorch keeps only frozen weights"),
])
def test_refusals(options, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        _refusal(make_config(**options))


def test_a_dataset_without_control_images_is_refused(tmp_path):
    from simpletuner.data.config import DatasetConfigError
    from simpletuner.testing.projects import make_family_project

    root = make_family_project(tmp_path, "sd1x", images=2)
    from simpletuner.options.resolve import resolve_run

    with pytest.raises((ConfigError, DatasetConfigError),
                       match=re.escape("dataset 'shapes': `--controlnet` needs a control image for every training "
                                       "image, and this dataset pairs no conditioning dataset of "
                                       "\"conditioning_type\": \"controlnet\"")):
        resolve_run(run_args(root, "out", model_type="full", controlnet="true"))
    assert check_controlnet_datasets(make_config(controlnet=False), None) is None  # off: nothing to check
