"""The ``aws`` backend against a real S3-protocol server (moto) that the tests start on 127.0.0.1.

Images, caption sidecars and the latent cache all live in the bucket. No test reaches the internet:
the endpoint is local, credentials are dummies, and the EC2 metadata lookup is disabled.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import socket
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

torch = pytest.importorskip("torch")
boto3 = pytest.importorskip("boto3")
moto_server = pytest.importorskip("moto.server")

from PIL import Image  # noqa: E402

from simpletuner.data.backends import StorageError, open_dataset  # noqa: E402
from simpletuner.data.backends.aws import S3Backend  # noqa: E402
from simpletuner.data.buckets import assign_buckets  # noqa: E402
from simpletuner.data.cache.vae import CONTENT_INDEX_NAME, VaeCache  # noqa: E402
from simpletuner.data.config import parse_dataset_plan  # noqa: E402
from simpletuner.data.metadata import HEADER_BYTES, scan_image_dataset  # noqa: E402
from simpletuner.testing.shapes import make_demo_dataset  # noqa: E402

BUCKET = "simpletuner-test"
SECRET = "sEcReT-d0-n0t-LOG-4f9e2a"
KEY_ID = "AKIATESTKEYID0000001"
IMAGES = 6


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory):
    """A moto S3 server on a free local port, with dummy credentials in the environment."""
    patch = pytest.MonkeyPatch()
    empty = tmp_path_factory.mktemp("aws-home") / "none"
    for name, value in {
        "AWS_ACCESS_KEY_ID": "env-key-id", "AWS_SECRET_ACCESS_KEY": "env-secret", "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": str(empty), "AWS_SHARED_CREDENTIALS_FILE": str(empty),
    }.items():
        patch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        patch.delenv(name, raising=False)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # the server's per-request lines
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=url, region_name="us-east-1").create_bucket(Bucket=BUCKET)
    yield url
    server.stop()
    patch.undo()


def _client(endpoint: str):
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


def _upload(endpoint: str, folder: Path, prefix: str) -> None:
    client = _client(endpoint)
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            client.put_object(Bucket=BUCKET, Key=f"{prefix}/{path.relative_to(folder).as_posix()}",
                              Body=path.read_bytes())


def _keys(endpoint: str, prefix: str) -> list[str]:
    pages = _client(endpoint).get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


def _entry(endpoint: str, prefix: str, **extra) -> dict:
    return {"id": "shapes", "type": "aws", "aws_bucket_name": BUCKET, "aws_data_prefix": prefix,
            "aws_endpoint_url": endpoint, "aws_region_name": "us-east-1", "resolution": 64,
            "resolution_type": "pixel", **extra}


def _plan(entry: dict, tmp_path: Path):
    text = {"id": "text", "dataset_type": "text_embeds", "cache_dir": str(tmp_path / "text")}
    return parse_dataset_plan([entry, text]).images[0]


@pytest.fixture()
def dataset(endpoint, tmp_path, request) -> tuple[str, Path]:
    """Demo images and captions uploaded under a prefix unique to the test; (prefix, local copy)."""
    local = tmp_path / "local"
    make_demo_dataset(local, IMAGES, size=64, seed=1)
    (local / "sub").mkdir()
    Image.new("RGB", (64, 96), (30, 60, 220)).save(local / "sub" / "tall.png")
    (local / "sub" / "tall.txt").write_text("a tall blue picture\n", encoding="utf-8")
    (local / ".cache").mkdir()
    Image.new("RGB", (8, 8)).save(local / ".cache" / "hidden.png")  # tool output: never listed
    (local / "notes.md").write_text("not an image")
    prefix = f"data/{request.node.name}"
    _upload(endpoint, local, prefix)
    return prefix, local


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    from simpletuner.testing.tiny_models import make_tiny_model

    folder = tmp_path_factory.mktemp("tiny") / "model"
    make_tiny_model("sd1x", folder, seed=0)
    return folder


@pytest.fixture(scope="module")
def model(tiny_folder):
    from simpletuner.models.sd1x import StableDiffusion1x
    from simpletuner.options.resolve import merge_sources

    config = merge_sources({}, {"model_family": "sd1x", "output_dir": str(tiny_folder.parent / "out"),
                                "pretrained_model_name_or_path": str(tiny_folder)}, "test", [])
    family = StableDiffusion1x(config, torch.device("cpu"), torch.float32)
    family.load()
    return family


class CallLog:
    """Records the S3 operations a backend makes: (operation, object key, Range or None)."""

    def __init__(self, monkeypatch) -> None:
        self.calls: list[tuple[str, str, str | None]] = []
        original = S3Backend._call

        def recording(backend, operation, key, **kwargs):
            self.calls.append((operation, kwargs.get("Key", ""), kwargs.get("Range")))
            return original(backend, operation, key, **kwargs)

        monkeypatch.setattr(S3Backend, "_call", recording)

    def gets(self, suffix: str = "") -> list[tuple[str, str | None]]:
        return [(key, rng) for op, key, rng in self.calls if op == "GetObject" and key.endswith(suffix)]


# --- scan ------------------------------------------------------------------------------------------


def test_scan_lists_bucket_images_with_captions_and_sizes(endpoint, dataset, tmp_path) -> None:
    prefix, local = dataset
    result = scan_image_dataset(_plan(_entry(endpoint, prefix), tmp_path))
    expected = sorted(p.relative_to(local).as_posix() for p in local.rglob("*.png") if ".cache" not in p.parts)
    assert [record.key for record in result.records] == expected and len(expected) == IMAGES + 1
    assert result.skipped == []
    for record in result.records:
        assert record.path == f"s3://{BUCKET}/{prefix}/{record.key}"
        assert record.caption == (local / record.key).with_suffix(".txt").read_text().strip()
        assert (record.width, record.height) == ((64, 96) if record.key == "sub/tall.png" else (64, 64))


def test_sizes_come_from_one_ranged_get_and_long_headers_fall_back(endpoint, dataset, tmp_path, monkeypatch) -> None:
    prefix, local = dataset
    # A JPEG whose ICC profile pushes the frame header past the first HEADER_BYTES.
    Image.new("RGB", (48, 80), (200, 10, 10)).save(local / "icc.jpg", icc_profile=os.urandom(3 * HEADER_BYTES))
    (local / "icc.txt").write_text("a red photo with a large colour profile")
    _upload(endpoint, local, prefix)
    log = CallLog(monkeypatch)
    result = scan_image_dataset(_plan(_entry(endpoint, prefix), tmp_path))
    sizes = {record.key: (record.width, record.height) for record in result.records}
    assert sizes["icc.jpg"] == (48, 80)
    image_gets = [(key, rng) for key, rng in log.gets() if not key.endswith(".txt")]
    assert sorted(key for key, rng in image_gets if rng is not None) == sorted(f"{prefix}/{k}" for k in sizes)
    assert all(rng == f"bytes=0-{HEADER_BYTES - 1}" for _, rng in image_gets if rng is not None)
    assert [key for key, rng in image_gets if rng is None] == [f"{prefix}/icc.jpg"]  # the one fallback
    assert [op for op, _, _ in log.calls].count("ListObjectsV2") == 1  # sidecars are found in the listing


def test_unusable_objects_are_skipped_with_reasons(endpoint, dataset, tmp_path) -> None:
    prefix, _ = dataset
    client = _client(endpoint)
    client.delete_object(Bucket=BUCKET, Key=f"{prefix}/sub/tall.txt")
    for name, body in (("empty.png", b""), ("words.jpg", b"just some text")):
        client.put_object(Bucket=BUCKET, Key=f"{prefix}/{name}", Body=body)
        client.put_object(Bucket=BUCKET, Key=f"{prefix}/{Path(name).stem}.txt", Body=b"a caption")
    result = scan_image_dataset(_plan(_entry(endpoint, prefix), tmp_path))
    assert len(result.records) == IMAGES
    where = f"s3://{BUCKET}/{prefix}"
    assert [(path, reason.split(" (")[0]) for path, reason in result.skipped] == [
        (f"{where}/empty.png", "cannot read image header: empty file"),
        (f"{where}/sub/tall.png", f"caption file {where}/sub/tall.txt not found"),
        (f"{where}/words.jpg", "cannot read image header: not an image"),
    ]


def test_parquet_table_in_the_bucket_lists_the_images(endpoint, dataset, tmp_path, monkeypatch) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    prefix, local = dataset
    names = sorted(p.stem for p in local.glob("*.png"))[:3]  # stems: matched to the .png objects
    table = io.BytesIO()
    pq.write_table(pa.table({"id": names, "caption": ["", "second", "third"], "tags": ["first", "", ""],
                             "w": [640, 64, 64], "h": [480, 64, 64]}), table)
    _client(endpoint).put_object(Bucket=BUCKET, Key=f"{prefix}/meta/captions.parquet", Body=table.getvalue())
    entry = _entry(endpoint, prefix, metadata_backend="parquet",
                   parquet={"path": "meta/captions.parquet", "filename_column": "id", "caption_column": "caption",
                            "fallback_caption_column": "tags", "width_column": "w", "height_column": "h"})
    log = CallLog(monkeypatch)
    result = scan_image_dataset(_plan(entry, tmp_path))
    assert [(r.key, r.caption, r.width, r.height) for r in result.records] == [
        (f"{names[0]}.png", "first", 640, 480), (f"{names[1]}.png", "second", 64, 64),
        (f"{names[2]}.png", "third", 64, 64)]
    assert log.gets(".png") == []  # sizes and captions from the table: no image object read


# --- latent cache in the bucket ----------------------------------------------------------------------


def _vae_cache(cfg, source, url: str) -> VaeCache:
    from simpletuner.data.backends import cache_backend
    from simpletuner.data.cache.store import BackendEntries

    return VaeCache(url, cfg.id, crop=False, images=source.images, entries=BackendEntries(cache_backend(url, cfg)))


def test_latent_cache_lives_in_the_bucket_and_is_reused(endpoint, dataset, tmp_path, model, monkeypatch) -> None:
    prefix, _ = dataset
    cfg = _plan(_entry(endpoint, prefix, cache_dir_vae=f"s3://{BUCKET}/{prefix}-cache/vae"), tmp_path)
    source = open_dataset(cfg)
    buckets = assign_buckets(scan_image_dataset(cfg, source).records, 64, "pixel", 8, crop=False)
    first = _vae_cache(cfg, source, cfg.cache_dir_vae)
    report = first.ensure(buckets, model, batch_size=4, progress=False)
    assert (report.built, report.reused, report.skipped) == (IMAGES + 1, 0, [])
    stored = _keys(endpoint, f"{prefix}-cache/vae/")
    assert len([k for k in stored if k.endswith(".safetensors")]) == IMAGES + 1
    assert f"{prefix}-cache/vae/{CONTENT_INDEX_NAME}" in stored
    assert not list(tmp_path.rglob("*.safetensors"))  # nothing cached locally

    log = CallLog(monkeypatch)
    fresh_source = open_dataset(cfg)
    second = _vae_cache(cfg, fresh_source, cfg.cache_dir_vae)
    again = second.ensure(buckets, model, batch_size=4, progress=False)
    assert (again.built, again.reused) == (0, IMAGES + 1)
    assert log.gets(".png") == []  # content hashes come from the index (ETag unchanged): no image read
    for size, records in buckets.items():
        for record in records:
            assert torch.equal(first.load(record, size)["latent_mean"], second.load(record, size)["latent_mean"])

    victim = next(k for k in stored if k.endswith(".safetensors"))
    data = bytearray(_client(endpoint).get_object(Bucket=BUCKET, Key=victim)["Body"].read())
    data[-5] ^= 0xFF  # a flipped byte inside the tensor data: the header still parses
    _client(endpoint).put_object(Bucket=BUCKET, Key=victim, Body=bytes(data))
    third = _vae_cache(cfg, open_dataset(cfg), cfg.cache_dir_vae).ensure(buckets, model, batch_size=4, progress=False)
    assert (third.built, third.reused) == (1, IMAGES)


def test_corrupt_object_is_skipped_with_one_log_line(endpoint, dataset, tmp_path, model, caplog) -> None:
    prefix, local = dataset
    victim = sorted(local.glob("*.png"))[1]
    data = victim.read_bytes()
    _client(endpoint).put_object(Bucket=BUCKET, Key=f"{prefix}/{victim.name}", Body=data[: len(data) // 2])
    cfg = _plan(_entry(endpoint, prefix), tmp_path)
    source = open_dataset(cfg)
    buckets = assign_buckets(scan_image_dataset(cfg, source).records, 64, "pixel", 8, crop=False)
    cache = VaeCache(tmp_path / "vae", cfg.id, images=source.images)
    with caplog.at_level(logging.WARNING):
        report = cache.ensure(buckets, model, batch_size=4, progress=False)
    location = f"s3://{BUCKET}/{prefix}/{victim.name}"
    assert report.built == IMAGES and [path for path, _ in report.skipped] == [location]
    assert len([r for r in caplog.records if location in r.getMessage()]) == 1


# --- credentials and errors --------------------------------------------------------------------------


def test_secrets_never_reach_logs_reprs_or_errors(endpoint, dataset, tmp_path, model, caplog, monkeypatch) -> None:
    prefix, _ = dataset
    entry = _entry(endpoint, prefix, aws_access_key_id=KEY_ID, aws_secret_access_key=SECRET,
                   cache_dir_vae=f"s3://{BUCKET}/{prefix}-cache")
    cfg = _plan(entry, tmp_path)
    texts = [repr(cfg), str(cfg), repr(open_dataset(cfg).images)]
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")  # the keys of the entry are the ones used
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with caplog.at_level(logging.DEBUG):
        source = open_dataset(cfg)
        buckets = assign_buckets(scan_image_dataset(cfg, source).records, 64, "pixel", 8, crop=False)
        assert _vae_cache(cfg, source, cfg.cache_dir_vae).ensure(buckets, model, 4, progress=False).built == IMAGES + 1
        for broken in ({"aws_bucket_name": "no-such-bucket-here"}, {"aws_endpoint_url": f"http://127.0.0.1:{_free_port()}"}):
            with pytest.raises(StorageError) as caught:
                scan_image_dataset(_plan({**entry, **broken}, tmp_path))
            texts.append(str(caught.value))
    texts += [record.getMessage() for record in caplog.records]
    texts += [str(record.args) for record in caplog.records]
    assert texts and not [text for text in texts if SECRET in text]


def test_missing_bucket_and_unreachable_endpoint_are_clear_errors(endpoint, tmp_path) -> None:
    with pytest.raises(StorageError, match=r"bucket 'no-such-bucket-here' at http://127\.0\.0\.1:\d+: the bucket does not "
                                           r"exist; check aws_bucket_name"):
        scan_image_dataset(_plan(_entry(endpoint, "x", aws_bucket_name="no-such-bucket-here"), tmp_path))
    dead = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(StorageError, match=rf"bucket '{BUCKET}' at {dead}: cannot connect .*check aws_endpoint_url"):
        scan_image_dataset(_plan(_entry(dead, "x"), tmp_path))


def test_credentials_come_from_the_environment_when_the_entry_has_none(endpoint, dataset, tmp_path,
                                                                       monkeypatch) -> None:
    prefix, _ = dataset
    cfg = _plan(_entry(endpoint, prefix), tmp_path)
    assert len(scan_image_dataset(cfg).records) == IMAGES + 1  # env-key-id / env-secret from the fixture
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(StorageError, match="no AWS credentials found; set aws_access_key_id"):
        scan_image_dataset(cfg)


def test_config_requires_a_bucket_and_refuses_aws_keys_elsewhere(tmp_path) -> None:
    from simpletuner.data.config import DatasetConfigError

    with pytest.raises(DatasetConfigError, match="type 'aws' needs key 'aws_bucket_name'"):
        _plan({"id": "a", "type": "aws"}, tmp_path)
    with pytest.raises(DatasetConfigError, match="'aws_endpoint_url' is only used with \"type\": \"aws\""):
        _plan({"id": "a", "type": "local", "instance_data_dir": str(tmp_path), "aws_endpoint_url": "http://x"},
              tmp_path)
    with pytest.raises(DatasetConfigError, match="unknown key 'aws_bucket'; did you mean 'aws_bucket_name'"):
        _plan({"id": "a", "type": "aws", "aws_bucket": "b"}, tmp_path)
    cfg = _plan({"id": "a", "type": "aws", "aws_bucket_name": "b", "aws_data_prefix": "/imgs/"}, tmp_path)
    assert (cfg.instance_data_dir, cfg.aws.bucket_name, cfg.aws.data_prefix) == (None, "b", "imgs")


def _free_port() -> int:
    """A local port nothing listens on (bound, read, released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# --- end to end ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_training_three_steps_from_the_bucket(endpoint, dataset, tmp_path, tiny_folder) -> None:
    from simpletuner.options.resolve import resolve_run
    from simpletuner.training.trainer import train

    prefix, _ = dataset
    cache_url = f"s3://{BUCKET}/{prefix}-cache/vae"
    datasets = [_entry(endpoint, prefix, cache_dir_vae=cache_url),
                {"id": "text", "dataset_type": "text_embeds", "cache_dir": str(tmp_path / "cache" / "text")}]
    (tmp_path / "multidatabackend.json").write_text(json.dumps(datasets))
    args = {
        "model_family": "sd1x", "pretrained_model_name_or_path": str(tiny_folder), "model_type": "lora",
        "output_dir": str(tmp_path / "out"), "data_backend_config": str(tmp_path / "multidatabackend.json"),
        "cache_dir": str(tmp_path / "cache"), "resolution": "64", "resolution_type": "pixel",
        "aspect_bucket_alignment": "8", "mixed_precision": "no", "train_batch_size": "2", "max_train_steps": "3",
        "seed": "7", "learning_rate": "1e-3", "report_to": "none", "optimizer": "optimi-adamw",
    }
    config = resolve_run([token for key, value in args.items() for token in (f"--{key}", value)]).config
    trainer = train(config, show_progress=False)
    assert len(trainer.state.losses) == 3 and all(math.isfinite(loss) for loss in trainer.state.losses)
    summary = trainer.data.summaries[0]
    assert (summary.found, summary.latents_built) == (IMAGES + 1, IMAGES + 1)
    assert len([k for k in _keys(endpoint, f"{prefix}-cache/vae/") if k.endswith(".safetensors")]) == IMAGES + 1
    assert not (tmp_path / "cache" / "vae").exists()
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()
    assert all(path.startswith(f"s3://{BUCKET}/{prefix}/") for path in trainer.data.next_batch()["paths"])
