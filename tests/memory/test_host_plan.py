"""The host-RAM plan (memory/host.py) and the per-rank plan under FSDP2 / ZeRO (memory/sharding.py):
each term's arithmetic against sizes computed independently from the model files, the division by
the shard degree, the plan-memory output, and one measured load peak."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from simpletuner.memory import host, planner, sharding
from simpletuner.memory.units import format_size

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "host_memory.py"


def file_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


@pytest.fixture
def flux(memory_config, tiny):
    """``flux(**flags)``: (config, inventory, settings) of the tiny Flux model with ``flags``."""

    def build(**flags):
        config = memory_config("flux", **flags)
        return config, planner.read_inventory(config), planner.PlanSettings.from_config(config)

    return build


def by_label(plan_terms, prefix: str) -> host.HostTerm:
    return next(term for term in plan_terms if term.label.startswith(prefix))


# --- the host terms --------------------------------------------------------------------------------


def test_weights_read_at_load_are_every_component_as_stored(flux, tiny):
    config, inventory, settings = flux()
    stored = sum(t.numel() * t.element_size() for name in inventory.components
                 for t in file_tensors(tiny.path("flux") / name).values())
    [term] = host.loaded_weights(inventory, config)
    assert term.nbytes == stored and term.phases == ("load",) and not term.main_only


def test_ram_efficient_loading_reads_the_denoiser_on_the_main_process_only(flux):
    """--fsdp_cpu_ram_efficient_loading: the machine holds one copy of the denoiser while loading, not one
    per process; the other processes still read the text encoders and the VAE."""
    config, inventory, settings = flux()
    everywhere = config.replace(fsdp_enable=True, num_processes=4)
    efficient = everywhere.replace(fsdp_cpu_ram_efficient_loading=True)
    others, denoiser = host.loaded_weights(inventory, efficient)
    assert denoiser.main_only and denoiser.nbytes == inventory.denoiser.stored_bytes()
    assert others.nbytes + denoiser.nbytes == host.loaded_weights(inventory, everywhere)[0].nbytes
    before = host.plan_host(inventory, settings, everywhere, ram=2**40)
    after = host.plan_host(inventory, settings, efficient, ram=2**40)
    assert after.phase_total("load") == before.phase_total("load")  # the main process reads everything
    assert after.phase_total("load", main=False) == before.phase_total("load") - denoiser.nbytes
    # the load phase of the whole machine: four readers of everything before, one after
    assert (after.phase_total("load") + 3 * after.phase_total("load", main=False)
            == 4 * before.phase_total("load") - 3 * denoiser.nbytes)
    assert after.machine_total <= before.machine_total


def test_swapped_blocks_are_the_last_blocks_in_the_weight_dtype(flux, tiny):
    tensors = file_tensors(tiny.path("flux") / "transformer")
    last_two = sum(t.numel() for name, t in tensors.items() if name.startswith("single_transformer_blocks."))
    config, inventory, settings = flux(musubi_blocks_to_swap=2)
    assert host.swapped_blocks(inventory, settings, config).nbytes == last_two * 4
    bf16 = planner.replace(settings, mixed_precision="bf16")
    assert host.swapped_blocks(inventory, bf16, config).nbytes == last_two * 2
    elsewhere = config.replace(musubi_block_swap_device="cuda:1")
    assert host.swapped_blocks(inventory, settings, elsewhere) is None


def encoder_and_vae_parameters(tiny) -> tuple[int, int]:
    folder = tiny.path("flux")
    encoders = sum(t.numel() for name in ("text_encoder", "text_encoder_2")
                   for t in file_tensors(folder / name).values())
    return encoders, sum(t.numel() for t in file_tensors(folder / "vae").values())


def test_offloaded_components_group_offload_model_offload_and_disk(flux, tiny):
    encoders, vae = encoder_and_vae_parameters(tiny)
    config, inventory, settings = flux(enable_group_offload="true")
    term = host.offloaded_components(inventory, settings, config)
    assert term.nbytes == (encoders + vae) * 4 and term.option == "--enable_group_offload"
    assert "training" in term.phases and "load" not in term.phases
    disk = host.offloaded_components(inventory, settings, config.replace(group_offload_to_disk_path="/tmp/x"))
    assert disk.nbytes == 0
    config, inventory, settings = flux(enable_model_cpu_offload="true")
    assert host.offloaded_components(inventory, settings, config).option == "--enable_model_cpu_offload"
    config, inventory, settings = flux()
    assert host.offloaded_components(inventory, settings, config) is None


def test_startup_parking_is_the_larger_of_encoders_and_vae(flux, tiny):
    encoders, vae = encoder_and_vae_parameters(tiny)
    config, inventory, settings = flux(offload_during_startup="true")
    term = host.startup_parking(inventory, settings)
    assert term.nbytes == max(encoders, vae) * 4 and term.phases == ("caching",)


def test_ramtorch_counts_the_chosen_linear_weights(flux, tiny):
    tensors = file_tensors(tiny.path("flux") / "transformer")
    linears = [(name, t.numel()) for name, t in tensors.items() if name.endswith(".weight") and t.dim() == 2]
    config, inventory, settings = flux()
    config = config.replace(ramtorch=True)  # validation asks for CUDA; the plan does not
    assert host.ramtorch_layers(inventory, settings, config).nbytes == sum(n for _, n in linears) * 4
    half = config.replace(ramtorch_transformer_percent=50)
    first_half = linears[: len(linears) // 2]
    assert host.ramtorch_layers(inventory, settings, half).nbytes == sum(n for _, n in first_half) * 4
    blocks = config.replace(ramtorch_target_modules=["single_transformer_blocks.*"])
    in_blocks = sum(n for name, n in linears if name.startswith("single_transformer_blocks."))
    assert host.ramtorch_layers(inventory, settings, blocks).nbytes == in_blocks * 4


def test_ema_on_the_cpu_holds_the_trainable_weights(flux):
    config, inventory, settings = flux(use_ema="true", ema_device="cpu")
    adapter = planner.lora_parameters(inventory.denoiser, settings.lora_targets, settings.lora_rank)
    terms = host.ema_on_cpu(inventory, settings, config)
    assert [t.nbytes for t in terms] == [adapter * 4]
    terms = host.ema_on_cpu(inventory, settings, config.replace(ema_cpu_only=True))
    assert [t.nbytes for t in terms] == [adapter * 4, adapter * 4]
    assert host.ema_on_cpu(inventory, settings, config.replace(ema_device="accelerator")) == []


def test_zero_offload_puts_this_ranks_slice_on_the_host(flux):
    config, inventory, settings = flux()
    adapter = planner.lora_parameters(inventory.denoiser, settings.lora_targets, settings.lora_rank)
    deepspeed = config.replace(zero_stage=3, num_processes=4, deepspeed_config=  # parsed, as validation leaves it
                               {"zero_optimization": {"offload_optimizer": {"device": "cpu"},
                                                      "offload_param": {"device": "cpu"}}})
    terms = host.deepspeed_offload(inventory, settings, deepspeed, shards=4)
    # fp32 master + fp32 gradient + Adam's two fp32 moments, a quarter each
    assert terms[0].nbytes == adapter * (4 + 4 + 8) / 4
    assert terms[1].nbytes == inventory.denoiser.parameters * 4 / 4
    assert host.deepspeed_offload(inventory, settings, config, shards=1) == []


def test_cache_prefetch_and_decode_terms(flux, tiny):
    config, inventory, settings = flux(dataloader_prefetch="true", dataloader_prefetch_qlen=5)
    vae = json.loads((tiny.path("flux") / "vae" / "config.json").read_text())
    edge = 64 // 2 ** (len(vae["block_out_channels"]) - 1)
    latent = 2 * vae["latent_channels"] * edge * edge * 4  # mean and spread, fp32
    width = json.loads((tiny.path("flux") / "transformer" / "config.json").read_text())["joint_attention_dim"]
    text = planner.text_tokens(config) * width * 4
    assert host.entry_bytes(inventory, settings) == (latent, text)
    from simpletuner.data.config import load_dataset_plan

    cached = host.cache_in_ram(inventory, settings, load_dataset_plan(config.data_backend_config))
    assert cached.nbytes == 8 * (latent + text) and "8 images" in cached.label
    assert host.cache_in_ram(inventory, settings, None).nbytes == host.TENSOR_MEMORY_BUDGET_BYTES
    assert host.prefetch_queue(inventory, settings, config).nbytes == 5 * settings.batch_size * (latent + text)
    assert host.decode_ahead(settings, config).nbytes == 2 * settings.vae_batch_size * 3 * 64 * 64 * 4


def test_quantization_copy_quanto_holds_a_full_precision_copy(flux):
    config, inventory, settings = flux(base_model_precision="int8-quanto")
    denoiser = inventory.denoiser
    quantizable = sum(t.numel for t in (*denoiser.linear_weights(), *denoiser.conv_weights()))
    term = host.quantization_copy(inventory, settings, config)
    assert term.nbytes == (denoiser.parameters + quantizable) * 4 and term.phases == ("quantize",)
    assert host.quantization_copy(inventory, settings, config.replace(quantize_via="pipeline")) is None


def test_phases_peak_machine_total_and_warning(flux):
    config, inventory, settings = flux(musubi_blocks_to_swap=2)
    plan = host.plan_host(inventory, settings, config, ram=10 * 2**30)
    load = host.PROCESS_BASELINE_BYTES + host.loaded_weights(inventory, config)[0].nbytes
    assert plan.phase_total("load") == load
    training = sum(t.nbytes for t in plan.terms if "training" in t.phases)
    assert plan.phase_total("training") == training
    assert plan.per_process_peak == max(plan.phase_total(p) for p in host.PHASES)
    assert plan.machine_total == plan.per_process_peak and "fits in --host_ram (10.00 GiB)" in plan.lines()[-1]
    tight = host.plan_host(inventory, settings, config, ram=2**20)
    assert tight.lines()[-1] == "  WARNING: more than --host_ram (1.00 MiB)"
    assert any("fewer processes per machine" in note for note in tight.notes)
    four = host.HostPlan(plan.terms, processes=4, machine_ram=None)
    assert four.machine_total == 4 * plan.per_process_peak


def test_machine_ram_reads_the_machine(flux):
    total = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0]) * 1024
    assert host.machine_ram() == pytest.approx(total, rel=0.01)
    config, inventory, settings = flux()
    assert host.plan_host(inventory, settings, config).lines()[-1] == \
        f"  fits in this machine's RAM ({format_size(host.machine_ram())})"


# --- per rank --------------------------------------------------------------------------------------


def test_fsdp_divides_the_denoisers_state_not_activations(flux):
    config, inventory, settings = flux()
    result = planner.estimate(inventory, settings)
    assert sharding.peaks(result.parts, settings.set_grads_to_none) == pytest.approx(result.training_peak)
    sharded = config.replace(fsdp_enable=True, num_processes=4)
    plan = sharding.plan_sharding(result, inventory, sharded)
    assert plan.engine == "FSDP2" and plan.degree == 4
    for part in ("denoiser weights", "adapter weights", "gradients", "optimizer state"):
        assert plan.per_rank[part] == pytest.approx(result.parts[part] / 4), part
    for part in ("activations", "text encoders", "vae"):
        assert plan.per_rank[part] == result.parts[part], part
    largest = max(p for _, p, _ in inventory.blocks()) * 4
    assert plan.per_rank["gathered blocks"] == 2 * largest
    assert plan.training_peak == pytest.approx(sharding.peaks(plan.per_rank, False))
    assert plan.training_peak < result.training_peak
    hsdp = sharding.plan_sharding(result, inventory, sharded.replace(hsdp_replicate_dim=2, hsdp_shard_dim=2))
    assert hsdp.engine == "HSDP"
    assert hsdp.per_rank["optimizer state"] == pytest.approx(result.parts["optimizer state"] / 2)
    kept = sharding.plan_sharding(result, inventory, sharded.replace(fsdp_reshard_after_forward=False))
    assert kept.per_rank["gathered blocks"] == pytest.approx(result.parts["denoiser weights"] * 3 / 4)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stages_divide_optimizer_then_gradients_then_weights(flux, stage):
    config, inventory, settings = flux()
    result = planner.estimate(inventory, settings)
    plan = sharding.plan_sharding(result, inventory, config.replace(zero_stage=stage, num_processes=2))
    assert plan.engine == f"ZeRO-{stage}"
    assert plan.per_rank["optimizer state"] == pytest.approx(result.parts["optimizer state"] / 2)
    # stage 3: its fp32 partition of the gradients and the master's fp32 gradient (tests/memory/test_sharding.py)
    gradients = {1: result.parts["gradients"], 2: result.parts["gradients"] / 2, 3: result.parts["gradients"]}
    assert plan.per_rank["gradients"] == pytest.approx(gradients[stage])
    weights = result.parts["denoiser weights"] / (2 if stage == 3 else 1)
    assert plan.per_rank["denoiser weights"] == pytest.approx(weights)
    assert plan.per_rank["activations"] == result.parts["activations"]
    # DeepSpeed clones fp32 masters of the adapters' partitions although they train in fp32 already
    assert plan.per_rank["fp32 master weights"] == pytest.approx(result.parts["adapter weights"] / 2)


def test_zero_full_training_below_fp32_adds_sharded_master_weights(flux):
    config, inventory, settings = flux()
    full = planner.replace(settings, model_type="full", mixed_precision="bf16")
    result = planner.estimate(inventory, full)
    plan = sharding.plan_sharding(result, inventory, config.replace(zero_stage=1, num_processes=4))
    assert plan.per_rank["fp32 master weights"] == inventory.denoiser.parameters * 4 / 4


def test_no_sharding_no_per_rank_section(flux):
    config, inventory, settings = flux()
    assert sharding.plan_sharding(planner.estimate(inventory, settings), inventory, config) is None


# --- the command -----------------------------------------------------------------------------------


def test_plan_memory_prints_the_host_and_per_rank_sections(memory_config, capsys):
    from simpletuner.cli import main

    from tests.memory.test_planner import plan_argv

    config = memory_config("flux")
    argv = ["plan-memory", *plan_argv(config), "--num_processes", "2", "--fsdp_enable", "true",
            "--dataloader_prefetch", "true", "--host_ram", "1MiB"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "per-rank accelerator memory (FSDP2, sharded over 2 processes):" in out
    assert "training peak per rank" in out
    assert "host RAM plan (per process; phases in brackets):" in out
    inventory = planner.read_inventory(config)
    assert "weights read at load" in out and format_size(host.loaded_weights(inventory, config)[0].nbytes) in out
    assert "prefetched batches (10 x batch 2)" in out and "--dataloader_prefetch_qlen" in out
    assert "2 processes on this machine" in out
    assert "WARNING: more than --host_ram (1.00 MiB)" in out
    with pytest.raises(SystemExit, match="--host_ram 'lots' is not a size"):
        main(["plan-memory", *plan_argv(config), "--host_ram", "lots"])


# --- measured ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_load_phase_within_10_percent_of_the_measured_peak(tmp_path):
    """benchmarks/host_memory.py's ``load`` case in a fresh process: a 272 MiB model read through the
    trainer's loader; the plan's load phase against the process's peak RSS."""
    output = subprocess.run([sys.executable, str(BENCHMARK), "--cases", "load", "--json", str(tmp_path / "r.json")],
                            capture_output=True, text=True, timeout=900,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert output.returncode == 0, output.stderr[-2000:]
    (result,) = json.loads((tmp_path / "r.json").read_text())
    assert result["measured_peak"] > 700 * 2**20  # the weights were really read
    assert abs(result["error"]) <= 0.10, result


def test_zero_offload_takes_optimizer_state_and_weights_off_the_rank(flux):
    config, inventory, settings = flux()
    result = planner.estimate(inventory, settings)
    offloaded = config.replace(zero_stage=3, num_processes=2, deepspeed_config={"zero_optimization": {
        "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}}})
    plan = sharding.plan_sharding(result, inventory, offloaded)
    assert plan.per_rank["optimizer state"] == 0 and plan.per_rank["denoiser weights"] == 0
    assert any("host plan" in note for note in plan.notes)


def test_memory_budget_is_checked_per_rank_when_sharded(memory_config):
    config = memory_config("flux", model_type="full", lora_rank=None, resolution=128, image_size=128)
    inventory = planner.read_inventory(config)
    result = planner.estimate(inventory, planner.PlanSettings.from_config(config))
    sharded = config.replace(fsdp_enable=True, num_processes=4)
    per_rank = sharding.plan_sharding(result, inventory, sharded)
    between = (max(per_rank.training_peak, result.startup_peak) + result.peak) / 2
    assert per_rank.training_peak < between < result.peak
    text = planner.describe(sharded, budget=str(int(between)), host_ram=2**40)
    assert f"fits in {format_size(int(between))} per rank as configured (FSDP2, see below)" in text
    assert "as configured" not in planner.describe(config, budget=str(int(between)), host_ram=2**40)


def test_ramtorch_weights_leave_the_accelerator_estimate_for_the_host_plan(flux):
    config, inventory, settings = flux()
    streaming = config.replace(ramtorch=True)
    plain = planner.estimate(inventory, settings)
    streamed = planner.estimate(inventory, planner.PlanSettings.from_config(streaming))
    on_host = host.ramtorch_layers(inventory, settings, streaming).nbytes
    largest = max(t.numel for t in inventory.denoiser.linear_weights()) * 4
    assert plain.parts["denoiser weights"] - streamed.parts["denoiser weights"] == on_host - largest
    assert any(note.startswith("RamTorch: ") for note in streamed.notes)


def test_processes_per_machine_spread_over_the_machines(flux):
    config, inventory, settings = flux()
    eight = config.replace(num_processes=8)
    assert host.processes_on_this_machine(eight) == 8
    assert host.processes_on_this_machine(eight, machines=2) == 4
    plan = host.plan_host(inventory, settings, eight, ram=2**40, machines=2)
    assert plan.machine_total == 4 * plan.per_process_peak
    assert any(line.startswith("  4 processes on this machine") for line in plan.lines())
