"""``--push_to_hub`` and friends against a recording stand-in for ``HfApi`` (no network), and their rules."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from simpletuner.options import ConfigError
from simpletuner.publishing.hub import HubPublisher, HubUploadError
from tests.publishing.fake_hub import FakeHubApi, install
from tests.training.conftest import config_for


def uploaded_files(call: dict) -> list[str]:
    """What ``upload_folder`` would send for ``call``, with huggingface_hub's own pattern filter."""
    from huggingface_hub.utils import filter_repo_objects

    root = Path(call["folder_path"])
    files = [path.relative_to(root).as_posix() for path in root.rglob("*") if path.is_file()]
    return sorted(filter_repo_objects(files, allow_patterns=call.get("allow_patterns"),
                                      ignore_patterns=call.get("ignore_patterns")))


def test_push_uploads_checkpoints_in_the_background_then_the_final_artefacts(project: Path, monkeypatch) -> None:
    from simpletuner.training.trainer import train

    api = install(monkeypatch, FakeHubApi(upload_delay=0.2))
    config = config_for(project, "pushed", push_to_hub="true", hub_model_id="me/tiny-lora", model_card_private="true",
                        push_checkpoints_to_hub="true", push_to_hub_background="true", checkpoint_step_interval=2)
    train(config, show_progress=False)
    output = project / "pushed"
    assert api.of("create_repo") == [{"repo_id": "me/tiny-lora", "private": True, "exist_ok": True,
                                      "repo_type": "model"}]
    checkpoint, final = api.of("upload_folder")  # the background upload finished before the final one began
    assert checkpoint["path_in_repo"] == "checkpoints/checkpoint-2" and checkpoint["thread"].startswith("hub-upload")
    assert Path(checkpoint["folder_path"]) == output / "checkpoint-2"
    assert final["repo_id"] == "me/tiny-lora" and Path(final["folder_path"]) == output
    assert uploaded_files(final) == ["README.md", "pytorch_lora_weights.safetensors"]
    assert any(path.name == "training_config.json" for path in output.iterdir())  # present, yet not uploaded


def test_failed_uploads_warn_for_checkpoints_and_raise_a_clear_error_at_the_end(project: Path, monkeypatch,
                                                                                caplog) -> None:
    from simpletuner.training.trainer import train

    install(monkeypatch, FakeHubApi(fail_uploads=True))
    config = config_for(project, "failing", push_to_hub="true", hub_model_id="me/failing",
                        push_checkpoints_to_hub="true", checkpoint_step_interval=2)
    with caplog.at_level(logging.WARNING, logger="simpletuner.publishing.hub"), \
            pytest.raises(HubUploadError) as error:
        train(config, show_progress=False)
    assert "could not upload checkpoint-2 to the Hub repository me/failing" in caplog.text
    message = str(error.value)
    output = project / "failing"
    assert "me/failing" in message and "simulated network failure" in message and "nothing was deleted" in message
    assert f"huggingface-cli upload me/failing {output} ." in message
    for kept in ("pytorch_lora_weights.safetensors", "README.md", "checkpoint-2"):
        assert (output / kept).exists(), kept


def test_background_wait_and_checkpoint_switch(tmp_path: Path) -> None:
    api = FakeHubApi(upload_delay=0.1)
    folder = tmp_path / "checkpoint-5"
    folder.mkdir()
    HubPublisher("me/x", checkpoints=False, api=api).push_checkpoint(folder, 5)
    assert api.calls == []  # checkpoints are only pushed with --push_checkpoints_to_hub
    publisher = HubPublisher("me/x", background=True, checkpoints=True, api=api)
    publisher.push_checkpoint(folder, 5)
    publisher.close()
    assert [call for call, _ in api.calls] == ["create_repo", "upload_folder"]


# --- rules ---------------------------------------------------------------------------------------------


def resolve(tmp_path: Path, **flags):
    from simpletuner.options.resolve import resolve_run
    from tests.conftest import write_minimal_dataset_list

    values = {"model_family": "sd1x", "output_dir": str(tmp_path / "out"),
              "data_backend_config": str(write_minimal_dataset_list(tmp_path)), **flags}
    return resolve_run([token for key, value in values.items() for token in (f"--{key}", str(value))],
                       environ={}, root=tmp_path)


@pytest.mark.parametrize(("flags", "expected"), [
    ({"push_checkpoints_to_hub": "true"}, "`--push_checkpoints_to_hub` only applies with `--push_to_hub true`"),
    ({"push_to_hub_background": "true"}, "`--push_to_hub_background` only applies"),
    ({"model_card_private": "true"}, "`--model_card_private` only applies"),
    ({"push_to_hub": "true"}, "`--push_to_hub` needs `--hub_model_id owner/name`"),
    ({"hub_model_id": "just-a-name"}, "`--hub_model_id just-a-name` is not a Hub repository id; use `owner/name`"),
    ({"hub_model_id": "a/b/c"}, "is not a Hub repository id"),
])
def test_rule_errors(tmp_path: Path, monkeypatch, flags, expected) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with pytest.raises(ConfigError, match=None) as error:
        resolve(tmp_path, **flags)
    assert expected in str(error.value)


def test_offline_mode_blocks_pushing(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError) as error:
        resolve(tmp_path, push_to_hub="true", hub_model_id="me/model")
    assert "`--push_to_hub` needs the network, but HF_HUB_OFFLINE is set" in str(error.value)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    config = resolve(tmp_path, push_to_hub="true", hub_model_id="me/model", push_to_hub_background="true").config
    assert config.push_to_hub and config.hub_model_id == "me/model"
    assert resolve(tmp_path, model_card_note="hi", model_card_safe_for_work="true").config.model_card_note == "hi"
