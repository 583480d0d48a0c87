"""Block swap and RamTorch on the tiny FLUX transformer with a PEFT LoRA.

On this CPU-only machine the compute and swap devices are both the CPU, so the swapper runs with
``copy_on_same_device``: each visit makes a distinct copy. Storage identity then shows where a
weight is (the swap master's storage between uses, a fresh copy while its block runs), and the
measured live bytes show that autograd does not keep the copies alive. What this cannot show is a
real host-to-device transfer.
"""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")

from simpletuner.memory.measure import measure_peak  # noqa: E402
from simpletuner.models.block_swap import WeightSwapper, last_blocks  # noqa: E402
from simpletuner.models.ramtorch import eligible_layers  # noqa: E402


@pytest.fixture(scope="module")
def lora_flux(tiny):
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig

    model = FluxTransformer2DModel.from_pretrained(tiny.path("flux") / "transformer")
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                 init_lora_weights="gaussian"))
    return model


def flux_inputs(batch: int = 2, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch, 16, 64, generator=generator),
                encoder_hidden_states=torch.randn(batch, 8, 48, generator=generator),
                pooled_projections=torch.randn(batch, 32, generator=generator),
                timestep=torch.full((batch,), 0.5), img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3),
                guidance=torch.full((batch,), 3.5), return_dict=False)


def train_step(model) -> tuple[float, dict[str, torch.Tensor]]:
    loss = model(**flux_inputs())[0].square().mean()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


def blocks_of(model) -> list[tuple[str, torch.nn.Module]]:
    return ([(f"transformer_blocks.{i}", b) for i, b in enumerate(model.transformer_blocks)]
            + [(f"single_transformer_blocks.{i}", b) for i, b in enumerate(model.single_transformer_blocks)])


def master_pointers(swapper: WeightSwapper) -> set[int]:
    return {slot.master.untyped_storage().data_ptr() for unit in swapper.units for slot in unit.slots}


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient-checkpointing"])
def test_swapped_blocks_are_off_the_compute_device_between_uses(lora_flux, checkpointing):
    reference_loss, reference_grads = train_step(lora_flux)
    model = copy.deepcopy(lora_flux)
    if checkpointing:
        model.enable_gradient_checkpointing()
    swapped = last_blocks(blocks_of(model), 3)
    assert [name for name, _ in swapped] == ["transformer_blocks.1", "single_transformer_blocks.0",
                                             "single_transformer_blocks.1"]
    swapper = WeightSwapper(swapped, model, "cpu", "cpu", copy_on_same_device=True)
    masters = master_pointers(swapper)
    block = swapped[1][1]
    seen: list[tuple[int, list[str]]] = []
    block.attn.to_q.register_forward_hook(
        lambda module, args, out: seen.append((module.base_layer.weight.untyped_storage().data_ptr(),
                                               swapper.resident_units())))
    loss, grads = train_step(model)
    assert loss == reference_loss
    assert grads.keys() == reference_grads.keys()
    assert all(torch.equal(grads[name], reference_grads[name]) for name in grads)
    # while the block ran (forward, and the recomputation when checkpointing) it used a copy, and it was
    # the only swapped block on the compute device
    assert seen and all(pointer not in masters and resident == [swapped[1][0]] for pointer, resident in seen)
    # between uses every frozen tensor of every swapped block is its master again
    assert swapper.resident_units() == []
    for _, module in swapped:
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if "lora_" in name:
                assert tensor.requires_grad  # adapters are not swapped
            else:
                assert tensor.untyped_storage().data_ptr() in masters, name
    # forward (3 blocks) and backward (3 more visits: saved-weight references or the recomputation)
    assert swapper.copies_made == 6


def test_autograd_does_not_keep_the_copies_alive(lora_flux):
    """Measured live bytes of a training step: with block swap the compute-device part (everything
    but the masters, which live on the swap device) is the unswapped peak minus the swapped weights,
    plus at most one block's copy."""
    plain = copy.deepcopy(lora_flux)
    train_step(plain)
    without = measure_peak(lambda: train_step(plain), [plain]).total
    model = copy.deepcopy(lora_flux)
    swapper = WeightSwapper(last_blocks(blocks_of(model), 3), model, "cpu", "cpu", copy_on_same_device=True)
    train_step(model)
    with_swap = measure_peak(lambda: train_step(model), [model]).total
    compute_device = with_swap - swapper.swapped_bytes
    largest_block = max(unit.nbytes for unit in swapper.units)
    assert compute_device <= without - swapper.swapped_bytes + largest_block
    assert compute_device < without


def test_module_to_leaves_swapped_weights_to_the_swapper(lora_flux):
    model = copy.deepcopy(lora_flux)
    swapped = last_blocks(blocks_of(model), 1)
    swapper = WeightSwapper(swapped, model, "cpu", "cpu", copy_on_same_device=True)
    masters = master_pointers(swapper)
    model.to(torch.float64)  # what accelerate's prepare does with a device, here visible as a dtype
    block = swapped[0][1]
    assert block.attn.to_q.base_layer.weight.dtype == torch.float32
    assert block.attn.to_q.base_layer.weight.untyped_storage().data_ptr() in masters
    assert block.attn.to_q.lora_A.default.weight.dtype == torch.float64  # trainable: moved as usual
    assert model.transformer_blocks[0].attn.to_q.base_layer.weight.dtype == torch.float64


def test_inference_visits_each_block_once(lora_flux):
    model = copy.deepcopy(lora_flux)
    swapper = WeightSwapper(last_blocks(blocks_of(model), 2), model, "cpu", "cpu", copy_on_same_device=True)
    with torch.no_grad():
        expected = lora_flux(**flux_inputs())[0]
        output = model(**flux_inputs())[0]
    assert torch.equal(output, expected)
    assert swapper.copies_made == 2 and swapper.resident_units() == []


def test_too_many_blocks_is_a_clear_error(lora_flux):
    with pytest.raises(ValueError, match="only 4 transformer blocks"):
        last_blocks(blocks_of(lora_flux), 5)


def test_ramtorch_streams_one_linear_layer_at_a_time(lora_flux):
    reference_loss, reference_grads = train_step(lora_flux)
    model = copy.deepcopy(lora_flux)
    layers = eligible_layers(model, ["transformer_blocks.*"], 100, extensions=False)
    assert layers and all(isinstance(module, torch.nn.Linear) and "lora_" not in name for name, module in layers)
    assert all(name.startswith("transformer_blocks.") for name, _ in layers)
    half = eligible_layers(model, ["transformer_blocks.*"], 50, extensions=False)
    assert [name for name, _ in half] == [name for name, _ in layers][: round(len(layers) / 2)]
    swapper = WeightSwapper(layers, model, "cpu", "cpu", copy_on_same_device=True)
    resident_counts = []
    for _, module in layers:
        module.register_forward_hook(lambda m, a, o: resident_counts.append(len(swapper.resident_units())), prepend=True)
    loss, grads = train_step(model)
    assert loss == reference_loss and all(torch.equal(grads[n], reference_grads[n]) for n in grads)
    assert resident_counts and max(resident_counts) == 1
    assert swapper.resident_units() == []
    # every layer once forward; in backward only those whose weight the gradient needs (not, e.g., the
    # modulation of block 0, whose input carries no gradient)
    assert len(layers) < swapper.copies_made < 2 * len(layers)
