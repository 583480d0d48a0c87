"""extract-lora and merge-lora on the tiny sd1x pipeline: known low-rank deltas come back exactly, the
files load in diffusers, merges reproduce the adapted model, and bad inputs get one clear refusal."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

#: Layers given a known rank-4 change: two Linear, two 3x3 Conv2d, one 1x1 Conv2d.
CHANGED = (
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    "mid_block.attentions.0.transformer_blocks.0.ff.net.2",
    "down_blocks.0.resnets.0.conv1",
    "conv_out",
    "up_blocks.0.attentions.0.proj_in",
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    from simpletuner.testing.tiny_models import make_tiny_model

    return make_tiny_model("sd1x", tmp_path_factory.mktemp("lora-tools") / "base", seed=0).path


def fine_tune(base: Path, folder: Path, edit) -> Path:
    """A copy of the ``base`` pipeline whose UNet ``edit(unet)`` changed (saved with save_pretrained)."""
    import torch
    from diffusers import UNet2DConditionModel

    shutil.copytree(base, folder)
    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    with torch.no_grad():
        edit(unet)
    shutil.rmtree(folder / "unet")
    unet.save_pretrained(folder / "unet")
    return folder


@pytest.fixture(scope="module")
def tuned(base, tmp_path_factory) -> tuple[Path, dict]:
    """The fine-tuned pipeline and the exact rank-4 delta added to each layer of :data:`CHANGED`."""
    import torch

    deltas = {}

    def edit(unet):
        generator = torch.Generator().manual_seed(1)
        modules = dict(unet.named_modules())
        for path in CHANGED:
            weight = modules[path].weight
            rows, cols = weight.shape[0], weight[0].numel()
            delta = (torch.randn(rows, 4, generator=generator) @ torch.randn(4, cols, generator=generator)) * 0.05
            deltas[path] = delta.reshape(weight.shape)
            weight += deltas[path]

    return fine_tune(base, tmp_path_factory.mktemp("lora-tools") / "ft", edit), deltas


def unet_outputs(unet):
    """The UNet's prediction for fixed inputs (latents, two timesteps, text states)."""
    import torch

    generator = torch.Generator().manual_seed(5)
    latents = torch.randn(2, 4, 16, 16, generator=generator)
    text = torch.randn(2, 7, 64, generator=generator)
    with torch.no_grad():
        return unet(latents, torch.tensor([10, 500]), text).sample


def load_unet(folder: Path):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(folder / "unet")


def delta_of(layer):
    """``lora_B @ lora_A`` in the layer's weight shape (PEFT's conv LoRA is this product too)."""
    up = layer.lora_B.reshape(layer.lora_B.shape[0], -1)
    down = layer.lora_A.reshape(layer.lora_A.shape[0], -1)
    return (up @ down).reshape(layer.lora_B.shape[0], *layer.lora_A.shape[1:])


# --- extraction -------------------------------------------------------------------------------------


def test_rank_4_extraction_recovers_the_known_deltas(base, tuned):
    import torch

    from simpletuner.tools.lora_extract import extract

    ft, deltas = tuned
    summary = extract(base, ft, rank=4)
    assert summary.component == "unet"
    assert sorted(layer.path for layer in summary.layers) == sorted(CHANGED)
    assert summary.unextractable == [] and summary.unchanged > 50
    for layer in summary.layers:
        assert layer.rank == 4
        assert torch.allclose(delta_of(layer), deltas[layer.path], atol=1e-5), layer.path
    kinds = {layer.path: (layer.kind, tuple(layer.lora_A.shape), tuple(layer.lora_B.shape)) for layer in summary.layers}
    assert kinds["conv_out"] == ("conv", (4, 32, 3, 3), (4, 4, 1, 1))  # k x k conv in->r, 1x1 conv r->out
    assert kinds[CHANGED[0]] == ("linear", (4, 64), (64, 4))
    assert summary.energy_kept_fraction == pytest.approx(1.0, abs=1e-6)
    assert summary.worst_layer.kept_fraction == pytest.approx(1.0, abs=1e-6)


def test_rank_1_keeps_less_energy_and_the_summary_says_so(base, tuned):
    from simpletuner.tools.lora_extract import extract

    summary = extract(base, tuned[0], rank=1)
    assert all(layer.rank == 1 for layer in summary.layers)
    assert summary.worst_layer.kept_fraction <= summary.energy_kept_fraction < 0.9
    text = summary.describe()
    assert f"{summary.energy_kept_fraction:.6f} overall" in text
    assert f"worst layer: {summary.worst_layer.path}" in text and "below 1" in text


@pytest.mark.parametrize("rank", [4, None], ids=["rank4", "full-rank"])
def test_extracted_file_loads_in_diffusers_and_matches_the_fine_tune(base, tuned, tmp_path, rank):
    import torch
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    from simpletuner.tools.lora_extract import extract_lora

    ft, deltas = tuned
    out = tmp_path / "adapter.safetensors"
    summary = extract_lora(base, ft, out, rank)
    assert summary.file == out and summary.file_bytes == out.stat().st_size > 0
    with safe_open(str(out), framework="pt") as handle:
        keys, metadata = set(handle.keys()), handle.metadata()
    assert keys == {f"unet.{path}.lora_{ab}.weight" for path in CHANGED for ab in "AB"}
    config = json.loads(metadata["lora_adapter_metadata"])
    assert config["unet.lora_alpha"] == config["unet.r"]
    assert config["unet.alpha_pattern"] == config["unet.rank_pattern"]
    if rank is None:  # every layer at its own full rank, exact
        assert {layer.path: layer.rank for layer in summary.layers}["down_blocks.0.resnets.0.conv1"] == 32
        for layer in summary.layers:
            assert torch.allclose(delta_of(layer), deltas[layer.path], atol=1e-5)

    pipeline = StableDiffusionPipeline.from_pretrained(base)
    pipeline.load_lora_weights(str(out))
    assert torch.allclose(unet_outputs(pipeline.unet), unet_outputs(load_unet(ft)), atol=1e-4)


def test_changed_biases_and_norms_are_reported_not_dropped(base, tmp_path):
    from simpletuner.tools.lora_extract import extract

    def edit(unet):
        unet.conv_in.bias += 0.5
        unet.conv_norm_out.weight[:3] += 0.25
        unet.down_blocks[0].resnets[0].conv1.weight += 0.01

    ft = fine_tune(base, tmp_path / "ft", edit)
    summary = extract(base, ft, rank=2)
    assert [layer.path for layer in summary.layers] == ["down_blocks.0.resnets.0.conv1"]
    found = {item.name: item for item in summary.unextractable}
    assert set(found) == {"conv_in.bias", "conv_norm_out.weight"}
    assert found["conv_norm_out.weight"].changed_values == 3
    assert found["conv_in.bias"].max_abs_change == pytest.approx(0.5, abs=1e-6)
    assert "GroupNorm" in found["conv_norm_out.weight"].reason
    text = summary.describe()
    assert "NOT extracted: 2 changed tensors" in text and "conv_in.bias" in text


# --- merging ----------------------------------------------------------------------------------------


def test_cli_extract_then_merge_reproduces_the_fine_tune(base, tuned, tmp_path, capsys):
    import torch

    from simpletuner.cli import main

    ft = tuned[0]
    adapter, merged = tmp_path / "adapter.safetensors", tmp_path / "merged"
    assert main(["extract-lora", "--base", str(base), "--ft", str(ft), "--out", str(adapter), "--rank", "4"]) == 0
    printed = capsys.readouterr().out
    assert "extracted 5 unet layers at rank 4" in printed and "1.000000 overall" in printed and "MB)" in printed
    assert main(["merge-lora", "--base", str(base), "--adapter", str(adapter), "--output", str(merged)]) == 0
    assert "merged" in capsys.readouterr().out
    assert (merged / "model_index.json").is_file() and not list(tmp_path.glob(".merged*"))
    assert torch.allclose(unet_outputs(load_unet(merged)), unet_outputs(load_unet(ft)), atol=1e-4)

    # the output folder exists now: refused without --overwrite, left as it was
    before = (merged / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert main(["merge-lora", "--base", str(base), "--adapter", str(adapter), "--output", str(merged),
                 "--scale", "0.5"]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert (merged / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == before
    assert main(["merge-lora", "--base", str(base), "--adapter", str(adapter), "--output", str(merged),
                 "--scale", "0", "--overwrite"]) == 0
    assert torch.allclose(unet_outputs(load_unet(merged)), unet_outputs(load_unet(base)), atol=1e-6)


def test_merging_a_trainer_lora_matches_the_unfused_pipeline(base, tmp_path):
    import torch
    from diffusers import StableDiffusionPipeline

    from simpletuner.models.adapters import add_lora, lora_state_dict
    from simpletuner.models.sd1x import StableDiffusion1x
    from simpletuner.tools.lora_merge import merge_lora

    unet = load_unet(base)
    config = add_lora(unet, ["to_q", "to_k", "to_v", "to_out.0", "proj_in"], rank=4, alpha=2, dropout=0.0)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if "lora_B" in name:  # a trained adapter: B is no longer zero
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    # the family's own writer, as the trainer calls it (it uses no instance state)
    file = StableDiffusion1x.save_lora(None, tmp_path / "lora", lora_state_dict(unet), {"lora_config": config})

    report = merge_lora(base, file, tmp_path / "merged", scale=0.7)
    assert report.adapter_format == "diffusers" and report.merged_layers > 0
    pipeline = StableDiffusionPipeline.from_pretrained(base)
    pipeline.load_lora_weights(str(file))
    pipeline.set_adapters(pipeline.get_active_adapters(), adapter_weights=0.7)
    expected = unet_outputs(pipeline.unet)
    assert not torch.allclose(expected, unet_outputs(load_unet(base)), atol=1e-3)  # the LoRA does something
    assert torch.allclose(unet_outputs(load_unet(tmp_path / "merged")), expected, atol=1e-4)


@pytest.mark.parametrize("algo, settings", [
    ("locon", {"linear_dim": 4, "linear_alpha": 2, "conv_dim": 2, "conv_alpha": 1}),
    # alpha != dim: lycoris' own LoHa merge_to scales twice; lora_merge corrects it (see its docstring)
    ("loha", {"linear_dim": 4, "linear_alpha": 2}),
], ids=["locon", "loha"])
def test_merging_a_lycoris_file(base, tmp_path, algo, settings):
    import torch
    from lycoris import create_lycoris, create_lycoris_from_weights

    from simpletuner.models.lora_formats import LoraFile
    from simpletuner.tools.lora_merge import merge_lora

    unet = load_unet(base)
    network = create_lycoris(unet, 1.0, algo=algo, **settings)
    network.apply_to()
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    file = tmp_path / f"{algo}.safetensors"
    network.save_weights(str(file), torch.float32, {"lycoris_config": json.dumps({"algo": algo, **settings})})
    assert LoraFile.read(file).format == "lycoris"

    report = merge_lora(base, file, tmp_path / "merged")
    assert report.adapter_format == "lycoris" and report.merged_layers > 0
    reference = load_unet(base)
    applied, _ = create_lycoris_from_weights(1.0, str(file), reference)
    applied.apply_to()
    expected = unet_outputs(reference)
    assert not torch.allclose(expected, unet_outputs(load_unet(base)), atol=1e-3)
    assert torch.allclose(unet_outputs(load_unet(tmp_path / "merged")), expected, atol=1e-4)


def test_a_pipeline_without_a_lora_loader_is_named():
    from simpletuner.tools.lora_merge import MergeError, merge_peft

    class PlainPipeline:
        pass

    with pytest.raises(MergeError, match="PlainPipeline has no LoRA loader"):
        merge_peft(PlainPipeline(), Path("adapter.safetensors"), 1.0)


# --- refusals ---------------------------------------------------------------------------------------


def test_architecture_mismatch_is_refused(base, tuned, tmp_path, capsys):
    from simpletuner.cli import main
    from simpletuner.tools.lora_extract import ExtractError, check_same_architecture

    other = tmp_path / "other"
    shutil.copytree(base, other)
    config_file = other / "unet" / "config.json"
    config = json.loads(config_file.read_text())
    config["attention_head_dim"] = 8
    config_file.write_text(json.dumps(config))
    assert main(["extract-lora", "--base", str(base), "--ft", str(other), "--out", str(tmp_path / "a.safetensors"),
                 "--rank", "4"]) == 2
    error = capsys.readouterr().err
    assert "different architectures" in error and "attention_head_dim: 4 vs 8" in error
    assert not (tmp_path / "a.safetensors").exists()

    import torch

    unet_folder = base / "unet"
    with pytest.raises(ExtractError, match="lacks 1 weights"):
        check_same_architecture(unet_folder, unet_folder, {"a": torch.zeros(1), "b": torch.zeros(1)},
                                {"a": torch.zeros(1)})
    with pytest.raises(ExtractError, match="differ in shape"):
        check_same_architecture(unet_folder, unet_folder, {"a": torch.zeros(2)}, {"a": torch.zeros(3)})


def test_bad_rank_unreadable_folders_and_existing_files_are_refused(base, tuned, tmp_path, capsys):
    from simpletuner.cli import main

    ft = str(tuned[0])
    out = str(tmp_path / "a.safetensors")
    assert main(["extract-lora", "--base", str(base), "--ft", ft, "--out", out, "--rank", "0"]) == 2
    assert "--rank must be at least 1" in capsys.readouterr().err
    assert main(["extract-lora", "--base", str(tmp_path / "nowhere"), "--ft", ft, "--out", out, "--rank", "2"]) == 2
    assert "not a folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["extract-lora", "--base", str(tmp_path / "empty"), "--ft", ft, "--out", out, "--rank", "2"]) == 2
    assert "neither model_index.json nor config.json" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # both or neither of --rank / --full-rank
        main(["extract-lora", "--base", str(base), "--ft", ft, "--out", out, "--rank", "2", "--full-rank"])
    assert exit_info.value.code == 2
    # no changed layer: nothing to write
    assert main(["extract-lora", "--base", str(base), "--ft", str(base), "--out", out, "--full-rank"]) == 2
    assert "nothing to extract" in capsys.readouterr().err
    Path(out).write_bytes(b"x")
    assert main(["extract-lora", "--base", str(base), "--ft", ft, "--out", out, "--rank", "2"]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert main(["merge-lora", "--base", str(base), "--adapter", str(tmp_path / "missing.safetensors"),
                 "--output", str(tmp_path / "m")]) == 2
    assert "no such adapter file" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["extract-lora", "merge-lora"])
def test_tool_help_stays_torch_free(tmp_path, command):
    from tests.test_cli import heavy_modules_after, run_main_code

    heavy, stdout = heavy_modules_after(run_main_code([command, "--help"]), cwd=tmp_path)
    assert heavy == [] and "EXIT=0" in stdout and f"simpletuner {command}" in stdout
