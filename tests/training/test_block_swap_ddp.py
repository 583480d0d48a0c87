"""Block swap with several processes: DDP leaves the swapped, frozen weights alone.

DDP refuses a module whose parameters sit on more than one device type -- frozen ones count -- and
broadcasts every parameter and buffer at start-up. Block swap keeps the frozen weights of the last
blocks on the CPU while the rest of the denoiser (LoRA adapters included) is on the GPU, so the
swapped tensors are named in DDP's ignore list before ``accelerator.prepare`` wraps the denoiser.

On a CPU-only machine every real device is "cpu", so the mixed-device case is shown with the "meta"
device as the swap device (DDP counts it as another device type too), and a real 2-process gloo run
shows that training is unchanged: it equals one process with gradient accumulation 2.
"""

from __future__ import annotations

import re

import pytest

torch = pytest.importorskip("torch")

from simpletuner.models.block_swap import WeightSwapper  # noqa: E402
from simpletuner.options import ConfigError, memory_rules  # noqa: E402
from simpletuner.testing.tiny_models import make_tiny_model  # noqa: E402
from simpletuner.training import distributed  # noqa: E402
from tests.memory.test_rules import resolve  # noqa: E402
from tests.training.test_multiprocess import (cli, in_process, lora, make_project, max_difference,  # noqa: E402
                                              synced_steps)


class TwoBlocks(torch.nn.Module):
    """Two frozen blocks (a weight and a buffer each) and one trainable layer, like a LoRA denoiser."""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(2))
        for block in self.blocks:
            block.register_buffer("scale", torch.ones(4))
            block.requires_grad_(False)
        self.head = torch.nn.Linear(4, 1)

    def forward(self, x):
        for block in self.blocks:
            x = block(x) * block.scale
        return self.head(x)


@pytest.fixture
def one_process_group(tmp_path):
    """A gloo process group of one, so DistributedDataParallel can be built in this process."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_swapped_names_are_the_frozen_tensors_of_the_swapped_blocks_only():
    model = TwoBlocks()
    swapper = WeightSwapper([("blocks.1", model.blocks[1])], model, "cpu", "cpu")
    assert sorted(swapper.swapped_names(model)) == ["blocks.1.bias", "blocks.1.scale", "blocks.1.weight"]
    assert sorted(swapper.swapped_names(model.blocks)) == ["1.bias", "1.scale", "1.weight"]
    assert swapper.swapped_names(model.head) == []


def test_ddp_accepts_a_module_with_swapped_weights_on_another_device_once_they_are_hidden(one_process_group):
    from torch.nn.parallel import DistributedDataParallel

    model = TwoBlocks()
    swapper = WeightSwapper([("blocks.1", model.blocks[1])], model, "cpu", "cpu")
    swapped = model.blocks[1]  # stands for "on the CPU while the rest is on the GPU": another device type
    for key in ("weight", "bias"):
        setattr(swapped, key, torch.nn.Parameter(getattr(swapped, key).to("meta"), requires_grad=False))
    swapped.scale = swapped.scale.to("meta")
    with pytest.raises(ValueError, match="same type of devices"):
        DistributedDataParallel(model)

    distributed.hide_from_ddp(model, ["blocks.0.scale"])  # names hidden earlier are kept
    distributed.hide_from_ddp(model, swapper.swapped_names(model))
    wrapped = DistributedDataParallel(model)
    assert wrapped.parameters_to_ignore == {"blocks.0.scale", "blocks.1.weight", "blocks.1.bias", "blocks.1.scale"}
    assert "blocks.1.scale" not in wrapped.named_module_buffers and "blocks.0.scale" not in wrapped.named_module_buffers
    assert [p for p in wrapped._module_parameters if p.device.type == "meta"] == []


@pytest.mark.parametrize("flags", [{"musubi_blocks_to_swap": 2}, {"ramtorch": "true"},
                                   {"enable_group_offload": "true"}], ids=["block swap", "ramtorch", "group offload"])
def test_weight_streaming_is_accepted_with_two_processes_for_lora(tmp_path, monkeypatch, flags):
    monkeypatch.setattr(memory_rules, "accelerator_visible", lambda: True)  # RamTorch needs a GPU
    config = resolve(tmp_path, num_processes=2, **flags).config
    assert config.num_processes == 2 and all(getattr(config, key) for key in flags)


@pytest.mark.parametrize("flags", [{"musubi_blocks_to_swap": 2}, {"ramtorch": "true"}], ids=["block swap", "ramtorch"])
def test_full_training_with_streamed_weights_is_still_refused_with_the_reason(tmp_path, monkeypatch, flags):
    monkeypatch.setattr(memory_rules, "accelerator_visible", lambda: True)
    with pytest.raises(ConfigError, match="with `--model_type full` every weight trains"):
        resolve(tmp_path, num_processes=2, model_type="full", **flags)


@pytest.mark.slow
def test_two_processes_with_block_swap_equal_one_process_with_accumulation(tmp_path):
    model = tmp_path / "flux"
    make_tiny_model("flux", model, seed=0)
    root = make_project(tmp_path / "project", model, "TRAINING_NUM_PROCESSES=2\nSIMPLETUNER_CHECK_RANK_SYNC=1\n",
                        model_family="flux", musubi_blocks_to_swap=2, max_train_steps=3, disable_benchmark=True)
    output = cli(root)
    ddp = synced_steps(output)
    assert list(ddp) == [1, 2, 3]
    assert re.search(r"DDP ignores the [1-9]\d* swapped frozen tensors", output), output[-3000:]

    reference = in_process(root, "--gradient_accumulation_steps", "2", "--output_dir", str(tmp_path / "ref"))
    assert list(ddp.values()) == pytest.approx(reference.state.losses, rel=1e-5)
    assert max_difference(lora(root / "out" / "pytorch_lora_weights.safetensors"),
                          lora(tmp_path / "ref" / "pytorch_lora_weights.safetensors")) < 1e-5
    # the same code path on one process: every swapped frozen tensor is on DDP's ignore list
    swapper = reference.memory.block_swapper
    denoiser = reference._unwrapped_denoiser()
    swapped = swapper.swapped_names(denoiser)
    assert swapped and [name for name in swapped if "lora_" in name] == []
    assert sorted(distributed.ddp_ignored_names(denoiser)) == sorted(swapped)
    assert {name.split(".")[0] + "." + name.split(".")[1] for name in swapped} == {
        "single_transformer_blocks.0", "single_transformer_blocks.1"}
