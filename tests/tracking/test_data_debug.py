"""--debug_aspect_buckets, --debug_dataset_loader and --print_sampler_statistics in a real 4-step run."""

from __future__ import annotations

import logging
import re

import pytest

pytest.importorskip("torch")


def test_debug_options_log_buckets_batches_and_statistics(project, caplog):
    from simpletuner.training.trainer import train
    from tests.training.conftest import config_for

    config = config_for(project, "debugged", max_train_steps=4, debug_aspect_buckets="true",
                        debug_dataset_loader="true", print_sampler_statistics="true")
    with caplog.at_level(logging.INFO, logger="simpletuner.data.debug"):
        trainer = train(config, show_progress=False)
    messages = [r.getMessage() for r in caplog.records if r.name == "simpletuner.data.debug"]

    bucket_lines = [m for m in messages if re.search(r"dataset \S+ bucket \d+x\d+: \d+ images, e\.g\. ", m)]
    assert bucket_lines and all(".png" in m or ".jpg" in m for m in bucket_lines)
    counted = sum(int(re.search(r": (\d+) images", m).group(1)) for m in bucket_lines)
    assert counted == 8

    batch_lines = [m for m in messages if re.match(r"step \d+ batch: dataset \S+, bucket \d+x\d+, 2 files: ", m)]
    assert [int(m.split()[1]) for m in batch_lines] == [1, 2, 3, 4]

    stats = [m for m in messages if m.startswith("sampler statistics")]
    assert stats[0].startswith("sampler statistics (epoch 1): 8 samples")  # 4 steps per epoch at batch 2
    assert stats[-1].startswith("sampler statistics (whole run): 8 samples")
    assert re.search(r"bucket \d+x\d+: \d+", stats[-1]) and "dataset " in stats[-1]
    assert trainer.batch_inspector.run_counts.total() == 8


def test_debug_options_are_quiet_when_off(project, caplog):
    from simpletuner.training.trainer import train
    from tests.training.conftest import config_for

    with caplog.at_level(logging.INFO, logger="simpletuner.data.debug"):
        trainer = train(config_for(project, "quiet", max_train_steps=1), show_progress=False)
    assert trainer.batch_inspector is None
    assert not [r for r in caplog.records if r.name == "simpletuner.data.debug"]
