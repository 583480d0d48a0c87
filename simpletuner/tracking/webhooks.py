"""Webhook notifications (``--webhook_config``, ``--webhook_reporting_interval``).

A run posts a small JSON message to every configured target when it starts, every N optimizer steps,
when validation images or a checkpoint are written, and when it finishes or fails. Two target kinds:

* ``raw``: the event itself as a JSON object (``event``, ``level``, ``message``, ``job_id``, ``data``...),
  for custom dashboards and monitoring tools;
* ``discord``: a Discord incoming-webhook body (``content`` plus one embed whose fields hold the numbers).

Posting happens on one daemon thread fed by a bounded queue, with a short timeout per request, so a slow
or dead endpoint never holds up training. A failure is logged once per target and kind of failure; the
target URL is never logged in full (it usually embeds a secret token): log lines show scheme and host,
and error texts are scrubbed of every part of the URL (simpletuner/options/secrets.py). A URL with
``user:password@`` is posted to without the user info, which goes in an HTTP basic ``Authorization``
header instead. Only the standard library is used. Parsing and checking the configuration is torch-free
so the option rules can share it.
"""

from __future__ import annotations

import base64
import datetime as _dt
import json
import logging
import os
import queue
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from simpletuner.options.secrets import redact_url, scrub_text, split_userinfo, url_secrets

logger = logging.getLogger(__name__)

WEBHOOK_TYPES = ("raw", "discord")
LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}
#: Event name -> its level (a target's ``log_level`` drops events below it).
EVENT_LEVELS = {
    "run_started": "info", "progress": "info", "validation": "info", "checkpoint": "info",
    "run_finished": "info", "run_failed": "error",
}
DEFAULT_TIMEOUT_S = 5.0
#: The longest the end of a run waits for queued messages to go out.
FLUSH_TIMEOUT_S = 10.0
QUEUE_SIZE = 256
DISCORD_CONTENT_LIMIT = 2000
_DISCORD_COLOURS = {"info": 0x3B82F6, "error": 0xDC2626, "warning": 0xF59E0B, "debug": 0x9CA3AF, "critical": 0x7F1D1D}


class WebhookConfigError(ValueError):
    """A webhook entry that cannot be used; the message names the field and the fix."""


@dataclass(frozen=True)
class WebhookTarget:
    webhook_type: str
    callback_url: str = field(repr=False)  # holds the secret; ``safe_url`` is what may be shown
    message_prefix: str | None = None
    log_level: str = "info"
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def safe_url(self) -> str:
        return redact_url(self.callback_url)

    def accepts(self, level: str) -> bool:
        return LEVELS[level] >= LEVELS[self.log_level]

    def request_url_and_headers(self) -> tuple[str, dict[str, str]]:
        """The URL to post to (without user info) and the headers, with HTTP basic auth when the
        configured URL has ``user:password@``: urllib would otherwise take the user info for part of
        the host name and never deliver."""
        url, user, password = split_userinfo(self.callback_url)
        headers = {"Content-Type": "application/json", "User-Agent": "simpletuner-webhook"}
        if user is not None:
            pair = f"{user}:{password or ''}".encode("utf-8")
            headers["Authorization"] = "Basic " + base64.b64encode(pair).decode("ascii")
        return url, headers


def _check_url(where: str, url: str) -> None:
    """An http(s) URL with a host and, if given, a numeric port; the message shows it redacted."""
    try:
        parts = urlsplit(url)
        host, _port = parts.hostname, parts.port
    except ValueError:
        raise WebhookConfigError(f"{where}: callback_url {redact_url(url)} is not a valid URL (a bad port or "
                                 "bracketed host); percent-encode special characters in a user name or "
                                 "password") from None
    if parts.scheme not in ("http", "https") or not host:
        scheme = parts.scheme or "no scheme"
        raise WebhookConfigError(f"{where}: callback_url must be an http:// or https:// URL (got {scheme}, "
                                 f"{redact_url(url)})")


def parse_targets(raw: Any) -> list[WebhookTarget]:
    """Targets from the parsed JSON: one object or a list of objects. Raises :class:`WebhookConfigError`."""
    entries = raw if isinstance(raw, list) else [raw]
    if not entries:
        raise WebhookConfigError("the list of webhooks is empty; give at least one object or unset the option")
    targets = []
    for index, entry in enumerate(entries):
        where = f"webhook #{index}" if isinstance(raw, list) else "the webhook"
        if not isinstance(entry, dict):
            raise WebhookConfigError(f"{where} must be a JSON object with webhook_type and callback_url, "
                                     f"got {type(entry).__name__}")
        kind = str(entry.get("webhook_type", "raw")).lower()
        if kind not in WEBHOOK_TYPES:
            raise WebhookConfigError(f"{where}: webhook_type {entry.get('webhook_type')!r} is unknown; "
                                     f"use one of: {', '.join(WEBHOOK_TYPES)}")
        url = entry.get("callback_url")
        if not isinstance(url, str) or not url:
            raise WebhookConfigError(f"{where}: callback_url is missing; give the http(s) URL to post to")
        _check_url(where, url)
        level = str(entry.get("log_level", "info")).lower()
        if level not in LEVELS:
            raise WebhookConfigError(f"{where}: log_level {entry.get('log_level')!r} is unknown; "
                                     f"use one of: {', '.join(LEVELS)}")
        prefix = entry.get("message_prefix")
        timeout = entry.get("timeout", DEFAULT_TIMEOUT_S)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= 60:
            raise WebhookConfigError(f"{where}: timeout {timeout!r} must be a number of seconds in (0, 60]")
        targets.append(WebhookTarget(kind, url, None if prefix is None else str(prefix), level, float(timeout)))
    return targets


def load_targets(value: Any) -> list[WebhookTarget]:
    """Targets from the option's value (parsed inline JSON, or a path to a JSON file)."""
    from simpletuner.options.values import read_json_option

    return parse_targets(read_json_option("webhook_config", value))


# --- message bodies ---------------------------------------------------------------------------------


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return "\n".join(str(v) for v in value) or "-"
    return str(value)


def raw_body(event: dict, target: WebhookTarget) -> dict:
    body = dict(event)
    if target.message_prefix:
        body["message_prefix"] = target.message_prefix
    return body


def discord_body(event: dict, target: WebhookTarget) -> dict:
    """``content`` (prefix and message, within Discord's 2000 characters) and one embed with the data."""
    prefix = f"**{target.message_prefix}** " if target.message_prefix else ""
    content = f"{prefix}{event['message']}"
    if len(content) > DISCORD_CONTENT_LIMIT:
        content = content[: DISCORD_CONTENT_LIMIT - 1] + "…"
    fields = [{"name": str(name)[:256], "value": _format_value(value)[:1024] or "-",
               "inline": not isinstance(value, (list, tuple))}
              for name, value in event["data"].items() if value is not None][:25]
    if event.get("job_id"):
        fields.append({"name": "job_id", "value": str(event["job_id"])[:1024], "inline": True})
    embed = {"title": event["event"].replace("_", " "), "color": _DISCORD_COLOURS[event["level"]],
             "fields": fields, "timestamp": event["timestamp"]}
    return {"content": content, "embeds": [embed]}


BODIES = {"raw": raw_body, "discord": discord_body}


# --- the sender -------------------------------------------------------------------------------------


class NullNotifier:
    """What non-main processes and runs without ``--webhook_config`` get: every call does nothing."""

    interval: int | None = None

    def send(self, event: str, message: str, **data: Any) -> None:
        pass

    def progress_due(self, step: int) -> bool:
        return False

    def close(self, timeout: float = FLUSH_TIMEOUT_S) -> None:
        pass


class WebhookNotifier(NullNotifier):
    """Queues events and posts them from a background thread; never raises into the caller."""

    def __init__(self, targets: list[WebhookTarget], interval: int | None = None, run_name: str | None = None):
        self.targets = targets
        self.interval = interval
        self.run_name = run_name
        self.job_id = os.environ.get("SIMPLETUNER_JOB_ID") or None
        self._queue: queue.Queue = queue.Queue(maxsize=QUEUE_SIZE)
        self._warned: set[tuple] = set()
        self._closed = False
        self.delivered = 0
        self._thread = threading.Thread(target=self._worker, name="simpletuner-webhooks", daemon=True)
        self._thread.start()

    def progress_due(self, step: int) -> bool:
        return bool(self.interval) and step > 0 and step % self.interval == 0

    def send(self, event: str, message: str, **data: Any) -> None:
        try:
            level = EVENT_LEVELS.get(event, "info")
            payload = {
                "event": event, "level": level, "message": message, "job_id": self.job_id,
                "run_name": self.run_name,
                "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "data": data,
            }
            if self._closed:
                return
            self._queue.put_nowait(payload)
        except queue.Full:
            self._warn_once(("queue",), "webhook queue is full (the endpoints are too slow); dropping %s events",
                            event)
        except Exception as error:  # a bad value in ``data`` must not stop training
            self._warn_once(("build", type(error).__name__), "could not build the webhook %s event: %s", event, error)

    def close(self, timeout: float = FLUSH_TIMEOUT_S) -> None:
        """Send what is queued (waiting at most ``timeout`` seconds), then stop the thread."""
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + timeout
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            pass
        self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            logger.warning("webhook messages still unsent after %.0f s at the end of the run; giving up on them",
                           timeout)

    def _worker(self) -> None:
        while True:
            payload = self._queue.get()
            if payload is None:
                return
            for index, target in enumerate(self.targets):
                if target.accepts(payload["level"]):
                    self._post(index, target, payload)

    def _post(self, index: int, target: WebhookTarget, payload: dict) -> None:
        try:
            body = json.dumps(BODIES[target.webhook_type](payload, target), default=str).encode("utf-8")
            url, headers = target.request_url_and_headers()
            request = urllib.request.Request(url, data=body, method="POST", headers=headers)
            started = time.monotonic()
            with urllib.request.urlopen(request, timeout=target.timeout_s) as response:  # noqa: S310 (checked)
                response.read(1024)
            self.delivered += 1
            logger.debug("webhook %s: %s delivered in %.2f s", target.safe_url, payload["event"],
                         time.monotonic() - started)
        except urllib.error.HTTPError as error:
            self._warn_once((index, "http", error.code), "webhook %s answered HTTP %d to a %s event; "
                            "further failures like this are not logged", target.safe_url, error.code,
                            payload["event"])
        except Exception as error:  # URLError, timeouts, connection resets: all non-fatal
            reason = getattr(error, "reason", error)
            self._warn_once((index, "io", type(reason).__name__),
                            "webhook %s could not be reached (%s: %s); further failures like this are not logged",
                            target.safe_url, type(reason).__name__, _scrub(str(reason), target.callback_url))

    def _warn_once(self, key: tuple, message: str, *args: Any) -> None:
        if key in self._warned:
            return
        self._warned.add(key)
        logger.warning(message, *args)


#: Parts of a URL shorter than this stay in an error text (scrubbing "a" would garble the line).
_SCRUB_MIN_LENGTH = 3


def _scrub(text: str, url: str) -> str:
    """An error text without any part of the URL that may be secret (the URL, its user name and
    password, path and query, in plain or percent-encoded form)."""
    return scrub_text(text, url_secrets(url), min_length=_SCRUB_MIN_LENGTH) if url else text


def build_notifier(config, is_main_process: bool) -> NullNotifier:
    """The notifier for ``--webhook_config``; a do-nothing one when unset or on non-main processes."""
    if not is_main_process or config.webhook_config in (None, "", [], {}):
        return NullNotifier()
    try:
        targets = load_targets(config.webhook_config)
    except Exception as error:  # validated at config time; a file changed since must not stop the run
        logger.warning("--webhook_config unusable, webhooks disabled: %s", error)
        return NullNotifier()
    logger.info("webhooks: %s", ", ".join(f"{t.webhook_type} {t.safe_url}" for t in targets))
    return WebhookNotifier(targets, interval=config.webhook_reporting_interval, run_name=config.tracker_run_name)
