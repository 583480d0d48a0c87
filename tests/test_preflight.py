"""The checks ``simpletuner train`` and ``--dry-run`` make before any model loads: the model can be
found (a local folder or file, the local hub cache, the Hub when online) and the datasets hold at
least one usable image. Each failure is one line, and nothing is written in ``output_dir`` first.

The Hub is never contacted: offline runs read a hand-made cache folder, online answers are mocked.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from simpletuner.cli import main
from simpletuner.options import ConfigError
from simpletuner.options.resolve import resolve_run
from simpletuner.training import preflight
from simpletuner.training.preflight import cached_snapshot, check_model_sources, first_usable_image, run_preflight

REPO = "someone/tiny-model"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    for name in ("ENV", "TRAINING_NUM_PROCESSES", "SIMPLETUNER_LOG_LEVEL", "RANK", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.chdir(tmp_path)


@pytest.fixture(autouse=True)
def no_training(monkeypatch: pytest.MonkeyPatch):
    """Every run here must stop in the pre-flight checks, before the trainer (and a model) starts."""
    import simpletuner.training.trainer as trainer_module

    def refuse(*args, **kwargs):
        raise AssertionError("training started: the pre-flight checks let a bad setup through")

    monkeypatch.setattr(trainer_module, "train", refuse)


def write_project(root: Path, images: int = 3, model: str | None = None, **config) -> Path:
    """``root/images`` with captioned 64 px images, a dataset list and a config; returns the config path."""
    folder = root / "images"
    folder.mkdir(exist_ok=True)
    for index in range(images):
        Image.new("RGB", (64, 64), (40 * index, 90, 200)).save(folder / f"img{index}.png")
        (folder / f"img{index}.txt").write_text(f"a shape {index}", encoding="utf-8")
    (root / "multidatabackend.json").write_text(json.dumps([
        {"id": "shapes", "type": "local", "instance_data_dir": str(folder), "caption_strategy": "textfile"},
        {"id": "text", "dataset_type": "text_embeds", "cache_dir": str(root / "cache" / "text")},
    ]), encoding="utf-8")
    local_model = root / "model"
    local_model.mkdir(exist_ok=True)
    values = {"model_family": "sd1x", "pretrained_model_name_or_path": model or str(local_model),
              "output_dir": str(root / "out"), "data_backend_config": str(root / "multidatabackend.json"),
              "resolution": 64, "resolution_type": "pixel", "aspect_bucket_alignment": 8, "max_train_steps": 2,
              **config}
    path = root / "config.json"
    path.write_text(json.dumps(values), encoding="utf-8")
    return path


def fake_cached_repo(cache: Path, repo_id: str, revision: str = "main", commit: str = "abc123") -> Path:
    """The layout huggingface_hub leaves after a download: refs/<revision> naming a snapshot folder."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    (snapshot / "model_index.json").write_text("{}")
    return snapshot


def train_error(capsys: pytest.CaptureFixture, *argv: str) -> str:
    assert main(["train", *argv]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("simpletuner train: configuration error: ")]
    assert len(lines) == 1, err
    return lines[0][len("simpletuner train: configuration error: "):]


# --- the model ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "train"])
def test_a_missing_model_path_stops_before_anything_is_written(tmp_path, capsys, dry_run) -> None:
    config = write_project(tmp_path, model="./models/my-sd15")
    message = train_error(capsys, "--config", str(config), *(["--dry-run"] if dry_run else []))
    assert message == ("`--pretrained_model_name_or_path` './models/my-sd15' is neither an existing folder nor a file "
                       f"(looked at {tmp_path / 'models/my-sd15'}); fix the path, or give a Hugging Face Hub id such "
                       "as owner/name")
    assert not (tmp_path / "out").exists()  # no training_config.json left behind


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "train"])
def test_an_uncached_hub_id_offline_stops_before_anything_is_written(tmp_path, capsys, dry_run) -> None:
    config = write_project(tmp_path, model=REPO)
    message = train_error(capsys, "--config", str(config), *(["--dry-run"] if dry_run else []))
    assert message.startswith(f"`--pretrained_model_name_or_path` '{REPO}' is not a local folder (no "
                              f"{tmp_path / REPO}) and is not in the local Hugging Face cache ({tmp_path / 'hub-cache'}), "
                              "and HF_HUB_OFFLINE is set, so it cannot be downloaded; fix the path or the id")
    assert not (tmp_path / "out").exists()


def test_the_flavour_default_is_checked_when_no_model_is_named(tmp_path, capsys) -> None:
    config = write_project(tmp_path)
    message = train_error(capsys, "--config", str(config), "--pretrained_model_name_or_path", "", "--dry-run")
    assert message.startswith("the sd1x 1.5 model 'stable-diffusion-v1-5/stable-diffusion-v1-5' (the default, as "
                              "`--pretrained_model_name_or_path` is unset) is not in the local Hugging Face cache")
    assert "set `--pretrained_model_name_or_path` to a local model folder" in message


def test_a_hub_id_in_the_local_cache_passes_offline(tmp_path, capsys) -> None:
    fake_cached_repo(tmp_path / "hub-cache", REPO)
    config = write_project(tmp_path, model=REPO)
    assert main(["train", "--config", str(config), "--dry-run"]) == 0
    assert "start:        " in capsys.readouterr().out


def test_the_cache_must_hold_the_requested_revision(tmp_path) -> None:
    cache = tmp_path / "hub-cache"
    snapshot = fake_cached_repo(cache, REPO)
    assert cached_snapshot(REPO, None, cache) == snapshot
    assert cached_snapshot(REPO, "abc123", cache) == snapshot  # a commit names its own snapshot
    assert cached_snapshot(REPO, "v2", cache) is None
    config = write_project(tmp_path, model=REPO, revision="v2")
    with pytest.raises(ConfigError, match=r"is not in the local Hugging Face cache \(revision v2\)"):
        check_model_sources(resolve_run(["--config", str(config)], environ={}).config, {"HF_HUB_OFFLINE": "1",
                                                                                       "HF_HUB_CACHE": str(cache)})


def test_component_overrides_are_checked_too(tmp_path, capsys) -> None:
    config = write_project(tmp_path)
    message = train_error(capsys, "--config", str(config), "--pretrained_vae_model_name_or_path", "vaes/missing.safetensors",
                          "--dry-run")
    assert message.startswith("`--pretrained_vae_model_name_or_path` 'vaes/missing.safetensors' is neither an existing "
                              "folder nor a file")


def _not_found(repo_id: str) -> Exception:
    httpx = pytest.importorskip("httpx2")
    from huggingface_hub.errors import RepositoryNotFoundError

    request = httpx.Request("GET", f"https://huggingface.co/api/models/{repo_id}")
    return RepositoryNotFoundError("404 Client Error: Repository Not Found", response=httpx.Response(404, request=request))


def online_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, answer):
    """A config naming an uncached Hub id, with the Hub's answer to ``model_info`` mocked."""
    import huggingface_hub

    asked = []

    def model_info(self, repo_id, revision=None, **kwargs):
        asked.append((repo_id, revision))
        if isinstance(answer, BaseException):
            raise answer
        return answer

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    return resolve_run(["--config", str(write_project(tmp_path, model=REPO))], environ={}).config, asked


def test_online_an_unknown_hub_id_is_refused(tmp_path, monkeypatch) -> None:
    config, asked = online_config(tmp_path, monkeypatch, _not_found(REPO))
    with pytest.raises(ConfigError) as error:
        check_model_sources(config, {"HF_HUB_CACHE": str(tmp_path / "hub-cache")})
    assert asked == [(REPO, None)]
    assert str(error.value) == (f"`--pretrained_model_name_or_path` '{REPO}' is not a local folder (no {tmp_path / REPO}) "
                                "and the Hugging Face Hub has no model repository of that name (or it is private); fix "
                                "the path or the id (private or gated models need `huggingface-cli login` or HF_TOKEN)")


def test_online_a_known_hub_id_passes_and_a_silent_hub_only_warns(tmp_path, monkeypatch) -> None:
    config, asked = online_config(tmp_path, monkeypatch, object())
    notes, warnings = check_model_sources(config, {"HF_HUB_CACHE": str(tmp_path / "hub-cache")})
    assert (notes, warnings) == ([f"download:     {REPO} from the Hugging Face Hub"], [])
    config, asked = online_config(tmp_path, monkeypatch, ConnectionError("no route to host"))
    notes, warnings = check_model_sources(config, {"HF_HUB_CACHE": str(tmp_path / "hub-cache")})
    assert notes == []
    assert warnings == [f"`--pretrained_model_name_or_path` '{REPO}': could not ask the Hugging Face Hub whether it "
                        "exists (ConnectionError: no route to host); loading will try anyway"]


# --- the datasets ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "train"])
def test_an_empty_image_folder_stops_before_the_model_loads(tmp_path, capsys, dry_run) -> None:
    config = write_project(tmp_path, images=0)
    message = train_error(capsys, "--config", str(config), *(["--dry-run"] if dry_run else []))
    assert message == (f"no usable images in any enabled dataset of {tmp_path / 'multidatabackend.json'} (shapes: 0 "
                       f"file(s) found in {tmp_path / 'images'}, 0 skipped); check instance_data_dir, the image files "
                       "and their captions")
    assert not (tmp_path / "out").exists()


def test_images_without_captions_are_named_with_the_first_reason(tmp_path, capsys) -> None:
    config = write_project(tmp_path, images=2)
    for caption in (tmp_path / "images").glob("*.txt"):
        caption.unlink()
    message = train_error(capsys, "--config", str(config), "--dry-run")
    assert message.startswith("no usable images in any enabled dataset of ")
    assert f"(shapes: 2 file(s) found in {tmp_path / 'images'}, 2 skipped; first reason: {tmp_path / 'images/img0.png'}: " \
           "caption file" in message


def test_images_below_the_minimum_size_are_not_usable(tmp_path, capsys) -> None:
    config = write_project(tmp_path, images=2)
    message = train_error(capsys, "--config", str(config), "--minimum_image_size", "512", "--dry-run")
    assert "shapes: 2 file(s) found" in message and "2 skipped; first reason: " in message


def test_the_search_stops_at_the_first_usable_image(tmp_path, monkeypatch) -> None:
    write_project(tmp_path, images=preflight.SCAN_CHUNK * 3)
    run = resolve_run(["--config", str(tmp_path / "config.json")], environ={})
    from simpletuner.data import metadata

    scanned = []
    original = metadata.scan_image_dataset

    def counting_scan(*args, **kwargs):
        result = original(*args, **kwargs)
        scanned.append(len(result.listed))
        return result

    monkeypatch.setattr(metadata, "scan_image_dataset", counting_scan)
    from simpletuner.data.settings import resolve_dataset

    dataset = resolve_dataset(run.dataset_plan.enabled_images[0], run.config)
    count = first_usable_image(dataset, run.config, run.dataset_plan)
    assert count.usable and count.listed == preflight.SCAN_CHUNK * 3
    assert scanned == [preflight.SCAN_CHUNK]


def test_a_good_setup_passes_every_check_and_writes_nothing_in_a_dry_run(tmp_path, capsys) -> None:
    config = write_project(tmp_path)
    run = resolve_run(["--config", str(config), "--dry-run"], environ={})
    report = run_preflight(run, act=False)
    assert report.folder.action == "fresh" and report.config is run.config
    assert report.notes == [f"start:        {tmp_path / 'out'} holds no checkpoint: starting at step 0"]
    assert main(["train", "--config", str(config), "--dry-run"]) == 0
    assert capsys.readouterr().out.rstrip().endswith(report.notes[-1])
    assert not (tmp_path / "out").exists()


def test_the_regularizers_teacher_and_tiny_autoencoder_are_checked_too(tmp_path) -> None:
    """U-REPA's DINOv2 (a short name meaning a Hub id) and its Tiny AutoEncoder (the family's default
    when unset) must be loadable too; the base model's ``--revision`` does not apply to them."""
    cache = tmp_path / "hub-cache"
    config = write_project(tmp_path, urepa_enabled=True, urepa_model="dinov2_vits14", urepa_use_tae=True,
                           alignment_teacher_features="live", revision="v2")
    resolved = resolve_run(["--config", str(config)], environ={}).config
    environ = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    with pytest.raises(ConfigError, match=r"^`--urepa_model` 'dinov2_vits14' is not a local folder .* not in the "
                                          r"local Hugging Face cache \("):
        check_model_sources(resolved, environ)
    fake_cached_repo(cache, "facebook/dinov2-small")
    with pytest.raises(ConfigError, match=r"^the Tiny AutoEncoder 'madebyollin/taesd'"):
        check_model_sources(resolved, environ)
    fake_cached_repo(cache, "madebyollin/taesd")
    assert check_model_sources(resolved, environ) == ([], [])
