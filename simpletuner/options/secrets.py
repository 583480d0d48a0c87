"""Which option and dataset values are secrets, and the redacted form every written or printed copy uses.

A run needs some secrets in memory: webhook URLs (their path or query usually *is* the credential, and
some carry ``user:password@``), S3 keys in dataset entries, Hub tokens in the environment. None of them
may reach a file or a terminal the run writes: ``training_config.json``, the ``--dry-run`` printout, the
launch command line, log lines, the model card or safetensors metadata. Every such writer passes its
values through this module, so there is one rule and one test for it:

* a key is secret when its name says so (:func:`is_secret_key`: ``*_token``, ``*_secret``, ``*_key``,
  ``*password*``, ``*access_key*``...); its value becomes :data:`MASK`;
* a webhook target's URL (``callback_url``) keeps only scheme and host (:func:`redact_url`): the trainer
  cannot know which part of an arbitrary endpoint is the secret;
* any other URL keeps its shape but loses user info, token-like query values and the token segments of
  known webhook paths (:func:`mask_url_credentials`);
* a secret value copied somewhere else (a note, a comment filled from ``{env:HF_TOKEN}``) is replaced by
  :data:`MASK` wherever it appears (:func:`scrub_text`), including values of secret-named environment
  variables.

Only the standard library is used: config validation and ``--dry-run`` import this without torch.
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence
from urllib.parse import parse_qsl, quote, unquote, urlsplit, urlunsplit

#: What a secret value is replaced with in configs, printouts and logs.
MASK = "<redacted>"
#: What a secret part of a URL is replaced with (``<`` and ``>`` would need escaping in a URL).
URL_MASK = "***"
#: Secrets shorter than this are not searched for inside free text: replacing every "1" or "abc"
#: would mangle the text without protecting anything (such values are masked by key all the same).
MIN_SCRUB_LENGTH = 6

_SECRET_SUFFIXES = ("_token", "_secret", "_key", "_password", "_passwd", "_credentials")
_SECRET_NAMES = frozenset({"token", "secret", "key", "password", "passwd", "credentials", "authorization",
                           "apikey", "auth"})
_SECRET_WORDS = ("secret", "password", "access_key", "api_key", "apikey", "private_key")
#: Query parameters that carry credentials without a secret-looking name.
_SECRET_QUERY_NAMES = frozenset({"sig", "signature", "x_amz_signature", "x_amz_credential", "code", "auth"})
#: Keys whose value is a webhook endpoint: the whole path and query count as the secret.
_WEBHOOK_URL_KEYS = frozenset({"callback_url", "webhook_url"})
#: Path segments after which every segment of a webhook URL is a token or an id (Discord's
#: ``/api/webhooks/<id>/<token>``, ``/hooks/<id>/<token>`` of many services).
_WEBHOOK_PATH_MARKERS = frozenset({"webhooks", "webhook", "hooks", "hook"})
_URL_START = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def _normalised(name: str) -> str:
    return str(name).strip().lstrip("-").lower().replace("-", "_")


def is_secret_key(name: str) -> bool:
    """True when an option, dataset key, query parameter or environment variable is named like a credential.

    The rule is by name only, so a new option such as ``--hub_token`` or a dataset key such as
    ``aws_session_token`` is covered without being listed anywhere.
    """
    name = _normalised(name)
    return (name in _SECRET_NAMES or name.endswith(_SECRET_SUFFIXES)
            or any(word in name for word in _SECRET_WORDS))


def looks_like_url(value: Any) -> bool:
    return isinstance(value, str) and bool(_URL_START.match(value.strip()))


def split_userinfo(url: str) -> tuple[str, str | None, str | None]:
    """``(url without user info, user name, password)``, percent-decoded; names are None when absent.

    ``https://user:pa%40ss@host/x`` gives ``("https://host/x", "user", "pa@ss")``: the URL a request
    goes to, and the pair for an HTTP basic ``Authorization`` header. Raises ValueError for a URL that
    cannot be split.
    """
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url, None, None
    userinfo, _, host = parts.netloc.rpartition("@")
    user, has_password, password = userinfo.partition(":")
    clean = urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    return clean, unquote(user), unquote(password) if has_password else None


def _host_and_port(url: str) -> tuple[str, str] | None:
    """``(scheme, host[:port])`` of a URL, without user info; None when it has neither."""
    try:
        parts = urlsplit(str(url).strip())
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return None
    if not parts.scheme or not host:
        return None
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    return parts.scheme, f"{host}:{port}" if port else host


def redact_url(url: str) -> str:
    """Scheme, a user-info marker and host only: ``https://***@discord.com/***``.

    For webhook endpoints and log lines: a webhook's path or query usually *is* its secret, in a shape
    the trainer cannot know for every service, so nothing after the host is shown.
    """
    located = _host_and_port(url)
    if located is None:
        return "<url hidden>"
    scheme, host = located
    parts = urlsplit(str(url).strip())
    userinfo = f"{URL_MASK}@" if "@" in parts.netloc else ""
    tail = f"/{URL_MASK}" if parts.path.strip("/") or parts.query or parts.fragment else ""
    return f"{scheme}://{userinfo}{host}{tail}"


def _masked_path(host: str, path: str) -> str:
    segments = path.split("/")
    masking = host.startswith("hooks.")  # hooks.slack.com/services/<team>/<bot>/<token> and alike
    for index, segment in enumerate(segments):
        if masking and segment:
            segments[index] = URL_MASK
        elif segment.lower() in _WEBHOOK_PATH_MARKERS:
            masking = True
    return "/".join(segments)


def _masked_query(query: str) -> str:
    if not query:
        return query
    pairs = parse_qsl(query, keep_blank_values=True)
    if not any(value and _is_secret_query_name(name) for name, value in pairs):
        return query
    shown = [(name, URL_MASK if value and _is_secret_query_name(name) else quote(value, safe=""))
             for name, value in pairs]
    return "&".join(f"{quote(name, safe='')}={value}" for name, value in shown)


def _is_secret_query_name(name: str) -> bool:
    return is_secret_key(name) or _normalised(name) in _SECRET_QUERY_NAMES


def mask_url_credentials(url: str) -> str:
    """The URL with its credentials masked and everything else kept.

    User info becomes ``***@``, values of token-like query parameters (``token``, ``api_key``,
    ``X-Amz-Signature``...) become ``***``, and so do the segments after ``webhooks``/``hooks`` in a
    path (Discord's ``/api/webhooks/<id>/<token>``) and the whole path on ``hooks.*`` hosts (Slack).
    Used for URLs in configs that are not webhook targets (an S3 endpoint, a model URL), where the rest
    of the URL is worth keeping. Anything that is not a ``scheme://`` URL (a local path) is returned
    unchanged.
    """
    if not looks_like_url(url):
        return url
    try:
        parts = urlsplit(str(url).strip())
        host = parts.hostname or ""
    except ValueError:
        return "<url hidden>"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{URL_MASK}@" + netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, _masked_path(host, parts.path), _masked_query(parts.query),
                       parts.fragment))


def url_secrets(url: str) -> set[str]:
    """The parts of a URL that must not be printed: the URL itself, user name and password (as written
    and decoded), the path and query, token-like query values. For scrubbing error texts that quote
    some of them. Empty for a URL with nothing after its host (``http://127.0.0.1:8080``)."""
    url = str(url)
    try:
        clean, user, password = split_userinfo(url)
        parts = urlsplit(clean)
        userinfo = urlsplit(url).netloc.rpartition("@")[0]
    except ValueError:
        return {url}
    if not (userinfo or parts.path.strip("/") or parts.query or parts.fragment):
        return set()
    found = {url, clean, parts.path, parts.query, parts.path + ("?" + parts.query if parts.query else "")}
    found |= {userinfo, *userinfo.split(":", 1)}
    found |= {value for value in (user, password) if value}
    found |= {value for name, value in parse_qsl(parts.query) if _is_secret_query_name(name)}
    masked = _masked_path(parts.hostname or "", parts.path).split("/")
    # the token segments of a webhook path; numeric ids are not secrets and too common to scrub
    found |= {original for original, shown in zip(parts.path.split("/"), masked)
              if shown == URL_MASK and not original.isdigit()}
    return {value for value in found if value and value.strip("/")}


def redact_value(key: str | None, value: Any) -> Any:
    """``value`` as it may be written or printed, given the key it is stored under.

    Dicts and lists are redacted recursively (each dict value by its own key), so a whole config, a
    dataset list or a ``webhook_config`` object goes through in one call. A string holding inline JSON
    is redacted inside and written back as JSON. Booleans and empty values are never secrets.
    """
    if value is None or isinstance(value, bool) or value in ("", [], {}):
        return value
    if key is not None and is_secret_key(key):
        return MASK
    if isinstance(value, Mapping):
        return {name: redact_value(str(name), item) for name, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_value(key, item) for item in value]
    if isinstance(value, str):
        text = value.strip()
        if key is not None and _normalised(key) in _WEBHOOK_URL_KEYS and looks_like_url(text):
            return redact_url(text)
        if looks_like_url(text):
            return mask_url_credentials(text)
        if text.startswith(("{", "[")):
            try:
                parsed = json.loads(text)
            except (ValueError, RecursionError):
                return value
            return json.dumps(redact_value(key, parsed))
    return value


def secret_values(value: Any, key: str | None = None) -> set[str]:
    """Every secret string inside ``value`` (a config, a dataset list...): values under secret keys,
    webhook URLs and the credentials inside any URL. What :func:`scrub_text` looks for elsewhere."""
    found: set[str] = set()
    if isinstance(value, Mapping):
        for name, item in value.items():
            found |= secret_values(item, str(name))
    elif isinstance(value, (list, tuple)):
        for item in value:
            found |= secret_values(item, key)
    elif isinstance(value, str) and value.strip():
        text = value.strip()
        if key is not None and is_secret_key(key):
            found.add(text)
        elif looks_like_url(text):
            whole_path = key is not None and _normalised(key) in _WEBHOOK_URL_KEYS
            found |= url_secrets(text) if whole_path else _credentials_of(text)
        elif text.startswith(("{", "[")):
            try:
                found |= secret_values(json.loads(text), key)
            except (ValueError, RecursionError):
                pass
    elif key is not None and is_secret_key(key) and isinstance(value, (int, float)) and not isinstance(value, bool):
        found.add(str(value))
    return found


def _credentials_of(url: str) -> set[str]:
    """User info and masked query values / path tokens of a URL that is not a webhook target."""
    masked = mask_url_credentials(url)
    if masked == url:
        return set()
    return {part for part in url_secrets(url) if part not in masked}


def environment_secrets(environ: Mapping[str, str] | None = None) -> set[str]:
    """Values of secret-named environment variables (``HF_TOKEN``, ``AWS_SECRET_ACCESS_KEY``,
    ``WANDB_API_KEY``...), so one copied into a comment or note through ``{env:NAME}`` is caught."""
    environ = os.environ if environ is None else environ
    return {value for name, value in environ.items() if is_secret_key(name) and len(value) >= MIN_SCRUB_LENGTH}


def scrub_text(text: str, secrets: Iterable[str], min_length: int = MIN_SCRUB_LENGTH) -> str:
    """``text`` with every occurrence of a known secret (at least ``min_length`` characters) replaced
    by :data:`MASK`; longest first, so a URL goes before the token inside it."""
    for secret in sorted({s for s in secrets if s and len(s) >= min_length}, key=len, reverse=True):
        text = text.replace(secret, MASK)
    return text


_URL_IN_TEXT = re.compile(r"""[A-Za-z][A-Za-z0-9+.-]*://[^\s'"<>\\]+""")


def redact_urls_in_text(text: str) -> str:
    """Free text (an error message echoing a value) with every URL in it cut to scheme and host
    (:func:`redact_url`): which part of an arbitrary URL is its secret cannot be known from text."""
    return _URL_IN_TEXT.sub(lambda match: redact_url(match.group(0)), text)


def _scrub_strings(value: Any, secrets: set[str]) -> Any:
    if isinstance(value, str):
        return scrub_text(value, secrets)
    if isinstance(value, dict):
        return {name: _scrub_strings(item, secrets) for name, item in value.items()}
    if isinstance(value, list):
        return [_scrub_strings(item, secrets) for item in value]
    return value


def redacted_config(values: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """A copy of a config (or any key -> value mapping) that is safe to write or print.

    Values are redacted by key (:func:`redact_value`), then any secret of the mapping or of the
    environment that is still quoted somewhere (a token pasted into a note) is scrubbed. Values that are
    not JSON types are turned into strings first, as ``json.dumps(default=str)`` would show them.
    """
    plain = json.loads(json.dumps(dict(values), default=str))
    secrets = secret_values(plain) | environment_secrets(environ)
    return _scrub_strings(redact_value(None, plain), secrets)


def redacted_argv(argv: Sequence[str]) -> list[str]:
    """A command line with the values of secret options masked (``--hub_token X`` and ``--x_key=X``)
    and URLs or inline JSON redacted as in a config (``--webhook_config '{"callback_url": ...}'``)."""
    shown: list[str] = []
    option: str | None = None
    for token in map(str, argv):
        if token.startswith("--") and "=" in token:
            name, _, value = token.partition("=")
            shown.append(f"{name}={redact_value(name, value)}")
            option = None
        elif token.startswith("--"):
            shown.append(token)
            option = token
        else:
            shown.append(str(redact_value(option, token)))
            option = None
    return shown


def write_private_json(path: Path, data: Any) -> Path:
    """Write ``data`` as indented JSON, readable by the owner only (mode 0600, also when the file
    already existed with wider permissions). Redaction is the caller's job; the mode keeps what is
    left (paths, prompts) private on shared machines."""
    path = Path(path)
    text = json.dumps(data, indent=2, default=str) + "\n"
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, stat.S_IRUSR | stat.S_IWUSR)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        if hasattr(os, "fchmod"):
            os.fchmod(handle.fileno(), stat.S_IRUSR | stat.S_IWUSR)
        handle.write(text)
    return path
