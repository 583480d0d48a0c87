"""The model card written at the end of every run, and ``--modelspec_comment`` in the LoRA file."""

from __future__ import annotations

from pathlib import Path

import pytest

from simpletuner.publishing.model_card import NSFW_TAG, CardFacts, modelspec_comment, render_model_card
from tests.training.conftest import config_for

SAMPLING = {"validation_prompt": "a red square", "validation_num_inference_steps": 2, "validation_resolution": 64}


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    block = text.split("---\n")[1]
    try:
        import yaml
    except ImportError:  # pragma: no cover - yaml ships with the test environment
        pytest.skip("PyYAML not installed")
    return yaml.safe_load(block)


def facts(**overrides) -> CardFacts:
    values = dict(family="sd1x", base_model="stable-diffusion-v1-5/stable-diffusion-v1-5", model_type="lora",
                  weights="pytorch_lora_weights.safetensors", steps=3, images_seen=6, resolution="64 (pixel)",
                  optimizer="adamw", learning_rate=1e-4, mixed_precision="bf16", lora_rank=4, lora_alpha=4)
    values.update(overrides)
    return CardFacts(**values)


def test_lora_run_writes_the_model_card_and_the_modelspec_comment(project: Path, monkeypatch) -> None:
    from simpletuner.models import lora_formats as formats
    from simpletuner.training.trainer import train

    monkeypatch.setenv("CARD_TEST_DATASET", "shapes-v1")
    config = config_for(project, "card", lora_rank=4, model_card_note="Trained on eight coloured shapes.",
                        modelspec_comment="dataset {env:CARD_TEST_DATASET}", **SAMPLING)
    train(config, show_progress=False)
    output = project / "card"
    text = (output / "README.md").read_text()
    meta = front_matter(text)
    assert meta["library_name"] == "diffusers" and meta["pipeline_tag"] == "text-to-image"
    assert {"diffusers", "lora", "sd1x", "text-to-image", NSFW_TAG} <= set(meta["tags"])
    assert "base_model" not in meta and meta["inference"] is False  # a local folder is no Hub model id
    assert "license" not in meta
    body = text.split("---\n", 2)[2]
    assert body.index("Trained on eight coloured shapes.") < body.index("## Training settings")
    for fact in ("| Optimizer steps | 3 |", "| Images seen | 6 |", "rank 4, alpha 4", "| Resolution | 64 (pixel) |",
                 "| Optimizer | optimi-adamw |", "| Learning rate | 0.001 |", "| Mixed precision | no |",
                 str(project / "model"), "`a red square`", "load_lora_weights(",
                 'weight_name="pytorch_lora_weights.safetensors"'):
        assert fact in body, fact
    assert "![validation grid](validation/step_3/grid_64x64.png)" in body
    assert (output / "validation" / "step_3" / "grid_64x64.png").is_file()
    _, metadata = formats.read_safetensors_header(output / "pytorch_lora_weights.safetensors")
    assert metadata["modelspec.comment"] == "dataset shapes-v1"


def test_safe_for_work_drops_the_nsfw_tag_and_warning() -> None:
    flagged = render_model_card(facts())
    assert NSFW_TAG in front_matter(flagged)["tags"] and "not be suitable" in flagged
    safe = render_model_card(facts(safe_for_work=True))
    assert NSFW_TAG not in front_matter(safe)["tags"] and "not be suitable" not in safe


def test_hub_base_model_and_full_model_usage() -> None:
    meta = front_matter(render_model_card(facts()))
    assert meta["base_model"] == "stable-diffusion-v1-5/stable-diffusion-v1-5" and meta["inference"] is True
    full = render_model_card(facts(model_type="full", weights="pipeline", repo_id="me/full-model", lora_rank=None))
    assert "full" in front_matter(full)["tags"] and "load_lora_weights" not in full
    assert 'snapshot_download("me/full-model"' in full and "from_pretrained(folder" in full
    assert "\n# full-model\n" in full


def test_a_channel_control_card_passes_a_control_image() -> None:
    card = render_model_card(facts(family="flux", model_type="full", weights="pipeline", lora_rank=None, control=True,
                                   prompts=["a red square"]))
    assert "from diffusers.utils import load_image" in card
    assert 'pipeline("a red square", control_image=load_image("control.png"))' in card
    assert "control_image" not in render_model_card(facts())


def test_modelspec_comment_lines_and_environment(monkeypatch) -> None:
    from simpletuner.options.table.publishing import OPTIONS
    from simpletuner.options.values import _coerce_kind
    from simpletuner.testing.config import make_config

    option = next(o for o in OPTIONS if o.name == "modelspec_comment")
    assert _coerce_kind(option, ["line one", "line {env:MS_TEST}"]) == "line one\nline {env:MS_TEST}"
    monkeypatch.setenv("MS_TEST", "two")
    assert modelspec_comment(make_config(modelspec_comment="line one\nline {env:MS_TEST}")) == "line one\nline two"
    monkeypatch.delenv("MS_TEST")
    assert modelspec_comment(make_config(modelspec_comment="{env:MS_TEST}")) == "{env:MS_TEST}"
    assert modelspec_comment(make_config(modelspec_comment=None)) is None
