"""Config-time rules of the precision, attention and publishing options: accepted values resolve, refused
ones stop the run with one precise message (and never echo a secret)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import write_minimal_dataset_list
from tests.options.conftest import error_of, resolve  # noqa: F401 (argv is the conftest fixture)

SECRET = "sEcReT-pUbLiSh-9f8e7d"


# --- precision and attention -----------------------------------------------------------------------


@pytest.mark.parametrize("flags", [["--mixed_precision", "fp16"], ["--mixed_precision", "no"],
                                   ["--vae_dtype", "fp16"], ["--vae_dtype", "bf16"], ["--vae_dtype", "default"],
                                   ["--attention_mechanism", "native-math"], ["--attention_mechanism", "native-flash"]])
def test_precision_values_that_run_here_resolve(tmp_path, argv, flags) -> None:
    config = resolve(tmp_path, argv + flags).config
    assert getattr(config, flags[0].lstrip("-")) == flags[1]


def test_precision_fp8_is_refused_without_float8_hardware(tmp_path, argv, monkeypatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert error_of(tmp_path, argv + ["--mixed_precision", "fp8"]) == (
        "`--mixed_precision fp8` needs float8 matrix units (an NVIDIA GPU of compute capability 8.9 or newer: Ada, "
        "Hopper, Blackwell); this machine has none (device cpu). Use `--mixed_precision bf16` (or fp16 on GPUs "
        "without bf16)")


@pytest.mark.parametrize("mechanism, message", [
    ("flash-attn", "`--attention_mechanism flash-attn` needs the flash-attn package, which is not installed; install "
                   "it or use `--attention_mechanism diffusers` (PyTorch SDPA)"),
    ("xformers", "`--attention_mechanism xformers` needs the xformers package, which is not installed"),
    ("sageattention", "`--attention_mechanism sageattention` needs the sageattention package, which is not installed"),
    ("sla", "`--attention_mechanism sla`: Sparse-Linear Attention is not part of diffusers' attention dispatcher"),
    ("cudnn", "`--attention_mechanism cudnn` runs only on NVIDIA GPUs, and this machine trains on cpu"),
    ("flex", "`--attention_mechanism flex`: PyTorch's FlexAttention has no backward pass on CPU"),
])
def test_attention_backends_that_cannot_run_here_are_refused(tmp_path, argv, monkeypatch, mechanism, message) -> None:
    import importlib.util

    if importlib.util.find_spec({"flash-attn": "flash_attn", "sageattention": "sageattention"}.get(mechanism, mechanism)):
        pytest.skip(f"{mechanism} is installed here")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert message in error_of(tmp_path, argv + ["--attention_mechanism", mechanism])


def test_attention_sageattention_usage_stays_refused(tmp_path, argv) -> None:
    assert "`--sageattention_usage` is not supported yet" in error_of(tmp_path, argv + ["--sageattention_usage",
                                                                                        "inference"])


def test_precision_vae_dtype_is_refused_for_a_family_without_vae(tmp_path) -> None:
    dataset_list = write_minimal_dataset_list(tmp_path)
    message = error_of(tmp_path, ["--model_family", "deepfloyd", "--output_dir", str(tmp_path / "out"),
                                  "--data_backend_config", str(dataset_list), "--vae_dtype", "fp16"])
    assert message == ("`--vae_dtype fp16` has no effect: the deepfloyd model works on pixels and has no VAE; remove it")


# --- publishing ----------------------------------------------------------------------------------------


def s3_entry(**extra) -> dict:
    return {"provider": "s3", "bucket": "models", "prefix": "runs/a", "access_key_id": "AKIAEXAMPLE",
            "secret_access_key": SECRET, **extra}


def test_publishing_config_inline_and_from_a_file_resolves(tmp_path, argv) -> None:
    config = resolve(tmp_path, argv + ["--publishing_config", json.dumps(s3_entry())]).config
    assert config.publishing_config["bucket"] == "models"
    path = tmp_path / "publishing.json"
    path.write_text(json.dumps([s3_entry(), {"provider": "s3", "bucket": "backup"}]))
    targets = resolve(tmp_path, argv + ["--publishing_config", str(path)]).config.publishing_config  # read at start-up
    assert [target["bucket"] for target in targets] == ["models", "backup"]


@pytest.mark.parametrize("entry, message", [
    ({"provider": "s3"}, "the target: bucket is missing; give the name of the bucket to upload to"),
    ({"provider": "dropbox", "bucket": "x"}, "the target: provider 'dropbox': Dropbox is not supported yet"),
    ({"provider": "ftp", "bucket": "x"}, "the target: provider 'ftp' is unknown; use one of: s3"),
    ({"provider": "s3", "bucket": "x/y"}, "bucket 'x/y' must be a bare bucket name; put the folder part in \"prefix\""),
    ({"provider": "s3", "bucket": "x", "secret_access_key": SECRET},
     "give both access_key_id and secret_access_key, or neither"),
    ({"provider": "s3", "bucket": "x", "acl": "public"}, "the target: unknown key(s) acl; an s3 entry takes"),
])
def test_publishing_config_mistakes_are_named_without_the_secret(tmp_path, argv, entry, message) -> None:
    text = error_of(tmp_path, argv + ["--publishing_config", json.dumps(entry)])
    assert text.startswith("`--publishing_config` (inline JSON): ") and message in text and SECRET not in text


def test_publishing_config_secret_is_redacted_in_the_written_config(tmp_path, argv) -> None:
    from simpletuner.options.secrets import redacted_config

    config = resolve(tmp_path, argv + ["--publishing_config", json.dumps(s3_entry())]).config
    assert SECRET not in json.dumps(redacted_config(config.as_dict()))


@pytest.mark.parametrize("script, message", [
    ("/bin/echo {remote_checkpoint_path} | tee log", "uses shell syntax (pipes, redirections, `;`, `&`, `$`), but "
                                                     "the command runs without a shell"),
    ("/bin/echo {bucket}", "uses unknown placeholder(s) {bucket}; available:"),
    ("/bin/echo 'open", "cannot be split into arguments"),
    ("/bin/echo {global_step:q}", "cannot be filled in"),
    ("  ", "`--post_upload_script` is empty"),
])
def test_publishing_post_upload_script_mistakes(tmp_path, argv, script, message) -> None:
    assert message in error_of(tmp_path, argv + ["--post_upload_script", script])


def test_publishing_post_upload_script_resolves(tmp_path, argv) -> None:
    template = "/bin/echo {remote_checkpoint_path} {global_step:05d} {model_family} {validation_prompt}"
    assert resolve(tmp_path, argv + ["--post_upload_script", template]).config.post_upload_script == template
