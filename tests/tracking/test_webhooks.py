"""--webhook_config / --webhook_reporting_interval: the message bodies and sender on their own, then real
4-step runs of the tiny sd1x model posting to a local receiver."""

from __future__ import annotations

import json
import logging
import socket

import pytest

from simpletuner.tracking.webhooks import (
    WebhookConfigError,
    WebhookNotifier,
    WebhookTarget,
    discord_body,
    parse_targets,
    redact_url,
)
from tests.tracking.conftest import Receiver

SECRET = "hook/123456/s3cr3t-t0ken"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- configuration and bodies (no model) ------------------------------------------------------------


def test_parse_one_object_or_a_list():
    single = parse_targets({"webhook_type": "discord", "callback_url": "https://discord.com/api/webhooks/1/x",
                            "message_prefix": "run-a", "log_level": "ERROR"})
    assert single == [WebhookTarget("discord", "https://discord.com/api/webhooks/1/x", "run-a", "error")]
    many = parse_targets([{"callback_url": "http://127.0.0.1:9/a"}, {"webhook_type": "raw",
                                                                     "callback_url": "https://x.example/b"}])
    assert [t.webhook_type for t in many] == ["raw", "raw"] and many[0].log_level == "info"


@pytest.mark.parametrize("entry, words", [
    ({"webhook_type": "slack", "callback_url": "https://x.example/a"}, "webhook_type 'slack' is unknown"),
    ({"webhook_type": "raw"}, "callback_url is missing"),
    ({"callback_url": "ftp://x.example/a"}, "must be an http:// or https:// URL"),
    ({"callback_url": "https://x.example/a", "log_level": "loud"}, "log_level 'loud' is unknown"),
    ("https://x.example/a", "must be a JSON object"),
])
def test_bad_entries_are_refused(entry, words):
    with pytest.raises(WebhookConfigError, match=words):
        parse_targets([entry])


def test_redacted_url_keeps_only_scheme_and_host():
    assert redact_url(f"https://discord.com/api/webhooks/{SECRET}?wait=true") == "https://discord.com/***"
    assert redact_url(f"http://127.0.0.1:8080/{SECRET}") == "http://127.0.0.1:8080/***"


def test_discord_body_has_content_and_one_embed():
    target = WebhookTarget("discord", "https://discord.com/api/webhooks/1/x", message_prefix="my-run")
    event = {"event": "progress", "level": "info", "message": "step 2/4, loss 0.1", "job_id": "job-7",
             "timestamp": "2026-01-01T00:00:00+00:00", "data": {"step": 2, "loss": 0.125, "grids": ["/a.png"],
                                                               "skipped": None}}
    body = discord_body(event, target)
    assert body["content"] == "**my-run** step 2/4, loss 0.1"
    (embed,) = body["embeds"]
    fields = {f["name"]: f["value"] for f in embed["fields"]}
    assert fields == {"step": "2", "loss": "0.125", "grids": "/a.png", "job_id": "job-7"}
    assert embed["title"] == "progress" and isinstance(embed["color"], int)


def test_log_level_filters_events(receiver):
    notifier = WebhookNotifier([WebhookTarget("raw", receiver.url(), log_level="error")])
    notifier.send("progress", "step 1", step=1)
    notifier.send("run_failed", "boom", error="boom")
    notifier.close()
    assert receiver.events() == ["run_failed"]


def test_job_id_comes_from_the_environment(receiver, monkeypatch):
    monkeypatch.setenv("SIMPLETUNER_JOB_ID", "nightly-7")
    notifier = WebhookNotifier([WebhookTarget("raw", receiver.url(), message_prefix="pre")])
    notifier.send("checkpoint", "saved", step=3)
    notifier.close()
    (body,) = receiver.bodies
    assert body["job_id"] == "nightly-7" and body["message_prefix"] == "pre" and body["data"] == {"step": 3}


def test_dead_endpoint_warns_once_without_raising_or_leaking_the_url(caplog):
    url = f"http://127.0.0.1:{free_port()}/{SECRET}"
    notifier = WebhookNotifier([WebhookTarget("raw", url, timeout_s=1)])
    with caplog.at_level(logging.DEBUG, logger="simpletuner"):
        for step in range(3):
            notifier.send("progress", f"step {step}", step=step)
        notifier.close()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "webhook" in r.getMessage()]
    assert len(warnings) == 1 and "could not be reached" in warnings[0].getMessage()
    assert all(SECRET not in r.getMessage() for r in caplog.records)


def test_slow_endpoint_does_not_block_send():
    import time

    notifier = WebhookNotifier([WebhookTarget("raw", f"http://127.0.0.1:{free_port()}/{SECRET}", timeout_s=1)])
    started = time.perf_counter()
    for step in range(50):
        notifier.send("progress", "x", step=step)
    assert time.perf_counter() - started < 0.5
    notifier.close(timeout=0.1)


# --- real runs --------------------------------------------------------------------------------------


def run(project, output, webhook, **flags):
    from simpletuner.training.trainer import train
    from tests.training.conftest import config_for

    config = config_for(project, output, **{"max_train_steps": 4, **flags}, webhook_config=json.dumps(webhook))
    return train(config, show_progress=False)


def test_run_posts_start_progress_checkpoint_and_finish(project, receiver, caplog):
    with caplog.at_level(logging.DEBUG):
        trainer = run(project, "hooked", {"webhook_type": "raw", "callback_url": receiver.url()},
                      webhook_reporting_interval=2, checkpoint_step_interval=4)
    events = receiver.events()
    assert events == ["run_started", "progress", "progress", "checkpoint", "run_finished"]
    by_event = {}
    for body in receiver.bodies:
        by_event.setdefault(body["event"], []).append(body)
    started = by_event["run_started"][0]["data"]
    assert started["model_family"] == "sd1x" and started["max_steps"] == 4 and started["model_type"] == "lora"
    progress = [body["data"] for body in by_event["progress"]]
    assert [p["step"] for p in progress] == [2, 4]
    assert [p["num_images_seen"] for p in progress] == [4, 8]  # batch 2
    assert progress[1]["loss"] == pytest.approx(trainer.state.losses[3])
    assert all(p["lr"] > 0 and p["seconds_per_step"] > 0 for p in progress)
    checkpoint = by_event["checkpoint"][0]["data"]
    assert checkpoint["step"] == 4 and checkpoint["path"].endswith("checkpoint-4")
    finished = by_event["run_finished"][0]["data"]
    assert finished["step"] == 4 and finished["num_images_seen"] == 8
    assert receiver.paths and all(path == "/" + SECRET for path in receiver.paths)
    assert all(SECRET not in record.getMessage() for record in caplog.records)


def test_discord_run_posts_discord_bodies(project, receiver):
    run(project, "discord", [{"webhook_type": "discord", "callback_url": receiver.url(), "message_prefix": "tiny"}],
        max_train_steps=2, webhook_reporting_interval=1)
    assert len(receiver.bodies) == 4  # start, two progress messages, finish
    for body in receiver.bodies:
        assert set(body) == {"content", "embeds"} and body["content"].startswith("**tiny** ")
        assert body["embeds"][0]["fields"]
    assert receiver.bodies[0]["embeds"][0]["title"] == "run started"
    assert receiver.bodies[-1]["embeds"][0]["title"] == "run finished"


def test_server_errors_do_not_fail_the_run_and_are_warned_once(project, caplog):
    failing = Receiver(status=500)
    try:
        with caplog.at_level(logging.WARNING):
            trainer = run(project, "http500", {"callback_url": failing.url()}, webhook_reporting_interval=1)
    finally:
        failing.close()
    assert trainer.state.global_step == 4
    assert len(failing.bodies) == 6  # every event was still attempted
    warnings = [r.getMessage() for r in caplog.records if "webhook" in r.getMessage() and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "HTTP 500" in warnings[0] and SECRET not in warnings[0]


def test_dead_server_does_not_fail_the_run(project, caplog):
    url = f"http://127.0.0.1:{free_port()}/{SECRET}"
    with caplog.at_level(logging.WARNING):
        trainer = run(project, "dead", {"callback_url": url, "timeout": 1}, max_train_steps=2,
                      webhook_reporting_interval=1)
    assert trainer.state.global_step == 2
    warnings = [r.getMessage() for r in caplog.records if "webhook" in r.getMessage() and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and SECRET not in warnings[0]


def test_failing_run_sends_the_failure(project, receiver):
    from tests.training.conftest import Interrupted, crash_after_step

    with crash_after_step(1), pytest.raises(Interrupted):
        run(project, "failing", {"callback_url": receiver.url()}, max_train_steps=3)
    assert receiver.events() == ["run_started", "run_failed"]
    failure = receiver.bodies[-1]
    assert failure["level"] == "error" and failure["data"]["error_type"] == "Interrupted"
    assert failure["data"]["step"] == 1


def test_validation_event_lists_the_grid(project, receiver):
    run(project, "validated", {"callback_url": receiver.url()}, max_train_steps=2,
        validation_prompt="a red circle on a white background", validation_num_inference_steps=1,
        validation_step_interval=2)
    validations = [body for body in receiver.bodies if body["event"] == "validation"]
    assert validations and validations[0]["data"]["step"] == 2
    grids = validations[0]["data"]["grids"]
    assert grids and all(path.endswith(".png") and "grid_" in path for path in grids)
