"""DeepSpeed ZeRO's options: the mapping to the DeepSpeed config accelerate gets, the refusals of what
cannot work, and the install message where the package is missing (simulated: the test environment has
it, for tests/training/test_zero.py). Torch-free."""

from __future__ import annotations

import json

import pytest

from simpletuner.options import ConfigError
from simpletuner.options import deepspeed_rules as rules
from simpletuner.testing.config import make_config
from simpletuner.training import deepspeed
from simpletuner.training.deepspeed import deepspeed_config_for, deepspeed_plugin, uses_deepspeed

@pytest.fixture
def without_deepspeed(monkeypatch):
    """The package looked for and not found, as on a machine without the extra."""
    monkeypatch.setattr(deepspeed, "deepspeed_installed", lambda: False)


def zero(**overrides):
    values = {"zero_stage": 2, "train_batch_size": 4, "gradient_accumulation_steps": 3, "max_grad_norm": 1.5,
              "mixed_precision": "bf16", "optimizer": "optimi-adamw"}
    return make_config(**{**values, **overrides})


def test_without_the_options_nothing_uses_deepspeed():
    config = make_config()
    assert not uses_deepspeed(config) and deepspeed_plugin(config) is None
    for rule in rules.DEEPSPEED_RULES:
        rule(config)  # no error, and no question about the deepspeed package


def test_options_map_to_the_deepspeed_config_accelerate_gets():
    assert deepspeed_config_for(zero()) == {
        "train_batch_size": "auto",  # accelerate multiplies in the process count
        "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 3, "gradient_clipping": 1.5,
        "zero_optimization": {"stage": 2}, "bf16": {"enabled": True}, "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,
    }
    fp16 = deepspeed_config_for(zero(zero_stage=3, mixed_precision="fp16", max_grad_norm=0))
    assert fp16["fp16"] == {"enabled": True, "loss_scale": 0} and fp16["bf16"] == {"enabled": False}
    assert fp16["zero_optimization"] == {"stage": 3} and fp16["gradient_clipping"] == 0.0  # 0: no clipping
    fp32 = deepspeed_config_for(zero(zero_stage=1, mixed_precision="no"))
    assert fp32["bf16"] == {"enabled": False} and fp32["fp16"] == {"enabled": False}


def test_a_deepspeed_file_adds_offload_and_may_write_auto(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({
        "gradient_accumulation_steps": "auto", "bf16": {"enabled": "auto"},
        "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": True},
                              "overlap_comm": True},
    }))
    mapped = deepspeed_config_for(zero(zero_stage=None, deepspeed_config=str(path)))
    assert mapped["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": True},
                                           "overlap_comm": True}
    assert mapped["gradient_accumulation_steps"] == 3 and mapped["bf16"] == {"enabled": True}
    assert mapped["zero_force_ds_cpu_optimizer"] is False  # our optimizer steps on the offloaded copy
    inline = deepspeed_config_for(zero(zero_stage=None, deepspeed_config={"zero_optimization": {}}))
    assert inline["zero_optimization"] == {"stage": 2}  # no stage anywhere: ZeRO-2


@pytest.mark.parametrize("given, message", [
    ({"zero_optimization": {"stage": 3}}, r"zero_optimization.stage = 3, but --zero_stage gives 2"),
    ({"zero_optimization": {}, "gradient_accumulation_steps": 8},
     r"gradient_accumulation_steps = 8, but --gradient_accumulation_steps gives 3; set it in one place"),
    ({"zero_optimization": {}, "fp16": {"enabled": True}}, r"fp16.enabled = True, but --mixed_precision gives False"),
    ({"zero_optimization": {}, "optimizer": {"type": "AdamW"}}, r"'optimizer' section; remove it: --optimizer builds"),
    ({"zero_optimization": {}, "scheduler": {"type": "WarmupLR"}}, r"'scheduler' section; remove it"),
    ({"zero_optimization": {"stage": 5}}, r"zero_optimization.stage must be 0, 1, 2 or 3, got 5"),
    ({"bf16": {"enabled": True}}, r"no zero_optimization section"),
    ({"zero_optimization": {"reduce_bucket_size": "auto"}},
     r"zero_optimization.reduce_bucket_size = \"auto\" cannot be filled in: .*hidden_size"),
    ([1, 2], r"must be a JSON object"),
])
def test_a_deepspeed_config_that_disagrees_is_refused_naming_both(given, message):
    with pytest.raises(ConfigError, match=message):
        rules.check_deepspeed_config(zero(deepspeed_config=given))


@pytest.mark.parametrize("overrides, message", [
    ({"musubi_blocks_to_swap": 4}, r"`--musubi_blocks_to_swap` cannot be combined with DeepSpeed ZeRO .*: block "
                                   r"swap moves"),
    ({"ramtorch": True}, r"`--ramtorch` cannot be combined .*RamTorch keeps"),
    ({"enable_group_offload": True}, r"`--enable_group_offload` cannot be combined"),
])
def test_features_that_place_the_weights_themselves_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        rules.check_deepspeed_weight_placement(zero(**overrides))


def test_quantized_bases_ema_under_stage_3_and_other_misfits_are_refused():
    with pytest.raises(ConfigError, match=r"base_model_precision int8-quanto` cannot be combined .*casts every weight"):
        rules.check_deepspeed_quantized_base(zero(base_model_precision="int8-quanto"))
    rules.check_deepspeed_quantized_base(zero(base_model_precision="no_change"))
    with pytest.raises(ConfigError, match=r"`--use_ema` cannot be combined with ZeRO stage 3: each process holds"):
        rules.check_deepspeed_training_parts(zero(zero_stage=3, use_ema=True))
    rules.check_deepspeed_training_parts(zero(zero_stage=2, use_ema=True))  # whole weights under stage 2
    with pytest.raises(ConfigError, match=r"`--use_ema` cannot be combined with ZeRO stage 3"):  # stage from the file
        rules.check_deepspeed_training_parts(zero(zero_stage=None, use_ema=True,
                                                  deepspeed_config={"zero_optimization": {"stage": 3}}))
    with pytest.raises(ConfigError, match=r"`--train_text_encoder` cannot be combined"):
        rules.check_deepspeed_training_parts(zero(train_text_encoder=True))
    with pytest.raises(ConfigError, match=r"`--lora_type lycoris` cannot be combined with DeepSpeed ZeRO: LyCORIS keeps"):
        rules.check_deepspeed_training_parts(zero(lora_type="lycoris"))
    with pytest.raises(ConfigError, match=r"`--grad_clip_method value` cannot be combined .*by the norm"):
        rules.check_deepspeed_training_parts(zero(grad_clip_method="value"))
    with pytest.raises(ConfigError, match=r"`--optimizer adamw_schedulefree` cannot be combined"):
        rules.check_deepspeed_training_parts(zero(optimizer="adamw_schedulefree"))


def test_a_missing_deepspeed_package_names_the_extra_to_install(without_deepspeed):
    with pytest.raises(ConfigError, match=r"`--zero_stage` trains with DeepSpeed ZeRO, but the deepspeed package is "
                                          r"not installed.*`pip install 'simpletuner\[deepspeed\]'`"):
        rules.check_deepspeed_installed(zero())
    with pytest.raises(ConfigError, match=r"`--deepspeed_config` trains with DeepSpeed ZeRO"):
        rules.check_deepspeed_installed(zero(zero_stage=None, deepspeed_config={"zero_optimization": {}}))
    with pytest.raises(ImportError, match=r"pip install 'simpletuner\[deepspeed\]'"):
        deepspeed_plugin(zero())


def test_every_stage_is_accepted_and_stage_3_refuses_validation_on_one_process():
    for stage in (0, 1, 2, 3):
        rules.check_deepspeed_stage(zero(zero_stage=stage))
    rules.check_deepspeed_stage(zero(zero_stage=2, validation_prompt="a cat"))
    with pytest.raises(ConfigError, match=r"`--validation_prompt` cannot be combined with `--zero_stage 3` yet: "
                                          r"validation samples on the main process alone.*`--validation_disable true`"):
        rules.check_deepspeed_stage(zero(zero_stage=3, validation_prompt="a cat"))
    with pytest.raises(ConfigError, match=r"combined with stage 3 in `--deepspeed_config` yet"):
        rules.check_deepspeed_stage(zero(zero_stage=None, validation_prompt="a cat",
                                         deepspeed_config={"zero_optimization": {"stage": 3}}))
    rules.check_deepspeed_stage(zero(zero_stage=3, validation_prompt="a cat", validation_disable=True))
    rules.check_deepspeed_stage(make_config())  # no DeepSpeed: nothing to refuse


def test_what_needs_the_step_in_the_trainers_hands_is_refused():
    rules.check_deepspeed_step_control(zero())
    with pytest.raises(ConfigError, match=r"`--nan_action skip_batch` cannot be combined with DeepSpeed ZeRO: .*inside "
                                          r"the backward pass.*Use `--nan_action stop`"):
        rules.check_deepspeed_step_control(zero(nan_action="skip_batch"))
    with pytest.raises(ConfigError, match=r"`--gradient_precision fp32` cannot be combined .*grad_accum_dtype"):
        rules.check_deepspeed_step_control(zero(gradient_precision="fp32"))


def test_validation_of_a_whole_config_stops_at_the_missing_package(tmp_path, without_deepspeed):
    from simpletuner.options.resolve import resolve_run

    data = tmp_path / "multidatabackend.json"
    data.write_text(json.dumps([{"id": "shapes", "type": "local", "instance_data_dir": str(tmp_path / "images")}]))
    (tmp_path / "images").mkdir()
    argv = ["--model_family", "sd1x", "--pretrained_model_name_or_path", str(tmp_path / "model"),
            "--output_dir", str(tmp_path / "out"), "--data_backend_config", str(data), "--zero_stage", "2",
            "--mixed_precision", "no", "--optimizer", "optimi-adamw"]
    with pytest.raises(ConfigError, match=r"pip install 'simpletuner\[deepspeed\]'"):
        resolve_run(argv)


def test_the_plugin_accelerate_builds_carries_the_mapped_config(monkeypatch):
    """accelerate's DeepSpeedPlugin is built from the mapped dict (it needs no deepspeed to be built)."""
    monkeypatch.setattr(deepspeed, "deepspeed_installed", lambda: True)
    plugin = deepspeed_plugin(zero(zero_stage=3))
    assert plugin.zero_stage == 3 and plugin.gradient_clipping == 1.5 and plugin.zero3_init_flag is False
    assert plugin.zero3_save_16bit_model is True
    assert plugin.deepspeed_config["train_micro_batch_size_per_gpu"] == 4
    assert plugin.deepspeed_config["zero_allow_untested_optimizer"] is True

