"""``--resume_from_checkpoint s3://...`` against the moto S3 server the publishing tests start: finding
the checkpoint (named or newest), refusing a missing bucket, an empty prefix and an incomplete upload
(naming the missing file), downloading atomically, and a resumed run that ends with exactly the weights
of an uninterrupted one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
boto3 = pytest.importorskip("boto3")
pytest.importorskip("moto.server")

from simpletuner.options import ConfigError  # noqa: E402
from simpletuner.testing.kill_runs import final_weights, max_difference  # noqa: E402
from simpletuner.training import checkpoint as ckpt  # noqa: E402
from simpletuner.training import remote_checkpoint as remote  # noqa: E402
from tests.publishing.test_s3_and_post_upload import BUCKET, KEY_ID, SECRET, endpoint, entry  # noqa: E402,F401
from tests.training.conftest import Interrupted, config_for, crash_after_step, run_args  # noqa: E402


@pytest.fixture
def s3_env(endpoint, monkeypatch) -> str:
    """boto3's own way to find the moto server and its keys, as a user without --publishing_config has."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    return endpoint


def client(endpoint: str):
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=KEY_ID,
                        aws_secret_access_key=SECRET)


def upload_folder(endpoint: str, folder: Path, prefix: str, skip: tuple[str, ...] = ()) -> None:
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder).as_posix()
        if path.is_file() and relative not in skip:
            client(endpoint).upload_file(str(path), BUCKET, f"{prefix}/{relative}")


def fake_checkpoint(root: Path, step: int, **state) -> Path:
    """A real (manifest-checked) checkpoint folder with small files, one of them in a sub-folder."""
    return ckpt.write_checkpoint(root, step, {"weights.bin": lambda p: p.write_bytes(b"w" * (10 + step)),
                                              "ema": lambda p: (p.mkdir(), (p / "ema.bin").write_bytes(b"e" * step))},
                                 {"global_step": step, **state})


def test_a_named_checkpoint_is_downloaded_atomically_and_reused(s3_env, tmp_path):
    upload_folder(s3_env, fake_checkpoint(tmp_path / "local", 3), "named/checkpoint-3")
    output = tmp_path / "out"
    staged = remote.stage_remote_checkpoint(f"s3://{BUCKET}/named/checkpoint-3", output)
    assert staged == output / remote.STAGING_FOLDER / "checkpoint-3"
    assert ckpt.is_complete(staged) and (staged / "ema" / "ema.bin").read_bytes() == b"eee"
    assert [entry.name for entry in staged.parent.iterdir()] == ["checkpoint-3"]  # no partial folder left
    assert ckpt.resolve_resume_path(output, str(staged)) == staged  # resumable like any local checkpoint

    client(s3_env).delete_object(Bucket=BUCKET, Key="named/checkpoint-3/weights.bin")
    with pytest.raises(remote.RemoteCheckpointError, match=r"weights\.bin is missing"):
        remote.stage_remote_checkpoint(f"s3://{BUCKET}/named/checkpoint-3", output)
    upload_folder(s3_env, tmp_path / "local" / "checkpoint-3", "named/checkpoint-3")
    (staged / "weights.bin").write_bytes(b"changed by hand")  # no longer matches: fetched again
    remote.stage_remote_checkpoint(f"s3://{BUCKET}/named/checkpoint-3/", output)
    assert ckpt.is_complete(staged) and (staged / "weights.bin").read_bytes() == b"w" * 13


def test_a_prefix_means_its_newest_complete_unsuspected_checkpoint(s3_env, tmp_path, caplog):
    local = tmp_path / "local"
    for step in (2, 10):
        upload_folder(s3_env, fake_checkpoint(local, step), f"runs/a/checkpoint-{step}")
    upload_folder(s3_env, fake_checkpoint(local, 12, suspect=True), "runs/a/checkpoint-12")
    upload_folder(s3_env, fake_checkpoint(local, 14), "runs/a/checkpoint-14", skip=("manifest.json",))
    found = remote.find_remote_checkpoint(remote.target_for(f"s3://{BUCKET}/runs/a/"))
    assert found.step == 10 and found.uri == f"s3://{BUCKET}/runs/a/checkpoint-10"  # numeric order, not text
    assert "checkpoint-14, incomplete (manifest.json is missing" in caplog.text
    assert "checkpoint-12, marked suspect" in caplog.text
    assert "would download s3://published-models/runs/a/checkpoint-10 (step 10, 3 files" in \
        remote.describe_remote_checkpoint(f"s3://{BUCKET}/runs/a", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # the dry run writes nothing


def test_missing_bucket_empty_prefix_and_incomplete_upload_are_named(s3_env, tmp_path):
    with pytest.raises(remote.RemoteCheckpointError, match=r"bucket 'no-such-bucket' .*does not exist"):
        remote.stage_remote_checkpoint("s3://no-such-bucket/runs/checkpoint-2", tmp_path)
    with pytest.raises(remote.RemoteCheckpointError, match=r"s3://published-models/nothing-here/ holds no "
                                                          r"checkpoint-<step> folder"):
        remote.stage_remote_checkpoint(f"s3://{BUCKET}/nothing-here/", tmp_path)
    upload_folder(s3_env, fake_checkpoint(tmp_path / "local", 4), "broken/checkpoint-4", skip=("ema/ema.bin",))
    with pytest.raises(remote.RemoteCheckpointError, match=r"checkpoint-4 is not a complete checkpoint: "
                                                          r"ema/ema.bin is missing"):
        remote.stage_remote_checkpoint(f"s3://{BUCKET}/broken/checkpoint-4", tmp_path)
    with pytest.raises(remote.RemoteCheckpointError, match=r"no usable checkpoint under .*broken/: checkpoint-4: "
                                                          r"ema/ema.bin is missing"):
        remote.stage_remote_checkpoint(f"s3://{BUCKET}/broken", tmp_path)
    assert not (tmp_path / remote.STAGING_FOLDER).exists()
    with pytest.raises(ckpt.CheckpointError, match="downloaded by `simpletuner train` before the run starts"):
        ckpt.resolve_resume_path(tmp_path, f"s3://{BUCKET}/broken/checkpoint-4")


def test_an_interrupted_download_never_looks_like_a_checkpoint(s3_env, tmp_path, monkeypatch):
    upload_folder(s3_env, fake_checkpoint(tmp_path / "local", 5), "cut/checkpoint-5")
    calls = []
    original = remote._Bucket.download

    def failing_download(self, key, path):
        calls.append(key)
        if len(calls) == 2:
            raise remote.RemoteCheckpointError("connection reset (injected)")
        original(self, key, path)

    with monkeypatch.context() as patch, pytest.raises(remote.RemoteCheckpointError, match="injected"):
        patch.setattr(remote._Bucket, "download", failing_download)
        remote.stage_remote_checkpoint(f"s3://{BUCKET}/cut/checkpoint-5", tmp_path / "out")
    assert list((tmp_path / "out" / remote.STAGING_FOLDER).iterdir()) == []  # the partial folder is gone
    assert ckpt.is_complete(remote.stage_remote_checkpoint(f"s3://{BUCKET}/cut/checkpoint-5", tmp_path / "out"))


def test_publishing_config_for_the_same_bucket_supplies_endpoint_and_keys(endpoint, tmp_path):
    published = json.loads(entry(endpoint, "runs/b"))  # as the validated option holds it
    target = remote.target_for(f"s3://{BUCKET}/runs/b/checkpoint-2", [published])
    assert (target.endpoint_url, target.access_key_id, target.prefix) == (endpoint, KEY_ID, "runs/b/checkpoint-2")
    assert remote.target_for("s3://other-bucket/x", published).endpoint_url is None
    with pytest.raises(remote.RemoteCheckpointError, match="no bucket name"):
        remote.parse_s3_uri("s3:///checkpoint-2")


def test_resuming_from_s3_ends_with_the_uninterrupted_weights(project, s3_env):
    from simpletuner.options.resolve import resolve_run
    from simpletuner.training.preflight import run_preflight
    from simpletuner.training.trainer import train

    run = dict(max_train_steps=4, checkpoint_step_interval=2)
    train(config_for(project, "s3-reference", **run), show_progress=False)
    with crash_after_step(2), pytest.raises(Interrupted):
        train(config_for(project, "s3-resumed", **run), show_progress=False)
    output = project / "s3-resumed"
    upload_folder(s3_env, output / "checkpoint-2", "runs/s3-resumed/checkpoint-2")
    shutil.rmtree(output)  # nothing local is left: the machine that trained is gone

    args = run_args(project, "s3-resumed", optimizer="optimi-adamw", resume_from_checkpoint=f"s3://{BUCKET}/runs/"
                    "s3-resumed/", **run)
    dry = run_preflight(resolve_run(args), act=False)
    assert "would download s3://published-models/runs/s3-resumed/checkpoint-2 (step 2" in dry.notes[-1]
    assert not output.exists()
    report = run_preflight(resolve_run(args))
    staged = output / remote.STAGING_FOLDER / "checkpoint-2"
    assert report.config.resume_from_checkpoint == str(staged)
    resumed = train(report.config, show_progress=False)
    assert resumed.resumed_from == staged and resumed.state.global_step == 4
    assert max_difference(final_weights(output), final_weights(project / "s3-reference")) == 0.0


def test_a_missing_remote_checkpoint_stops_preflight_with_a_config_error(project, s3_env):
    from simpletuner.options.resolve import resolve_run
    from simpletuner.training.preflight import run_preflight

    args = run_args(project, "s3-none", optimizer="optimi-adamw", resume_from_checkpoint=f"s3://{BUCKET}/empty/")
    with pytest.raises(ConfigError, match="holds no checkpoint-<step> folder"):
        run_preflight(resolve_run(args))
    assert not (project / "s3-none").exists()


def test_overwrite_output_dir_moves_the_earlier_run_and_resumes_from_the_s3_copy(project, s3_env, tmp_path):
    from simpletuner.options.resolve import resolve_run
    from simpletuner.training.preflight import run_preflight

    upload_folder(s3_env, fake_checkpoint(tmp_path / "local", 6), "seed/checkpoint-6")
    output = project / "s3-overwrite"
    fake_checkpoint(output, 1)  # an earlier run in the same output_dir
    args = run_args(project, "s3-overwrite", optimizer="optimi-adamw", overwrite_output_dir="true",
                    resume_from_checkpoint=f"s3://{BUCKET}/seed/checkpoint-6")
    report = run_preflight(resolve_run(args))
    assert report.folder.action == "overwrite" and not (output / "checkpoint-1").exists()
    assert report.config.resume_from_checkpoint == str(output / remote.STAGING_FOLDER / "checkpoint-6")
    assert ckpt.is_complete(output / remote.STAGING_FOLDER / "checkpoint-6")


def test_the_other_local_ranks_wait_for_rank_0s_copy(tmp_path):
    local = fake_checkpoint(tmp_path / "local", 7)
    files = json.loads((local / ckpt.MANIFEST).read_text())["files"]
    wanted = remote.RemoteCheckpoint(remote.S3Target(bucket=BUCKET, prefix="x/checkpoint-7"), 7, files)
    naps = []
    with pytest.raises(remote.RemoteCheckpointError, match=r"waited 3 s for local rank 0 to download "
                                                          r"s3://published-models/x/checkpoint-7"):
        remote.wait_for_download(wanted, tmp_path / "out", timeout=3, sleep=naps.append)
    assert naps == [1.0, 1.0, 1.0]

    def rank_0_finishes(seconds):  # the copy appears while this rank waits
        shutil.copytree(local, remote.staged_path(tmp_path / "out", wanted))

    assert remote.wait_for_download(wanted, tmp_path / "out", sleep=rank_0_finishes) == \
        tmp_path / "out" / remote.STAGING_FOLDER / "checkpoint-7"
