"""FSDP2 (``--fsdp_enable``) on 2 gloo CPU processes, compared with one process, and its refusals.

The 2-process runs start as a user would (``simpletuner train`` with TRAINING_NUM_PROCESSES=2): accelerate
shards the denoiser with torch's fully_shard, every weight is a DTensor slice, and each step reduces the
gradients to those slices. Two processes x batch 2 must still compute what one process with batch 2 x
accumulation 2 computes (the batch order and noise are global, training/distributed.py), and the gathered
checkpoint / final LoRA must hold the same keys, shapes and values.
"""

from __future__ import annotations

import json

import pytest

from simpletuner.options import ConfigError
from simpletuner.options import distributed_rules as rules
from simpletuner.testing.config import make_config

torch = pytest.importorskip("torch")

from tests.training.test_multiprocess import cli, in_process, lora, make_project, max_difference  # noqa: E402

TWO_PROCESSES = "TRAINING_NUM_PROCESSES=2\n"


# --- refusals (no processes started) ------------------------------------------------------------------

def fsdp(**overrides):
    return make_config(**{"fsdp_enable": True, "num_processes": 2, **overrides})


def check(config) -> None:
    for rule in rules.DISTRIBUTED_RULES:
        rule(config)


def test_defaults_pass_and_details_need_fsdp():
    check(make_config())
    check(fsdp())
    check(fsdp(fsdp_state_dict_type="sharded"))
    with pytest.raises(ConfigError, match=r"`--fsdp_reshard_after_forward` only applies when the weights are sharded; "
                                          r"add `--fsdp_enable true`"):
        check(make_config(fsdp_reshard_after_forward=False))


@pytest.mark.parametrize(("overrides", "message"), [
    ({"fsdp_version": 1}, r"`--fsdp_version 1` is not supported: .*Use `--fsdp_version 2`"),
    ({"num_processes": 1}, r"`--num_processes 1` starts one"),
    ({"fsdp_cpu_ram_efficient_loading": True, "lora_init_type": "pissa"},
     r"`--lora_init_type pissa` cannot be combined with `--fsdp_cpu_ram_efficient_loading true`: it computes"),
    ({"musubi_blocks_to_swap": 2}, r"`--musubi_blocks_to_swap` cannot be combined with `--fsdp_enable`: block swap"),
    ({"use_ema": True}, r"`--use_ema` cannot be combined with `--fsdp_enable`"),
    ({"zero_stage": 2}, r"`--zero_stage` cannot be combined with `--fsdp_enable`"),
    ({"base_model_precision": "int8-quanto"}, r"`--base_model_precision int8-quanto` cannot be combined"),
    ({"gradient_precision": "fp32"}, r"`--gradient_precision fp32` cannot be combined"),
    ({"validation_prompt": "a cat"}, r"`--validation_prompt` cannot be combined with `--fsdp_enable` yet"),
    ({"hsdp_replicate_dim": 2}, r"`--hsdp_replicate_dim` needs `--hsdp_shard_dim` too"),
    ({"hsdp_replicate_dim": 2, "hsdp_shard_dim": 2}, r"= 4 processes, but `--num_processes` is 2"),
])
def test_combinations_that_cannot_work_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        check(fsdp(**overrides))


def test_hsdp_mesh_that_fits_is_accepted():
    check(fsdp(hsdp_replicate_dim=1, hsdp_shard_dim=2))
    check(fsdp(fsdp_cpu_ram_efficient_loading=True, lora_init_type="gaussian"))


def test_options_become_accelerates_fsdp2_plugin_and_mesh(monkeypatch):
    from simpletuner.training.fsdp import accelerator_mesh, fsdp_plugin, parallelism_config

    assert fsdp_plugin(make_config()) is None and parallelism_config(make_config()) is None
    plugin = fsdp_plugin(fsdp(fsdp_reshard_after_forward=False, fsdp_transformer_layer_cls_to_wrap="BlockA, BlockB"))
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is False
    assert plugin.transformer_cls_names_to_wrap == ["BlockA", "BlockB"]
    assert fsdp_plugin(fsdp()).transformer_cls_names_to_wrap is None  # filled from the denoiser at start-up
    hsdp = fsdp(num_processes=4, hsdp_replicate_dim=2, hsdp_shard_dim=2)
    mesh = parallelism_config(hsdp)
    assert (mesh.dp_replicate_size, mesh.dp_shard_size) == (2, 2)
    # accelerate validates a mesh against CPU processes before they are marked FSDP: attached afterwards there
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert accelerator_mesh(hsdp) is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert accelerator_mesh(hsdp).dp_replicate_size == 2


# --- 2 processes against 1 ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from simpletuner.testing.tiny_models import make_tiny_model

    folder = tmp_path_factory.mktemp("model") / "sd1x"
    make_tiny_model("sd1x", folder, seed=0)
    return folder


@pytest.mark.slow
def test_fsdp2_lora_matches_one_process_and_resumes_exactly(tiny_model, tmp_path):
    root = make_project(tmp_path, tiny_model, TWO_PROCESSES, fsdp_enable=True, max_train_steps=4,
                        checkpoint_step_interval=2, max_grad_norm=1.0)
    first = cli(root)
    assert "FSDP2 on 2 CPU processes" in first and "FSDP2 shards these block classes as units" in first
    reference = in_process(root, "--fsdp_enable", "false", "--gradient_accumulation_steps", "2",
                           "--max_train_steps", "6", "--output_dir", str(tmp_path / "ref"))
    out = root / "out"
    for step in (2, 4):
        sharded = lora(out / f"checkpoint-{step}" / "pytorch_lora_weights.safetensors")
        single = lora(tmp_path / "ref" / f"checkpoint-{step}" / "pytorch_lora_weights.safetensors")
        assert {k: v.shape for k, v in sharded.items()} == {k: v.shape for k, v in single.items()}
        assert max_difference(sharded, single) < 1e-5, step
    # the gathered optimizer state: whole moments (no DTensor slices) for every trained number
    optimizer = torch.load(out / "checkpoint-4" / "optimizer.pt", weights_only=True)
    moments = [entry["exp_avg"] for entry in optimizer["state"].values()]
    assert moments and all(type(moment) is torch.Tensor for moment in moments)
    assert sum(m.numel() for m in moments) == sum(t.numel() for k, t in sharded.items() if "alpha" not in k)
    state = json.loads((out / "checkpoint-4" / "training_state.json").read_text())
    assert state["global_step"] == 4 and state["num_processes"] == 2

    # resume the sharded run from checkpoint-4: steps 5 and 6 equal the single process's
    cli(root, "--max_train_steps", "6", "--resume_from_checkpoint", "latest")
    final = lora(out / "pytorch_lora_weights.safetensors")
    single_final = lora(tmp_path / "ref" / "pytorch_lora_weights.safetensors")
    assert {k: v.shape for k, v in final.items()} == {k: v.shape for k, v in single_final.items()}
    assert max_difference(final, single_final) < 1e-5
    assert max_difference(final, lora(out / "checkpoint-4" / "pytorch_lora_weights.safetensors")) > 1e-4  # trained on


@pytest.mark.slow
def test_cpu_ram_efficient_loading_sends_the_main_process_weights_and_resumes(tiny_model, tmp_path):
    """Only the main process reads the UNet; the other builds it on the meta device and gets its slices of
    the main process's weights when FSDP2 shards it, at the start and after a resume alike."""
    efficient = ("--fsdp_cpu_ram_efficient_loading", "true")
    root = make_project(tmp_path, tiny_model, TWO_PROCESSES, fsdp_enable=True, max_train_steps=2,
                        checkpoint_step_interval=1, max_grad_norm=1.0)
    cli(root, *efficient)  # (the building on meta is tests/quantization/test_loading.py's)
    cli(root, *efficient, "--max_train_steps", "3", "--resume_from_checkpoint", "latest")
    in_process(root, "--fsdp_enable", "false", "--gradient_accumulation_steps", "2", "--max_train_steps", "3",
               "--output_dir", str(tmp_path / "ref"))
    out, ref = root / "out", tmp_path / "ref"
    assert max_difference(lora(out / "checkpoint-1" / "pytorch_lora_weights.safetensors"),
                          lora(ref / "checkpoint-1" / "pytorch_lora_weights.safetensors")) < 1e-5
    assert max_difference(lora(out / "pytorch_lora_weights.safetensors"),
                          lora(ref / "pytorch_lora_weights.safetensors")) < 1e-5


@pytest.mark.slow
def test_hsdp_two_replicas_of_two_shards_match_one_process(tiny_model, tmp_path):
    """4 gloo processes in a 2 x 2 mesh: each replica shards over its pair, the replicas average; one process
    with accumulation 4 computes the same LoRA."""
    root = make_project(tmp_path, tiny_model, "TRAINING_NUM_PROCESSES=4\n", max_train_steps=2, max_grad_norm=1.0,
                        train_batch_size=1)
    output = cli(root, "--fsdp_enable", "true", "--hsdp_replicate_dim", "2", "--hsdp_shard_dim", "2")
    assert "HSDP on 4 CPU processes (gloo): 2 replicas x 2 shards" in output
    in_process(root, "--gradient_accumulation_steps", "4", "--output_dir", str(tmp_path / "ref"))
    assert max_difference(lora(root / "out" / "pytorch_lora_weights.safetensors"),
                          lora(tmp_path / "ref" / "pytorch_lora_weights.safetensors")) < 1e-5


@pytest.mark.slow
def test_fsdp2_full_training_matches_one_process(tiny_model, tmp_path):
    from safetensors.torch import load_file

    root = make_project(tmp_path, tiny_model, TWO_PROCESSES, fsdp_enable=True, model_type="full",
                        max_train_steps=2, checkpoint_step_interval=2, learning_rate=1e-4)
    cli(root)
    in_process(root, "--fsdp_enable", "false", "--gradient_accumulation_steps", "2",
               "--output_dir", str(tmp_path / "ref"))
    sharded = load_file(str(root / "out" / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors"))
    single = load_file(str(tmp_path / "ref" / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert max_difference(sharded, single) < 1e-5
    base = load_file(str(tiny_model / "unet" / "diffusion_pytorch_model.safetensors"))
    assert max_difference(sharded, base) > 1e-6  # it trained


@pytest.mark.slow
def test_fsdp2_sharded_checkpoints_resume_exactly_and_only_with_the_same_process_count(tiny_model, tmp_path):
    from simpletuner.training.checkpoint import CheckpointError, _read_manifest_files, list_checkpoints

    sharded = ("--fsdp_state_dict_type", "sharded")
    root = make_project(tmp_path, tiny_model, TWO_PROCESSES, fsdp_enable=True, max_train_steps=4,
                        checkpoint_step_interval=2, max_grad_norm=1.0)
    cli(root, *sharded, "--output_dir", str(tmp_path / "whole"))  # uninterrupted: steps 1-4
    out = root / "out"
    cli(root, *sharded, "--max_train_steps", "2")  # stopped after checkpoint-2 ...
    checkpoint = out / "checkpoint-2"
    shard_files = sorted(p.name for p in (checkpoint / "sharded").iterdir())
    assert shard_files == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert not (checkpoint / "pytorch_lora_weights.safetensors").exists()  # nothing gathered
    assert not (checkpoint / "optimizer.pt").exists()
    listed = _read_manifest_files(checkpoint)
    assert {f"sharded/{name}" for name in shard_files} <= set(listed)
    assert {"lr_scheduler.pt", "sampler.json", "random_states.pt", "training_state.json"} <= set(listed)
    assert not list(out.glob(".tmp-checkpoint-*"))  # the staged shards were moved in

    # a different process count (one process, without sharding) is refused before anything loads
    with pytest.raises(CheckpointError, match=r"checkpoint-2 was written with `--fsdp_state_dict_type sharded` by 2 "
                                              r"process\(es\): .* TRAINING_NUM_PROCESSES=2"):
        in_process(root, "--fsdp_enable", "false", "--gradient_accumulation_steps", "2",
                   "--resume_from_checkpoint", "latest")

    output = cli(root, *sharded, "--max_train_steps", "4", "--resume_from_checkpoint", "latest")  # ... and resumed
    assert "resumed from" in output and "checkpoint-2 at step 2" in output
    resumed = lora(out / "pytorch_lora_weights.safetensors")  # the final LoRA is gathered as usual
    whole = lora(tmp_path / "whole" / "pytorch_lora_weights.safetensors")
    assert resumed.keys() == whole.keys() and max_difference(resumed, whole) < 1e-6

    # a shard missing (a save cut short, a lost file) makes the folder no checkpoint at all
    (checkpoint / "sharded" / "__1_0.distcp").unlink()
    assert [info.step for info in list_checkpoints(out)] == [4]
