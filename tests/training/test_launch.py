"""config.env -> the ``accelerate launch`` command, process-count resolution, rank sharding of the batch
order, per-batch seeds, the resume rule for another process count, and the compile helper.

All of it runs in one process in well under a second; the real multi-process and inductor runs are in
``test_multiprocess.py``.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from simpletuner.options import ConfigError
from simpletuner.options.files import LauncherSettings, load_launcher_settings
from simpletuner.options.resolve import resolve_run
from simpletuner.testing.config import make_config
from simpletuner.training.launch import (LAUNCHED_MARKER, accelerate_command, needs_relaunch, printable_command,
                                         usable_cpus)


def project(tmp_path: Path, env_file: str = "", **config) -> Path:
    """A project folder with config/config.json (valid for --dry-run style resolution) and config.env."""
    (tmp_path / "config").mkdir(exist_ok=True)
    (tmp_path / "images").mkdir(exist_ok=True)
    datasets = tmp_path / "multidatabackend.json"
    datasets.write_text(json.dumps([
        {"id": "images", "type": "local", "instance_data_dir": str(tmp_path / "images")},
        {"id": "text", "dataset_type": "text_embeds", "cache_dir": str(tmp_path / "cache" / "text")},
    ]))
    values = {"model_family": "sd1x", "pretrained_model_name_or_path": "some/model", "output_dir": str(tmp_path / "out"),
              "data_backend_config": str(datasets), **config}
    (tmp_path / "config" / "config.json").write_text(json.dumps(values))
    (tmp_path / "config" / "config.env").write_text(env_file)
    return tmp_path


def resolve(root: Path, argv: list[str] | None = None, environ: dict | None = None):
    return resolve_run(argv or [], environ=environ or {}, root=root)


def flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def launcher_part(command: list[str]) -> list[str]:
    """The arguments given to accelerate itself (before the training module)."""
    return command[: command.index("simpletuner.cli") - 1]


# --- the accelerate command -----------------------------------------------------------------------


def test_cpu_command_starts_real_processes(tmp_path):
    run = resolve(project(tmp_path, "TRAINING_NUM_PROCESSES=2\n", mixed_precision="no"))
    command, env = accelerate_command(run.launcher, ["--seed", "3"], has_gpu=False, config=run.config)
    assert command[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert (flag(command, "--num_processes"), flag(command, "--num_machines")) == ("2", "1")
    assert (flag(command, "--mixed_precision"), flag(command, "--dynamo_backend")) == ("no", "no")
    assert int(flag(command, "--main_process_port")) > 0
    assert "--multi_gpu" in command and "--cpu" not in command  # --cpu would silently start one process
    import os

    if "OMP_NUM_THREADS" not in os.environ:  # the cores are shared between the processes
        assert flag(command, "--num_cpu_threads_per_process") == str(max(1, usable_cpus() // 2))
    assert env == {LAUNCHED_MARKER: "1", "ACCELERATE_USE_CPU": "1"}
    assert command[-5:] == ["-m", "simpletuner.cli", "train", "--seed", "3"]
    line = printable_command(command, env)
    assert line.startswith("SIMPLETUNER_LAUNCHED=1 ACCELERATE_USE_CPU=1 ") and "--num_processes 2" in line


def test_gpu_command_carries_precision_and_every_dynamo_option(tmp_path):
    env_file = "TRAINING_NUM_PROCESSES=4\nTRAINING_DYNAMO_BACKEND=inductor\nMIXED_PRECISION=bf16\n"
    run = resolve(project(tmp_path, env_file, dynamo_mode="max-autotune", dynamo_fullgraph=True, dynamo_dynamic=True,
                          dynamo_use_regional_compilation=True))
    assert run.config.mixed_precision == "bf16"  # MIXED_PRECISION fills --mixed_precision
    command, env = accelerate_command(run.launcher, [], has_gpu=True, config=run.config)
    assert env == {LAUNCHED_MARKER: "1"}
    assert (flag(command, "--mixed_precision"), flag(command, "--dynamo_backend")) == ("bf16", "inductor")
    assert flag(command, "--dynamo_mode") == "max-autotune"
    assert {"--dynamo_use_fullgraph", "--dynamo_use_dynamic", "--dynamo_use_regional_compilation",
            "--multi_gpu"} <= set(command)


def test_dynamo_options_without_a_backend_warn_and_stay_off_the_command(tmp_path):
    run = resolve(project(tmp_path, "TRAINING_NUM_PROCESSES=2\n", dynamo_mode="max-autotune"))
    assert any("`--dynamo_mode` has no effect without a compiler backend" in w for w in run.warnings)
    command, _ = accelerate_command(run.launcher, [], has_gpu=True, config=run.config)
    assert flag(command, "--dynamo_backend") == "no" and "--dynamo_mode" not in command


def test_multi_node_command(tmp_path):
    env_file = ("TRAINING_NUM_PROCESSES=16\nTRAINING_NUM_MACHINES=2\nTRAINING_MACHINE_RANK=1\n"
                "TRAINING_MAIN_PROCESS_IP=10.0.0.1\nTRAINING_MAIN_PROCESS_PORT=29500\n")
    run = resolve(project(tmp_path, env_file))
    command, _ = accelerate_command(run.launcher, [], has_gpu=True, config=run.config)
    assert (flag(command, "--num_processes"), flag(command, "--num_machines"), flag(command, "--machine_rank"),
            flag(command, "--main_process_ip"), flag(command, "--main_process_port")) == ("16", "2", "1", "10.0.0.1", "29500")


@pytest.mark.parametrize("env_file, message", [
    ("TRAINING_NUM_MACHINES=2\nTRAINING_NUM_PROCESSES=4\nTRAINING_MAIN_PROCESS_IP=h\n",
     "needs TRAINING_MACHINE_RANK, TRAINING_MAIN_PROCESS_PORT on every machine"),
    ("TRAINING_NUM_MACHINES=2\nTRAINING_NUM_PROCESSES=4\nTRAINING_MAIN_PROCESS_IP=h\nTRAINING_MACHINE_RANK=2\n"
     "TRAINING_MAIN_PROCESS_PORT=1\n", "TRAINING_MACHINE_RANK=2 must be below TRAINING_NUM_MACHINES=2"),
    ("TRAINING_NUM_MACHINES=2\nTRAINING_NUM_PROCESSES=1\nTRAINING_MAIN_PROCESS_IP=h\nTRAINING_MACHINE_RANK=0\n"
     "TRAINING_MAIN_PROCESS_PORT=1\n", "counts the processes of all machines together"),
    ("TRAINING_NUM_PROCESS=2\n", "unknown variable TRAINING_NUM_PROCESS; did you mean TRAINING_NUM_PROCESSES?"),
    ("TRAINING_NUM_PROCESSES=two\n", "TRAINING_NUM_PROCESSES='two' is not an integer"),
    ("TRAINING_DYNAMO_BACKEND=inductr\n", "TRAINING_DYNAMO_BACKEND='inductr': use one of"),
    ("MIXED_PRECISION=fp32\n", "MIXED_PRECISION='fp32': use one of no, fp16, bf16, fp8"),
    ("ACCELERATE_EXTRA_ARGS='--num_processes 4'\n", "`--num_processes` is set by simpletuner; use TRAINING_NUM_PROCESSES"),
    ("ACCELERATE_EXTRA_ARGS='--main-process-port=1234'\n", "use TRAINING_MAIN_PROCESS_PORT instead"),
    ("ACCELERATE_EXTRA_ARGS='--cpu'\n", "remove `--cpu` (with it accelerate starts a single process)"),
])
def test_bad_launcher_settings_are_named(tmp_path, env_file, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        resolve(project(tmp_path, env_file))


def test_accelerate_config_file_or_engine_flag_chooses_the_engine(tmp_path):
    fsdp = resolve(project(tmp_path, "TRAINING_NUM_PROCESSES=8\nACCELERATE_EXTRA_ARGS='--config_file fsdp.yaml'\n"))
    command, _ = accelerate_command(fsdp.launcher, ["--seed", "1"], has_gpu=True, config=fsdp.config)
    assert "--multi_gpu" not in command  # the file's distributed_type (FSDP) decides
    assert launcher_part(command)[-2:] == ["--config_file", "fsdp.yaml"]
    # on the CPU --multi_gpu is still what starts several processes
    command, _ = accelerate_command(fsdp.launcher, [], has_gpu=False, config=fsdp.config)
    assert "--multi_gpu" in command
    deepspeed = resolve(project(tmp_path, "TRAINING_NUM_PROCESSES=2\nACCELERATE_EXTRA_ARGS='--use_deepspeed "
                                "--zero_stage 2 --gradient_clipping 1.0'\n"))
    command, _ = accelerate_command(deepspeed.launcher, [], has_gpu=True, config=deepspeed.config)
    assert "--multi_gpu" not in command and launcher_part(command)[-5:] == [
        "--use_deepspeed", "--zero_stage", "2", "--gradient_clipping", "1.0"]
    # one process with extra arguments (e.g. DeepSpeed offload on one GPU) still goes through accelerate
    single = LauncherSettings(num_processes=1, accelerate_extra_args=("--use_deepspeed",))
    command, _ = accelerate_command(single, [], has_gpu=True)
    assert "--multi_gpu" not in command and needs_relaunch(single)


def test_needs_relaunch(monkeypatch):
    monkeypatch.delenv(LAUNCHED_MARKER, raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert not needs_relaunch(LauncherSettings())
    assert needs_relaunch(LauncherSettings(num_processes=2))
    assert needs_relaunch(LauncherSettings(num_processes=8, num_machines=2))
    monkeypatch.setenv(LAUNCHED_MARKER, "1")
    assert not needs_relaunch(LauncherSettings(num_processes=2))


# --- where the process count and precision come from ------------------------------------------------


def test_process_count_precedence(tmp_path):
    root = project(tmp_path, "", num_processes=3)
    assert resolve(root).launcher.num_processes == 3  # config.json alone
    (root / "config" / "config.env").write_text("TRAINING_NUM_PROCESSES=2\n")
    assert resolve(root).launcher.num_processes == 2  # config.env beats config.json
    assert resolve(root, environ={"TRAINING_NUM_PROCESSES": "4"}).launcher.num_processes == 4  # then the environment
    assert resolve(root, ["--num_processes", "1"], environ={"TRAINING_NUM_PROCESSES": "4"}).launcher.num_processes == 1
    assert load_launcher_settings(tmp_path / "nowhere", None, {}) == LauncherSettings()


def test_mixed_precision_in_both_places_must_agree(tmp_path):
    root = project(tmp_path, "MIXED_PRECISION=bf16\n", mixed_precision="no")
    with pytest.raises(ConfigError, match="MIXED_PRECISION=bf16 disagrees with `--mixed_precision no`"):
        resolve(root)
    assert resolve(root, ["--mixed_precision", "bf16"]).config.mixed_precision == "bf16"
    (root / "config" / "config.env").write_text("MIXED_PRECISION=fp16\n")
    with pytest.raises(ConfigError, match="MIXED_PRECISION=fp16 disagrees"):
        resolve(root)


def test_dry_run_names_machines_and_extra_args(tmp_path, capsys):
    from simpletuner.training.plan import describe_launcher

    run = resolve(project(tmp_path, "TRAINING_NUM_PROCESSES=4\nTRAINING_NUM_MACHINES=2\nTRAINING_MACHINE_RANK=0\n"
                          "TRAINING_MAIN_PROCESS_IP=h1\nTRAINING_MAIN_PROCESS_PORT=29500\n"
                          "ACCELERATE_EXTRA_ARGS='--config_file ds.yaml'\n"))
    line = describe_launcher(run.launcher)
    assert line.startswith("launcher: 4 process(es), dynamo off, 2 machines (this one rank 0, main h1:29500), "
                           "accelerate args --config_file ds.yaml, from ")


# --- sharding, seeds and resume with another process count --------------------------------------------

torch = pytest.importorskip("torch")


def fake_trainer(rank: int, processes: int, records, batch_size: int = 2, sp_size: int = 1):
    """A Trainer with just what ``_next_local_batch`` uses: the real sampler and mixer, a fake accelerator
    (``sp_size``: groups of that many processes share a batch, as with ``--sp_size``)."""
    from simpletuner.data.mixing import DatasetMixer, DatasetSchedule
    from simpletuner.data.sampler import BucketBatchSampler
    from simpletuner.training.sequence_parallel import data_ranks
    from simpletuner.training.trainer import LoopState, Trainer

    mixer = DatasetMixer({"d": BucketBatchSampler({(64, 64): records}, batch_size, seed=5)},
                         {"d": DatasetSchedule(weight=1.0)}, seed=5)
    seeds = []

    class Data:
        sampler = mixer

        def next_batch(self, step):
            seeds.append(torch.initial_seed())
            return {"paths": [r.path for r in mixer.next_draw(step).records]}

        def skip_batch(self, step):
            mixer.next_draw(step)

        def state_dict(self):
            return mixer.state_dict()

    trainer = Trainer.__new__(Trainer)
    trainer.accelerator = SimpleNamespace(num_processes=processes, process_index=rank)
    trainer.data_ranks = data_ranks(processes, rank, sp_size)
    trainer.state = LoopState()
    trainer.data = Data()
    trainer.batch_seed_base = 7
    trainer.batch_inspector = None  # no --debug_dataset_loader / --print_sampler_statistics
    return trainer, seeds


def test_ranks_split_every_epoch_without_overlap_and_draw_their_own_noise():
    from simpletuner.data.metadata import ImageRecord
    from simpletuner.training.distributed import batch_seed

    records = [ImageRecord(f"img{i}.png", 64, 64, f"caption {i}", "d") for i in range(24)]
    processes, batch = 3, 2
    steps_per_epoch = len(records) // batch // processes
    seen, seeds = {}, {}
    for rank in range(processes):
        trainer, used_seeds = fake_trainer(rank, processes, records, batch)
        paths = []
        for step in range(2 * steps_per_epoch):  # two epochs
            trainer.state.global_step = step
            paths.append(trainer._next_local_batch()["paths"])
        seen[rank] = paths
        seeds[rank] = used_seeds
    for epoch in range(2):
        window = slice(epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch)
        images = [p for rank in seen for paths in seen[rank][window] for p in paths]
        assert sorted(images) == sorted(r.path for r in records), f"epoch {epoch}: every image exactly once"
    # the noise seed of a batch is a function of its position in the global order: rank r at step s
    # trains global batch s * processes + r
    for rank in range(processes):
        assert seeds[rank] == [batch_seed(7, s * processes + rank) % 2**32 for s in range(2 * steps_per_epoch)]
    assert len({seed for rank in seeds for seed in seeds[rank]}) == 2 * len(records) // batch


def test_one_process_with_accumulation_walks_the_same_batches_as_two_processes():
    from simpletuner.data.metadata import ImageRecord

    records = [ImageRecord(f"img{i}.png", 64, 64, f"c{i}", "d") for i in range(16)]
    two = [fake_trainer(rank, 2, records)[0] for rank in range(2)]
    one, _ = fake_trainer(0, 1, records)
    for step in range(4):
        for trainer in two:
            trainer.state.global_step = step
        one.state.global_step = step
        assert [t._next_local_batch()["paths"] for t in two] == [one._next_local_batch()["paths"] for _ in range(2)]


def settings(processes=2, batch=2, accumulation=1):
    return make_config(train_batch_size=batch, gradient_accumulation_steps=accumulation), processes


def test_resume_with_another_process_count_keeps_or_names_the_global_batch(tmp_path):
    from simpletuner.training.checkpoint import CheckpointError
    from simpletuner.training.distributed import check_resume_topology, topology

    saved = topology(*settings(processes=2, batch=2, accumulation=1))
    check_resume_topology(tmp_path, saved, *settings(processes=2))  # same count: fine
    check_resume_topology(tmp_path, saved, *settings(processes=1, accumulation=2))  # same 4 images per step
    check_resume_topology(tmp_path, {"global_step": 3}, *settings(processes=4))  # older checkpoint: warned, allowed
    with pytest.raises(CheckpointError) as error:
        check_resume_topology(tmp_path, saved, *settings(processes=1, accumulation=1))
    assert str(error.value) == (
        f"{tmp_path} was trained with 2 process(es) x batch 2 x accumulation 1 = 4 images per step; this run has "
        "1 x 2 x 1 = 2. Resume with TRAINING_NUM_PROCESSES=2 or --gradient_accumulation_steps 2 (keeps 4 images per "
        "step with 1 process(es)), or start a new --output_dir")
    with pytest.raises(CheckpointError, match="Resume with TRAINING_NUM_PROCESSES=2, or start"):
        check_resume_topology(tmp_path, saved, *settings(processes=4, accumulation=1))


# --- compilation helpers -------------------------------------------------------------------------------


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)

    def forward(self, x):
        return torch.relu(self.linear(x))


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Linear(4, 4)
        self.blocks = torch.nn.ModuleList([Block() for _ in range(3)])
        self.mixed = torch.nn.ModuleList([torch.nn.Linear(4, 4), torch.nn.ReLU()])

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.mixed[1](self.mixed[0](x))


def test_regional_compilation_compiles_repeated_blocks_in_place_and_keeps_weight_names():
    from simpletuner.training.distributed import compile_denoiser, repeated_blocks

    net = Net()
    assert repeated_blocks(net) == list(net.blocks)  # the mixed list is not a repeated block
    names = list(net.state_dict())
    options = make_config(dynamo_use_regional_compilation=True)
    assert compile_denoiser(net, None, options) == 0
    assert compile_denoiser(net, "eager", options) == 3
    assert all(block._compiled_call_impl is not None for block in net.blocks)
    assert net._compiled_call_impl is None and net.stem._compiled_call_impl is None
    assert list(net.state_dict()) == names  # LoRA files and checkpoints see the usual names
    x = torch.randn(2, 4)
    net(x).sum().backward()
    assert net.blocks[0].linear.weight.grad is not None
    whole = Net()
    assert compile_denoiser(whole, "eager", options.replace(dynamo_use_regional_compilation=False)) == 1
    assert whole._compiled_call_impl is not None and list(whole.state_dict()) == names


def test_engines_that_shard_state_are_refused_until_simpletuner_can_save_it():
    from accelerate.utils import DistributedType
    from torch.distributed.fsdp import ShardingStrategy

    from simpletuner.training.distributed import check_engine

    def accelerator(kind, **plugins):
        return SimpleNamespace(distributed_type=kind, state=SimpleNamespace(**plugins))

    def fsdp(strategy, version=1):
        return SimpleNamespace(sharding_strategy=strategy, reshard_after_forward=None, fsdp_version=version)

    check_engine(accelerator(DistributedType.MULTI_CPU))
    check_engine(accelerator(DistributedType.DEEPSPEED, deepspeed_plugin=SimpleNamespace(zero_stage=0)))
    check_engine(accelerator(DistributedType.FSDP, fsdp_plugin=fsdp(ShardingStrategy.NO_SHARD)))
    with pytest.raises(ConfigError, match=r"DeepSpeed ZeRO stage 2 was set up in accelerate .*set `--zero_stage 2`"):
        check_engine(accelerator(DistributedType.DEEPSPEED, deepspeed_plugin=SimpleNamespace(zero_stage=2)))
    # ZeRO from --zero_stage: every process writes its share of the optimizer state (training/zero.py)
    check_engine(accelerator(DistributedType.DEEPSPEED, deepspeed_plugin=SimpleNamespace(zero_stage=2)),
                 zero_from_options=True)
    with pytest.raises(ConfigError, match=r"FSDP version 1 \(FULL_SHARD\) flattens the weights .* Use "
                                          r"`--fsdp_enable true`"):
        check_engine(accelerator(DistributedType.FSDP, fsdp_plugin=fsdp(ShardingStrategy.FULL_SHARD)))
    # FSDP2 is gathered before saving (training/fsdp.py, tests/training/test_fsdp.py)
    check_engine(accelerator(DistributedType.FSDP, fsdp_plugin=SimpleNamespace(
        sharding_strategy=None, reshard_after_forward=True, fsdp_version=2)))
