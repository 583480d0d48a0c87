"""Config-time rules for the validation options: each mistake names the flag, the value and the fix."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest

from simpletuner.options import ConfigError
from simpletuner.options.resolve import resolve_run
from simpletuner.options.validation_rules import DDPM_SCHEDULERS, FLOW_SCHEDULERS, GUIDANCE_RESCALE_FAMILIES
from tests.conftest import write_minimal_dataset_list


def resolve(tmp_path: Path, family: str = "sd1x", **flags):
    dataset_list = write_minimal_dataset_list(tmp_path)
    values = {"model_family": family, "output_dir": str(tmp_path / "out"), "data_backend_config": str(dataset_list),
              **flags}
    argv = [token for key, value in values.items() for token in (f"--{key}", str(value))]
    return resolve_run(argv, environ={}, root=tmp_path)


def error_of(tmp_path: Path, family: str = "sd1x", **flags) -> str:
    with pytest.raises(ConfigError) as error:
        resolve(tmp_path, family, **flags)
    return str(error.value)


def test_valid_combinations_pass(tmp_path: Path) -> None:
    library = tmp_path / "prompts.json"
    library.write_text(json.dumps({"dog": "a dog", "red-car.v2": "a red car"}))
    run = resolve(tmp_path, validation_prompt="x", validation_on_startup="true", validation_epoch_interval=2,
                  validation_randomize="true", validation_seed_source="gpu", validation_guidance_rescale=0.7,
                  validation_noise_scheduler="euler-a", user_prompt_library=str(library),
                  validation_prompt_library="true")
    config = run.config
    assert (config.validation_epoch_interval, config.validation_noise_scheduler) == (2, "euler-a")
    resolve(tmp_path, "sd3", validation_noise_scheduler="euler")
    resolve(tmp_path, "flux", validation_disable_unconditional="true")
    resolve(tmp_path, "deepfloyd", validation_noise_scheduler="ddpm")


def test_epoch_interval_must_be_positive_and_not_with_validation_disabled(tmp_path: Path) -> None:
    assert "`--validation_epoch_interval` = 0 must be at least 1" in error_of(tmp_path, validation_epoch_interval=0)
    message = error_of(tmp_path, validation_epoch_interval=1, validation_disable="true")
    assert "`--validation_disable` and `--validation_epoch_interval` conflict" in message
    message = error_of(tmp_path, validation_on_startup="true", validation_disable="true")
    assert "`--validation_disable` and `--validation_on_startup` conflict" in message


def test_randomize_and_a_fixed_seed_conflict(tmp_path: Path) -> None:
    message = error_of(tmp_path, validation_randomize="true", validation_seed=3)
    assert "`--validation_randomize`" in message and "`--validation_seed 3`" in message and "remove one" in message


def test_seed_source_only_takes_cpu_or_gpu(tmp_path: Path) -> None:
    assert "validation_seed_source" in error_of(tmp_path, validation_seed_source="tpu")


def test_guidance_rescale_only_for_families_whose_pipeline_takes_it(tmp_path: Path) -> None:
    message = error_of(tmp_path, "sd3", validation_guidance_rescale=0.7)
    assert "`--validation_guidance_rescale 0.7`: the sd3 pipeline has no guidance rescale" in message
    assert "sd1x, sd2x, sdxl" in message
    assert "must be between 0 and 1" in error_of(tmp_path, validation_guidance_rescale=1.5)


def test_guidance_rescale_family_table_matches_the_diffusers_pipelines() -> None:
    diffusers = pytest.importorskip("diffusers")
    pipelines = {"sd1x": "StableDiffusionPipeline", "sd2x": "StableDiffusionPipeline",
                 "sdxl": "StableDiffusionXLPipeline", "kolors": "KolorsPipeline", "sd3": "StableDiffusion3Pipeline",
                 "deepfloyd": "IFPipeline", "pixart_sigma": "PixArtSigmaPipeline", "flux": "FluxPipeline"}
    accepts = {family for family, name in pipelines.items()
               if "guidance_rescale" in inspect.signature(getattr(diffusers, name).__call__).parameters}
    assert accepts == set(GUIDANCE_RESCALE_FAMILIES)


def test_disable_unconditional_conflicts_with_cfg_only_options(tmp_path: Path) -> None:
    message = error_of(tmp_path, validation_disable_unconditional="true", validation_guidance_rescale=0.5)
    assert "`--validation_guidance_rescale 0.5`" in message and "remove one" in message
    message = error_of(tmp_path, validation_disable_unconditional="true", validation_guidance=7.5)
    assert "`--validation_guidance 7.5` needs the unconditional pass" in message
    message = error_of(tmp_path, "flux", validation_disable_unconditional="true", validation_guidance_real=3.0)
    assert "`--validation_guidance_real 3.0`" in message
    run = resolve(tmp_path, validation_disable_unconditional="true", validation_negative_prompt="blurry")
    assert any("validation_negative_prompt" in warning for warning in run.warnings)


def test_noise_scheduler_must_fit_the_prediction_type(tmp_path: Path) -> None:
    message = error_of(tmp_path, "flux", validation_noise_scheduler="ddim")
    assert "`--validation_noise_scheduler ddim` cannot sample a flow-matching flux model" in message
    assert "choose one of: euler" in message
    message = error_of(tmp_path, validation_noise_scheduler="euler-a", prediction_type="sample")
    assert "cannot sample a sample-prediction sd1x model" in message
    message = error_of(tmp_path, "deepfloyd", validation_noise_scheduler="unipc")
    assert "choose one of: ddpm" in message
    assert "`--validation_noise_scheduler perflow` is not supported yet" in error_of(
        tmp_path, validation_noise_scheduler="perflow")


def test_scheduler_tables_name_real_diffusers_classes() -> None:
    diffusers = pytest.importorskip("diffusers")
    for name in [*DDPM_SCHEDULERS.values(), *FLOW_SCHEDULERS.values()]:
        assert hasattr(diffusers, name), name


@pytest.mark.parametrize("content, fragment", [
    (None, "does not exist"),
    ("{not json", "is not valid JSON"),
    ('["a dog"]', "non-empty JSON object"),
    ('{"bad name": "a dog"}', "shortname 'bad name'"),
    ('{"dog": ""}', "the prompt of 'dog'"),
])
def test_user_prompt_library_file_is_checked(tmp_path: Path, content, fragment) -> None:
    library = tmp_path / "library.json"
    if content is not None:
        library.write_text(content)
    message = error_of(tmp_path, user_prompt_library=str(library))
    assert message.startswith("`--user_prompt_library`") and fragment in message


def test_library_alone_counts_as_a_validation_prompt(tmp_path: Path) -> None:
    run = resolve(tmp_path, validation_step_interval=5, validation_prompt_library="true")
    assert not any("no validation images" in warning for warning in run.warnings)
    run = resolve(tmp_path, validation_epoch_interval=1)
    assert any("`--validation_epoch_interval` is set" in warning for warning in run.warnings)
