"""Secrets stay in memory: webhook user info goes out as HTTP basic auth, delivery failures never print a
credential, and a real run configured with a webhook token, a password, S3 keys and a Hub token leaves
none of them in any file of its output, cache and log folders, in its log records, on its stdout/stderr
or in the ``--dry-run`` printout."""

from __future__ import annotations

import base64
import http.client
import json
import logging
import stat
import urllib.request
from pathlib import Path

import pytest

from simpletuner.tracking.webhooks import WebhookConfigError, WebhookNotifier, parse_targets
from tests.data.test_backend_aws import BUCKET, _upload, endpoint  # noqa: F401 (a local S3 server fixture)
from tests.tracking.conftest import Receiver
from tests.tracking.test_webhooks import free_port

USER = "alice-e2e-user"
PASSWORD = "p4ss-W0rd-e2e-7c1"
QUERY_TOKEN = "qT0ken-31337-query"
WEBHOOK_TOKEN = "wh-T0ken-9f8e7d6c5b4a"
HF_TOKEN = "hf_TestT0kenNeverLogged123"
AWS_KEY_ID = "AKIASECRETKEYID00042"
AWS_SECRET = "sEcReT-aws-e2e-8d7c6b/+x"


def basic_auth(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def user_info_url(port: int, path: str = "notify", user: str = USER, password: str = PASSWORD) -> str:
    return f"http://{user}:{password}@127.0.0.1:{port}/{path}?token={QUERY_TOKEN}"


def post_once(url: str, timeout_s: float = 5) -> WebhookNotifier:
    (target,) = parse_targets({"callback_url": url, "timeout": timeout_s})
    notifier = WebhookNotifier([target])
    notifier.send("progress", "step 1", step=1)
    notifier.close()
    return notifier


def log_texts(caplog) -> str:
    return "\n".join([record.getMessage() for record in caplog.records] + [str(record.args) for record in caplog.records])


# --- delivery with user info ------------------------------------------------------------------------


def test_user_info_is_sent_as_basic_auth_and_not_in_the_request_path(receiver):
    notifier = post_once(user_info_url(receiver.server.server_address[1]))
    assert notifier.delivered == 1 and receiver.events() == ["progress"]
    assert receiver.paths == [f"/notify?token={QUERY_TOKEN}"]  # the query is the endpoint's; user info is not
    assert receiver.headers[0]["Authorization"] == basic_auth(USER, PASSWORD)


def test_percent_encoded_user_info_is_decoded_for_the_header(receiver):
    post_once(user_info_url(receiver.server.server_address[1], user="me%40corp", password="p%40ss%3Aword"))
    assert receiver.headers[0]["Authorization"] == basic_auth("me@corp", "p@ss:word")


def test_a_user_without_password_is_a_token_in_basic_auth(receiver):
    post_once(f"http://{WEBHOOK_TOKEN}@127.0.0.1:{receiver.server.server_address[1]}/x")
    assert receiver.headers[0]["Authorization"] == basic_auth(WEBHOOK_TOKEN, "")


# --- failures never print a credential ---------------------------------------------------------------


def test_unreachable_endpoint_log_hides_user_info_and_tokens(caplog):
    with caplog.at_level(logging.DEBUG, logger="simpletuner"):
        post_once(user_info_url(free_port()), timeout_s=1)
    text = log_texts(caplog)
    assert "could not be reached" in text and "http://***@127.0.0.1:" in text
    for secret in (USER, PASSWORD, QUERY_TOKEN):
        assert secret not in text


def test_http_error_log_hides_user_info(caplog):
    failing = Receiver(status=500)
    try:
        with caplog.at_level(logging.DEBUG, logger="simpletuner"):
            post_once(user_info_url(failing.server.server_address[1]))
    finally:
        failing.close()
    assert failing.headers[0]["Authorization"] == basic_auth(USER, PASSWORD)  # it was delivered, then refused
    text = log_texts(caplog)
    assert "HTTP 500" in text and PASSWORD not in text and USER not in text


ENCODED_PASSWORD = "p%40ss-W0rd-enc"  # "p@ss-W0rd-enc", percent-encoded in the URL as it must be


@pytest.mark.parametrize("password, quoted", [
    (PASSWORD, f"nonnumeric port: '{PASSWORD}@127.0.0.1'"),  # what http.client said for user:pass@ before the fix
    (PASSWORD, "could not open {url}"),
    (PASSWORD, f"bad request line for /notify?token={QUERY_TOKEN}"),
    (ENCODED_PASSWORD, f"auth {USER}:{ENCODED_PASSWORD} refused"),
    (ENCODED_PASSWORD, "auth for p@ss-W0rd-enc refused"),
])
def test_error_texts_quoting_credentials_are_scrubbed(password, quoted, caplog, monkeypatch):
    url = user_info_url(9, password=password)

    def failing_urlopen(request, timeout):
        raise http.client.InvalidURL(quoted.format(url=url))

    monkeypatch.setattr(urllib.request, "urlopen", failing_urlopen)
    with caplog.at_level(logging.WARNING, logger="simpletuner"):
        post_once(url)
    text = log_texts(caplog)
    assert "InvalidURL" in text and "<redacted>" in text
    for secret in (password, "p@ss-W0rd-enc", QUERY_TOKEN, USER, url):
        assert secret not in text


def test_a_url_that_cannot_be_parsed_is_refused_without_echoing_it():
    with pytest.raises(WebhookConfigError) as error:
        parse_targets({"callback_url": f"http://{USER}:{PASSWORD}@127.0.0.1:99999/x?token={QUERY_TOKEN}"})
    message = str(error.value)
    assert "not a valid URL" in message and PASSWORD not in message and QUERY_TOKEN not in message


def test_target_repr_hides_the_url():
    (target,) = parse_targets({"callback_url": user_info_url(9)})
    assert PASSWORD not in repr(target) and QUERY_TOKEN not in repr(target)


# --- a real run ---------------------------------------------------------------------------------------


SECRETS = (USER, PASSWORD, QUERY_TOKEN, WEBHOOK_TOKEN, HF_TOKEN, AWS_KEY_ID, AWS_SECRET)


def leaks(data: bytes | str) -> list[str]:
    """The secrets (plain, percent-encoded or as the basic-auth header value) found in ``data``."""
    from urllib.parse import quote

    text = data if isinstance(data, str) else data.decode("latin-1")
    forms = {secret: {secret, quote(secret, safe="")} for secret in SECRETS}
    forms[PASSWORD].add(basic_auth(USER, PASSWORD).split()[1])
    return [secret for secret, spellings in forms.items() if any(form in text for form in spellings)]


def files_leaking(*folders: Path) -> dict[str, list[str]]:
    found = {}
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and (hits := leaks(path.read_bytes())):
                found[str(path)] = hits
    return found


def secret_run_args(project: Path, work: Path, receiver: Receiver, data_backend_config: Path) -> list[str]:
    from tests.training.conftest import run_args

    port = receiver.server.server_address[1]
    webhooks = [{"webhook_type": "discord", "callback_url": receiver.url(f"api/webhooks/424242/{WEBHOOK_TOKEN}")},
                {"webhook_type": "raw", "callback_url": user_info_url(port)}]
    return run_args(project, "unused", output_dir=work / "out", cache_dir=work / "cache",
                    data_backend_config=data_backend_config, optimizer="optimi-adamw", max_train_steps=2,
                    report_to="tensorboard", webhook_config=json.dumps(webhooks), webhook_reporting_interval=1,
                    checkpoint_step_interval=2, validation_prompt="a red circle on a white background",
                    validation_num_inference_steps=1, validation_step_interval=2,
                    modelspec_comment="uploaded with {env:HF_TOKEN}",
                    model_card_note=f"Endpoint token {WEBHOOK_TOKEN} pasted here by mistake.")


def test_dry_run_prints_no_secret(project, receiver, tmp_path, capfd, monkeypatch):
    from simpletuner.cli import main

    monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
    args = secret_run_args(project, tmp_path, receiver, project / "multidatabackend.json")
    assert main(["train", *args, "--dry-run"]) == 0
    out, err = capfd.readouterr()
    assert "=== resolved config" in out and '"callback_url": "http://***@127.0.0.1:' in out
    assert leaks(out + err) == []


def test_configuration_error_echoing_a_webhook_url_hides_it(project, tmp_path, capfd):
    from simpletuner.cli import main
    from tests.training.conftest import run_args

    broken = f'{{"callback_url": "http://{USER}:{PASSWORD}@127.0.0.1:9/{WEBHOOK_TOKEN}"'  # no closing brace
    assert main(["train", *run_args(project, str(tmp_path / "out"), webhook_config=broken)]) == 2
    out, err = capfd.readouterr()
    assert "configuration error" in err and "webhook_config" in err and "http://***@127.0.0.1:9/***" in err
    assert leaks(out + err) == []


@pytest.mark.slow
def test_run_with_secrets_leaves_none_in_outputs_logs_or_dry_run(project, receiver, endpoint, tmp_path, capfd,
                                                                   caplog, monkeypatch):
    """S3 keys in the dataset entry (a moto server on 127.0.0.1), two webhooks (a token in the path; user
    info and a query token), HF_TOKEN in the environment pulled into ``--modelspec_comment``, a token
    pasted into the model card note: the run uses them all, and writes none of them anywhere."""
    from simpletuner.cli import main

    monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):  # the keys of the dataset entry are the ones used
        monkeypatch.delenv(name, raising=False)
    _upload(endpoint, project / "data", "secrets-run")
    datasets = [{"id": "shapes", "type": "aws", "aws_bucket_name": BUCKET, "aws_data_prefix": "secrets-run",
                 "aws_endpoint_url": endpoint, "aws_region_name": "us-east-1", "aws_access_key_id": AWS_KEY_ID,
                 "aws_secret_access_key": AWS_SECRET, "caption_strategy": "textfile", "resolution": 64,
                 "resolution_type": "pixel"},
                {"id": "text", "dataset_type": "text_embeds", "cache_dir": str(tmp_path / "cache" / "text"),
                 "default": True}]
    dataset_list = tmp_path / "multidatabackend.json"
    dataset_list.write_text(json.dumps(datasets))
    args = secret_run_args(project, tmp_path, receiver, dataset_list)

    with caplog.at_level(logging.DEBUG):
        assert main(["train", *args]) == 0
        assert main(["train", *args, "--dry-run"]) == 0
    out, err = capfd.readouterr()
    output = tmp_path / "out"

    # the secrets were used: both webhooks were delivered, the second with basic auth
    events = [body.get("event") or body["embeds"][0]["title"] for body in receiver.bodies]
    assert {"run_started", "progress", "validation", "checkpoint", "run_finished"} <= set(events)
    assert f"/api/webhooks/424242/{WEBHOOK_TOKEN}" in receiver.paths
    assert f"/notify?token={QUERY_TOKEN}" in receiver.paths
    assert basic_auth(USER, PASSWORD) in [headers.get("Authorization") for headers in receiver.headers]
    # ...and every kind of output exists to be searched
    checkpoint = output / "checkpoint-2"
    for written in (output / "training_config.json", output / "README.md", output / "pytorch_lora_weights.safetensors",
                    checkpoint / "training_state.json", checkpoint / "pytorch_lora_weights.safetensors"):
        assert written.is_file(), written
    assert list((output / "logs").rglob("events.out.tfevents.*"))
    assert "uploaded with <redacted>" in (output / "pytorch_lora_weights.safetensors").read_bytes().decode("latin-1")

    assert files_leaking(output, tmp_path / "cache") == {}
    assert leaks(out + err) == [] and leaks(log_texts(caplog)) == []
    saved = json.loads((output / "training_config.json").read_text())
    assert [hook["callback_url"] for hook in saved["webhook_config"]] == [
        f"{receiver.base}/***", f"http://***@127.0.0.1:{receiver.server.server_address[1]}/***"]
    assert stat.S_IMODE((output / "training_config.json").stat().st_mode) == 0o600
    assert "=== resolved config" in out
