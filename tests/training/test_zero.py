"""DeepSpeed ZeRO (``--zero_stage``) on gloo CPU processes, compared with one plain process.

DeepSpeed 0.19 runs on the CPU through its CPU accelerator (training/zero.py says what accelerate needs
for that). The runs start as a user starts them (``simpletuner train`` with TRAINING_NUM_PROCESSES), so
accelerate wraps the denoiser in DeepSpeed's engine, the engine reduces the gradients, clips and steps,
and every process holds its share of the optimizer state. Two ZeRO processes x batch 2 must compute what
one plain process with batch 2 x accumulation 2 computes (the batch order and noise are global,
training/distributed.py), across a resume from DeepSpeed's split checkpoint too.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("deepspeed")
torch = pytest.importorskip("torch")

from tests.training.test_multiprocess import cli, in_process, lora, make_project, max_difference  # noqa: E402

LORA_FILE = "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from simpletuner.testing.tiny_models import make_tiny_model

    folder = tmp_path_factory.mktemp("model") / "sd1x"
    make_tiny_model("sd1x", folder, seed=0)
    return folder


SPLIT = {2: "optimizer state and gradients", 3: "weights, gradients and optimizer state"}


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_lora_matches_one_process_and_resumes_exactly(tiny_model, tmp_path, stage):
    """Stage 2 splits the optimizer state and gradients; stage 3 the weights too, which are gathered for
    every save and come back from DeepSpeed's own files on resume."""
    from simpletuner.training.checkpoint import _read_manifest_files

    root = make_project(tmp_path, tiny_model, "TRAINING_NUM_PROCESSES=2\n", max_train_steps=4,
                        checkpoint_step_interval=2, max_grad_norm=1.0)
    zero = ("--zero_stage", str(stage))
    first = cli(root, *zero)
    launch = next(line for line in first.splitlines() if line.startswith("launch: "))
    assert "ACCELERATE_USE_CPU" not in launch  # it would switch DeepSpeed off
    assert f"processes 2, DeepSpeed ZeRO stage {stage} ({SPLIT[stage]} split over the processes)" in first
    reference = in_process(root, "--gradient_accumulation_steps", "2", "--max_train_steps", "6",
                           "--output_dir", str(tmp_path / "ref"))
    out = root / "out"
    for step in (2, 4):
        split = lora(out / f"checkpoint-{step}" / LORA_FILE)
        single = lora(tmp_path / "ref" / f"checkpoint-{step}" / LORA_FILE)
        assert max_difference(split, single) < 1e-5, step

    # the optimizer state is DeepSpeed's, one file per process, listed in the manifest; no optimizer.pt
    checkpoint = out / "checkpoint-4"
    optimizer_files = sorted(p.name for p in (checkpoint / "zero" / "state").glob("*optim_states.pt"))
    assert optimizer_files == ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert not (checkpoint / "optimizer.pt").exists()
    assert {f"zero/state/{name}" for name in optimizer_files} <= set(_read_manifest_files(checkpoint))
    assert not list(out.glob(".tmp-checkpoint-*"))  # the staged files were moved in
    state = json.loads((checkpoint / "training_state.json").read_text())
    assert state["global_step"] == 4 and state["num_processes"] == 2

    # steps 5 and 6 after a resume equal the single process's, so the split Adam moments came back
    output = cli(root, *zero, "--max_train_steps", "6", "--resume_from_checkpoint", "latest")
    assert "checkpoint-4 at step 4" in output
    final, single_final = lora(out / LORA_FILE), lora(tmp_path / "ref" / LORA_FILE)
    assert max_difference(final, single_final) < 1e-5
    assert max_difference(final, lora(checkpoint / LORA_FILE)) > 1e-4  # it trained on
    assert reference.state.global_step == 6
    if stage == 3:
        return

    # one process with the optimizer state in CPU memory (ZeRO-Offload, the one-GPU case) starts DeepSpeed
    # without a launcher: same numbers again
    offload = json.dumps({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}})
    one = cli(root, *zero, "--deepspeed_config", offload, "--gradient_accumulation_steps", "2", "--max_train_steps",
              "2", "--output_dir", str(tmp_path / "one"), "--num_processes", "1")
    assert "processes 1, DeepSpeed ZeRO stage 2 (one process)" in one
    assert max_difference(lora(tmp_path / "one" / LORA_FILE),
                          lora(tmp_path / "ref" / "checkpoint-2" / LORA_FILE)) < 1e-5


@pytest.mark.slow
def test_zero3_full_training_gathers_the_same_pipeline_as_one_process(tiny_model, tmp_path):
    from safetensors.torch import load_file

    root = make_project(tmp_path, tiny_model, "TRAINING_NUM_PROCESSES=2\n", model_type="full", max_train_steps=2,
                        learning_rate=1e-4)
    cli(root, "--zero_stage", "3")
    in_process(root, "--gradient_accumulation_steps", "2", "--output_dir", str(tmp_path / "ref"))
    unet = ("pipeline", "unet", "diffusion_pytorch_model.safetensors")
    split = load_file(str(root.joinpath("out", *unet)))
    single = load_file(str(tmp_path.joinpath("ref", *unet)))
    assert max_difference(split, single) < 1e-5
    assert max_difference(split, load_file(str(tiny_model / "unet" / "diffusion_pytorch_model.safetensors"))) > 1e-6
