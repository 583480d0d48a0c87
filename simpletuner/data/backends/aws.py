"""S3 backend: dataset files (and optionally the latent cache) in a bucket, through boto3.

Works with AWS and with any S3-protocol server (MinIO, Ceph, R2, moto) via ``aws_endpoint_url``.
Credentials come from the dataset entry (``aws_access_key_id`` / ``aws_secret_access_key``) or, when
those are absent, from boto3's standard chain (``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``,
``~/.aws/credentials``, instance roles). They are handed to boto3 and nowhere else: no message, log
line or ``repr`` made here contains them.

Costs: the prefix is listed once (1 request per 1000 objects) and the listing answers ``exists`` and
``stat``; an image's size is read with a ranged GET of its first :data:`HEAD_BYTES`; writes are a
single PUT, which S3 applies atomically (a reader sees the old object or the new one).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from simpletuner.data.backends import StorageError

if TYPE_CHECKING:
    from simpletuner.data.config import AwsSettings

#: Error codes S3 uses for "no such object" (GET says NoSuchKey, HEAD only has the status).
_MISSING_CODES = ("NoSuchKey", "404", "NotFound")
#: Connections kept open per bucket unless ``--aws_max_pool_connections`` says otherwise: more than
#: the threads that read headers and write cache entries at once, so none waits for a connection.
DEFAULT_POOL_CONNECTIONS = 32
_DENIED_CODES = ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "ExpiredToken")


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ``("bucket", "some/prefix")``.

    Raises:
        ValueError: not an ``s3://`` URL or no bucket name.
    """
    if not url.startswith("s3://"):
        raise ValueError(f"{url!r} is not an s3:// URL")
    bucket, _, prefix = url[len("s3://"):].partition("/")
    if not bucket:
        raise ValueError(f"{url!r} names no bucket; write s3://<bucket>/<prefix>")
    return bucket, prefix.strip("/")


@dataclass
class S3Backend:
    """Objects under ``prefix`` in ``bucket``; keys are relative to the prefix.

    The boto3 client is created on first use, so building a backend (e.g. while validating a
    config) never touches the network.
    """

    bucket: str
    prefix: str = ""
    region_name: str | None = None
    endpoint_url: str | None = None
    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)
    max_pool_connections: int | None = None
    _client: object = field(default=None, init=False, repr=False)
    _listing: dict[str, dict] | None = field(default=None, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        self.prefix = (self.prefix or "").strip("/")

    @classmethod
    def from_settings(cls, settings: "AwsSettings | None", bucket: str | None = None,
                      prefix: str | None = None) -> "S3Backend":
        """A backend from a dataset's ``aws_*`` keys; ``bucket``/``prefix`` override theirs."""
        if settings is None:
            if bucket is None:
                raise ValueError("an S3 backend needs a bucket")
            return cls(bucket=bucket, prefix=prefix or "")
        return cls(
            bucket=bucket if bucket is not None else settings.bucket_name,
            prefix=prefix if prefix is not None else settings.data_prefix,
            region_name=settings.region_name,
            endpoint_url=settings.endpoint_url,
            access_key_id=settings.access_key_id,
            secret_access_key=settings.secret_access_key,
            max_pool_connections=settings.max_pool_connections,
        )

    # --- the Backend interface --------------------------------------------------------------------

    def describe(self) -> str:
        where = f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
        return f"{where} (endpoint {self.endpoint_url})" if self.endpoint_url else where

    def locate(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._object_key(key)}"

    def local_path(self, key: str) -> None:
        return None

    def list_files(self, extensions: tuple[str, ...]) -> list[str]:
        """Keys under the prefix ending with one of ``extensions``; hidden "folders" are skipped."""
        wanted = tuple(ext.lower() for ext in extensions)
        return sorted(key for key in self._list() if key.lower().endswith(wanted))

    def read_bytes(self, key: str) -> bytes:
        response = self._call("GetObject", key, Bucket=self.bucket, Key=self._object_key(key))
        return response["Body"].read()

    def read_head(self, key: str, length: int) -> bytes:
        """The first ``length`` bytes with one ranged GET (an empty object gives ``b""``)."""
        try:
            response = self._call("GetObject", key, Bucket=self.bucket, Key=self._object_key(key),
                                  Range=f"bytes=0-{max(0, length - 1)}")
        except _InvalidRange:
            return b""
        return response["Body"].read()[:length]

    def exists(self, key: str) -> bool:
        listing = self._listing
        if listing is not None:
            return key in listing
        try:
            self._call("HeadObject", key, Bucket=self.bucket, Key=self._object_key(key))
        except FileNotFoundError:
            return False
        return True

    def stat(self, key: str) -> dict:
        """Size and ETag (S3 gives the same ETag back until the object is replaced)."""
        listing = self._list()
        if key in listing:
            return listing[key]
        response = self._call("HeadObject", key, Bucket=self.bucket, Key=self._object_key(key))
        return {"size": int(response["ContentLength"]), "etag": response["ETag"].strip('"')}

    def delete(self, key: str) -> None:
        """One DeleteObject (deleting a missing key succeeds on S3)."""
        self._call("DeleteObject", key, Bucket=self.bucket, Key=self._object_key(key))
        if self._listing is not None:
            self._listing.pop(key, None)

    def write_bytes_atomic(self, key: str, data: bytes) -> None:
        """One PUT: S3 never exposes a partly written object under the key."""
        response = self._call("PutObject", key, Bucket=self.bucket, Key=self._object_key(key), Body=data)
        if self._listing is not None:
            self._listing[key] = {"size": len(data), "etag": str(response.get("ETag", "")).strip('"')}

    # --- internals -----------------------------------------------------------------------------------

    def _object_key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _list(self) -> dict[str, dict]:
        """Every object under the prefix (listed once): relative key -> {size, etag}."""
        if self._listing is not None:
            return self._listing
        listing: dict[str, dict] = {}
        start = f"{self.prefix}/" if self.prefix else ""
        token: str | None = None
        while True:
            kwargs = {"Bucket": self.bucket, "Prefix": start}
            if token:
                kwargs["ContinuationToken"] = token
            page = self._call("ListObjectsV2", start or "/", **kwargs)
            for item in page.get("Contents", []):
                key = item["Key"][len(start):]
                if not key or key.endswith("/") or any(part.startswith(".") for part in key.split("/")[:-1]):
                    continue
                listing[key] = {"size": int(item["Size"]), "etag": str(item.get("ETag", "")).strip('"')}
            if not page.get("IsTruncated"):
                break
            token = page.get("NextContinuationToken")
        self._listing = listing
        return listing

    def _client_or_create(self):
        with self._lock:
            if self._client is None:
                import boto3
                from botocore.config import Config

                session = boto3.session.Session(
                    aws_access_key_id=self.access_key_id or None,
                    aws_secret_access_key=self.secret_access_key or None,
                    region_name=self.region_name or None,
                )
                self._client = session.client(
                    "s3", endpoint_url=self.endpoint_url or None,
                    config=Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=10,
                                  read_timeout=60,
                                  max_pool_connections=self.max_pool_connections or DEFAULT_POOL_CONNECTIONS),
                )
            return self._client

    def _call(self, operation: str, key: str, **kwargs):
        """Run one S3 operation, turning boto's errors into FileNotFoundError or StorageError.

        The messages name the bucket, the key and the endpoint, never the credentials.
        """
        from botocore import exceptions as boto_errors

        client = self._client_or_create()
        method = {"GetObject": client.get_object, "HeadObject": client.head_object,
                  "PutObject": client.put_object, "ListObjectsV2": client.list_objects_v2,
                  "DeleteObject": client.delete_object}[operation]
        where = f"bucket {self.bucket!r} at {self.endpoint_url or 'the default AWS endpoint'}"
        try:
            return method(**kwargs)
        except boto_errors.ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            message = error.get("Message") or code
            if code in _MISSING_CODES:
                raise FileNotFoundError(f"{self.locate(key)} does not exist") from None
            if code == "InvalidRange":
                raise _InvalidRange() from None
            if code == "NoSuchBucket":
                raise StorageError(f"{where}: the bucket does not exist; check aws_bucket_name "
                                   "(and aws_endpoint_url for a non-AWS server)") from None
            if code in _DENIED_CODES:
                raise StorageError(f"{where}: {operation} of {self.locate(key)} was refused ({code}: {message}); "
                                   "check aws_access_key_id / aws_secret_access_key in the dataset entry or "
                                   "the AWS credentials in the environment, and the bucket policy") from None
            raise StorageError(f"{where}: {operation} of {self.locate(key)} failed ({code}: {message})") from None
        except boto_errors.NoCredentialsError:
            raise StorageError(f"{where}: no AWS credentials found; set aws_access_key_id and "
                               "aws_secret_access_key in the dataset entry, or AWS_ACCESS_KEY_ID / "
                               "AWS_SECRET_ACCESS_KEY / AWS_PROFILE in the environment") from None
        except (boto_errors.EndpointConnectionError, boto_errors.ConnectionError) as exc:
            raise StorageError(f"{where}: cannot connect ({type(exc).__name__}); check aws_endpoint_url "
                               "and the network") from None
        except boto_errors.BotoCoreError as exc:
            raise StorageError(f"{where}: {operation} of {self.locate(key)} failed "
                               f"({type(exc).__name__})") from None


class _InvalidRange(Exception):
    """A ranged GET of an empty object (S3 answers 416 when the range starts past the end)."""
