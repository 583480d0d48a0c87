"""Short real training runs with the memory options on: each changes where weights live (read from
the placement record and from storage identity), never what the run computes (same losses and LoRA
weights as the run without it)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from simpletuner.options import memory_rules  # noqa: E402
from simpletuner.training.offload import MemorySavers  # noqa: E402
from simpletuner.training.trainer import train  # noqa: E402

pytestmark = pytest.mark.slow


def lora_state(trainer) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in trainer.model.denoiser.named_parameters() if "lora_" in name}


@pytest.fixture
def copies_on_the_cpu(monkeypatch):
    """Block swap / RamTorch / unsloth make real copies although compute and swap device are both the CPU."""
    monkeypatch.setattr(MemorySavers, "copy_on_same_device", True)


@pytest.fixture
def baseline(memory_config, tmp_path):
    cache = {}

    def run(family: str, **flags):
        key = (family, tuple(sorted(flags.items())))
        if key not in cache:
            output = str(tmp_path / f"baseline-{len(cache)}")
            trainer = train(memory_config(family, output_dir=output, **flags), show_progress=False)
            cache[key] = (list(trainer.state.losses), lora_state(trainer))
        return cache[key]

    return run


def assert_same_run(trainer, reference) -> None:
    losses, weights = reference
    assert trainer.state.losses == losses
    state = lora_state(trainer)
    assert state.keys() == weights.keys() and all(torch.equal(state[k], weights[k]) for k in state)


def test_block_swap_trains_the_same_and_keeps_swapped_blocks_off_between_steps(memory_config, baseline,
                                                                             copies_on_the_cpu, tmp_path):
    reference = baseline("flux")
    config = memory_config("flux", musubi_blocks_to_swap=3, output_dir=str(tmp_path / "swap"))
    trainer = train(config, show_progress=False)
    swapper = trainer.memory.block_swapper
    assert [unit.name for unit in swapper.units] == ["transformer_blocks.1", "single_transformer_blocks.0",
                                                     "single_transformer_blocks.1"]
    assert swapper.resident_units() == [] and swapper.copies_made == 3 * 2 * 3  # 3 steps x (forward + backward)
    for unit in swapper.units:
        for slot in unit.slots:
            assert slot.current().untyped_storage().data_ptr() == slot.master.untyped_storage().data_ptr()
    assert_same_run(trainer, reference)
    assert "block swap: 3 blocks" in trainer.startup_summary()


def test_block_swap_with_gradient_checkpointing_and_the_unsloth_backend(memory_config, baseline, copies_on_the_cpu,
                                                                        monkeypatch, tmp_path):
    reference = baseline("flux", gradient_checkpointing="true")
    monkeypatch.setattr(memory_rules, "accelerator_visible", lambda: True)
    config = memory_config("flux", gradient_checkpointing="true", gradient_checkpointing_backend="unsloth",
                           musubi_blocks_to_swap=2, output_dir=str(tmp_path / "unsloth"))
    trainer = train(config, show_progress=False)
    assert trainer.memory.activation_offload.packed_count >= 3 * 4  # block inputs copied out, every step
    assert trainer.memory.block_swapper.resident_units() == []
    assert_same_run(trainer, reference)


def test_ramtorch_trains_the_same(memory_config, baseline, copies_on_the_cpu, monkeypatch, tmp_path):
    reference = baseline("flux")
    monkeypatch.setattr(memory_rules, "accelerator_visible", lambda: True)
    config = memory_config("flux", ramtorch="true", ramtorch_target_modules="single_transformer_blocks.*",
                           ramtorch_text_encoder="true", output_dir=str(tmp_path / "ramtorch"))
    trainer = train(config, show_progress=False)
    swappers = trainer.memory.ramtorch_swappers
    assert len(swappers) == 3  # the transformer's single blocks, and each text encoder
    assert all(name.startswith("single_transformer_blocks.") for name in (u.name for u in swappers[0].units))
    assert all(swapper.resident_units() == [] for swapper in swappers)
    assert_same_run(trainer, reference)


def test_startup_and_save_offload_record_their_moves_and_change_nothing(memory_config, baseline, tmp_path):
    reference = baseline("sd1x", checkpoint_step_interval=2)
    config = memory_config("sd1x", offload_during_startup="true", offload_during_save="true", cache_tag="-own",
                           checkpoint_step_interval=2, output_dir=str(tmp_path / "offload"))
    trainer = train(config, show_progress=False)
    history = trainer.memory.placement.history
    assert ("text_encoder", "offload", "startup: latent caching") in history
    assert ("vae", "compute", "startup: latent caching") in history
    assert ("vae", "offload", "startup: text caching") in history
    assert ("text_encoder", "compute", "startup: text caching") in history
    saves = [entry for entry in history if entry[0] == "unet"]
    assert saves == [("unet", "offload", "offload during save"), ("unet", "compute", "save done")] * 2  # step 2, final
    assert (tmp_path / "offload" / "checkpoint-2").is_dir()
    assert_same_run(trainer, reference)


def test_component_and_group_offload_train_the_same(memory_config, baseline, tmp_path):
    reference = baseline("sd1x")
    trainer = train(memory_config("sd1x", enable_model_cpu_offload="true", output_dir=str(tmp_path / "model-offload"),
                                  cache_tag="-own"), show_progress=False)
    assert ("vae", "compute", "model cpu offload: in use") in trainer.memory.placement.history  # latent caching
    assert_same_run(trainer, reference)
    trainer = train(memory_config("sd1x", enable_group_offload="true", group_offload_to_disk_path=str(tmp_path / "g"),
                                  output_dir=str(tmp_path / "group-offload"), cache_tag="-group"), show_progress=False)
    assert list((tmp_path / "g" / "text_encoder").glob("*.safetensors"))
    assert_same_run(trainer, reference)
