"""``--resume_from_checkpoint s3://bucket/prefix/checkpoint-N``: resume from a checkpoint kept in S3.

``s3://bucket/prefix/`` (a prefix not ending in ``checkpoint-<digits>``) means the newest complete
checkpoint directly under that prefix that is not marked suspect, as ``latest`` means locally.

The checkpoint is copied into ``<output_dir>/resumed-from-s3/checkpoint-N`` and the run then resumes
from that local folder exactly as from any other. Three rules keep that copy trustworthy:

* before anything is downloaded, the remote ``manifest.json`` (written last by
  :func:`simpletuner.training.checkpoint.write_checkpoint`) is read and every file it lists must be
  in the bucket with its recorded size; otherwise the error names the first missing or short file;
* files arrive in a hidden ``.partial-*`` folder, the manifest last, and only a folder whose files
  match its manifest is renamed to ``checkpoint-N``: an interrupted download never looks like a
  checkpoint, and is removed at the next start;
* a staged copy whose manifest equals the remote one is reused, so the relaunch under ``accelerate``
  and the other processes of a multi-process run do not download again (only local rank 0 downloads;
  the other local ranks wait for its rename).

Credentials and endpoint: when ``--publishing_config`` has an entry for the same bucket, its
``endpoint_url``, region and keys are used (that is where the checkpoints were uploaded to);
otherwise boto3 finds them the usual way (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``,
``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``, ``~/.aws``). The client is
:meth:`simpletuner.publishing.s3.S3Target.client`, and secrets never reach a message. Torch-free;
boto3 is imported when the checkpoint is looked up.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from simpletuner.publishing.s3 import S3Target, load_publishing_targets
from simpletuner.training import checkpoint as ckpt

logger = logging.getLogger(__name__)

S3_SCHEME = "s3://"
#: Folder inside ``output_dir`` where checkpoints fetched from S3 are kept.
STAGING_FOLDER = "resumed-from-s3"
#: Prefix of the folders a download writes into before the rename makes it a checkpoint.
PARTIAL_PREFIX = ".partial-"
#: How long the other local processes wait for local rank 0 to finish the download.
WAIT_SECONDS = 3600.0


class RemoteCheckpointError(ckpt.CheckpointError):
    """An S3 checkpoint that cannot be found, read or trusted; the message names the S3 location."""


@dataclass(frozen=True)
class RemoteCheckpoint:
    """A complete checkpoint folder in S3: ``target.prefix`` is the folder, ``files`` its manifest."""

    target: S3Target
    step: int
    files: dict[str, int]

    @property
    def uri(self) -> str:
        return self.target.uri_for()

    @property
    def size(self) -> int:
        return sum(self.files.values())


def is_remote(request: str | None) -> bool:
    """True for a ``--resume_from_checkpoint`` value that names an S3 location."""
    return isinstance(request, str) and request.strip().lower().startswith(S3_SCHEME)


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix/`` -> ``("bucket", "some/prefix")``."""
    rest = uri.strip()[len(S3_SCHEME):]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise RemoteCheckpointError(f"--resume_from_checkpoint {uri}: no bucket name; write "
                                    "s3://<bucket>/<prefix>/checkpoint-<step> or s3://<bucket>/<prefix>/")
    return bucket, prefix.strip("/")


def target_for(uri: str, publishing_config: Any = None) -> S3Target:
    """The bucket and prefix of ``uri``, with the endpoint and keys of a ``--publishing_config`` entry
    for the same bucket (the place the checkpoints were uploaded to), if there is one."""
    bucket, prefix = parse_s3_uri(uri)
    for published in load_publishing_targets(publishing_config):
        if published.bucket == bucket:
            return S3Target(bucket=bucket, prefix=prefix, endpoint_url=published.endpoint_url,
                            region=published.region, access_key_id=published.access_key_id,
                            secret_access_key=published.secret_access_key, session_token=published.session_token)
    return S3Target(bucket=bucket, prefix=prefix)


# --- finding the checkpoint ----------------------------------------------------------------------------


class _Bucket:
    """The few S3 calls a resume needs, each turning boto3's errors into one message."""

    def __init__(self, target: S3Target):
        self.target = target
        self.client = target.client()

    def _fail(self, action: str, error: Exception) -> RemoteCheckpointError:
        from simpletuner.options.secrets import scrub_text

        code = str(getattr(error, "response", {}).get("Error", {}).get("Code", ""))
        if code in ("NoSuchBucket", "404") and action.startswith("open"):
            return RemoteCheckpointError(
                f"--resume_from_checkpoint: the {self.target.where()} does not exist (or these credentials cannot "
                "see it); check the bucket name in the s3:// path and, for a non-AWS server, the endpoint_url of "
                "the matching --publishing_config entry or AWS_ENDPOINT_URL_S3")
        detail = scrub_text(f"{type(error).__name__}: {error}", self.target.secrets)
        return RemoteCheckpointError(f"--resume_from_checkpoint: could not {action} ({self.target.where()}): {detail}. "
                                     "Check the endpoint, the credentials and the network, then run again")

    def check_exists(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.target.bucket)
        except Exception as error:  # botocore has many error types; each one ends the same way
            raise self._fail("open the bucket", error) from None

    def sizes_under(self, prefix: str) -> dict[str, int]:
        """Every object below ``prefix/`` by its key relative to it, with its size."""
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.target.bucket,
                                                                          Prefix=f"{prefix}/" if prefix else "")
            return {item["Key"][len(prefix) + 1 if prefix else 0:]: int(item["Size"])
                    for page in pages for item in page.get("Contents", [])}
        except Exception as error:
            raise self._fail(f"list s3://{self.target.bucket}/{prefix}", error) from None

    def read_json(self, key: str) -> Any:
        try:
            body = self.client.get_object(Bucket=self.target.bucket, Key=key)["Body"].read()
            return json.loads(body)
        except ValueError:
            raise RemoteCheckpointError(f"--resume_from_checkpoint: s3://{self.target.bucket}/{key} is not valid "
                                        "JSON; the checkpoint is damaged, pick another one") from None
        except Exception as error:
            raise self._fail(f"read s3://{self.target.bucket}/{key}", error) from None

    def download(self, key: str, path: Path) -> None:
        try:
            self.client.download_file(self.target.bucket, key, str(path))
        except Exception as error:
            raise self._fail(f"download s3://{self.target.bucket}/{key}", error) from None


def _checkpoint_folders(sizes: dict[str, int]) -> dict[int, str]:
    """``checkpoint-<step>`` folders directly under the listed prefix, by step."""
    found = {}
    for relative in sizes:
        head = relative.split("/", 1)[0]
        match = ckpt.CHECKPOINT_PATTERN.match(head)
        if match and "/" in relative:
            found[int(match.group(1))] = head
    return found


def _manifest_problem(listed: dict[str, int], manifest: dict[str, int]) -> str | None:
    """What makes a remote folder incomplete, naming the first missing or short file; None when whole."""
    for name, size in manifest.items():
        if name not in listed:
            return f"{name} is missing"
        if listed[name] != size:
            return f"{name} has {listed[name]} bytes where the manifest records {size}"
    return None


def _inspect(bucket: _Bucket, folder_prefix: str, step: int, listed: dict[str, int]) -> RemoteCheckpoint | str:
    """The checkpoint in ``folder_prefix`` (its files listed in ``listed``), or why it is incomplete."""
    if ckpt.MANIFEST not in listed:
        return f"{ckpt.MANIFEST} is missing (the upload was interrupted or is still running)"
    manifest = bucket.read_json(f"{folder_prefix}/{ckpt.MANIFEST}")
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        return f"{ckpt.MANIFEST} lists no files"
    problem = _manifest_problem(listed, files)
    if problem:
        return problem
    files = {str(name): int(size) for name, size in files.items()}
    return RemoteCheckpoint(dataclasses.replace(bucket.target, prefix=folder_prefix), step, files)


def _is_suspect(bucket: _Bucket, remote: RemoteCheckpoint) -> str | None:
    """The suspect reason in the checkpoint's ``training_state.json`` (see ``training/nan_guard.py``)."""
    state = bucket.read_json(remote.target.key_for(ckpt.TRAINING_STATE))
    if isinstance(state, dict) and state.get("suspect") is True:
        return str(state.get("suspect_reason", "saved during a loss spike"))
    return None


def find_remote_checkpoint(target: S3Target) -> RemoteCheckpoint:
    """The checkpoint ``target`` names: the folder itself when its prefix ends in ``checkpoint-<step>``,
    else the newest complete, unsuspected ``checkpoint-<step>`` directly under the prefix."""
    bucket = _Bucket(target)
    bucket.check_exists()
    name = target.prefix.rsplit("/", 1)[-1]
    named = ckpt.CHECKPOINT_PATTERN.match(name)
    if named:
        found = _inspect(bucket, target.prefix, int(named.group(1)), bucket.sizes_under(target.prefix))
        if isinstance(found, str):
            raise RemoteCheckpointError(_incomplete(target.uri_for(), found))
        return found
    return _newest(bucket, target)


def _incomplete(uri: str, problem: str) -> str:
    return (f"--resume_from_checkpoint: {uri} is not a complete checkpoint: {problem}. Upload the whole folder "
            "again (e.g. `aws s3 cp --recursive <output_dir>/checkpoint-N " + uri + "`) or name another checkpoint")


def _newest(bucket: _Bucket, target: S3Target) -> RemoteCheckpoint:
    listed = bucket.sizes_under(target.prefix)
    folders = _checkpoint_folders(listed)
    where = target.uri_for() + "/"
    if not folders:
        raise RemoteCheckpointError(
            f"--resume_from_checkpoint: {where} holds no checkpoint-<step> folder ({len(listed)} object(s) under it); "
            "check the prefix, or name the folder (s3://<bucket>/<prefix>/checkpoint-<step>)")
    problems = []
    for step in sorted(folders, reverse=True):
        folder_prefix = target.key_for(folders[step])
        inside = {key[len(folders[step]) + 1:]: size for key, size in listed.items()
                  if key.startswith(folders[step] + "/")}
        found = _inspect(bucket, folder_prefix, step, inside)
        if isinstance(found, str):
            logger.warning("--resume_from_checkpoint %s: skipping %s, incomplete (%s)", where, folders[step], found)
            problems.append(f"{folders[step]}: {found}")
            continue
        reason = _is_suspect(bucket, found)
        if reason is None:
            return found
        logger.warning("--resume_from_checkpoint %s: skipping %s, marked suspect (%s); name it to resume from it "
                       "anyway", where, folders[step], reason)
        problems.append(f"{folders[step]}: marked suspect ({reason})")
    raise RemoteCheckpointError(f"--resume_from_checkpoint: no usable checkpoint under {where}: "
                                + "; ".join(problems) + ". Name one folder to resume from it anyway, or upload a "
                                "complete checkpoint")


# --- bringing it here ----------------------------------------------------------------------------------


def staged_path(output_dir: Path, remote: RemoteCheckpoint) -> Path:
    return Path(output_dir) / STAGING_FOLDER / f"checkpoint-{remote.step}"


def _matches(folder: Path, remote: RemoteCheckpoint) -> bool:
    """A complete local copy of exactly this remote checkpoint."""
    try:
        return ckpt.is_complete(folder) and json.loads((folder / ckpt.MANIFEST).read_text())["files"] == remote.files
    except (OSError, ValueError, KeyError):
        return False


def _remove_dead_partials(staging_root: Path) -> None:
    """``.partial-*`` folders this host left behind in a killed download (their process is gone)."""
    if not staging_root.is_dir():
        return
    host = socket.gethostname()
    for entry in staging_root.iterdir():
        if not entry.name.startswith(PARTIAL_PREFIX):
            continue
        *_, owner_host, pid = entry.name.rsplit("-", 2)
        if owner_host == host and pid.isdigit() and not _process_alive(int(pid)):
            logger.warning("removing %s, an S3 download interrupted earlier", entry)
            shutil.rmtree(entry, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def download_checkpoint(remote: RemoteCheckpoint, output_dir: Path) -> Path:
    """Copy ``remote`` into ``output_dir/resumed-from-s3/checkpoint-N`` (atomically; see the module
    docstring) and return that folder. A matching copy already there is used as it is."""
    final = staged_path(output_dir, remote)
    if _matches(final, remote):
        logger.info("using %s, already downloaded from %s", final, remote.uri)
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_partials(final.parent)
    partial = final.parent / f"{PARTIAL_PREFIX}{final.name}-{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    bucket = _Bucket(remote.target)
    try:
        for name in sorted(remote.files):
            path = partial / name
            path.parent.mkdir(parents=True, exist_ok=True)
            bucket.download(remote.target.key_for(name), path)
        bucket.download(remote.target.key_for(ckpt.MANIFEST), partial / ckpt.MANIFEST)  # last, as when written
        if not _matches(partial, remote):
            raise RemoteCheckpointError(f"--resume_from_checkpoint: the files downloaded from {remote.uri} do not "
                                        "match its manifest (it changed during the download?); run again")
        _rename_into_place(partial, final, remote)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    logger.info("downloaded %s (%d files, %d bytes) to %s", remote.uri, len(remote.files), remote.size, final)
    return final


def _rename_into_place(partial: Path, final: Path, remote: RemoteCheckpoint) -> None:
    """Make the download visible in one rename; an older copy of another content goes to trash first."""
    if final.exists():
        if _matches(final, remote):
            return  # another node sharing this folder finished the same download first
        trash = final.with_name(f"{ckpt.TRASH_PREFIX}{final.name}-{os.getpid()}")
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(final, trash)
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(partial, final)


def wait_for_download(remote: RemoteCheckpoint, output_dir: Path, timeout: float = WAIT_SECONDS,
                      sleep: Callable[[float], None] = time.sleep) -> Path:
    """For the local ranks other than 0: the staged copy, once local rank 0 has renamed it into place."""
    final = staged_path(output_dir, remote)
    waited = 0.0
    while not _matches(final, remote):
        if waited >= timeout:
            raise RemoteCheckpointError(f"--resume_from_checkpoint: waited {timeout:.0f} s for local rank 0 to "
                                        f"download {remote.uri} into {final}; see its log for why it did not")
        sleep(1.0)
        waited += 1.0
    return final


def stage_remote_checkpoint(uri: str, output_dir: Path, publishing_config: Any = None,
                            downloads: bool = True) -> Path:
    """The local folder to resume from for ``--resume_from_checkpoint uri``: found and verified in S3,
    then downloaded (``downloads``: local rank 0) or waited for (the other local ranks)."""
    remote = find_remote_checkpoint(target_for(uri, publishing_config))
    if downloads:
        return download_checkpoint(remote, Path(output_dir))
    return wait_for_download(remote, Path(output_dir))


def describe_remote_checkpoint(uri: str, output_dir: Path, publishing_config: Any = None) -> str:
    """For ``--dry-run``: what a real run would download, after checking that it is complete."""
    remote = find_remote_checkpoint(target_for(uri, publishing_config))
    return (f"would download {remote.uri} (step {remote.step}, {len(remote.files)} files, {remote.size} bytes; "
            f"complete) to {staged_path(Path(output_dir), remote)} and resume from it")
