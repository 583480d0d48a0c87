"""``--evaluation_type clip``: a CLIP score of images sampled from the validation prompts, logged at
the eval schedule as ``eval/clip_score``; repeatable, no effect on training, and the config rules."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.training.conftest import config_for

PROMPT = "a red circle on a white background"


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> Path:
    """A tiny random CLIP model (32 px images, patch 8) with tokenizer and image processor, built offline."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    from simpletuner.testing.tokenizers import build_clip_tokenizer
    from simpletuner.training.clip_eval import _image_processor

    folder = tmp_path_factory.mktemp("tiny-clip")
    tokenizer = build_clip_tokenizer()
    config = CLIPConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 16, "intermediate_size": 32,
                     "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 77,
                     "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                     "pad_token_id": tokenizer.pad_token_id},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        projection_dim=8,
    )
    torch.manual_seed(0)
    model = CLIPModel(config)
    with torch.no_grad():  # a shared positive direction in both embeddings: scores land inside (0, 100)
        for norm in (model.vision_model.post_layernorm, model.text_model.final_layer_norm):
            norm.bias.fill_(1.0)
        for projection in (model.visual_projection, model.text_projection):
            projection.weight.mul_(0.5).add_(0.3)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    _image_processor(str(folder), 32).save_pretrained(folder)
    return folder


def _run(root: Path, output: str, monkeypatch, **flags):
    """Train; returns (trainer, [(step, scalars)] of every eval/ log call)."""
    from simpletuner.tracking.trackers import NullTracker
    from simpletuner.training.trainer import train

    logged: list[tuple[int, dict]] = []

    def capture(self, scalars, step):
        evals = {key: value for key, value in scalars.items() if key.startswith("eval/")}
        if evals:
            logged.append((step, evals))

    monkeypatch.setattr(NullTracker, "log_scalars", capture)
    trainer = train(config_for(root, output, **flags), show_progress=False)
    return trainer, logged


def _clip_flags(folder: Path, **extra) -> dict:
    return {"max_train_steps": 2, "validation_prompt": PROMPT, "validation_num_inference_steps": 2,
            "validation_resolution": 64, "evaluation_type": "clip",
            "pretrained_evaluation_model_name_or_path": str(folder), "num_eval_images": 2, **extra}


def test_clip_score_is_logged_repeatable_and_leaves_training_alone(project, clip_folder, monkeypatch):
    import torch

    plain, plain_logged = _run(project, "clip-none", monkeypatch, max_train_steps=2)
    assert plain_logged == []
    trainer, logged = _run(project, "clip-steps", monkeypatch, **_clip_flags(clip_folder, eval_steps_interval=1))
    # no eval dataset in this project: the evaluation is the CLIP score alone, once per step
    assert [step for step, _ in logged] == [1, 2]
    for _, scalars in logged:
        assert set(scalars) == {"eval/clip_score"}
        assert math.isfinite(scalars["eval/clip_score"]) and 0 < scalars["eval/clip_score"] < 100
    assert logged[0][1] != logged[1][1]  # the weights moved between steps 1 and 2
    assert trainer.state.losses == plain.state.losses  # exact: scoring draws no global random numbers
    # the same weights give the same score; the global random state and the modes are left alone
    before = torch.get_rng_state()
    assert trainer.evaluate(2) == logged[1][1]
    assert trainer.evaluate(2) == logged[1][1]
    assert torch.equal(before, torch.get_rng_state())
    assert trainer.model.denoiser.training
    clip = trainer.clip_eval.load()[0]
    assert not clip.training and not any(p.requires_grad for p in clip.parameters())
    assert trainer.clip_eval.prompts == [PROMPT, PROMPT]


def test_clip_score_and_eval_loss_are_logged_together(project, clip_folder, monkeypatch):
    import json

    from simpletuner.testing.shapes import make_demo_dataset

    make_demo_dataset(project / "clip_held", 2, size=64, seed=13)
    entries = json.loads((project / "multidatabackend.json").read_text())
    entries.append({"id": "clip_held", "type": "local", "dataset_type": "eval",
                    "instance_data_dir": str(project / "clip_held"), "caption_strategy": "textfile",
                    "resolution": 64, "resolution_type": "pixel"})
    (project / "clip_eval_datasets.json").write_text(json.dumps(entries))
    _, logged = _run(project, "clip-and-loss", monkeypatch, data_backend_config=str(project / "clip_eval_datasets.json"),
                     **_clip_flags(clip_folder, eval_steps_interval=2, num_eval_images=1))
    assert [step for step, _ in logged] == [2]  # one tracker call per evaluation
    assert set(logged[0][1]) == {"eval/loss/clip_held", "eval/clip_score"}


def test_clip_score_helper():
    import torch

    from simpletuner.training.clip_eval import clip_score, eval_prompts

    same = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert clip_score(same, same) == pytest.approx(100.0)
    assert clip_score(same, -same) == 0.0  # clamped at 0 per image
    assert clip_score(same, torch.tensor([[1.0, 0.0], [0.0, -1.0]])) == pytest.approx(50.0)
    assert eval_prompts(["a", "b"], 5) == ["a", "b", "a", "b", "a"]


@pytest.mark.parametrize(("flags", "message"), [
    ({"evaluation_type": "clip", "eval_steps_interval": 2, "validation_prompt": PROMPT},
     "needs `--pretrained_evaluation_model_name_or_path`"),
    ({"evaluation_type": "clip", "eval_steps_interval": 2, "pretrained_evaluation_model_name_or_path": "clip"},
     "there is none"),
    ({"evaluation_type": "clip", "eval_steps_interval": 2, "validation_prompt": PROMPT,
      "pretrained_evaluation_model_name_or_path": "clip", "num_eval_images": 0}, "--num_eval_images"),
    ({"evaluation_type": "clip", "validation_prompt": PROMPT, "pretrained_evaluation_model_name_or_path": "clip"},
     "without an evaluation schedule"),
    ({"num_eval_images": 3}, "without an evaluation schedule"),
    ({"eval_steps_interval": 2, "num_eval_images": 3}, "without `--evaluation_type clip`"),
    ({"eval_steps_interval": 2, "pretrained_evaluation_model_name_or_path": "clip"},
     "without `--evaluation_type clip`"),
])
def test_clip_rules(project, flags, message):
    from simpletuner.options import ConfigError

    with pytest.raises(ConfigError, match=message):
        config_for(project, "clip-rules", **flags)


def test_clip_with_library_prompts_is_accepted(project):
    config = config_for(project, "clip-ok", evaluation_type="clip", eval_steps_interval=2,
                        validation_prompt_library="true", pretrained_evaluation_model_name_or_path="clip")
    assert config.evaluation_type == "clip"
