"""make_config: the TrainConfig tests use, with the table's defaults and TrainConfig's strictness."""

from __future__ import annotations

import pytest

from simpletuner.options import options_by_name
from simpletuner.options.resolve import TrainConfig, merge_sources
from simpletuner.testing.config import make_config


def test_every_option_holds_its_table_default():
    config = make_config()
    assert isinstance(config, TrainConfig)
    assert config.as_dict() == {name: option.default for name, option in options_by_name().items()}
    assert config.explicit == frozenset()
    assert config.as_dict() == merge_sources({}, {}, "test", []).as_dict()  # what a run without options gets


def test_overrides_are_the_explicit_options():
    config = make_config(lora_rank=4, learning_rate=3e-4)
    assert (config.lora_rank, config.learning_rate) == (4, 3e-4)
    assert config.explicit == {"lora_rank", "learning_rate"}
    assert config.non_default() == {"lora_rank": 4, "learning_rate": 3e-4}


def test_values_are_taken_as_given_so_code_guards_can_be_tested():
    assert make_config(optimizer="not-an-optimizer").optimizer == "not-an-optimizer"


def test_an_unknown_keyword_names_the_closest_option():
    with pytest.raises(TypeError, match=r"make_config: unknown option `lora_rnk`; did you mean `lora_rank`\?"):
        make_config(lora_rnk=4)


def test_a_deprecated_alias_names_its_option():
    with pytest.raises(TypeError, match="`checkpointing_steps` is a deprecated alias; use `checkpoint_step_interval`"):
        make_config(checkpointing_steps=5)


def test_reading_an_undeclared_option_fails_as_in_a_run():
    config = make_config()
    with pytest.raises(AttributeError, match="did you mean `lora_rank`"):
        config.lora_rnk  # noqa: B018
    with pytest.raises(AttributeError, match="immutable"):
        config.lora_rank = 8
