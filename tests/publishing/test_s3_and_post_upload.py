"""``--publishing_config`` (S3) against a moto S3 server on 127.0.0.1 and ``--post_upload_script``, on
short runs of the tiny sd1x project. No test reaches the internet; the keys are dummies that must never
appear in a log line or a written file."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
boto3 = pytest.importorskip("boto3")
moto_server = pytest.importorskip("moto.server")

from simpletuner.publishing.post_upload import PostUploadScript  # noqa: E402
from simpletuner.publishing.s3 import PublishingError  # noqa: E402
from tests.training.conftest import config_for  # noqa: E402

BUCKET = "published-models"
KEY_ID = "AKIAPUBLISHTEST00001"
SECRET = "pUbLiSh-sEcReT-n0t-in-l0gs-77"


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory):
    """A moto S3 server on a free local port; no AWS configuration of this machine is read."""
    patch = pytest.MonkeyPatch()
    empty = tmp_path_factory.mktemp("aws-home") / "none"
    for name, value in {"AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": str(empty),
                        "AWS_SHARED_CREDENTIALS_FILE": str(empty), "AWS_DEFAULT_REGION": "us-east-1"}.items():
        patch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID",
                 "AWS_SECRET_ACCESS_KEY"):
        patch.delenv(name, raising=False)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id=KEY_ID,
                 aws_secret_access_key=SECRET).create_bucket(Bucket=BUCKET)
    yield url
    server.stop()
    patch.undo()


def bucket_keys(endpoint: str, prefix: str) -> list[str]:
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=KEY_ID,
                          aws_secret_access_key=SECRET)
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


def recorder(tmp_path: Path) -> Path:
    """A script that appends its arguments (one JSON list per run) to ``calls.jsonl`` beside it."""
    script = tmp_path / "record.py"
    script.write_text("import json, pathlib, sys\n"
                      f"with open({str(tmp_path / 'calls.jsonl')!r}, 'a') as out:\n"
                      "    out.write(json.dumps(sys.argv[1:]) + '\\n')\n")
    return script


def recorded_calls(tmp_path: Path) -> list[list[str]]:
    path = tmp_path / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def entry(endpoint: str, prefix: str, **extra) -> str:
    return json.dumps({"provider": "s3", "bucket": BUCKET, "prefix": prefix, "endpoint_url": endpoint,
                       "region": "us-east-1", "access_key_id": KEY_ID, "secret_access_key": SECRET, **extra})


def test_final_outputs_go_to_s3_and_the_script_gets_each_location(project: Path, endpoint: str, tmp_path: Path,
                                                                 caplog) -> None:
    from simpletuner.training.trainer import train

    script = recorder(tmp_path)
    output = project / "to-s3"
    odd = "with space; and 'quotes'"  # stays one argument: nothing runs through a shell
    config = config_for(project, "to-s3", publishing_config=entry(endpoint, "runs/one"), checkpoint_step_interval=2,
                        tracker_run_name=odd,
                        post_upload_script=f"{sys.executable} {script} {{remote_checkpoint_path}} {{global_step:05d}} "
                                           "{local_checkpoint_path} {tracker_run_name} {model_family}")
    with caplog.at_level(logging.INFO):  # (botocore's own DEBUG lines carry the key id in request headers)
        trainer = train(config, show_progress=False)
        trainer.post_upload.wait(timeout=60)
    assert bucket_keys(endpoint, "runs/one/") == ["runs/one/README.md", "runs/one/pytorch_lora_weights.safetensors"]
    assert (output / "checkpoint-2").is_dir()  # present, yet not uploaded
    assert recorded_calls(tmp_path) == [[f"s3://{BUCKET}/runs/one/pytorch_lora_weights.safetensors", "00003",
                                         str((output / "pytorch_lora_weights.safetensors").resolve()), odd, "sd1x"]]
    written = "".join(path.read_text(errors="ignore") for path in output.rglob("*.json"))
    assert SECRET not in caplog.text and KEY_ID not in caplog.text and SECRET not in written


def test_two_targets_each_start_the_script(project: Path, endpoint: str, tmp_path: Path) -> None:
    from simpletuner.training.trainer import train

    script = recorder(tmp_path)
    targets = f"[{entry(endpoint, 'a')}, {entry(endpoint, 'b/c')}]"
    config = config_for(project, "two-targets", publishing_config=targets, max_train_steps=1,
                        post_upload_script=f"{sys.executable} {script} {{remote_checkpoint_path}}")
    train(config, show_progress=False).post_upload.wait(timeout=60)
    assert bucket_keys(endpoint, "b/c/") == ["b/c/README.md", "b/c/pytorch_lora_weights.safetensors"]
    assert sorted(call[0] for call in recorded_calls(tmp_path)) == [
        f"s3://{BUCKET}/a/pytorch_lora_weights.safetensors", f"s3://{BUCKET}/b/c/pytorch_lora_weights.safetensors"]


def test_without_uploads_the_script_runs_once_with_an_empty_remote_path(project: Path, tmp_path: Path) -> None:
    from simpletuner.training.trainer import train

    script = recorder(tmp_path)
    config = config_for(project, "no-upload", max_train_steps=1,
                        post_upload_script=f"{sys.executable} {script} remote={{remote_checkpoint_path}} {{model_type}}")
    train(config, show_progress=False).post_upload.wait(timeout=60)
    assert recorded_calls(tmp_path) == [["remote=", "lora"]]


def test_a_failed_upload_names_the_bucket_keeps_the_files_and_hides_the_keys(project: Path, endpoint: str) -> None:
    from simpletuner.training.trainer import train

    config = config_for(project, "missing-bucket", max_train_steps=1,
                        publishing_config=entry(endpoint, "x").replace(BUCKET, "no-such-bucket"))
    with pytest.raises(PublishingError) as error:
        train(config, show_progress=False)
    message = str(error.value)
    assert f"bucket 'no-such-bucket' at {endpoint}" in message and "nothing was deleted" in message
    assert f"aws s3 cp --recursive {project / 'missing-bucket'} s3://no-such-bucket/x --endpoint-url {endpoint}" in message
    assert SECRET not in message and KEY_ID not in message
    assert (project / "missing-bucket" / "pytorch_lora_weights.safetensors").is_file()


def test_a_failing_script_only_warns(tmp_path: Path, caplog) -> None:
    class Config:
        post_upload_script = f"{sys.executable} -c 'import sys; sys.exit(3)' {{remote_checkpoint_path}}"
        tracker_run_name = tracker_project_name = hub_model_id = None
        model_family, model_type, lora_type = "sd1x", "lora", "standard"
        output_dir = str(tmp_path)

        def as_dict(self):
            return {"hub_model_id": None, "validation_prompt": "a cat"}

    runner = PostUploadScript.from_config(Config())
    with caplog.at_level(logging.INFO, logger="simpletuner.training.checkpoint_hooks"):  # BackgroundScripts logs
        runner.launch(tmp_path / "weights.safetensors", 7, "s3://b/k")
        runner.wait(timeout=60)
    assert "--post_upload_script for s3://b/k failed with exit status 3" in caplog.text
    assert os.path.basename(runner.command_for(tmp_path, 7, "s3://b/k")[0]) == os.path.basename(sys.executable)


def test_the_hub_upload_starts_the_script_with_the_repository_url(project: Path, tmp_path: Path, monkeypatch) -> None:
    from simpletuner.training.trainer import train
    from tests.publishing.fake_hub import FakeHubApi, install

    api = install(monkeypatch, FakeHubApi())
    script = recorder(tmp_path)
    config = config_for(project, "hub-script", max_train_steps=1, push_to_hub="true", hub_model_id="me/tiny",
                        post_upload_script=f"{sys.executable} {script} {{remote_checkpoint_path}} {{huggingface_path}}")
    train(config, show_progress=False).post_upload.wait(timeout=60)
    assert len(api.of("upload_folder")) == 1
    assert recorded_calls(tmp_path) == [["https://huggingface.co/me/tiny", "me/tiny"]]
