"""Real multi-process training on the CPU through the CLI, and torch.compile with inductor.

The 2-process run is started exactly as a user would: ``simpletuner train`` in a project whose
config/config.env says TRAINING_NUM_PROCESSES=2 (accelerate starts two gloo/DDP workers).
SIMPLETUNER_CHECK_RANK_SYNC=1 makes every worker print a digest of its LoRA weights after each
optimizer step. Because the batch order and each batch's noise depend only on the batch's position in
the global order, 2 processes x batch 2 must reproduce 1 process x batch 2 x accumulation 2.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch = pytest.importorskip("torch")

from simpletuner.options.resolve import resolve_run  # noqa: E402
from simpletuner.testing.shapes import make_demo_dataset  # noqa: E402
from simpletuner.testing.tiny_models import make_tiny_model  # noqa: E402
from simpletuner.training.trainer import train  # noqa: E402

pytestmark = pytest.mark.slow

SYNC_LINE = re.compile(r"rank-sync step=(\d+) rank=(\d+) loss=([-+.\de]+) weights=([0-9a-f]{16})")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model") / "sd1x"
    make_tiny_model("sd1x", folder, seed=0)
    return folder


def make_project(root: Path, model: Path, env_file: str, **overrides) -> Path:
    make_demo_dataset(root / "data", 16, size=64, seed=3)
    (root / "config").mkdir()
    (root / "multidatabackend.json").write_text(json.dumps([
        {"id": "shapes", "type": "local", "instance_data_dir": str(root / "data"), "caption_strategy": "textfile",
         "resolution": 64, "resolution_type": "pixel"},
        {"id": "text", "dataset_type": "text_embeds", "cache_dir": str(root / "cache" / "text"), "default": True},
    ]))
    config = {"model_family": "sd1x", "pretrained_model_name_or_path": str(model), "model_type": "lora",
              "output_dir": str(root / "out"), "data_backend_config": str(root / "multidatabackend.json"),
              "cache_dir": str(root / "cache"), "resolution": 64, "resolution_type": "pixel",
              "aspect_bucket_alignment": 8, "mixed_precision": "no", "train_batch_size": 2, "seed": 7,
              "learning_rate": 1e-3, "optimizer": "optimi-adamw", "report_to": "none", **overrides}
    if config["model_type"] == "lora":
        config.setdefault("lora_rank", 4)
    (root / "config" / "config.json").write_text(json.dumps(config, indent=1))
    (root / "config" / "config.env").write_text(env_file)
    return root


def in_process(root: Path, *argv: str):
    """Train in this process with the project's config plus ``argv`` (config.env is not used)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return train(resolve_run(list(argv), environ={}, root=root).config, show_progress=False)


def cli(root: Path, *argv: str) -> str:
    env = {key: value for key, value in os.environ.items()
           if key not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "SIMPLETUNER_LAUNCHED")}
    command = [str(Path(sys.executable).with_name("simpletuner")), "train", *argv]
    result = subprocess.run(command, cwd=root, env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                            timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    return output


def synced_steps(output: str) -> dict[int, float]:
    """step -> mean loss over the ranks, after checking both ranks printed bit-identical weights."""
    by_step: dict[int, dict[int, tuple[float, str]]] = {}
    for step, rank, loss, digest in SYNC_LINE.findall(output):
        by_step.setdefault(int(step), {})[int(rank)] = (float(loss), digest)
    for step, ranks in by_step.items():
        assert sorted(ranks) == [0, 1], f"step {step}: {ranks}"
        assert ranks[0][1] == ranks[1][1], f"step {step}: the processes hold different weights {ranks}"
        assert ranks[0][0] != ranks[1][0], f"step {step}: both processes trained on the same batch"
    return {step: (ranks[0][0] + ranks[1][0]) / 2 for step, ranks in sorted(by_step.items())}


def lora(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[key] - b[key]).abs().max()) for key in a)


def test_two_cpu_processes_match_one_process_and_resume(tiny_model, tmp_path):
    root = make_project(tmp_path, tiny_model, "TRAINING_NUM_PROCESSES=2\nSIMPLETUNER_CHECK_RANK_SYNC=1\n",
                        max_train_steps=4, checkpoint_step_interval=2, report_to="tensorboard",
                        validation_prompt="a red circle on a white background", validation_step_interval=2,
                        validation_num_inference_steps=2, num_validation_images=1, disable_benchmark=True)
    first = cli(root)
    launch = next(line for line in first.splitlines() if line.startswith("launch: "))
    assert launch.startswith("launch: SIMPLETUNER_LAUNCHED=1 ACCELERATE_USE_CPU=1 ")
    assert "accelerate.commands.launch --num_processes 2 --num_machines 1" in launch and "--multi_gpu" in launch
    ddp = synced_steps(first)
    assert list(ddp) == [1, 2, 3, 4]

    # one process, same global batch (2 x accumulation 2), same seed
    reference = in_process(root, "--gradient_accumulation_steps", "2", "--max_train_steps", "6",
                           "--output_dir", str(tmp_path / "ref"), "--report_to", "none", "--validation_prompt", "")
    assert list(ddp.values()) == pytest.approx(reference.state.losses[:4], rel=1e-5)
    out = root / "out"
    assert max_difference(lora(out / "checkpoint-4" / "pytorch_lora_weights.safetensors"),
                          lora(tmp_path / "ref" / "checkpoint-4" / "pytorch_lora_weights.safetensors")) < 1e-5
    state = json.loads((out / "checkpoint-4" / "training_state.json").read_text())
    assert (state["num_processes"], state["train_batch_size"], state["gradient_accumulation_steps"]) == (2, 2, 1)
    # only the main process logged and validated; what it logged is the loss of the whole global batch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    event_files = list((out / "logs").rglob("events.out.tfevents.*"))
    assert len(event_files) == 2  # the run's events and, in a subfolder, the config as hyperparameters
    event_files = [path for path in event_files if path.parent.name == "simpletuner-run"]
    assert len(event_files) == 1
    events = EventAccumulator(str(event_files[0].parent))
    events.Reload()
    assert [e.value for e in events.Scalars("loss/train")] == pytest.approx(list(ddp.values()), rel=1e-6)
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step_2", "step_4"]

    # a 2-process resume continues the loss sequence
    second = cli(root, "--max_train_steps", "6", "--resume_from_checkpoint", "latest")
    assert "resumed from" in second and "checkpoint-4 at step 4" in second
    resumed = synced_steps(second)
    assert list(resumed) == [5, 6]
    assert list(resumed.values()) == pytest.approx(reference.state.losses[4:], rel=1e-5)
    assert max_difference(lora(out / "pytorch_lora_weights.safetensors"),
                          lora(tmp_path / "ref" / "pytorch_lora_weights.safetensors")) < 1e-5

    # another process count: one process with the same global batch continues the same training ...
    shutil.copytree(out / "checkpoint-4", tmp_path / "one" / "checkpoint-4")
    one = in_process(root, "--gradient_accumulation_steps", "2", "--max_train_steps", "6", "--output_dir",
                     str(tmp_path / "one"), "--resume_from_checkpoint", "latest", "--report_to", "none",
                     "--validation_prompt", "")
    assert one.state.losses == pytest.approx(reference.state.losses[4:], rel=1e-5)
    # ... and a different global batch stops with the settings that would work
    from simpletuner.training.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match=re.escape(
            "this run has 1 x 2 x 1 = 2. Resume with TRAINING_NUM_PROCESSES=2 or --gradient_accumulation_steps 2")):
        in_process(root, "--max_train_steps", "6", "--output_dir", str(tmp_path / "one"),
                   "--resume_from_checkpoint", "checkpoint-4", "--report_to", "none", "--validation_prompt", "")


@pytest.fixture()
def one_compile_thread():
    """On a 2-core machine a pool of compile workers costs more than it saves (about 45 s vs 75 s cold).
    inductor's config is restored by its own patch(); monkeypatch's undo would delete the setting and
    break every later torch.compile in this process (torchao's optimizers use it)."""
    import torch._inductor.config as inductor_config

    with inductor_config.patch(compile_threads=1):
        yield


def test_inductor_compiles_the_tiny_model_on_the_cpu(tiny_model, tmp_path, one_compile_thread):
    """The first run on a machine compiles from scratch: about 100-130 s of CPU time on this 2-core
    machine (Python-side tracing and lowering plus g++). inductor caches the result under
    /tmp/torchinductor_<user>, so later runs take about 15 s."""
    compilers = [name for name in ("g++", "c++", "gcc", "cc", "clang++") if shutil.which(name)]
    if not compilers:
        pytest.skip("TRAINING_DYNAMO_BACKEND=inductor needs a C++ compiler on the CPU (g++, gcc, cc, clang++); none found")
    import torch._dynamo
    from torch._dynamo.utils import counters

    root = make_project(tmp_path, tiny_model, "TRAINING_DYNAMO_BACKEND=inductor\n", max_train_steps=3)
    run = resolve_run([], environ={}, root=root)
    assert run.launcher.dynamo_backend == "inductor" and run.launcher.num_processes == 1
    eager = in_process(root, "--output_dir", str(tmp_path / "eager")).state.losses

    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    torch._dynamo.reset()
    counters.clear()
    trainer = train(run.config, launcher=run.launcher, show_progress=False)
    unet = trainer._unwrapped_denoiser()
    assert unet._compiled_call_impl is not None, "the denoiser was not compiled"
    assert counters["stats"]["unique_graphs"] >= 1
    assert sum(counters["inductor"].values()) > 0, "inductor did not run"
    assert len(trainer.state.losses) == 3
    assert trainer.state.losses == pytest.approx(eager, rel=1e-4)
    keys = lora(root / "out" / "pytorch_lora_weights.safetensors")
    assert all(key.startswith("lora_unet_") and "orig_mod" not in key for key in keys)


def test_two_processes_train_a_regularizer_projector_in_step(tiny_model, tmp_path):
    """U-REPA brings a projector (outside the DDP-wrapped UNet) and a similarity gate: both processes start
    from the same projector, average its gradients and feed the gate the mean similarity, so their
    weights stay bit-identical and the run equals one process with the same global batch."""
    from simpletuner.testing.tiny_vision import make_tiny_dinov2

    dinov2 = make_tiny_dinov2(tmp_path / "dinov2")
    urepa = {"urepa_enabled": True, "urepa_model": str(dinov2), "urepa_encoder_image_size": 56,
             "urepa_similarity_threshold": 0.999, "urepa_threshold_mode": "recoverable"}
    root = make_project(tmp_path / "project", tiny_model, "TRAINING_NUM_PROCESSES=2\nSIMPLETUNER_CHECK_RANK_SYNC=1\n",
                        max_train_steps=3, seed_for_each_device=True, **urepa)
    ddp = synced_steps(cli(root))  # asserts equal weights, projector included, on both ranks after every step
    assert list(ddp) == [1, 2, 3]
    reference = in_process(root, "--gradient_accumulation_steps", "2", "--output_dir", str(tmp_path / "ref"))
    assert list(ddp.values()) == pytest.approx(reference.state.losses, rel=1e-5)
