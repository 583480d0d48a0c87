"""``--publishing_config``: upload the finished run to S3-compatible storage, besides (or instead of) the Hub.

The option holds one target object or a list of them, inline JSON or a JSON file::

    {"provider": "s3", "bucket": "my-models", "prefix": "runs/portrait-lora",
     "endpoint_url": "https://s3.example.com", "region": "us-east-1",
     "access_key_id": "...", "secret_access_key": "..."}

Only ``provider`` and ``bucket`` are required. Without keys in the entry boto3 finds credentials the
usual way (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, ``~/.aws``); any S3-protocol server
(MinIO, Cloudflare R2, Backblaze B2's S3 endpoint, moto in the tests) works through ``endpoint_url``.

The final upload sends what the Hub upload sends (:func:`simpletuner.publishing.hub.final_allow_patterns`):
the product, EMA copies, ``README.md`` and the last validation images, never checkpoints or caches.
Keys and secrets are never logged or put in an error message: messages name the bucket, the key and
the endpoint only, and any text from boto3 is scrubbed of the entry's secrets first.

Parsing is torch-free and boto3 is imported only when an upload starts, so config validation stays
cheap; a missing boto3 is reported at validation time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

PROVIDERS = ("s3",)
#: Providers other trainers offer that are not built here, with what to do instead.
OTHER_PROVIDERS = {
    "b2": "Backblaze B2 speaks the S3 protocol: use provider s3 with endpoint_url "
          "https://s3.<region>.backblazeb2.com and your application key as access_key_id / secret_access_key",
    "backblaze": "use provider s3 with B2's S3 endpoint_url",
    "azure": "Azure Blob Storage is not supported yet; upload the output dir with `az storage blob upload-batch`",
    "azure_blob": "Azure Blob Storage is not supported yet; upload the output dir with `az storage blob upload-batch`",
    "dropbox": "Dropbox is not supported yet; upload the output dir with the Dropbox client",
}
ENTRY_KEYS = ("provider", "bucket", "prefix", "endpoint_url", "region", "access_key_id", "secret_access_key",
              "session_token")


class PublishingConfigError(ValueError):
    """A ``--publishing_config`` entry that cannot be used; the message names the entry and the key."""


class PublishingError(RuntimeError):
    """An upload failed after training; the message says where the untouched files are."""


@dataclass(frozen=True)
class S3Target:
    """One S3 bucket (and key prefix) the final outputs go to."""

    bucket: str
    prefix: str = ""
    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None
    session_token: str | None = None

    def __repr__(self) -> str:  # keeps credentials out of any log line or traceback that prints a target
        return f"S3Target(bucket={self.bucket!r}, prefix={self.prefix!r}, endpoint_url={self.endpoint_url!r})"

    @property
    def secrets(self) -> set[str]:
        return {value for value in (self.access_key_id, self.secret_access_key, self.session_token) if value}

    def key_for(self, relative: str) -> str:
        return f"{self.prefix}/{relative}" if self.prefix else relative

    def uri_for(self, relative: str = "") -> str:
        key = self.key_for(relative) if relative else self.prefix
        return f"s3://{self.bucket}/{key}".rstrip("/") if key else f"s3://{self.bucket}"

    def where(self) -> str:
        return f"bucket {self.bucket!r}" + (f" at {self.endpoint_url}" if self.endpoint_url else "")

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url or None, region_name=self.region or None,
                            aws_access_key_id=self.access_key_id or None,
                            aws_secret_access_key=self.secret_access_key or None,
                            aws_session_token=self.session_token or None)

    def upload(self, root: Path, files: list[str]) -> None:
        """Upload ``files`` (relative to ``root``) under the prefix; raises PublishingError on failure."""
        from simpletuner.options.secrets import scrub_text

        client = self.client()
        for relative in files:
            try:
                client.upload_file(str(Path(root) / relative), self.bucket, self.key_for(relative))
            except Exception as error:  # botocore has many error types; all end the same way
                detail = scrub_text(f"{type(error).__name__}: {error}", self.secrets)
                raise PublishingError(
                    f"--publishing_config: uploading {relative} to {self.where()} as {self.key_for(relative)!r} "
                    f"failed ({detail}). Training finished and nothing was deleted: the files are in {root}. Upload "
                    f"them by hand, e.g. `aws s3 cp --recursive {root} {self.uri_for()}"
                    + (f" --endpoint-url {self.endpoint_url}" if self.endpoint_url else "") + "`"
                ) from None
        logger.info("uploaded %d file(s) to %s", len(files), self.uri_for())


def _text(entry: dict, key: str, where: str) -> str | None:
    value = entry.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise PublishingConfigError(f"{where}: {key} must be non-empty text")
    return value.strip()


def parse_entry(entry: Any, where: str) -> S3Target:
    if not isinstance(entry, dict):
        raise PublishingConfigError(f"{where} must be a JSON object with provider and bucket, got {type(entry).__name__}")
    provider = str(entry.get("provider", "")).strip().lower()
    if not provider:
        raise PublishingConfigError(f"{where}: provider is missing; use \"provider\": \"s3\"")
    if provider in OTHER_PROVIDERS:
        raise PublishingConfigError(f"{where}: provider {provider!r}: {OTHER_PROVIDERS[provider]}")
    if provider not in PROVIDERS:
        raise PublishingConfigError(f"{where}: provider {provider!r} is unknown; use one of: {', '.join(PROVIDERS)}")
    unknown = sorted(set(entry) - set(ENTRY_KEYS))
    if unknown:
        raise PublishingConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; an s3 entry takes "
                                    f"{', '.join(ENTRY_KEYS)}")
    bucket = _text(entry, "bucket", where)
    if bucket is None:
        raise PublishingConfigError(f"{where}: bucket is missing; give the name of the bucket to upload to")
    if "/" in bucket or bucket.startswith("s3:"):
        raise PublishingConfigError(f"{where}: bucket {bucket!r} must be a bare bucket name; put the folder part in "
                                    "\"prefix\"")
    endpoint = _text(entry, "endpoint_url", where)
    if endpoint is not None and not endpoint.startswith(("http://", "https://")):
        raise PublishingConfigError(f"{where}: endpoint_url must start with http:// or https://")
    key_id, secret = _text(entry, "access_key_id", where), _text(entry, "secret_access_key", where)
    if (key_id is None) != (secret is None):
        raise PublishingConfigError(f"{where}: give both access_key_id and secret_access_key, or neither (then "
                                    "boto3 reads AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or ~/.aws)")
    return S3Target(bucket=bucket, prefix=(_text(entry, "prefix", where) or "").strip("/"), endpoint_url=endpoint,
                    region=_text(entry, "region", where), access_key_id=key_id, secret_access_key=secret,
                    session_token=_text(entry, "session_token", where))


def parse_publishing_config(raw: Any) -> list[S3Target]:
    """Targets from the parsed JSON: one object or a non-empty list of objects."""
    entries = raw if isinstance(raw, list) else [raw]
    if not entries:
        raise PublishingConfigError("the list of targets is empty; give at least one object or unset the option")
    return [parse_entry(entry, f"target #{index}" if isinstance(raw, list) else "the target")
            for index, entry in enumerate(entries)]


def load_publishing_targets(value: Any) -> list[S3Target]:
    """Targets from the option's value (parsed inline JSON, or a path to a JSON file); [] when unset."""
    if value in (None, "", [], {}):
        return []
    from simpletuner.options.values import read_json_option

    return parse_publishing_config(read_json_option("publishing_config", value))


def final_files(output_dir: Path, result: Path, step: int) -> list[str]:
    """The files of ``output_dir`` the final upload sends, relative to it, with the Hub upload's patterns."""
    from huggingface_hub.utils import filter_repo_objects

    from simpletuner.publishing.hub import IGNORE_PATTERNS, final_allow_patterns

    output_dir = Path(output_dir)
    present = sorted(path.relative_to(output_dir).as_posix() for path in output_dir.rglob("*") if path.is_file())
    return list(filter_repo_objects(present, allow_patterns=final_allow_patterns(output_dir, result, step),
                                    ignore_patterns=IGNORE_PATTERNS))
