"""LTX-Video through the real CLI on tiny clips (9 frames of 32x32): LoRA training text-to-video (with
pictures mixed in as one-frame clips) and image-to-video, the saved LoRA reproducing the trained model
in LTXPipeline / LTXImageToVideoPipeline and changing their frames, the ComfyUI layout, a full
fine-tune's pipeline folder, and FastVideo's option names."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("av")

from simpletuner.cli import main  # noqa: E402
from simpletuner.options.resolve import resolve_run  # noqa: E402
from simpletuner.training.trainer import Trainer  # noqa: E402
from tests.models.conftest import family_args, keep_trainer  # noqa: E402

PROMPT = "a red square moving right"
SHORT = 16


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    from simpletuner.testing.clips import write_video_project
    from simpletuner.testing.tiny_models import make_tiny_model

    root = tmp_path_factory.mktemp("ltxvideo-cli")
    make_tiny_model("ltxvideo", root / "model")
    write_video_project(root, clips=4, frames=9, size=32, images=2)
    return root


def ltx_args(project: Path, output: str, **overrides) -> list[str]:
    return family_args(project, "ltxvideo", output, resolution=32, tokenizer_max_length=SHORT, **overrides)


def sample(pipeline, **extra) -> torch.Tensor:
    pipeline.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipeline(prompt=PROMPT, num_frames=9, height=32, width=32, num_inference_steps=2, output_type="pt",
                        max_sequence_length=SHORT, generator=torch.Generator().manual_seed(0), **extra).frames


def lora_keys(file: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as handle:
        return list(handle.keys())


def test_text_to_video_lora_trains_on_clips_and_pictures_and_loads_in_ltx_pipeline(project, monkeypatch):
    from diffusers import LTXPipeline

    from simpletuner.models.ltxvideo import LTXVideo

    seen = keep_trainer(monkeypatch)
    shapes = []
    original = LTXVideo.predict
    monkeypatch.setattr(LTXVideo, "predict", lambda self, x, t, *a, **k: shapes.append((tuple(x.shape), t.dim()))
                        or original(self, x, t, *a, **k))
    assert main(["train", *ltx_args(project, "t2v", max_train_steps=4)]) == 0
    trainer = seen["trainer"]
    assert len(trainer.state.losses) == 4 and all(math.isfinite(loss) for loss in trainer.state.losses)
    # clips train as 2 latent frames, pictures as one; one timestep per sample (text-to-video)
    assert {shape for shape, _ in shapes} == {(2, 8, 2, 4, 4), (2, 8, 1, 4, 4)}
    assert {dims for _, dims in shapes} == {1}
    file = project / "t2v" / "pytorch_lora_weights.safetensors"
    keys = lora_keys(file)
    assert keys and all(re.match(r"transformer\.transformer_blocks\.\d\.attn[12]\.to_(q|k|v|out\.0)\.lora_[AB]\.weight$",
                                 key) for key in keys)
    trained = sample(LTXPipeline(**trainer.model._components(trainer._unwrapped_denoiser().eval())))
    pipeline = LTXPipeline.from_pretrained(project / "model")
    before = sample(pipeline)
    pipeline.load_lora_weights(str(file))
    after = sample(pipeline)
    torch.testing.assert_close(after, trained, atol=1e-6, rtol=0)  # the file reproduces the trained model
    assert (after - before).abs().max() > 1e-3, "loading the trained LoRA must change the frames"


def test_image_to_video_lora_keeps_the_first_frame_clean_and_loads_in_the_i2v_pipeline(project, monkeypatch):
    from diffusers import LTXImageToVideoPipeline
    from PIL import Image

    from simpletuner.models.ltxvideo import LTXVideo

    seen = keep_trainer(monkeypatch)
    calls = []
    original = LTXVideo.predict
    monkeypatch.setattr(LTXVideo, "predict", lambda self, x, t, *a, **k: calls.append((x.detach().clone(), t.clone()))
                        or original(self, x, t, *a, **k))
    Image.new("RGB", (32, 32), (220, 30, 30)).save(project / "start.png")
    (project / "i2v.json").write_text(json.dumps([{"caption": PROMPT, "image_path": "start.png", "num_frames": 9}]))
    args = ltx_args(project, "i2v", ltx_train_mode="i2v", data_backend_config=str(project / "clips-only.json"),
                    validation_dataset_file=str(project / "i2v.json"), validation_step_interval=3,
                    validation_num_inference_steps=2, validation_resolution="32")
    entries = json.loads((project / "multidatabackend.json").read_text())
    (project / "clips-only.json").write_text(json.dumps([e for e in entries if e["id"] != "stills"]))
    assert main(["train", *args]) == 0
    trainer = seen["trainer"]
    assert all(math.isfinite(loss) for loss in trainer.state.losses)
    training_calls = [(x, t) for x, t in calls if t.dim() == 2]
    assert len(training_calls) == 3  # every training step: one timestep per latent frame
    for x, t in training_calls:
        assert t.shape == (2, 2) and (t[:, 0] == 0).all() and (t[:, 1] > 0).all()  # the first frame is clean
    assert (project / "i2v" / "validation" / "step_3" / "32x32_dataset_00_00.mp4").stat().st_size > 0
    file = project / "i2v" / "pytorch_lora_weights.safetensors"
    picture = Image.open(project / "start.png")
    trained = sample(LTXImageToVideoPipeline(**trainer.model._components(trainer._unwrapped_denoiser().eval())),
                     image=picture)
    pipeline = LTXImageToVideoPipeline.from_pretrained(project / "model")
    before = sample(pipeline, image=picture)
    pipeline.load_lora_weights(str(file))
    after = sample(pipeline, image=picture)
    torch.testing.assert_close(after, trained, atol=1e-6, rtol=0)
    assert (after - before).abs().max() > 1e-3, "loading the trained LoRA must change the frames"


def test_comfyui_layout_uses_native_names_under_diffusion_model(project, monkeypatch):
    from safetensors.torch import load_file

    from simpletuner.models import lora_formats

    seen = keep_trainer(monkeypatch)
    assert main(["train", *ltx_args(project, "comfy", lora_format="comfyui", lora_rank=4, lora_alpha=2,
                                    peft_lora_target_modules='["to_q", "to_k", "to_v", "to_out.0", "proj_in"]',
                                    max_train_steps=2)]) == 0
    file = project / "comfy" / "pytorch_lora_weights.safetensors"
    assert lora_formats.LoraFile.read(file).format == "comfyui"
    tensors = load_file(str(file))
    assert all(re.match(r"diffusion_model\.[\w.]+\.(lora_[AB]\.weight|alpha)$", key) for key in tensors)
    assert "diffusion_model.transformer_blocks.1.attn2.to_out.0.lora_A.weight" in tensors
    assert "diffusion_model.patchify_proj.lora_B.weight" in tensors  # ComfyUI's name of diffusers' proj_in
    assert not any(".proj_in." in key for key in tensors)
    assert {float(v) for k, v in tensors.items() if k.endswith(".alpha")} == {2.0}
    # --init_lora reads the layout back into the same modules
    trained = {n: p.detach().clone() for n, p in seen["trainer"]._unwrapped_denoiser().named_parameters()
               if "lora_" in n}
    monkeypatch.undo()
    config = resolve_run(ltx_args(project, "comfy-init", lora_rank=4, lora_alpha=2, init_lora=str(file),
                                  peft_lora_target_modules='["to_q", "to_k", "to_v", "to_out.0", "proj_in"]'),
                         environ={}, root=project).config
    started_trainer = Trainer(config, show_progress=False)
    started_trainer.setup()
    started_trainer.data.close()
    started = {n: p for n, p in started_trainer._unwrapped_denoiser().named_parameters() if "lora_" in n}
    assert started.keys() == trained.keys() and any("proj_in" in n for n in started)
    assert all(torch.equal(started[n], trained[n]) for n in trained)


def test_full_fine_tune_saves_an_ltx_pipeline_folder(project, monkeypatch):
    from diffusers import LTXPipeline

    seen = keep_trainer(monkeypatch)
    assert main(["train", *ltx_args(project, "full", model_type="full", max_train_steps=2)]) == 0
    trained = seen["trainer"]._unwrapped_denoiser().state_dict()
    saved = LTXPipeline.from_pretrained(project / "full" / "pipeline")
    base = LTXPipeline.from_pretrained(project / "model")
    loaded = saved.transformer.state_dict()
    assert all(torch.equal(loaded[name], value) for name, value in trained.items())
    assert any(not torch.equal(base.transformer.state_dict()[name], value) for name, value in loaded.items())


def test_fastvideo_option_names_are_accepted_where_they_mean_the_same(project):
    run = resolve_run(ltx_args(project, "fastvideo", weight_decay=0.05, validation_sampling_steps=7,
                               validation_guidance_scale=4.5, validation_steps=10), environ={}, root=project)
    config = run.config
    assert (config.adam_weight_decay, config.validation_num_inference_steps, config.validation_guidance,
            config.validation_step_interval) == (0.05, 7, 4.5, 10)
    assert ("command line: `--weight_decay` is another tool's name for `--adam_weight_decay`; read as "
            "`--adam_weight_decay`") in run.warnings
    # FastVideo's clip-shape flags have no single counterpart here (num_frames lives in the dataset list)
    for name in ("num_frames", "num_height", "num_width", "num_latent_t"):
        with pytest.raises(Exception, match=name):
            resolve_run(ltx_args(project, "fastvideo", **{name: 9}), environ={}, root=project)
