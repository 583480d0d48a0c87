"""Validation rules for the reporting options: ``--webhook_config`` and ``--webhook_reporting_interval``.

Torch-free: a webhook entry that could never be delivered (bad JSON, unknown type, a URL that is not
http(s)) stops the run at start-up, not silently hours later. URLs are shown redacted in errors.
"""

from __future__ import annotations

from typing import Callable

from simpletuner.options import ConfigError
from simpletuner.options.secrets import looks_like_url, redact_url
from simpletuner.tracking.webhooks import WEBHOOK_TYPES, WebhookConfigError, load_targets


def check_webhook_config(config) -> None:
    value = config.webhook_config
    if value in (None, "", [], {}):
        return
    if looks_like_url(value):  # a bare URL: show it redacted, never echo the token it holds
        raise ConfigError(f"`--webhook_config` {redact_url(value)} is a URL, not a webhook object; give JSON such as "
                          '{"webhook_type": "discord", "callback_url": "<the URL>"} inline or in a file')
    shown = value if isinstance(value, str) else "(inline JSON)"
    try:
        load_targets(value)
    except WebhookConfigError as error:
        raise ConfigError(f"`--webhook_config` {shown}: {error}") from None
    except ConfigError as error:  # unreadable or malformed file, or neither JSON nor a file
        raise ConfigError(f"`--webhook_config` {shown}: {error}; give inline JSON or a JSON file whose content is "
                          f"one object or a list of objects with webhook_type ({', '.join(WEBHOOK_TYPES)}) and "
                          "callback_url") from None


def check_webhook_interval(config) -> None:
    interval = config.webhook_reporting_interval
    if interval is None:
        return
    if interval < 1:
        raise ConfigError(f"`--webhook_reporting_interval` = {interval} must be at least 1 optimizer step "
                          "(leave it unset for no progress messages)")
    if not config.webhook_config:
        raise ConfigError(f"`--webhook_reporting_interval` {interval} has no effect without `--webhook_config` (the "
                          "progress messages go to its webhooks); add a webhook or remove the interval")


REPORTING_RULES: tuple[Callable, ...] = (check_webhook_config, check_webhook_interval)
