"""The memory planner: model sizes from headers, estimates against measured peaks, proposals."""

from __future__ import annotations

import json

import pytest

from simpletuner.memory import planner
from simpletuner.memory.units import format_size, parse_size


def test_sizes_parse_and_print():
    assert parse_size("24GiB") == 24 * 2**30
    assert parse_size("16 GB") == 16 * 10**9
    assert parse_size("8000MiB") == 8000 * 2**20
    assert parse_size("1.5g") == int(1.5 * 2**30)
    with pytest.raises(ValueError, match="24GiB"):
        parse_size("lots")
    assert format_size(3 * 2**30) == "3.00 GiB"


def test_inventory_counts_parameters_from_headers_without_torch(tiny, memory_config):
    import torch
    from safetensors.torch import load_file

    config = memory_config("flux")
    inventory = planner.read_inventory(config)
    folder = tiny.path("flux")
    for name, component in inventory.components.items():
        tensors = load_file(str(next((folder / name).glob("*.safetensors"))))
        assert component.parameters == sum(t.numel() for t in tensors.values()), name
    blocks = inventory.blocks()
    assert [name for name, _, _ in blocks] == ["transformer_blocks.0", "transformer_blocks.1",
                                               "single_transformer_blocks.0", "single_transformer_blocks.1"]
    tensors = load_file(str(next((folder / "transformer").glob("*.safetensors"))))
    assert blocks[2][1] == sum(t.numel() for k, t in tensors.items() if k.startswith("single_transformer_blocks.0."))
    assert all(isinstance(t, torch.Tensor) for t in tensors.values())


def test_lora_parameter_count_matches_peft(tiny, memory_config):
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    config = memory_config("sd1x")
    inventory = planner.read_inventory(config)
    unet = UNet2DConditionModel.from_pretrained(tiny.path("sd1x") / "unet")
    unet.add_adapter(LoraConfig(r=4, target_modules=list(planner.DEFAULT_LORA_TARGETS)))
    peft_count = sum(p.numel() for n, p in unet.named_parameters() if "lora_" in n)
    assert planner.lora_parameters(inventory.denoiser, planner.DEFAULT_LORA_TARGETS, 4) == peft_count


def test_estimate_reacts_to_each_knob(memory_config):
    config = memory_config("flux", resolution=128, image_size=128)
    inventory = planner.read_inventory(config)
    base = planner.PlanSettings.from_config(config)
    plain = planner.estimate(inventory, base)
    assert planner.estimate(inventory, planner.replace(base, batch_size=4)).parts["activations"] == \
        pytest.approx(2 * plain.parts["activations"])
    assert planner.estimate(inventory, planner.replace(base, gradient_checkpointing=True)).parts["activations"] < \
        0.75 * plain.parts["activations"]  # 4 blocks: about half (measured 9.4 -> 4.6 MiB at 64 px)
    quantized = planner.estimate(inventory, planner.replace(base, base_model_precision="int8-quanto"))
    assert quantized.parts["denoiser weights"] < 0.6 * plain.parts["denoiser weights"]
    swapped = planner.estimate(inventory, planner.replace(base, blocks_to_swap=3))
    assert swapped.parts["denoiser weights"] < plain.parts["denoiser weights"]
    offloaded = planner.estimate(inventory, planner.replace(base, offload_frozen=True))
    assert offloaded.parts["text encoders"] == 0 and offloaded.parts["vae"] == 0
    full = planner.estimate(inventory, planner.replace(base, model_type="full"))
    assert full.parts["optimizer state"] == pytest.approx(2 * full.parts["gradients"])


@pytest.mark.parametrize("preset", ["int8-quanto", "int4-quanto", "int8-torchao", "fp8-torchao", "nf4-bnb"])
def test_quantized_weights_match_the_quantized_unet(tiny, memory_config, preset):
    """Every preset quantizes the convolutions too (torchao and bitsandbytes ones with quanto; 58 % of
    the tiny UNet's weights): the estimated denoiser weights are the bytes the quantized UNet holds."""
    import torch
    from diffusers import UNet2DConditionModel

    from simpletuner.models.quantize import quantize_module, weight_bytes

    config = memory_config("sd1x")
    inventory = planner.read_inventory(config)
    settings = planner.replace(planner.PlanSettings.from_config(config), mixed_precision="bf16",
                               base_model_precision=preset)
    estimated = planner.estimate(inventory, settings).parts["denoiser weights"]
    unet = UNet2DConditionModel.from_pretrained(tiny.path("sd1x"), subfolder="unet", torch_dtype=torch.bfloat16)
    quantize_module(unet, preset)
    assert estimated == pytest.approx(weight_bytes(unet), rel=0.1)


def test_proposal_is_the_cheapest_that_fits(memory_config):
    config = memory_config("flux", resolution=128, image_size=128, train_batch_size=4)
    inventory = planner.read_inventory(config)
    base = planner.PlanSettings.from_config(config)
    plain = planner.estimate(inventory, base)
    assert planner.propose(inventory, base, int(plain.peak) + 1).changes == {}
    tight = int(0.6 * plain.peak)
    proposal = planner.propose(inventory, base, tight, cuda=False)
    assert proposal is not None and proposal.estimate.peak <= tight
    assert proposal.changes  # something had to change
    # every single cheaper-looking alternative that the planner rejected really does not fit
    for settings in planner._candidates(inventory, base, True, ["no_change", "int8-quanto", "int4-quanto"]):
        if planner._cost(settings, base, len(inventory.blocks())) < proposal.cost - 1e-9:
            assert planner.estimate(inventory, settings).peak > tight
    assert planner.propose(inventory, base, 1024) is None  # 1 KiB fits nothing


def test_describe_names_the_budget_and_flags(memory_config):
    config = memory_config("flux", resolution=128, image_size=128, train_batch_size=4)
    inventory = planner.read_inventory(config)
    peak = planner.estimate(inventory, planner.PlanSettings.from_config(config)).peak
    text = planner.describe(config, budget=str(int(0.6 * peak)))
    assert "training peak" in text and "activations" in text
    assert "to fit in" in text and "--" in text.split("to fit in")[1]
    assert "fits in" in planner.describe(config, budget=str(int(2 * peak)))


# --- estimates against measured peaks of real training steps ----------------------------------------

CASES = [
    # family, model (variant), resolution, batch, extra flags
    ("sd1x", None, 80, 1, {}),
    ("sd1x", "sd1x+", 112, 3, {"gradient_checkpointing": "true"}),
    ("sd1x", None, 96, 2, {"model_type": "full", "lora_rank": None}),
    ("sd1x", "sd1x+", 96, 2, {"base_model_precision": "nf4-bnb"}),
    ("flux", None, 112, 3, {}),
    ("flux", "flux+", 80, 1, {"gradient_checkpointing": "true"}),
    ("sd3", "sd3+", 112, 1, {}),
    ("sd3", None, 80, 3, {"model_type": "full", "lora_rank": None, "gradient_checkpointing": "true"}),
    ("pixart_sigma", None, 112, 3, {"gradient_checkpointing": "true"}),
    ("pixart_sigma", "pixart_sigma+", 80, 2, {"model_type": "full", "lora_rank": None}),
]


@pytest.mark.slow
@pytest.mark.parametrize("family,model,resolution,batch,flags", CASES,
                         ids=[f"{c[1] or c[0]}-{c[2]}px-b{c[3]}-{'-'.join(c[4]) or 'lora'}" for c in CASES])
def test_estimate_within_25_percent_of_measured_peak(memory_config, family, model, resolution, batch, flags):
    from simpletuner.memory.measure import measure_peak
    from simpletuner.training.offload import text_encoders_of, vae_of
    from simpletuner.training.trainer import Trainer

    config = memory_config(family, model=model, resolution=resolution, image_size=128, train_batch_size=batch,
                           **flags)
    estimate = planner.estimate(planner.read_inventory(config), planner.PlanSettings.from_config(config))
    trainer = Trainer(config, show_progress=False)
    trainer.setup()
    try:
        trainer.optimization_step()  # the optimizer state exists from here on
        model_parts = [trainer.model.denoiser, *text_encoders_of(trainer.model).values(), vae_of(trainer.model)]
        measured = measure_peak(trainer.optimization_step, [m for m in model_parts if m is not None] + [trainer.optimizer])
    finally:
        trainer.data.close()
    ratio = estimate.training_peak / measured.total
    print(f"estimate/measured {ratio:.3f} ({format_size(estimate.training_peak)} / {format_size(measured.total)})")
    assert 0.75 <= ratio <= 1.25, (f"estimated {format_size(estimate.training_peak)} vs measured {measured}: "
                                   f"{json.dumps({k: format_size(v) for k, v in estimate.parts.items()})}")


# --- the command line ---------------------------------------------------------------------------------


def plan_argv(config) -> list[str]:
    keys = ("model_family", "pretrained_model_name_or_path", "output_dir", "data_backend_config", "resolution",
            "resolution_type", "aspect_bucket_alignment", "train_batch_size", "max_train_steps", "lora_rank")
    return [token for key in keys for token in (f"--{key}", str(getattr(config, key)))]


def test_plan_memory_command_prints_the_plan_and_a_proposal(memory_config, capsys):
    from simpletuner.cli import main

    config = memory_config("flux", resolution=128, image_size=128, train_batch_size=4)
    assert main(["plan-memory", *plan_argv(config)]) == 0
    out = capsys.readouterr().out
    assert "memory plan for flux" in out and "training peak" in out and "to fit in" not in out
    assert main(["plan-memory", *plan_argv(config), "--memory_budget", "8MiB"]) == 0
    assert "to fit in 8.00 MiB: --" in capsys.readouterr().out
    assert main(["train", *plan_argv(config), "--memory_budget", "8MiB", "--dry-run"]) == 0
    assert "to fit in 8.00 MiB: --" in capsys.readouterr().out  # the same section in --dry-run


def test_plan_memory_stays_torch_free(memory_config, tmp_path):
    from tests.test_cli import heavy_modules_after, run_main_code

    config = memory_config("flux")
    heavy, stdout = heavy_modules_after(run_main_code(["plan-memory", *plan_argv(config), "--memory_budget", "8GiB"]),
                                        cwd=tmp_path)
    assert "EXIT=0" in stdout and "memory plan for flux" in stdout
    assert heavy == []
