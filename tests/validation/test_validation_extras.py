"""External validation commands, SD3 skip-layer guidance and Tiny AutoEncoder previews, on the tiny models:
each option changes what is written (the command's arguments, the images, the preview files), and the
config rules refuse each one clearly where a family cannot honour it."""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.validation.test_validation_rules import error_of, resolve

torch = pytest.importorskip("torch")

from simpletuner.testing.config import make_config  # noqa: E402
from simpletuner.validation.runner import ValidationSettings, Validator  # noqa: E402

#: writes its arguments (after the script path) as JSON to the file named by the first one
RECORDER = "import json, sys; json.dump(sys.argv[2:], open(sys.argv[1], 'w')); sys.exit(int(sys.argv[-1]))"


class NoTracker:
    def log_image(self, tag, image, step):
        pass

    def log_video(self, tag, path, step):
        pass


def family_model(family: str, folder: Path, edge: int = 64, **options):
    from simpletuner.models.registry import load_family_class
    from simpletuner.testing.tiny_models import make_tiny_model

    if not (folder / "model_index.json").exists():
        make_tiny_model(family, folder)
    options = {"validation_num_inference_steps": 4, **options}
    config = make_config(model_family=family, pretrained_model_name_or_path=str(folder), resolution=edge,
                         resolution_type="pixel", tokenizer_max_length=16, validation_resolution=str(edge), **options)
    model = load_family_class(family)(config, torch.device("cpu"), torch.float32)
    model.load()
    return model, config


def validate(model, config, output: Path, step: int = 3, edge: int = 64) -> Path:
    settings = ValidationSettings.from_config(config, fallback_edge=edge, family_defaults=model.validation_defaults())
    validator = Validator(settings=settings, output_dir=output, tracker=NoTracker(), interval=1,
                          benchmark_enabled=False, device="cpu")
    validator.check_model(model)
    validator.run(model, step)
    return output / "validation" / f"step_{step}"


def pixels(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB")).astype(int)


# --- config rules ------------------------------------------------------------------------------------------


def test_external_validation_rules_name_the_flag_and_the_fix(tmp_path):
    assert "needs `--validation_external_script`" in error_of(tmp_path, validation_method="external-script")
    assert "only used with `--validation_method external-script`" in error_of(
        tmp_path, validation_external_script="run.sh {global_step}")
    message = error_of(tmp_path, validation_method="external-script", validation_external_script="run.sh {stepp}")
    assert "unknown placeholder(s) {stepp}" in message and "global_step" in message
    assert "No closing quotation" in error_of(tmp_path, validation_method="external-script",
                                              validation_external_script="run.sh 'open")
    assert "`--validation_torch_compile` compiles the built-in sampler" in error_of(
        tmp_path, validation_torch_compile="true", validation_method="external-script", validation_external_script="x")
    config = resolve(tmp_path, validation_method="external-script",
                     validation_external_script="run.sh {local_checkpoint_path} {validation_guidance}").config
    assert config.validation_external_script.startswith("run.sh")


def test_skip_layer_guidance_rules(tmp_path):
    message = error_of(tmp_path, "sd1x", validation_guidance_skip_layers="[7, 8]")
    assert "the sd1x pipeline has no skip-layer guidance; it works for sd3" in message
    assert "turns on" in error_of(tmp_path, "sd3", validation_guidance_skip_scale=2.0)
    assert "must be below" in error_of(tmp_path, "sd3", validation_guidance_skip_layers="[1]",
                                       validation_guidance_skip_layers_start=0.5,
                                       validation_guidance_skip_layers_stop=0.2)
    assert "non-empty list" in error_of(tmp_path, "sd3", validation_guidance_skip_layers="[]")
    assert "remove one of them" in error_of(tmp_path, "sd3", validation_guidance_skip_layers="[1]",
                                            validation_disable_unconditional="true")
    config = resolve(tmp_path, "sd3", validation_guidance_skip_layers="[1, 2]",
                     validation_guidance_skip_scale=3.0).config
    assert config.validation_guidance_skip_layers == [1, 2]


def test_skip_layer_families_match_diffusers():
    import diffusers

    from simpletuner.options.validation_rules import SKIP_LAYER_GUIDANCE_FAMILIES

    keywords = {"skip_guidance_layers", "skip_layer_guidance_scale", "skip_layer_guidance_start",
                "skip_layer_guidance_stop"}
    assert SKIP_LAYER_GUIDANCE_FAMILIES == ("sd3",)
    assert keywords <= set(inspect.signature(diffusers.StableDiffusion3Pipeline.__call__).parameters)
    for other in ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "FluxPipeline", "PixArtSigmaPipeline"):
        assert "skip_guidance_layers" not in inspect.signature(getattr(diffusers, other).__call__).parameters


def test_preview_and_audio_rules(tmp_path):
    assert "pixart_sigma has no Tiny AutoEncoder preview" in error_of(tmp_path, "pixart_sigma",
                                                                      validation_preview="true")
    assert "add `--validation_preview`" in error_of(tmp_path, validation_preview_steps=3)
    (tmp_path / "tae.bin").write_text("x")
    assert "is not a folder" in error_of(tmp_path, validation_preview="true", tiny_autoencoder_path=str(tmp_path / "tae.bin"))
    assert "no model family in this trainer does" in error_of(tmp_path, validation_audio_only="true")


def test_preview_families_have_a_step_callback_and_a_tiny_autoencoder():
    import importlib

    import diffusers

    from simpletuner.models.registry import family_info
    from simpletuner.options.validation_rules import PREVIEW_FAMILIES

    for family in PREVIEW_FAMILIES:  # the pipeline class is the one the family's tiny model is built from
        assert family_info(family).tiny_autoencoder
        pipeline, _ = importlib.import_module(family_info(family).tiny_builder).build_tiny_pipeline(0)
        assert "callback_on_step_end" in inspect.signature(type(pipeline).__call__).parameters, family
    assert "callback_on_step_end" not in inspect.signature(diffusers.PixArtSigmaPipeline.__call__).parameters


# --- external validation command ----------------------------------------------------------------------------


def external_config(tmp_path: Path, exit_status: int = 0, **options):
    script = tmp_path / "record.py"
    script.write_text(RECORDER)
    command = (f"{sys.executable} {script} {tmp_path / 'argv.json'} {{local_checkpoint_path}} {{global_step}} "
               f"'{{validation_prompt}}' {{model_family}} {{huggingface_path}} {exit_status}")
    return make_config(model_family="sd1x", validation_method="external-script", validation_external_script=command,
                       validation_prompt="a red; square && rm -rf $HOME", **options)


def external_validator(config, output: Path) -> Validator:
    return Validator(settings=ValidationSettings.from_config(config, fallback_edge=64), output_dir=output,
                     tracker=NoTracker(), interval=1, benchmark_enabled=True, device="cpu")


def test_external_script_gets_the_newest_checkpoint_and_placeholders_as_single_arguments(tmp_path):
    output = tmp_path / "out"
    for step in (2, 10, 4):
        (output / f"checkpoint-{step}").mkdir(parents=True)
    validator = external_validator(external_config(tmp_path), output)
    validator.run_benchmark(model=None)  # no sampling: the model is never touched
    assert validator.enabled and validator.benchmark == {}
    validator.run(None, 10)
    argv = json.loads((tmp_path / "argv.json").read_text())
    # the prompt stays one argument: nothing in it reaches a shell
    assert argv == [str(output / "checkpoint-10"), "10", "a red; square && rm -rf $HOME", "sd1x", "", "0"]
    record = json.loads((output / "validation" / "step_10" / "external.json").read_text())
    assert record["returncode"] == 0 and record["argv"][-6:] == argv


def test_a_failing_external_script_is_recorded_and_a_background_one_is_not_waited_for(tmp_path, caplog):
    output = tmp_path / "out"
    external_validator(external_config(tmp_path, exit_status=3), output).run(None, 5)
    record = json.loads((output / "validation" / "step_5" / "external.json").read_text())
    assert record["returncode"] == 3 and "failed with exit status 3" in caplog.text
    assert json.loads((tmp_path / "argv.json").read_text())[0] == ""  # no checkpoint yet: empty
    (tmp_path / "argv.json").unlink()
    validator = external_validator(external_config(tmp_path, validation_external_background=True), output)
    validator.run(None, 6)
    record = json.loads((output / "validation" / "step_6" / "external.json").read_text())
    assert record["background"] and "returncode" not in record
    assert validator.settings.external.running[0].wait(timeout=60) == 0
    assert json.loads((tmp_path / "argv.json").read_text())[1] == "6"


@pytest.mark.slow
def test_external_validation_in_a_training_run_sees_that_steps_checkpoint(project, tmp_path):
    from simpletuner.training.trainer import train
    from tests.training.conftest import config_for

    script = tmp_path / "record.py"
    script.write_text(RECORDER)
    config = config_for(project, "external", validation_method="external-script", max_train_steps=2,
                        validation_step_interval=2, checkpoint_step_interval=2, disable_benchmark="false",
                        validation_external_script=f"{sys.executable} {script} {tmp_path / 'argv.json'} "
                                                   "{local_checkpoint_path} {global_step} 0")
    train(config)
    argv = json.loads((tmp_path / "argv.json").read_text())
    assert argv == [str(project / "external" / "checkpoint-2"), "2", "0"]
    assert not (project / "external" / "validation" / "step_0_base_model").exists()


# --- skip-layer guidance and previews on the tiny models ------------------------------------------------------


def test_skip_layer_guidance_changes_the_sd3_images(tmp_path):
    model, config = family_model("sd3", tmp_path / "model", validation_prompt="a red square",
                                 validation_guidance=5.0)
    plain = validate(model, config, tmp_path / "plain")
    layers = model.denoiser.config.num_layers
    skipped_config = config.replace(validation_guidance_skip_layers=[layers - 1], validation_guidance_skip_scale=8.0,
                                    validation_guidance_skip_layers_start=0.0,
                                    validation_guidance_skip_layers_stop=1.0)
    skipped = validate(model, skipped_config, tmp_path / "skipped")
    assert np.abs(pixels(plain / "64x64_00.png") - pixels(skipped / "64x64_00.png")).mean() > 1
    with pytest.raises(ValueError, match=f"has {layers} blocks"):
        validate(model, config.replace(validation_guidance_skip_layers=[layers]), tmp_path / "bad")


def test_previews_are_written_every_n_steps_beside_the_images(tmp_path):
    from simpletuner.testing.tiny_vision import make_tiny_autoencoder_tiny

    tae = make_tiny_autoencoder_tiny(tmp_path / "tae", latent_channels=4)
    model, config = family_model("sd1x", tmp_path / "model", validation_prompt="a red square",
                                 num_validation_images=2, validation_preview=True, validation_preview_steps=2,
                                 tiny_autoencoder_path=str(tae))
    folder = validate(model, config, tmp_path / "out")
    written = sorted(path.name for path in (folder / "previews").iterdir())
    assert written == ["64x64_00_step002.png", "64x64_00_step004.png", "64x64_01_step002.png",
                       "64x64_01_step004.png"]
    assert (folder / "64x64_00.png").exists()
    # the latents move between steps 2 and 4, and the two seeds give two different pictures
    assert np.abs(pixels(folder / "previews" / written[0]) - pixels(folder / "previews" / written[1])).mean() > 0.1
    assert np.abs(pixels(folder / "previews" / written[1]) - pixels(folder / "previews" / written[3])).mean() > 0.1


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_previews_of_shifted_and_packed_latents(tmp_path, family):
    """SD3 and Flux latents carry a shift factor; Flux's are packed into 2x2 patches during sampling."""
    from simpletuner.testing.tiny_vision import make_tiny_autoencoder_tiny

    model, config = family_model(family, tmp_path / "model", validation_prompt="a red square",
                                 validation_num_inference_steps=2, validation_preview=True)
    channels = model.build_pipeline().vae.config.latent_channels
    tae = make_tiny_autoencoder_tiny(tmp_path / "tae", latent_channels=channels)
    folder = validate(model, config.replace(tiny_autoencoder_path=str(tae)), tmp_path / "out")
    written = sorted(path.name for path in (folder / "previews").iterdir())
    assert written == ["64x64_00_step001.png", "64x64_00_step002.png"]
    first, second = (pixels(folder / "previews" / name) for name in written)
    assert first.shape[2] == 3 and first.shape[0] == first.shape[1] >= 16  # a spatial picture, unpacked
    assert np.abs(first - second).mean() > 0  # the random Tiny AutoEncoder saturates much, but the steps differ


def test_a_tiny_autoencoder_for_other_latents_is_refused(tmp_path):
    from simpletuner.testing.tiny_vision import make_tiny_autoencoder_tiny

    tae = make_tiny_autoencoder_tiny(tmp_path / "tae", latent_channels=16)
    model, config = family_model("sd1x", tmp_path / "model", validation_prompt="a red square",
                                 validation_preview=True, tiny_autoencoder_path=str(tae))
    with pytest.raises(ValueError, match="decodes 16-channel latents, the model makes 4"):
        validate(model, config, tmp_path / "out")


# --- validation-only adapters ----------------------------------------------------------------------------------


def write_lora(model, path: Path, seed: int, rank: int = 2, scale: float = 0.5) -> Path:
    """A diffusers-layout LoRA on the tiny UNet's attention projections (random, strong enough to show)."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in model.denoiser.named_modules():
        if name.endswith(("attn1.to_q", "attn1.to_v", "attn2.to_out.0")):
            out_features, in_features = module.weight.shape
            tensors[f"unet.{name}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator) * scale
            tensors[f"unet.{name}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator) * scale
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def weights(model) -> dict:
    return {key: value.clone() for key, value in model.denoiser.state_dict().items()}


def test_validation_adapter_rules(tmp_path):
    lora = tmp_path / "style.safetensors"
    lora.write_bytes(b"")
    assert "keep one" in error_of(tmp_path, validation_adapter_path=str(lora),
                                  validation_adapter_config=json.dumps([{"path": str(lora)}]))
    assert "without `--validation_adapter_path`" in error_of(tmp_path, validation_adapter_strength=0.5)
    assert "`--validation_adapter_mode` has no effect" in error_of(tmp_path, validation_adapter_mode="adapter_only")
    message = error_of(tmp_path, validation_adapter_path=str(tmp_path / "missing.safetensors"))
    assert "is neither an existing file or folder nor a hub id" in message
    assert "run 1: strength -1" in error_of(tmp_path, validation_adapter_config=json.dumps(
        [{"path": str(lora)}, {"path": str(lora), "strength": -1}]))
    assert "share a label" in error_of(tmp_path, validation_adapter_config=json.dumps(
        {"runs": [{"path": str(lora), "label": "a"}, {"path": str(lora), "label": "a"}]}))
    assert "replaces" in error_of(tmp_path, validation_adapter_path=str(lora), validation_method="external-script",
                                  validation_external_script="x {global_step}")
    config = resolve(tmp_path, validation_adapter_config=json.dumps(
        {"runs": [{"label": "both", "adapters": [str(lora), {"path": "org/repo:x.safetensors", "strength": 0.5}]}]}),
        validation_adapter_mode="adapter_only").config
    from simpletuner.validation.adapters import runs_from_config

    (run,) = runs_from_config(config)
    assert run.label == "both" and [a.strength for a in run.adapters] == [1.0, 0.5]


def test_comparison_writes_plain_and_adapter_images_and_restores_every_weight(tmp_path):
    model, config = family_model("sd1x", tmp_path / "model", validation_prompt="a red square")
    lora = write_lora(model, tmp_path / "loras" / "style.safetensors", seed=1)
    before = weights(model)
    output = tmp_path / "out"
    folder = validate(model, config.replace(validation_adapter_path=str(lora)), output)
    adapter_folder = output / "validation" / "step_3_adapter_style"
    plain, adapted = pixels(folder / "64x64_00.png"), pixels(adapter_folder / "64x64_00.png")
    assert np.abs(plain - adapted).mean() > 1
    after = weights(model)
    assert all(torch.equal(before[key], after[key]) for key in before)  # bit for bit
    from PIL import Image

    assert Image.open(adapter_folder / "grid_64x64.png").text["simpletuner_panels"] == "step 3 + style"
    # strength scales the merge: half strength is a different picture from full strength
    halved = validate(model, config.replace(validation_adapter_path=str(lora), validation_adapter_strength=0.5,
                                            validation_adapter_name="half", validation_adapter_mode="adapter_only"),
                      tmp_path / "half")
    assert not halved.exists()  # adapter_only: no plain pass
    half = pixels(tmp_path / "half" / "validation" / "step_3_adapter_half" / "64x64_00.png")
    assert np.abs(half - adapted).mean() > 0.5 and np.abs(half - plain).mean() > 0.5


def test_adapter_config_runs_one_after_another_on_a_peft_lora_run(tmp_path):
    from simpletuner.training.adapter import attach_adapter

    model, config = family_model("sd1x", tmp_path / "model", validation_prompt="a red square", model_type="lora")
    attach_adapter(model, config)  # the trained LoRA wraps the projections the extra adapters touch
    first = write_lora(model, tmp_path / "a.safetensors", seed=1)
    second = write_lora(model, tmp_path / "b.safetensors", seed=2)
    before = weights(model)
    runs = {"runs": [{"label": "one", "path": str(first)},
                     {"label": "two", "adapters": [str(first), {"path": str(second), "strength": 2.0}]}]}
    output = tmp_path / "out"
    validate(model, config.replace(validation_adapter_config=runs), output)
    found = {name: pixels(output / "validation" / name / "64x64_00.png")
             for name in ("step_3", "step_3_adapter_one", "step_3_adapter_two")}
    assert np.abs(found["step_3"] - found["step_3_adapter_one"]).mean() > 1
    assert np.abs(found["step_3_adapter_one"] - found["step_3_adapter_two"]).mean() > 1
    after = weights(model)
    assert all(torch.equal(before[key], after[key]) for key in before)


# --- starting from dataset pictures ---------------------------------------------------------------------------


def picture_dataset(folder: Path, colour: tuple[int, int, int]) -> Path:
    """A dataset list whose only image dataset holds one flat picture of ``colour``."""
    from PIL import Image

    from tests.conftest import write_minimal_dataset_list

    folder.mkdir(parents=True, exist_ok=True)
    dataset_list = write_minimal_dataset_list(folder)
    Image.new("RGB", (80, 64), colour).save(folder / "images" / "picture.png")
    return dataset_list


def test_using_datasets_rules(tmp_path):
    message = error_of(tmp_path, "pixart_sigma", validation_using_datasets="true")
    assert "pixart_sigma has no image-to-image or image-to-video pipeline" in message
    assert "add that or remove it" in error_of(tmp_path, validation_stitch_input_location="left")
    assert "no pictures found in the datasets of" in error_of(tmp_path, validation_using_datasets="true")
    picture_dataset(tmp_path, (200, 30, 30))
    assert "their first frame already" in error_of(tmp_path, "wan", validation_using_datasets="true",
                                                   validation_stitch_input_location="left")
    assert "names no enabled dataset" in error_of(tmp_path, validation_using_datasets="true", eval_dataset_id="nope")
    config = resolve(tmp_path, validation_using_datasets="true", validation_stitch_input_location="right").config
    assert config.validation_stitch_input_location == "right"


def test_img2img_families_have_a_diffusers_img2img_pipeline():
    from diffusers.pipelines.auto_pipeline import AUTO_IMAGE2IMAGE_PIPELINES_MAPPING, AUTO_TEXT2IMAGE_PIPELINES_MAPPING

    from simpletuner.models.registry import load_family_class
    from simpletuner.options.validation_rules import VIDEO_FAMILIES
    from simpletuner.validation.dataset_inputs import I2V_FAMILIES, IMG2IMG_FAMILIES

    tasks = {cls.__name__: task for task, cls in AUTO_TEXT2IMAGE_PIPELINES_MAPPING.items()}
    pipelines = {"sd1x": "StableDiffusionPipeline", "sd2x": "StableDiffusionPipeline",
                 "sdxl": "StableDiffusionXLPipeline", "kolors": "KolorsPipeline", "sd3": "StableDiffusion3Pipeline",
                 "flux": "FluxPipeline"}
    for family in IMG2IMG_FAMILIES:
        assert tasks[pipelines[family]] in AUTO_IMAGE2IMAGE_PIPELINES_MAPPING
    assert tasks["PixArtSigmaPipeline"] not in AUTO_IMAGE2IMAGE_PIPELINES_MAPPING
    assert set(I2V_FAMILIES) == set(VIDEO_FAMILIES)


def test_img2img_starts_from_the_dataset_picture_and_stitches_it_beside_the_result(tmp_path):
    from PIL import Image

    model, _ = family_model("sd1x", tmp_path / "model")
    folders_by_colour = {}
    for colour in ((220, 20, 20), (20, 20, 220)):
        dataset_list = picture_dataset(tmp_path / f"data_{colour[0]}", colour)
        _, config = family_model("sd1x", tmp_path / "model", validation_prompt="a square",
                                 data_backend_config=str(dataset_list), validation_using_datasets=True,
                                 validation_stitch_input_location="left")
        folders_by_colour[colour] = validate(model, config, tmp_path / f"out_{colour[0]}")
    red, blue = folders_by_colour.values()
    assert np.abs(pixels(red / "64x64_00.png") - pixels(blue / "64x64_00.png")).mean() > 5
    record = json.loads((red / "validation.json").read_text())
    assert record["images"]["00"]["input"].endswith("data_220/images/picture.png")
    grid = Image.open(red / "grid_64x64.png")
    assert grid.text["simpletuner_panels"] == "input | step 3" and grid.width == 128
    left = np.asarray(grid.convert("RGB"))[-32:, :64].reshape(-1, 3).mean(axis=0)
    assert left[0] > 180 and left[2] < 60  # the red starting picture, fitted to 64x64, on the left


@pytest.mark.slow
def test_wan_image_to_video_starts_from_the_dataset_picture(tmp_path):
    from tests.validation.test_video_families import decode
    from tests.validation.test_video_families import family_model as video_model

    dataset_list = picture_dataset(tmp_path / "data", (220, 30, 30))
    model, config = video_model("wan", tmp_path / "model", "i2v-2.1", model_flavour="i2v-480p-14b-2.1",
                                validation_prompt="a red circle", validation_resolution="32",
                                validation_num_video_frames=5, validation_num_inference_steps=2,
                                data_backend_config=str(dataset_list), validation_using_datasets=True)
    folder = validate(model, config, tmp_path / "out", edge=32)
    record = json.loads((folder / "validation.json").read_text())
    (entry,) = record["videos"].values()
    assert entry["image"] == str(tmp_path / "data" / "images" / "picture.png")
    video, _ = decode(next(folder.glob("*.mp4")))
    assert len(video) == 5


# --- torch.compile -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_torch_compile_samples_the_same_images_through_a_compiled_denoiser(tmp_path):
    model, config = family_model("sd1x", tmp_path / "model", validation_prompt="a red square",
                                 validation_num_inference_steps=2)
    plain = validate(model, config, tmp_path / "plain")
    settings = ValidationSettings.from_config(config.replace(validation_torch_compile=True), fallback_edge=64)
    validator = Validator(settings=settings, output_dir=tmp_path / "compiled", tracker=NoTracker(), interval=1,
                          benchmark_enabled=False, device="cpu")
    validator.run(model, 3)
    compiled = validator._compiled
    assert isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule) and compiled._orig_mod is model.denoiser
    first = pixels(tmp_path / "compiled" / "validation" / "step_3" / "64x64_00.png")
    assert np.abs(first - pixels(plain / "64x64_00.png")).max() <= 2  # same sampler, compiled kernels
    validator.run(model, 4)
    assert validator._compiled is compiled  # reused, not compiled again


@pytest.mark.slow
def test_a_training_run_sends_its_previews_with_the_validation_webhook(project, tmp_path):
    from simpletuner.testing.tiny_vision import make_tiny_autoencoder_tiny
    from simpletuner.training.trainer import train
    from tests.tracking.conftest import Receiver
    from tests.training.conftest import config_for

    tae = make_tiny_autoencoder_tiny(tmp_path / "tae", latent_channels=4)
    receiver = Receiver()
    try:
        config = config_for(project, "previews", max_train_steps=2, validation_step_interval=2,
                            validation_prompt="a red square", validation_num_inference_steps=2,
                            validation_resolution=64, validation_preview="true", tiny_autoencoder_path=str(tae),
                            webhook_config=json.dumps({"webhook_type": "raw", "callback_url": receiver.url()}))
        train(config, show_progress=False)
    finally:
        receiver.close()
    (validation,) = [body["data"] for body in receiver.bodies if body["event"] == "validation"]
    folder = project / "previews" / "validation" / "step_2" / "previews"
    assert validation["previews"] == [str(folder / "64x64_00_step001.png"), str(folder / "64x64_00_step002.png")]
    assert all(Path(path).is_file() for path in validation["previews"])
