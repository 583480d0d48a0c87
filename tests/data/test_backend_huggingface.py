"""Hugging Face datasets loaded from a local folder: image and caption columns, cache, training."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest

torch = pytest.importorskip("torch")
datasets = pytest.importorskip("datasets")

from PIL import Image  # noqa: E402

from simpletuner.data.backends import open_dataset  # noqa: E402
from simpletuner.data.buckets import assign_buckets  # noqa: E402
from simpletuner.data.cache.vae import VaeCache  # noqa: E402
from simpletuner.data.config import DatasetConfigError, parse_dataset_plan  # noqa: E402
from simpletuner.data.metadata import scan_image_dataset  # noqa: E402
from simpletuner.testing.shapes import make_demo_dataset  # noqa: E402

_TEXT = {"id": "text", "dataset_type": "text_embeds", "cache_dir": "cache/text"}
ROWS = 6


def _save_dataset(folder: Path, tmp: Path, with_sizes: bool = False, as_dict: bool = False) -> list[str]:
    """Demo shapes as a ``datasets.Dataset`` (Image + caption columns) written by ``save_to_disk``.

    The last row has an empty caption and a ``tags`` fallback. Returns the captions used.
    """
    paths = make_demo_dataset(tmp / "pngs", ROWS, size=64, seed=5)
    captions = [path.with_suffix(".txt").read_text().strip() for path in paths]
    columns = {"picture": [{"bytes": p.read_bytes(), "path": None} for p in paths],
               "text": captions[:-1] + [""], "tags": ["-"] * (ROWS - 1) + [captions[-1]]}
    features = {"picture": datasets.Image(), "text": datasets.Value("string"), "tags": datasets.Value("string")}
    if with_sizes:
        columns.update(w=[64] * ROWS, h=[64] * ROWS)
        features.update(w=datasets.Value("int32"), h=datasets.Value("int32"))
    dataset = datasets.Dataset.from_dict(columns, features=datasets.Features(features))
    (datasets.DatasetDict({"train": dataset}) if as_dict else dataset).save_to_disk(str(folder))
    return captions


def _entry(folder: Path, **columns) -> dict:
    return {"id": "hf", "type": "huggingface", "dataset_name": str(folder), "resolution": 64,
            "resolution_type": "pixel",
            "huggingface": {"image_column": "picture", "caption_column": "text", "fallback_caption_column": "tags",
                            **columns}}


def _cfg(entry: dict):
    return parse_dataset_plan([entry, _TEXT]).images[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model folder, loaded model) built once for the module."""
    from simpletuner.models.sd1x import StableDiffusion1x
    from simpletuner.options.resolve import merge_sources
    from simpletuner.testing.tiny_models import make_tiny_model

    folder = tmp_path_factory.mktemp("tiny") / "model"
    make_tiny_model("sd1x", folder, seed=0)
    config = merge_sources({}, {"model_family": "sd1x", "output_dir": str(folder.parent / "out"),
                                "pretrained_model_name_or_path": str(folder)}, "test", [])
    family = StableDiffusion1x(config, torch.device("cpu"), torch.float32)
    family.load()
    return folder, family


def test_scan_reads_image_and_caption_columns(tmp_path: Path) -> None:
    captions = _save_dataset(tmp_path / "ds", tmp_path)
    cfg = _cfg(_entry(tmp_path / "ds"))
    assert cfg.caption_strategy == "huggingface"
    result = scan_image_dataset(cfg)
    assert result.skipped == []
    assert [(r.key, r.caption, r.width, r.height) for r in result.records] == [
        (str(row), caption, 64, 64) for row, caption in enumerate(captions)]  # last one from the fallback
    assert str(result.records[2].path) == f"{tmp_path / 'ds'}[2]"


def test_size_columns_skip_the_header_and_dataset_dict_split(tmp_path: Path, monkeypatch) -> None:
    _save_dataset(tmp_path / "dd", tmp_path, with_sizes=True, as_dict=True)
    cfg = _cfg(_entry(tmp_path / "dd", width_column="w", height_column="h"))

    def no_opening(*args, **kwargs):
        raise AssertionError("no image may be opened when the table gives sizes")

    monkeypatch.setattr(Image, "open", no_opening)
    assert len(scan_image_dataset(cfg).records) == ROWS
    with pytest.raises(Exception, match=r"has no split 'validation'; its splits are \['train'\]"):
        scan_image_dataset(_cfg(_entry(tmp_path / "dd", split="validation")))


def test_parquet_files_folder_and_file_paths_in_the_image_column(tmp_path: Path) -> None:
    make_demo_dataset(tmp_path / "imgs", 3, size=32, seed=2)
    names = sorted(p.name for p in (tmp_path / "imgs").glob("*.png"))
    (tmp_path / "repo" / "data").mkdir(parents=True)
    datasets.Dataset.from_dict({"file": names, "caption": ["x", "y", "z"]}).to_parquet(
        str(tmp_path / "repo" / "data" / "train-00000-of-00001.parquet"))
    entry = {"id": "hf", "type": "huggingface", "dataset_name": str(tmp_path / "repo"),
             "instance_data_dir": str(tmp_path / "imgs"), "huggingface": {"image_column": "file"}}
    result = scan_image_dataset(_cfg(entry))
    assert [(r.caption, r.width) for r in result.records] == [("x", 32), ("y", 32), ("z", 32)]


def test_config_rules(tmp_path: Path) -> None:
    with pytest.raises(DatasetConfigError, match="type 'huggingface' needs key 'dataset_name'"):
        _cfg({"id": "hf", "type": "huggingface"})
    with pytest.raises(DatasetConfigError, match="is not a folder; .*never downloaded from the hub"):
        _cfg({"id": "hf", "type": "huggingface", "dataset_name": "someone/some-dataset"})
    (tmp_path / "ds").mkdir()
    with pytest.raises(DatasetConfigError, match="a huggingface dataset takes captions from its caption column"):
        _cfg({"id": "hf", "type": "huggingface", "dataset_name": str(tmp_path / "ds"), "caption_strategy": "textfile"})
    with pytest.raises(DatasetConfigError, match="'huggingface': unknown key 'image_col'; did you mean 'image_column'"):
        _cfg({"id": "hf", "type": "huggingface", "dataset_name": str(tmp_path / "ds"),
              "huggingface": {"image_col": "x"}})


def test_latent_cache_from_rows_is_reused(tmp_path: Path, tiny) -> None:
    _, model = tiny
    _save_dataset(tmp_path / "ds", tmp_path)
    cfg = _cfg(_entry(tmp_path / "ds"))
    source = open_dataset(cfg)
    buckets = assign_buckets(scan_image_dataset(cfg, source).records, 64, "pixel", 8, crop=False)
    first = VaeCache(tmp_path / "vae", cfg.id, images=source.images).ensure(buckets, model, 4, progress=False)
    assert (first.built, first.reused, first.skipped) == (ROWS, 0, [])
    again = VaeCache(tmp_path / "vae", cfg.id, images=open_dataset(cfg).images).ensure(buckets, model, 4,
                                                                                       progress=False)
    assert (again.built, again.reused) == (0, ROWS)


@pytest.mark.slow
def test_two_training_steps_from_a_saved_dataset(tmp_path: Path, tiny) -> None:
    from simpletuner.options.resolve import resolve_run
    from simpletuner.training.trainer import train

    folder, _ = tiny
    captions = _save_dataset(tmp_path / "ds", tmp_path)
    (tmp_path / "multidatabackend.json").write_text(json.dumps([
        _entry(tmp_path / "ds"), {**_TEXT, "cache_dir": str(tmp_path / "cache" / "text")}]))
    args = {
        "model_family": "sd1x", "pretrained_model_name_or_path": str(folder), "model_type": "lora",
        "output_dir": str(tmp_path / "out"), "data_backend_config": str(tmp_path / "multidatabackend.json"),
        "cache_dir": str(tmp_path / "cache"), "resolution": "64", "resolution_type": "pixel",
        "aspect_bucket_alignment": "8", "mixed_precision": "no", "train_batch_size": "2", "max_train_steps": "2",
        "seed": "7", "learning_rate": "1e-3", "report_to": "none", "optimizer": "optimi-adamw",
    }
    trainer = train(resolve_run([t for k, v in args.items() for t in (f"--{k}", v)]).config, show_progress=False)
    assert len(trainer.state.losses) == 2
    summary = trainer.data.summaries[0]
    assert (summary.found, summary.latents_built, summary.skipped) == (ROWS, ROWS, [])
    assert len(list((tmp_path / "cache" / "vae" / "hf").rglob("*.safetensors"))) == ROWS
    batch = trainer.data.next_batch()
    assert set(batch["captions"]) <= set(captions)
