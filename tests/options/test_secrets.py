"""The one redaction rule (simpletuner/options/secrets.py) on its own: which names are secrets, how URLs
and nested configs are masked, and the printed launch line. No model, no torch."""

from __future__ import annotations

import json
import os
import stat

import pytest

from simpletuner.options.secrets import (
    MASK,
    environment_secrets,
    is_secret_key,
    mask_url_credentials,
    redact_url,
    redact_value,
    redacted_argv,
    redacted_config,
    redact_urls_in_text,
    scrub_text,
    secret_values,
    split_userinfo,
    url_secrets,
    write_private_json,
)

DISCORD_TOKEN = "Xy9-discord-T0ken_abcdef0123456789"
PASSWORD = "hunter2-pw"


@pytest.mark.parametrize("name", [
    "hub_token", "HF_TOKEN", "--hub-token", "aws_secret_access_key", "aws_access_key_id", "aws_session_token",
    "client_secret", "api_key", "WANDB_API_KEY", "password", "db_password", "private_key_path", "token",
])
def test_secret_names(name):
    assert is_secret_key(name)


@pytest.mark.parametrize("name", [
    "tokenizer_max_length", "webhook_config", "aws_bucket_name", "aws_endpoint_url", "aws_max_pool_connections",
    "keyword", "monkey", "validation_prompt", "output_dir", "callback_url",
])
def test_ordinary_names(name):
    assert not is_secret_key(name)


def test_no_declared_option_is_named_like_a_secret_by_accident():
    """A declared option caught by the rule would be masked in every saved config: the rule must only
    catch options that really hold secrets (there are none today; a future ``--hub_token`` would be)."""
    from simpletuner.options import all_options

    assert [option.name for option in all_options() if is_secret_key(option.name)] == []


# --- URLs -------------------------------------------------------------------------------------------


def test_redact_url_keeps_scheme_and_host_and_marks_user_info():
    assert redact_url(f"https://discord.com/api/webhooks/123/{DISCORD_TOKEN}?wait=true") == "https://discord.com/***"
    assert redact_url(f"http://alice:{PASSWORD}@127.0.0.1:8080/hook") == "http://***@127.0.0.1:8080/***"
    assert redact_url("http://127.0.0.1:9000") == "http://127.0.0.1:9000"
    assert redact_url("http://[::1]:81/x") == "http://[::1]:81/***"
    assert redact_url("http://host:notaport/x") == "<url hidden>"
    assert redact_url("not a url") == "<url hidden>"


def test_mask_url_credentials_masks_user_info_tokens_and_webhook_paths():
    assert (mask_url_credentials(f"https://alice:{PASSWORD}@example.com/api/webhooks/42/{DISCORD_TOKEN}?wait=true")
            == "https://***@example.com/api/webhooks/***/***?wait=true")
    assert (mask_url_credentials("https://example.com/notify?token=abc123&channel=7&api_key=k")
            == "https://example.com/notify?token=***&channel=7&api_key=***")
    assert (mask_url_credentials("https://b.s3.amazonaws.com/k.png?X-Amz-Signature=dead&X-Amz-Expires=60")
            == "https://b.s3.amazonaws.com/k.png?X-Amz-Signature=***&X-Amz-Expires=60")
    assert mask_url_credentials("https://hooks.slack.com/services/T0/B0/XXXX") == "https://hooks.slack.com/***/***/***/***"
    # nothing secret: kept exactly, so model URLs and S3 endpoints stay useful
    for kept in ("https://huggingface.co/org/model/resolve/main/unet.safetensors", "http://127.0.0.1:9000",
                 "/home/me/hooks/model", "org/model"):
        assert mask_url_credentials(kept) == kept


def test_urls_in_free_text_are_cut_to_their_host():
    text = f"`webhook_config` = '{{\"callback_url\": \"http://alice:{PASSWORD}@h:9/x/{DISCORD_TOKEN}\"' is not JSON"
    assert redact_urls_in_text(text) == "`webhook_config` = '{\"callback_url\": \"http://***@h:9/***\"' is not JSON"
    assert redact_urls_in_text("see https://example.com for help") == "see https://example.com for help"


def test_split_userinfo_decodes_and_strips():
    assert split_userinfo("http://us%40er:p%3Ass@127.0.0.1:99/a?b=1") == ("http://127.0.0.1:99/a?b=1", "us@er", "p:ss")
    assert split_userinfo("https://token@host/x") == ("https://host/x", "token", None)
    assert split_userinfo("https://host/x") == ("https://host/x", None, None)


def test_url_secrets_cover_every_part_an_error_could_quote():
    url = f"http://alice:{PASSWORD}@127.0.0.1:99/hook/123456/{DISCORD_TOKEN}?token=q-tok"
    found = url_secrets(url)
    assert {url, PASSWORD, "alice", DISCORD_TOKEN, "q-tok", f"/hook/123456/{DISCORD_TOKEN}"} <= found
    assert "123456" not in found  # numeric ids are not secret and too common to scrub
    text = f"nonnumeric port: '{PASSWORD}@127.0.0.1'; url {url}"
    assert PASSWORD not in scrub_text(text, found) and DISCORD_TOKEN not in scrub_text(text, found)


# --- configs ----------------------------------------------------------------------------------------


def test_redacted_config_masks_nested_datasets_webhooks_and_secret_named_options():
    hook = f"https://discord.com/api/webhooks/42/{DISCORD_TOKEN}"
    config = {
        "webhook_config": [{"webhook_type": "discord", "callback_url": hook},
                           {"webhook_type": "raw", "callback_url": f"http://alice:{PASSWORD}@127.0.0.1:9/x"}],
        "datasets": [{"id": "s3", "type": "aws", "aws_bucket_name": "bucket", "aws_endpoint_url": "http://127.0.0.1:9000",
                      "aws_access_key_id": "AKIAEXAMPLEKEY", "aws_secret_access_key": "s3cr3t/aws+key"},
                     {"id": "local", "nested": {"deeper": [{"client_secret": "cs-123456"}]}}],
        "hub_token": "hf_abcdefghij", "my_api_key": 12345678, "signing_secret": "sig-secret-1",
        "use_auth_token": True, "learning_rate": 1e-4, "output_dir": "/runs/a",
        "model_card_note": f"pasted by mistake: {DISCORD_TOKEN}",
        "inline": json.dumps({"callback_url": hook}),
    }
    redacted = redacted_config(config, environ={})
    assert redacted["webhook_config"][0]["callback_url"] == "https://discord.com/***"
    assert redacted["webhook_config"][1]["callback_url"] == "http://***@127.0.0.1:9/***"
    s3 = redacted["datasets"][0]
    assert (s3["aws_access_key_id"], s3["aws_secret_access_key"]) == (MASK, MASK)
    assert (s3["aws_bucket_name"], s3["aws_endpoint_url"]) == ("bucket", "http://127.0.0.1:9000")
    assert redacted["datasets"][1]["nested"]["deeper"][0]["client_secret"] == MASK
    assert [redacted[key] for key in ("hub_token", "my_api_key", "signing_secret")] == [MASK] * 3
    assert (redacted["use_auth_token"], redacted["learning_rate"], redacted["output_dir"]) == (True, 1e-4, "/runs/a")
    assert redacted["model_card_note"] == f"pasted by mistake: {MASK}"
    assert json.loads(redacted["inline"]) == {"callback_url": "https://discord.com/***"}
    text = json.dumps(redacted)
    for secret in (DISCORD_TOKEN, PASSWORD, "AKIAEXAMPLEKEY", "s3cr3t/aws+key", "cs-123456", "hf_abcdefghij",
                   "12345678", "sig-secret-1"):
        assert secret not in text, secret
    assert config["hub_token"] == "hf_abcdefghij"  # the in-memory config keeps the secret for its use


def test_secret_values_of_the_environment_are_scrubbed_from_any_value():
    environ = {"HF_TOKEN": "hf_environmentToken99", "PATH": "/usr/bin", "SHORT_TOKEN": "abc"}
    assert environment_secrets(environ) == {"hf_environmentToken99"}
    redacted = redacted_config({"modelspec_comment": "uploaded with hf_environmentToken99"}, environ=environ)
    assert redacted == {"modelspec_comment": f"uploaded with {MASK}"}


def test_secret_values_collects_what_scrubbing_looks_for():
    found = secret_values({"a_token": "tok-value-1", "url": "https://u:pw-12345@host/x?sig=s1g-v4lue",
                           "plain": "https://example.com/model", "callback_url": "https://h.example/p/tok-2"})
    assert {"tok-value-1", "pw-12345", "s1g-v4lue", "/p/tok-2", "https://h.example/p/tok-2"} <= found
    assert not any("example.com/model" in value for value in found)


def test_redact_value_leaves_empty_and_boolean_values_alone():
    assert [redact_value("hub_token", value) for value in (None, "", [], {}, True)] == [None, "", [], {}, True]
    assert redact_value("hub_token", ["a", "b"]) == MASK


def test_redacted_argv_masks_secret_flags_and_inline_webhooks():
    hook = json.dumps({"callback_url": f"https://discord.com/api/webhooks/42/{DISCORD_TOKEN}"})
    shown = redacted_argv(["python", "-m", "simpletuner.cli", "train", "--hub_token", "hf_abcdef",
                           f"--client_secret={PASSWORD}", "--webhook_config", hook, "--webhook_config", "hooks.json",
                           "--learning_rate", "1e-4", "--multi_gpu"])
    assert shown[:5] == ["python", "-m", "simpletuner.cli", "train", "--hub_token"]
    assert shown[5] == MASK and shown[6] == f"--client_secret={MASK}"
    assert json.loads(shown[8]) == {"callback_url": "https://discord.com/***"}
    assert shown[9:] == ["--webhook_config", "hooks.json", "--learning_rate", "1e-4", "--multi_gpu"]


def test_printed_launch_command_is_redacted():
    from simpletuner.training.launch import printable_command

    line = printable_command(["python", "-m", "simpletuner.cli", "train", "--webhook_config",
                              json.dumps({"callback_url": f"http://alice:{PASSWORD}@h/x"})], {"A": "1"})
    assert PASSWORD not in line and "alice" not in line and line.startswith("A=1 python -m simpletuner.cli")


def test_private_json_is_owner_only_even_over_an_existing_file(tmp_path):
    path = tmp_path / "training_config.json"
    path.write_text("{}")
    os.chmod(path, 0o644)
    write_private_json(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_bare_webhook_url_is_refused_without_echoing_it():
    from simpletuner.options import ConfigError
    from simpletuner.options.reporting_rules import check_webhook_config

    class Config:
        webhook_config = f"https://discord.com/api/webhooks/42/{DISCORD_TOKEN}"

    with pytest.raises(ConfigError) as error:
        check_webhook_config(Config())
    assert DISCORD_TOKEN not in str(error.value)
    assert "https://discord.com/*** is a URL, not a webhook object" in str(error.value)


def test_wizard_change_summary_redacts_values():
    from types import SimpleNamespace

    from simpletuner.configure.write import describe_changes

    hook = [{"webhook_type": "raw", "callback_url": f"http://alice:{PASSWORD}@127.0.0.1:9/x"}]
    draft = SimpleNamespace(config_path="config.json", originals={"config.json": "", "d": "", "e": ""},
                            original_config={"webhook_config": None}, config={"webhook_config": hook, "hub_token": "x"},
                            dataset_path="d", datasets=[], original_datasets=[], env_path="e", env_lines=[],
                            original_env_lines=[])
    lines = describe_changes(draft)
    assert PASSWORD not in "\n".join(lines)
    assert 'config.json: add hub_token = "<redacted>"' in lines
