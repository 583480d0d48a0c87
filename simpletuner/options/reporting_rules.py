"""Validation rules for the reporting options: ``--report_to`` (one tracker or a comma-separated list) and the
tracker names, ``--webhook_config`` and ``--webhook_reporting_interval``.

Torch-free: a webhook entry that could never be delivered (bad JSON, unknown type, a URL that is not
http(s)) or a tracker whose package is missing stops the run at start-up, not silently hours later. URLs are shown redacted in errors.
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


def check_report_to_list(config) -> None:
    """``all`` and ``none`` stand for every tracker or no tracker, so they cannot be listed beside others
    (each listed name was already checked against the known trackers when the value was read)."""
    from simpletuner.tracking.trackers import report_to_names

    names = report_to_names(config.report_to)
    if len(names) < 2:
        return
    for alone in ("all", "none"):
        if alone in names:
            raise ConfigError(f"`--report_to {config.report_to}`: {alone} cannot be combined with other trackers; "
                              f"give {alone} on its own, or list only tracker names (e.g. tensorboard,wandb)")


def check_tracker_installed(config) -> None:
    """Every tracker ``--report_to`` names must be importable before training starts (the check does not
    import it)."""
    from simpletuner.tracking.trackers import TRACKER_INSTALL, TRACKER_PACKAGES, report_to_names, tracker_is_installed

    for name in report_to_names(config.report_to):
        if name not in TRACKER_PACKAGES or tracker_is_installed(name):
            continue
        raise ConfigError(f"`--report_to {config.report_to}` needs the {TRACKER_PACKAGES[name]} package, which is not "
                          f"installed; install it into this environment with pip install '{TRACKER_INSTALL[name]}', "
                          "or choose another tracker (all uses the installed ones, none disables tracking)")


def check_tracker_names(config) -> None:
    """The project and run names become folder names (TensorBoard) and titles (wandb, comet)."""
    for option in ("tracker_project_name", "tracker_run_name"):
        value = getattr(config, option)
        if value is None or not str(value).strip():
            raise ConfigError(f"`--{option}` is empty; give a name (the default is "
                              f"{'simpletuner' if option == 'tracker_project_name' else 'simpletuner-run'})")
        if "/" in value or "\\" in value or value in (".", ".."):
            raise ConfigError(f"`--{option}` {value!r} is used as a folder name for TensorBoard's events; use a name "
                              "without / or \\ (for example my-project)")


REPORTING_RULES: tuple[Callable, ...] = (check_report_to_list, check_tracker_installed, check_tracker_names,
                                         check_webhook_config, check_webhook_interval)
