"""`simpletuner import-config`: kohya, ai-toolkit and OneTrainer files become our config.json +
multidatabackend.json (+ prompt library), every unmapped setting is listed with its reason, and the
written files pass `simpletuner train` validation when the image folders exist."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from simpletuner.cli import main
from simpletuner.importers import read_foreign_config, sniff_format
from simpletuner.importers.common import ImportConfigError, parse_prompt_line
from simpletuner.importers.writer import validation_problem, write_import
from simpletuner.validation.prompt_library import load_prompt_settings, load_user_prompt_library

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "import"


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A working directory holding copies of the example files and the image folders they name."""
    for file in FIXTURES.iterdir():
        shutil.copy(file, tmp_path / file.name)
    for folder in ("images/character", "images/regularisation", "images/wide", "images/ohwx", "images/style",
                   "img/10_sks dog", "reg/1_dog", "img/not-a-repeat-folder"):
        (tmp_path / folder).mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def imported(workdir: Path, name: str, out: str = "out"):
    result = read_foreign_config(workdir / name)
    written = write_import(result, workdir / name, workdir / out)
    options = json.loads(written.config_path.read_text())
    datasets = {entry["id"]: entry for entry in json.loads(written.datasets_path.read_text())}
    return result, written, options, datasets


def unmapped_keys(result) -> dict[str, str]:
    return {item.key: item.reason for item in result.unmapped}


def test_kohya_sdxl_toml_maps_options_datasets_and_prompts(workdir):
    result, written, options, datasets = imported(workdir, "kohya_sdxl_lora.toml")
    assert options["model_family"] == "sdxl" and options["model_type"] == "lora"
    assert (options["lora_rank"], options["lora_alpha"]) == (32, 16.0)
    assert options["optimizer"] == "bnb-adamw8bit" and options["lr_scheduler"] == "cosine"
    assert (options["max_train_steps"], options["train_batch_size"], options["gradient_accumulation_steps"]) == (1600, 2, 2)
    assert options["checkpoint_step_interval"] == 200 and options["checkpoints_total_limit"] == 3
    assert options["snr_gamma"] == 5.0 and options["noise_offset"] == pytest.approx(0.0357)
    assert options["noise_offset_probability"] == 1.0  # kohya offsets every step
    assert options["vae_dtype"] == "fp32" and options["validation_noise_scheduler"] == "euler-a"
    assert "train_text_encoder" not in options  # network_train_unet_only
    # kohya num_repeats counts passes; ours counts extra passes
    assert datasets["character"]["repeats"] == 9
    # no .txt captions in the folder: kohya would train on the class tokens
    assert datasets["character"]["caption_strategy"] == "instanceprompt"
    assert datasets["character"]["instance_prompt"] == "ohwx woman"
    assert datasets["regularisation"]["is_regularisation_data"] is True
    assert datasets["wide"]["resolution"] == round((768 * 1344) ** 0.5)
    assert datasets["wide"]["resolution_type"] == "pixel_area"
    assert (datasets["wide"]["crop"], datasets["wide"]["crop_style"]) == (True, "random")
    assert datasets["text-embeds"]["dataset_type"] == "text_embeds"
    unmapped = unmapped_keys(result)
    assert "clip_skip" in unmapped and "earlier CLIP layer" in unmapped["clip_skip"]
    assert datasets["wide"]["random_flip"] is True and "random_flip" not in datasets["character"]
    # kohya's shuffle_caption + keep_tokens (from [general]) become cached shuffled variants
    assert datasets["character"]["caption_shuffle"] == {"variants": 4, "keep_tokens": 1}
    assert "caption_shuffle" not in datasets["regularisation"]  # that subset turns it off
    assert written.validation_problem is None
    assert validation_problem(written.config_path) is None


def test_kohya_prompt_flags_reach_the_prompt_library(workdir):
    _, written, options, _ = imported(workdir, "kohya_sdxl_lora.toml")
    library = json.loads(written.prompts_path.read_text())
    assert options["user_prompt_library"] == str(written.prompts_path)
    assert library["sample-01"] == {"prompt": "ohwx woman reading in a cafe, soft light",
                                    "negative_prompt": "lowres, blurry", "width": 1024, "height": 1024,
                                    "seed": 1234, "guidance": 6.5, "steps": 28}
    assert library["sample-03"] == "a portrait of ohwx woman, studio lighting"  # nothing else set: a plain string
    settings = load_prompt_settings(written.prompts_path)
    assert settings["sample-02"] == {"width": 832, "height": 1216, "seed": 7}
    assert load_user_prompt_library(written.prompts_path)["sample-02"] == "ohwx woman on a mountain trail at sunset"


def test_kohya_command_line_maps_repeat_folders_onto_folder_repeats(workdir):
    result, written, options, datasets = imported(workdir, "kohya_sd15_command.sh")
    assert options["model_family"] == "sd1x"
    assert options["pretrained_model_name_or_path"] == "runwayml/stable-diffusion-v1-5"
    assert (options["learning_rate"], options["text_encoder_lr"]) == (1e-4, 5e-5)
    assert options["train_text_encoder"] is True  # kohya trains text-encoder LoRA unless told not to
    assert options["num_train_epochs"] == 10 and options["checkpoint_epoch_interval"] == 2
    assert options["mixed_precision"] == "fp16" and options["resolution"] == 512
    assert options["attention_mechanism"] == "xformers"
    img, reg = datasets["img"], datasets["reg"]
    assert (img["folder_repeats"], img["caption_strategy"], "repeats" in img) == (True, "textfile", False)
    assert reg["folder_repeats"] is True and reg["is_regularisation_data"] is True
    # simpletuner train reads them as kohya does: 10_sks dog repeats 10 times, captioned by its words
    from simpletuner.data.config import load_dataset_plan

    expanded = {cfg.id: cfg for cfg in load_dataset_plan(written.datasets_path).enabled_images}
    assert set(expanded) == {"img-10_sks-dog", "reg-1_dog"}  # the folder not named <N>_<words> is left out
    assert (expanded["img-10_sks-dog"].repeats, expanded["img-10_sks-dog"].folder_prompt) == (9, "sks dog")
    dog = img
    unmapped = unmapped_keys(result)
    assert "sample_prompts" in unmapped and "not found" in unmapped["sample_prompts"]
    assert dog["caption_shuffle"] == {"variants": 4, "keep_tokens": 1} and dog["random_flip"] is True
    assert "max_token_length" in unmapped


def test_kohya_command_line_without_folders_says_why(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    command = (FIXTURES / "kohya_sd15_command.sh").read_text().replace("--xformers", "--sdpa")
    (tmp_path / "kohya_sd15_command.sh").write_text(command)
    result = read_foreign_config(tmp_path / "kohya_sd15_command.sh")
    assert any("folder 'img' is not here" in note for note in result.notes)
    written = write_import(result, tmp_path / "kohya_sd15_command.sh", tmp_path / "out")
    assert "does not exist" in written.validation_problem and "img" in written.validation_problem


def test_ai_toolkit_flux_yaml(workdir):
    result, written, options, datasets = imported(workdir, "ai_toolkit_flux_lora.yaml")
    assert options["model_family"] == "flux" and options["pretrained_model_name_or_path"] == "black-forest-labs/FLUX.1-dev"
    assert (options["lora_rank"], options["lora_alpha"], options["max_train_steps"]) == (16, 16.0, 2000)
    assert options["optimizer"] == "bnb-adamw8bit" and options["mixed_precision"] == "bf16"
    assert options["use_ema"] is True and options["ema_decay"] == 0.99
    assert options["checkpoint_step_interval"] == 250 and options["checkpoints_total_limit"] == 4
    assert options["validation_guidance"] == 4.0 and options["validation_num_inference_steps"] == 20
    assert options["validation_resolution"] == "1024x1024" and options["output_dir"] == "output/ohwx_flux_lora_v1"
    assert sorted(entry.get("resolution") for entry in datasets.values() if "resolution" in entry) == [512, 768, 1024]
    first = datasets["ohwx-512"]
    assert (first["instance_prompt"], first["prepend_instance_prompt"]) == ("ohwx", True)
    library = json.loads(written.prompts_path.read_text())
    assert library["sample-01"] == {"prompt": "ohwx holding a sign that says 'I LOVE PROMPTS!'", "seed": 42}
    assert library["sample-02"]["seed"] == 99 and library["sample-02"]["width"] == 768  # its own seed wins
    assert library["sample-03"] == {"prompt": "a photo of ohwx in a spacesuit", "steps": 30, "guidance": 3.0,
                                    "seed": 44}  # walk_seed: seed + index
    assert written.validation_problem is None


def test_ai_toolkit_trigger_placeholder_in_captions_becomes_a_filter(workdir):
    (workdir / "images/ohwx/a.txt").write_text("[trigger] smiling")
    _, _, _, datasets = imported(workdir, "ai_toolkit_flux_lora.yaml")
    assert datasets["ohwx-512"]["caption_filter_list"] == ["s/\\[trigger\\]/ohwx/"]
    assert "prepend_instance_prompt" not in datasets["ohwx-512"]


def test_onetrainer_sdxl_json(workdir):
    result, written, options, datasets = imported(workdir, "onetrainer_sdxl_lora.json")
    assert options["model_family"] == "sdxl" and options["lora_rank"] == 16 and options["lora_alpha"] == 1.0
    assert options["num_train_epochs"] == 100 and options["train_batch_size"] == 4
    assert options["optimizer"] == "bnb-adamw8bit" and options["adam_weight_decay"] == 0.01
    assert options["lr_scheduler"] == "constant_with_warmup" and options["lr_warmup_steps"] == 200
    assert options["snr_gamma"] == 5.0 and options["checkpoint_step_interval"] == 500
    assert options["gradient_checkpointing"] is True and options["mixed_precision"] == "bf16"
    assert datasets["ohwx"]["repeats"] == 3  # balancing 4 passes
    assert datasets["style-reference"]["disabled"] is True
    assert datasets["style-reference"]["caption_strategy"] == "filename"
    library = json.loads(written.prompts_path.read_text())
    assert list(library) == ["sample-01"]  # the disabled sample is left out
    assert library["sample-01"]["seed"] == 42 and library["sample-01"]["steps"] == 25
    unmapped = unmapped_keys(result)
    assert "minutes" in unmapped["sample_after / sample_after_unit"]
    assert datasets["ohwx"]["random_flip"] is True
    assert datasets["ohwx"]["caption_shuffle"] == {"variants": 4, "keep_tokens": 1}
    assert written.validation_problem is None


def test_cli_writes_files_and_prints_the_unmapped_table(workdir, capsys):
    assert main(["import-config", "kohya_sdxl_lora.toml", "--output-dir", "cfg"]) == 0
    printed = capsys.readouterr().out
    assert "| `clip_skip` | 2 |" in printed
    report = (workdir / "cfg" / "import-report.md").read_text()
    assert "| `clip_skip` | 2 | there is no option to take an earlier CLIP layer |" in report
    assert "`simpletuner train` accepts the written config." in report
    for name in ("config.json", "multidatabackend.json", "user_prompt_library.json"):
        assert (workdir / "cfg" / name).is_file()
    # a second import into the same folder loses nothing
    assert main(["import-config", "kohya_sdxl_lora.toml", "--output-dir", "cfg"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["import-config", "kohya_sdxl_lora.toml", "--output-dir", "cfg", "--overwrite"]) == 0


def test_unsupported_value_becomes_an_unmapped_row(workdir):
    text = (workdir / "kohya_sdxl_lora.toml").read_text().replace('lr_scheduler = "cosine"', 'lr_scheduler = "adafactor"')
    (workdir / "kohya_sdxl_lora.toml").write_text(text.replace("seed = 42", "seed = -5"))
    result, written, options, _ = imported(workdir, "kohya_sdxl_lora.toml")
    reasons = unmapped_keys(result)
    assert "lr_scheduler" in reasons and "lr_scheduler" not in options
    assert "seed" in reasons and "our option refuses the value" in reasons["seed"] and "seed" not in options


def test_format_sniffing_and_errors(workdir):
    assert sniff_format(workdir / "kohya_sd15_command.sh") == "kohya"
    assert sniff_format(workdir / "ai_toolkit_flux_lora.yaml") == "ai-toolkit"
    assert sniff_format(workdir / "onetrainer_sdxl_lora.json") == "onetrainer"
    (workdir / "cmd.txt").write_text("accelerate launch sdxl_train_network.py --network_dim 4\n")
    assert sniff_format(workdir / "cmd.txt") == "kohya"
    assert read_foreign_config(workdir / "cmd.txt").options["model_family"] == "sdxl"
    with pytest.raises(ImportConfigError, match="does not exist"):
        read_foreign_config(workdir / "missing.toml")
    (workdir / "bad.json").write_text("{\"lr\": 1}")
    with pytest.raises(ImportConfigError, match="model_type"):
        read_foreign_config(workdir / "bad.json")


def test_prompt_line_flags():
    prompt = parse_prompt_line("a cat --n dog, blurry --w 640 --h 480 --d 3 --l 5 --s 12", "here")
    assert (prompt.prompt, prompt.negative_prompt, prompt.width, prompt.height) == ("a cat", "dog, blurry", 640, 480)
    assert (prompt.seed, prompt.guidance, prompt.steps) == (3, 5.0, 12)
    assert parse_prompt_line("# comment", "here") is None
    with pytest.raises(ImportConfigError, match="--zz"):
        parse_prompt_line("a cat --zz 1", "prompts.txt, line 3")


def test_prompt_library_entry_settings_are_checked(tmp_path):
    path = tmp_path / "library.json"
    path.write_text(json.dumps({"cat": {"prompt": "a cat", "seed": 3, "steps": 10}, "dog": "a dog"}))
    assert load_user_prompt_library(path) == {"cat": "a cat", "dog": "a dog"}
    assert load_prompt_settings(path) == {"cat": {"seed": 3, "steps": 10}, "dog": {}}
    path.write_text(json.dumps({"cat": {"prompt": "a cat", "sampler": "ddim"}}))
    with pytest.raises(ValueError, match="unknown key 'sampler'"):
        load_user_prompt_library(path)
    path.write_text(json.dumps({"cat": {"prompt": "a cat", "steps": 0}}))
    with pytest.raises(ValueError, match="'steps' is 0"):
        load_user_prompt_library(path)
