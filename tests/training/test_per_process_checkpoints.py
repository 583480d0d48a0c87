"""Checkpoints with one file per process (FSDP2's sharded state, DeepSpeed's ZeRO state) resume only as
they were written: with the engine setting and the process count that wrote them, and a checkpoint
without such files only without that setting. No processes are started."""

from __future__ import annotations

import pytest

from simpletuner.training.checkpoint import CheckpointError
from simpletuner.training.fsdp import check_sharded_resume
from simpletuner.training.zero import check_resume

#: engine -> (its check, its folder, what each refusal must say: other engine, other count, plain checkpoint)
ENGINES = {
    "fsdp2 sharded": (check_sharded_resume, "sharded", (
        r"written with `--fsdp_state_dict_type sharded` by 2 process\(es\): its weights and optimizer state are only "
        r"in sharded/.*`--fsdp_enable true --fsdp_state_dict_type sharded` and TRAINING_NUM_PROCESSES=2",
        r"holds the shards of 2 process\(es\), and this run has 3: .*Set TRAINING_NUM_PROCESSES=2 .* or use "
        r"`--fsdp_state_dict_type full`",
        r"checkpoint-4 was written gathered \(no sharded/ folder\).*resume it with `--fsdp_state_dict_type full`")),
    "zero": (check_resume, "zero", (
        r"checkpoint-2 was written under DeepSpeed ZeRO by 2 process\(es\).*TRAINING_NUM_PROCESSES=2",
        r"holds the ZeRO optimizer state of 2 process\(es\), and this run has 3",
        r"checkpoint-4 was written without DeepSpeed ZeRO .*resume it without `--zero_stage`")),
}


@pytest.mark.parametrize("engine", ENGINES)
def test_per_process_checkpoints_resume_only_as_they_were_written(tmp_path, engine):
    check, folder, (other_engine, other_count, plain_checkpoint) = ENGINES[engine]
    split, plain = tmp_path / "checkpoint-2", tmp_path / "checkpoint-4"
    (split / folder).mkdir(parents=True)
    plain.mkdir()
    saved = {"num_processes": 2}
    check(split, saved, True, 2)
    check(plain, saved, False, 1)
    for checkpoint, split_run, processes, message in ((split, False, 2, other_engine), (split, True, 3, other_count),
                                                      (plain, True, 2, plain_checkpoint)):
        with pytest.raises(CheckpointError, match=message):
            check(checkpoint, saved, split_run, processes)
