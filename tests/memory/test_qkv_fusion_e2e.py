"""--fuse_qkv_projections through the real trainer: the same first loss as the unfused run, LoRA files
that diffusers' unfused pipelines load to the trained model's exact outputs (diffusers and ComfyUI
layouts), exact resume, --init_lora into a fused run, and a full fine-tune saved in the unfused layout."""

from __future__ import annotations

import re

import pytest

torch = pytest.importorskip("torch")

from simpletuner.models import lora_formats as formats  # noqa: E402
from simpletuner.training import checkpoint as ckpt  # noqa: E402
from simpletuner.training.trainer import Trainer, train  # noqa: E402
from tests.memory.test_qkv_fusion import forward  # noqa: E402
from tests.training.conftest import Interrupted, crash_after_step  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("lora_format", ["diffusers", "comfyui"])
def test_fused_lora_matches_the_unfused_start_loads_in_diffusers_and_resumes(memory_config, tiny,
                                                                             tmp_path, lora_format):
    from diffusers import StableDiffusionPipeline

    plain = train(memory_config("sd1x", output_dir=str(tmp_path / "plain")), show_progress=False)
    flags = dict(fuse_qkv_projections="true", lora_format=lora_format, checkpoint_step_interval=2)
    fused = train(memory_config("sd1x", output_dir=str(tmp_path / "fused"), **flags), show_progress=False)
    assert abs(fused.state.losses[0] - plain.state.losses[0]) < 1e-5  # B starts at zero: same model at step 0
    names = {name for name, _ in fused.model.denoiser.named_modules()}
    assert any(name.endswith("attn1.to_qkv.lora_A") for name in names)
    assert not any(name.endswith(".to_k") for name in names)

    file = tmp_path / "fused" / "pytorch_lora_weights.safetensors"
    lora_file = formats.LoraFile.read(file)
    assert not any("to_qkv" in key or "to_kv" in key for key in lora_file.tensors)
    assert lora_file.format == ("diffusers" if lora_format == "diffusers" else "comfyui")
    pipeline = StableDiffusionPipeline.from_pretrained(tiny.path("sd1x"), safety_checker=None)
    before = forward(pipeline.unet)
    pipeline.load_lora_weights(str(file))
    trained = forward(fused._unwrapped_denoiser().eval())
    torch.testing.assert_close(forward(pipeline.unet), trained, atol=1e-5, rtol=1e-4)
    assert (before - trained).abs().max() > 1e-4, "the trained LoRA must change the output"

    with crash_after_step(2), pytest.raises(Interrupted):
        train(memory_config("sd1x", output_dir=str(tmp_path / "cut"), **flags), show_progress=False)
    resumed = train(memory_config("sd1x", output_dir=str(tmp_path / "cut"), resume_from_checkpoint="latest",
                                  **flags), show_progress=False)
    assert resumed.state.losses == fused.state.losses[2:]


def test_init_lora_from_a_fused_runs_file_continues_in_a_fused_run(memory_config, tmp_path):
    from safetensors.torch import load_file

    first = train(memory_config("sd1x", output_dir=str(tmp_path / "first"), fuse_qkv_projections="true"),
                  show_progress=False)
    file = tmp_path / "first" / "pytorch_lora_weights.safetensors"
    second = Trainer(memory_config("sd1x", output_dir=str(tmp_path / "second"), fuse_qkv_projections="true",
                                   init_lora=str(file)), show_progress=False)
    second.setup()
    second.data.close()
    loaded = {name: p for name, p in second.model.denoiser.named_parameters() if "lora_" in name}
    trained = {name: p for name, p in first.model.denoiser.named_parameters() if "lora_" in name}
    assert loaded.keys() == trained.keys()
    for name, parameter in trained.items():
        torch.testing.assert_close(loaded[name], parameter, atol=1e-6, rtol=0)
    assert any(re.search(r"to_q[._]lora_(A|down)\.", key) for key in load_file(str(file)))  # saved per projection


def test_fused_flux_lora_is_saved_per_projection_and_reproduced_by_diffusers(memory_config, tiny, tmp_path):
    from diffusers import FluxPipeline

    trainer = train(memory_config("flux", output_dir=str(tmp_path / "flux"), fuse_qkv_projections="true",
                                  flux_lora_target="all", tokenizer_max_length=32), show_progress=False)
    assert all(torch.isfinite(torch.tensor(trainer.state.losses)))
    file = tmp_path / "flux" / "pytorch_lora_weights.safetensors"
    keys = list(formats.LoraFile.read(file).tensors)
    assert any(".add_k_proj.lora_B" in k for k in keys) and any(".attn.to_v.lora_A" in k for k in keys)
    assert not any("to_qkv" in k or "to_added_qkv" in k for k in keys)
    pipeline = FluxPipeline.from_pretrained(tiny.path("flux"))
    pipeline.load_lora_weights(str(file))
    torch.testing.assert_close(forward(pipeline.transformer), forward(trainer._unwrapped_denoiser().eval()),
                               atol=1e-5, rtol=1e-4)


def test_full_fused_run_saves_an_unfused_pipeline_and_resume_needs_the_same_layout(memory_config, tmp_path):
    from diffusers import UNet2DConditionModel

    flags = dict(model_type="full", fuse_qkv_projections="true", checkpoint_step_interval=2, lora_rank=None)
    trainer = train(memory_config("sd1x", output_dir=str(tmp_path / "full"), **flags), show_progress=False)
    saved = UNet2DConditionModel.from_pretrained(tmp_path / "full" / "pipeline" / "unet").eval()
    assert not any("to_qkv" in key for key in saved.state_dict())
    torch.testing.assert_close(forward(saved), forward(trainer._unwrapped_denoiser().eval()), atol=1e-5, rtol=1e-4)
    assert "fused q/k/v projections, PyTorch SDPA" in trainer.startup_summary()

    with pytest.raises(ckpt.CheckpointError, match="with fused q/k/v projections; set `--fuse_qkv_projections true`"):
        Trainer(memory_config("sd1x", output_dir=str(tmp_path / "full"), **{**flags, "fuse_qkv_projections": None},
                              resume_from_checkpoint="latest"), show_progress=False).setup()


def test_fusing_happens_before_quantizing_so_the_fused_layer_is_quantized(memory_config, tmp_path):
    trainer = train(memory_config("sd1x", output_dir=str(tmp_path / "q"), fuse_qkv_projections="true",
                                  base_model_precision="int8-quanto"), show_progress=False)
    fused_layers = {name: type(module).__name__ for name, module in trainer.model.denoiser.named_modules()
                    if name.endswith(("to_qkv.base_layer", "to_kv.base_layer"))}
    assert fused_layers and set(fused_layers.values()) == {"QLinear"}
    assert all(torch.isfinite(torch.tensor(trainer.state.losses)))
    trainable = [name for name, p in trainer.model.denoiser.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
