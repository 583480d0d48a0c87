"""Sequence parallel (``--sp_size``): the rules, the data split, and real 2-process Wan and LTX-Video runs
on the CPU.

The end-to-end tests are the proof that matters: two gloo processes splitting every clip's tokens
between them (diffusers' context-parallel hooks, Ulysses all-to-all in the forward and backward pass;
for LTX-Video simpletuner's own plan, which keeps the text whole) must train exactly what one process
trains on the same batches. It uses plain SGD without clipping, so
a gradient off by the group size (the gather's backward gives each process only its slice's share)
shows up in the weights instead of being normalised away as Adam would.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from simpletuner.options import ConfigError  # noqa: E402
from simpletuner.options.sequence_parallel_rules import SEQUENCE_PARALLEL_ATTENTION  # noqa: E402
from simpletuner.options.validation import validate_config  # noqa: E402
from simpletuner.testing.config import make_config  # noqa: E402

SYNC_LINE = re.compile(r"rank-sync step=(\d+) rank=(\d+) loss=([-+.\de]+) weights=([0-9a-f]{16})")


def rules(**options):
    from simpletuner.options.sequence_parallel_rules import SEQUENCE_PARALLEL_RULES

    config = make_config(**{"model_family": "wan", "num_processes": 2, "sp_size": 2, **options})
    for rule in SEQUENCE_PARALLEL_RULES:
        rule(config)


# --- rules (no torch) -------------------------------------------------------------------------------

def test_a_whole_number_of_groups_on_wan_is_accepted():
    rules()
    rules(num_processes=4)
    rules(num_processes=None)  # the count comes from config.env: the trainer checks it (data_ranks)
    rules(model_flavour="t2v-a14b-2.2", refiner_training=True)  # one expert of two
    rules(model_family="ltxvideo")
    rules(model_family="ltxvideo", ltx_train_mode="i2v")  # per-token timesteps are split with the tokens
    rules(model_family="sd1x", sp_size=1)  # off: nothing to check


@pytest.mark.parametrize("options, message", [
    ({"model_family": "flux"}, r"`--sp_size 2` is not available for `--model_family flux`: sequence parallel "
                               r"works for ltxvideo, wan"),
    ({"num_processes": 3}, r"`--sp_size 2` needs `--num_processes` to be a multiple of 2 .* but it is 3. Set "
                           r"`--num_processes 2`"),
    ({"num_processes": 1}, r"multiple of 2 .* but it is 1. Set `--num_processes 2`"),
    ({"tread_config": '{"routes": []}'}, r"`--tread_config` cannot be combined with `--sp_size 2`: TREAD drops tokens"),
    ({"crepa_enabled": True}, r"`--crepa_enabled` cannot be combined .* only this process's slice"),
    ({"layersync_enabled": True}, r"`--layersync_enabled` cannot be combined"),
    ({"musubi_blocks_to_swap": 1}, r"`--musubi_blocks_to_swap` cannot be combined"),
    ({"fsdp_enable": True}, r"`--fsdp_enable` cannot be combined .* runs under DDP"),
    ({"zero_stage": 2}, r"`--zero_stage` cannot be combined"),
    ({"attention_mechanism": "xformers"}, r"`--attention_mechanism xformers` cannot be combined with `--sp_size`"),
    ({"validation_prompt": "a red square"}, r"`--validation_prompt` cannot be combined with `--sp_size` yet"),
    ({"eval_steps_interval": 10}, r"`--eval_steps_interval` / `--eval_epoch_interval` cannot be combined"),
    ({"model_flavour": "t2v-a14b-2.2"}, r"`--sp_size` cannot train both experts of `--model_flavour t2v-a14b-2.2` "
                                        r"in one run yet"),
    ({"tp_size": 2}, r"`--tp_size 2` is not supported: diffusers' tensor parallelism has no plan for the video"),
])
def test_combinations_that_cannot_work_are_refused_with_the_reason(options, message):
    with pytest.raises(ConfigError, match=message):
        rules(**options)


def test_tp_size_is_refused_for_every_family_even_without_sp():
    with pytest.raises(ConfigError, match=r"`--tp_size 4` is not supported"):
        rules(model_family="flux", sp_size=1, tp_size=4)


def test_the_rules_run_in_full_validation(tmp_path):
    config = make_config(model_family="flux", sp_size=2, num_processes=2, output_dir=str(tmp_path / "out"))
    with pytest.raises(ConfigError, match=r"not available for `--model_family flux`"):
        validate_config(config)


def test_the_video_families_declare_sequence_parallel():
    from simpletuner.models.registry import FAMILIES, family_info

    assert [name for name in FAMILIES if family_info(name).sequence_parallel] == ["ltxvideo", "wan"]


# --- which plan ----------------------------------------------------------------------------------------

def tiny_ltx_transformer():
    from diffusers import LTXVideoTransformer3DModel

    from simpletuner.testing.tiny.ltxvideo import TRANSFORMER_CONFIG

    return LTXVideoTransformer3DModel(**TRANSFORMER_CONFIG)


def test_ltx_video_keeps_the_text_whole_and_its_cross_attention_local():
    pytest.importorskip("diffusers")
    from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

    from simpletuner.training.sequence_parallel import _exchanging_processors, split_plan

    transformer = tiny_ltx_transformer()
    plan = split_plan(transformer)
    assert "encoder_hidden_states" in transformer._cp_plan[""], "diffusers' own plan is the one that cannot train"
    top = plan.hooks[""]
    assert set(top) == {"hidden_states", "timestep"}, "the text and its mask must stay whole on every process"
    assert all(isinstance(cut, ContextParallelInput) and cut.split_dim == 1 for cut in top.values())
    assert [cut.split_output for cut in plan.hooks["rope"].values()] == [True, True]  # cos and sin, whole clip
    assert isinstance(plan.hooks["proj_out"], ContextParallelOutput)
    for path in plan.hooks:
        transformer.get_submodule(path)  # every hooked module exists in the real class
    blocks = transformer.transformer_blocks
    exchanging = _exchanging_processors(transformer, plan)
    assert [id(p) for p in exchanging] == [id(block.attn1.processor) for block in blocks]
    assert not {id(block.attn2.processor) for block in blocks} & {id(p) for p in exchanging}
    assert transformer._cp_plan is type(transformer)._cp_plan, "diffusers' class must be left as it was"


def test_wan_keeps_the_plan_diffusers_ships():
    pytest.importorskip("diffusers")
    from diffusers import WanTransformer3DModel

    from simpletuner.testing.tiny import wan
    from simpletuner.training.sequence_parallel import split_plan

    transformer = wan._transformer(16, 16)
    assert split_plan(transformer).hooks is WanTransformer3DModel._cp_plan
    assert split_plan(transformer).local_attention == ()


def test_a_processor_shared_by_self_and_cross_attention_is_refused():
    pytest.importorskip("diffusers")
    from diffusers.models.transformers.transformer_ltx import LTXVideoAttnProcessor

    from simpletuner.training.sequence_parallel import _exchanging_processors, split_plan

    transformer = tiny_ltx_transformer()
    shared = LTXVideoAttnProcessor()
    for block in transformer.transformer_blocks:
        block.attn1.set_processor(shared)
        block.attn2.set_processor(shared)
    with pytest.raises(RuntimeError, match=r"share one attention processor object, so the cross-attention \(attn2\)"):
        _exchanging_processors(transformer, split_plan(transformer))


@pytest.mark.parametrize("frames, height, width, message", [
    (3, 3, 3, r"--sp_size 2: a clip of 3 latent frames x 3 x 3 tokens makes 27 tokens, which do not split evenly over "
              r"2 processes; choose a frame count or resolution whose token count \(3 x 3 x 3\) is a multiple of 2"),
    (2, 4, 4, None),
])
def test_an_ltx_clip_whose_tokens_do_not_split_is_named(frames, height, width, message):
    torch = pytest.importorskip("torch")
    from simpletuner.training.sequence_parallel import _sequence_check

    check = _sequence_check(tiny_ltx_transformer(), 2)
    kwargs = {"hidden_states": torch.zeros(1, frames * height * width, 8), "num_frames": frames, "height": height,
              "width": width}
    if message is None:
        assert check(None, (), kwargs) is None
        return
    with pytest.raises(RuntimeError, match=message):
        check(None, (), kwargs)


def test_packed_tokens_without_their_grid_are_still_checked():
    torch = pytest.importorskip("torch")
    from simpletuner.training.sequence_parallel import _sequence_check

    check = _sequence_check(tiny_ltx_transformer(), 2)
    with pytest.raises(RuntimeError, match=r"a clip of packed latents makes 27 tokens, .*token count \(27\)"):
        check(None, (torch.zeros(1, 27, 8),), {})


def test_a_wan_clip_whose_tokens_do_not_split_is_named():
    torch = pytest.importorskip("torch")
    from simpletuner.testing.tiny import wan
    from simpletuner.training.sequence_parallel import _sequence_check

    check = _sequence_check(wan._transformer(16, 16), 2)  # patches of 1 x 2 x 2
    message = r"a clip of 3 latent frames x 6 x 6 latents makes 27 tokens, .*\(3 x 3 x 3\)"
    with pytest.raises(RuntimeError, match=message):
        check(None, (torch.zeros(1, 16, 3, 6, 6),), {})
    assert check(None, (torch.zeros(1, 16, 3, 4, 4),), {}) is None


# --- what the trainer derives --------------------------------------------------------------------------

def test_groups_of_consecutive_ranks_share_a_batch():
    from simpletuner.training.sequence_parallel import DataRanks, data_ranks

    assert [data_ranks(4, rank, 2) for rank in range(4)] == [DataRanks(2, 0, 2.0), DataRanks(2, 0, 2.0),
                                                             DataRanks(2, 1, 2.0), DataRanks(2, 1, 2.0)]
    assert data_ranks(3, 2, 1) == DataRanks(3, 2, 1.0)  # off: every process is its own data rank, loss unscaled
    with pytest.raises(RuntimeError, match="--sp_size 2 needs a multiple of 2 processes, but 3 were started"):
        data_ranks(3, 0, 2)


def test_the_processes_of_a_group_take_the_same_batches_with_the_same_seeds():
    pytest.importorskip("torch")
    from simpletuner.data.metadata import ImageRecord
    from tests.training.test_launch import fake_trainer

    records = [ImageRecord(f"img{i}.png", 64, 64, f"caption {i}", "d") for i in range(16)]
    seen, seeds = {}, {}
    for rank in range(4):  # two groups of two
        trainer, used_seeds = fake_trainer(rank, 4, records, batch_size=2, sp_size=2)
        paths = []
        for step in range(4):  # one epoch: 8 batches, 2 groups
            trainer.state.global_step = step
            paths.append(trainer._next_local_batch()["paths"])
        seen[rank], seeds[rank] = paths, used_seeds
    assert seen[0] == seen[1] and seen[2] == seen[3]
    assert seeds[0] == seeds[1] and seeds[2] == seeds[3]
    assert not set(map(tuple, seen[0])) & set(map(tuple, seen[2])), "the two groups trained the same batch"
    one, one_seeds = fake_trainer(0, 1, records, batch_size=2)
    whole = []
    for step in range(8):
        one.state.global_step = step
        whole.append(one._next_local_batch()["paths"])
    assert whole[0::2] == seen[0] and whole[1::2] == seen[2]  # the groups split the global order like DDP ranks
    assert one_seeds[0::2] == seeds[0] and one_seeds[1::2] == seeds[2]


def test_each_slice_draws_its_own_dropout_mask_and_the_shared_random_state_is_kept():
    torch = pytest.importorskip("torch")
    from simpletuner.training.sequence_parallel import SliceRandomness

    dropout = torch.nn.Dropout(0.5)
    masks = []
    for sp_rank in (0, 1):
        torch.manual_seed(11)  # every rank of a group starts the batch alike
        slices = SliceRandomness(sp_rank, torch.device("cpu"))
        slices.enter(dropout, ())
        masks.append(dropout(torch.ones(256)) == 0)
        slices.leave(dropout, (), None)
        after = torch.rand(4)  # what the step draws after the forward pass
        torch.manual_seed(11)
        assert torch.equal(after, torch.rand(4)), "the shared random state must come back untouched"
    assert not torch.equal(masks[0], masks[1]), "both slices dropped the same positions"


def test_the_accepted_attention_mechanisms_are_the_ones_diffusers_splits():
    pytest.importorskip("diffusers")
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    from simpletuner.options.precision_rules import DISPATCHER_BACKENDS

    splittable = {getattr(b, "value", b) for b in _AttentionBackendRegistry._supports_context_parallel}
    expected = {name for name, backend in DISPATCHER_BACKENDS.items()
                if (backend or "native") in splittable and not name.startswith("sage")}  # sage: refused, no backward
    assert set(SEQUENCE_PARALLEL_ATTENTION) == expected


# --- a real 2-process run -------------------------------------------------------------------------------

def run_cli(root: Path, *argv: str) -> str:
    env = {key: value for key, value in os.environ.items()
           if key not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "SIMPLETUNER_LAUNCHED")}
    command = [str(Path(sys.executable).with_name("simpletuner")), "train", *argv]
    result = subprocess.run(command, cwd=root, env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                            timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    return output


def video_project(root: Path, family: str, **options) -> Path:
    """A tiny ``family`` model and four 9-frame 32x32 clips, trained with plain SGD (see the module docstring).

    Wan: 3 latent frames x 2 x 2 patches = 12 tokens, 6 per process. LTX-Video: 2 latent frames x 4 x 4 =
    32 tokens, 16 per process, next to 16 text tokens that every process keeps whole."""
    import json

    from simpletuner.testing.clips import write_video_project
    from simpletuner.testing.tiny_models import make_tiny_model

    make_tiny_model(family, root / "model")
    write_video_project(root, clips=4, frames=9, size=32)
    (root / "config").mkdir()
    config = {"model_family": family, "pretrained_model_name_or_path": str(root / "model"), "model_type": "lora",
              "lora_rank": 4, "output_dir": str(root / "out"), "data_backend_config": str(root / "multidatabackend.json"),
              "cache_dir": str(root / "cache"), "resolution": 32, "resolution_type": "pixel",
              "aspect_bucket_alignment": 8, "tokenizer_max_length": 16, "mixed_precision": "no",
              "train_batch_size": 2, "seed": 7, "learning_rate": 0.5, "optimizer": "optimi-sgd", "max_grad_norm": 0,
              "lora_dropout": 0, "max_train_steps": 4, "report_to": "none", "disable_benchmark": True, **options}
    (root / "config" / "config.json").write_text(json.dumps(config, indent=1))
    return root


def split_losses_of(output: str, processes: int, steps: int) -> list[float]:
    """The loss of every step from the ranks' sync lines, after checking that all ranks hold the same
    weights, that the two halves of each clip agree on its loss, and that different groups trained
    different batches; with several groups, the mean over them."""
    by_step: dict[int, dict[int, tuple[float, str]]] = {}
    for step, rank, loss, digest in SYNC_LINE.findall(output):
        by_step.setdefault(int(step), {})[int(rank)] = (float(loss), digest)
    assert sorted(by_step) == list(range(1, steps + 1))
    groups = processes // 2
    split_losses = []
    for step, ranks in sorted(by_step.items()):
        assert sorted(ranks) == list(range(processes)), f"step {step}: {ranks}"
        assert len({digest for _, digest in ranks.values()}) == 1, f"step {step}: the processes hold different weights"
        for group in range(groups):  # the two halves of one clip agree on its loss
            assert ranks[2 * group][0] == ranks[2 * group + 1][0], f"step {step}: group {group} disagrees {ranks}"
        if groups > 1:
            assert ranks[0][0] != ranks[2][0], f"step {step}: both groups trained the same batch"
        split_losses.append(sum(ranks[2 * group][0] for group in range(groups)) / groups)
    return split_losses


def assert_same_lora_as_one_process(split_folder: Path, whole_folder: Path) -> None:
    from safetensors.torch import load_file

    split, whole = (load_file(str(folder / "pytorch_lora_weights.safetensors")) for folder in (split_folder,
                                                                                              whole_folder))
    assert split.keys() == whole.keys()
    difference = max(float((split[key] - whole[key]).abs().max()) for key in whole)
    assert difference < 1e-5, f"the split run's LoRA differs from one process's by {difference}"
    # lora_B starts at zero: a non-zero one means the adapter trained
    assert any(float(value.abs().max()) > 0 for key, value in whole.items() if "lora_B" in key), "nothing trained"


@pytest.mark.slow
@pytest.mark.parametrize("processes, batch, accumulation, resume", [
    (2, 2, 1, True),  # one group of 2: both halves of every clip; stopped at step 2 and resumed
    (4, 1, 2, False),  # two groups of 2 (data parallel 2): one process needs accumulation 2 for the same step
])
def test_processes_splitting_each_clip_train_what_one_process_trains(tmp_path, processes, batch, accumulation,
                                                                      resume):
    pytest.importorskip("torch")
    from tests.training.test_multiprocess import in_process

    root = video_project(tmp_path, "wan")
    (root / "config" / "config.env").write_text(f"TRAINING_NUM_PROCESSES={processes}\nSIMPLETUNER_CHECK_RANK_SYNC=1\n")
    argv = ("--sp_size", "2", "--train_batch_size", str(batch))
    if resume:
        output = run_cli(root, *argv, "--max_train_steps", "2", "--checkpoint_step_interval", "2")
        output += run_cli(root, *argv, "--resume_from_checkpoint", "latest")
        assert "checkpoint-2 at step 2" in output
    else:
        output = run_cli(root, *argv)
    groups = processes // 2
    assert f"sequence parallel: {groups} group(s) of 2 processes split WanTransformer3DModel's tokens" in output
    split_losses = split_losses_of(output, processes, steps=4)

    reference = in_process(root, "--output_dir", str(tmp_path / "ref"), "--train_batch_size", str(batch),
                           "--gradient_accumulation_steps", str(accumulation))
    assert split_losses == pytest.approx(reference.state.losses, rel=1e-5)
    assert_same_lora_as_one_process(root / "out", tmp_path / "ref")


@pytest.mark.slow
@pytest.mark.parametrize("mode", [
    "t2v",  # one timestep per sample: left whole, the adaptive norms broadcast over the slice
    "i2v",  # a clean first frame: one timestep per token, cut with the tokens
])
def test_ltx_video_split_over_two_processes_trains_what_one_process_trains(tmp_path, mode):
    pytest.importorskip("torch")
    from tests.training.test_multiprocess import in_process

    root = video_project(tmp_path, "ltxvideo", max_train_steps=2, ltx_train_mode=mode)
    (root / "config" / "config.env").write_text("TRAINING_NUM_PROCESSES=2\nSIMPLETUNER_CHECK_RANK_SYNC=1\n")
    output = run_cli(root, "--sp_size", "2")
    assert "sequence parallel: 1 group(s) of 2 processes split LTXVideoTransformer3DModel's tokens" in output
    split_losses = split_losses_of(output, processes=2, steps=2)

    reference = in_process(root, "--output_dir", str(tmp_path / "ref"))
    assert split_losses == pytest.approx(reference.state.losses, rel=1e-5)
    assert_same_lora_as_one_process(root / "out", tmp_path / "ref")
