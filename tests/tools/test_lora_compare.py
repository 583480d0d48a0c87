"""compare-lora: PSNR and SSIM against their closed forms, and a real comparison on the tiny sd1x pipeline
(adapter against base and against itself, grid and scores written, bad inputs refused)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
np = pytest.importorskip("numpy")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def image(values) -> "Image.Image":
    from PIL import Image

    return Image.fromarray(np.asarray(values, dtype=np.uint8))


def test_psnr_matches_its_formula_and_is_infinite_for_identical_images():
    from simpletuner.tools.lora_compare import psnr

    black, grey = image(np.zeros((16, 16, 3))), image(np.full((16, 16, 3), 10))
    assert psnr(black, grey) == pytest.approx(10 * math.log10(255**2 / 100))
    assert math.isinf(psnr(grey, grey))


def test_ssim_is_one_for_identical_images_and_falls_with_structure_not_with_a_small_shift():
    from simpletuner.tools.lora_compare import CompareError, ssim

    rng = np.random.default_rng(0)
    texture = rng.integers(0, 256, (32, 32, 3))
    assert ssim(image(texture), image(texture)) == pytest.approx(1.0)
    brighter = image(np.clip(texture + 5, 0, 255))
    shuffled = image(rng.permutation(texture.reshape(-1, 3)).reshape(32, 32, 3))
    assert ssim(image(texture), brighter) > 0.95  # same structure, slightly brighter
    assert ssim(image(texture), shuffled) < 0.2  # same pixel values, no shared structure
    with pytest.raises(CompareError, match="too small"):
        ssim(image(np.zeros((4, 4, 3))), image(np.zeros((4, 4, 3))))


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    from simpletuner.testing.tiny_models import make_tiny_model

    return make_tiny_model("sd1x", tmp_path_factory.mktemp("compare") / "base", seed=0).path


@pytest.fixture(scope="module")
def adapter(base, tmp_path_factory) -> Path:
    """A trainer-written sd1x LoRA (default layout) whose B matrices are clearly non-zero."""
    import torch
    from diffusers import UNet2DConditionModel

    from simpletuner.models import lora_formats as formats
    from simpletuner.models.adapters import add_lora, lora_state_dict

    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    add_lora(unet, ["to_q", "to_k", "to_v", "to_out.0"], rank=4, alpha=4, dropout=0.0)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    tensors = formats.peft_to_comfyui({"unet": lora_state_dict(unet)}, {"unet": 4.0}, formats.COMFYUI_NAMING["sd1x"],
                                      {"unet": unet})
    from safetensors.torch import save_file

    file = tmp_path_factory.mktemp("compare-adapter") / "pytorch_lora_weights.safetensors"
    save_file(tensors, str(file))
    return file


@pytest.mark.slow
def test_adapter_against_base_and_against_itself(base, adapter, tmp_path, capsys):
    from PIL import Image

    from simpletuner.cli import main

    prompts = ["a red circle on a white background", "a blue square on a white background"]
    argv = ["compare-lora", "--base", str(base), "--adapter", str(adapter), "--output", str(tmp_path / "vs-base"),
            "--prompt", prompts[0], "--prompt", prompts[1], "--seed", "1", "--seed", "2", "--steps", "2",
            "--size", "64"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    scores = json.loads((tmp_path / "vs-base" / "compare_scores.json").read_text())
    assert [(s["prompt"], s["seed"]) for s in scores["scores"]] == [(p, seed) for p in prompts for seed in (1, 2)]
    assert all(s["psnr"] is not None and s["psnr"] < 60 and s["ssim"] < 0.999 for s in scores["scores"])
    assert scores["side_b"].startswith("base")
    grid = Image.open(tmp_path / "vs-base" / "compare_grid.png")
    assert grid.size == (128, 4 * 64)
    assert "PSNR" in printed and prompts[1] in printed

    # the same adapter on both sides: identical renders, so PSNR is infinite (null in JSON) and SSIM 1
    assert main(["compare-lora", "--base", str(base), "--adapter", str(adapter), "--other", str(adapter),
                 "--output", str(tmp_path / "same"), "--prompt", prompts[0], "--steps", "2", "--size", "64"]) == 0
    same = json.loads((tmp_path / "same" / "compare_scores.json").read_text())["scores"]
    assert same[0]["psnr"] is None and same[0]["ssim"] == pytest.approx(1.0)
    capsys.readouterr()

    # an existing comparison is kept unless --overwrite; a missing adapter is named
    assert main(argv) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    missing = ["compare-lora", "--base", str(base), "--adapter", str(tmp_path / "nope.safetensors"), "--output",
               str(tmp_path / "x"), "--prompt", "a"]
    assert main(missing) == 2
    assert "nope.safetensors: no such adapter file" in capsys.readouterr().err
