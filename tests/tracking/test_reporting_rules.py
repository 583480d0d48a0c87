"""Config-time rules for --webhook_config and --webhook_reporting_interval (torch-free)."""

from __future__ import annotations

import json

import pytest

from simpletuner.options import ConfigError
from simpletuner.options.resolve import resolve_run
from simpletuner.testing.config import make_config

BASE = ["--model_family", "sd1x", "--pretrained_model_name_or_path", "m", "--output_dir", "out",
        "--data_backend_config", "d.json", "--model_type", "lora"]


def check(**flags):
    from simpletuner.options.reporting_rules import REPORTING_RULES

    config = make_config(**flags)
    for rule in REPORTING_RULES:
        rule(config)


def test_good_configs_pass(tmp_path):
    check(webhook_config={"webhook_type": "discord", "callback_url": "https://discord.com/api/webhooks/1/x"},
          webhook_reporting_interval=5)
    path = tmp_path / "hooks.json"
    path.write_text(json.dumps([{"callback_url": "http://127.0.0.1:8000/a"}]))
    check(webhook_config=str(path))
    check()


def test_malformed_json_file_names_the_flag_and_file(tmp_path):
    path = tmp_path / "hooks.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match=r"`--webhook_config`.*hooks\.json.*malformed JSON"):
        check(webhook_config=str(path))


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"`--webhook_config`.*neither inline JSON nor an existing JSON file"):
        check(webhook_config=str(tmp_path / "nope.json"))


def test_unknown_type_is_refused():
    with pytest.raises(ConfigError, match=r"`--webhook_config`.*webhook_type 'teams' is unknown.*raw, discord"):
        check(webhook_config={"webhook_type": "teams", "callback_url": "https://x.example/a"})


def test_non_http_url_is_refused_without_showing_it():
    with pytest.raises(ConfigError, match=r"http:// or https://") as error:
        check(webhook_config=[{"callback_url": "file:///etc/secret-path"}])
    assert "secret-path" not in str(error.value)


@pytest.mark.parametrize("interval", [0, -3])
def test_interval_below_one_is_refused(interval):
    with pytest.raises(ConfigError, match=rf"`--webhook_reporting_interval` = {interval} must be at least 1"):
        check(webhook_config={"callback_url": "https://x.example/a"}, webhook_reporting_interval=interval)


def test_rules_run_in_validation(tmp_path):
    bad = json.dumps({"webhook_type": "teams", "callback_url": "https://x.example/a"})
    with pytest.raises(ConfigError, match="webhook_type 'teams'"):
        resolve_run([*BASE, "--webhook_config", bad])
    with pytest.raises(ConfigError, match="webhook_reporting_interval"):
        resolve_run([*BASE, "--webhook_config", json.dumps({"callback_url": "https://x.example/a"}),
                     "--webhook_reporting_interval", "0"])


def test_inline_json_that_does_not_parse_names_the_flag():
    with pytest.raises(ConfigError, match="webhook_config"):
        resolve_run([*BASE, "--webhook_config", "{broken"])


def test_interval_without_a_webhook_is_refused():
    with pytest.raises(ConfigError, match="no effect without `--webhook_config`"):
        check(webhook_reporting_interval=5)
