"""TREAD under gradient checkpointing, on the real tiny Flux and SD3 transformers checkpointed the way
their families do it (simpletuner.models.base.checkpoint_every_nth_block): the recomputation replays
the forward's routing, so the loss, every parameter gradient and torch's RNG state equal those of the
same step without checkpointing, for every block or every other one, with LayerSync on top, and when a
no-gradient forward runs between the forward and its backward; forwards after the step are untouched."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from simpletuner.methods.base import LossOutput  # noqa: E402
from simpletuner.models.base import checkpoint_every_nth_block  # noqa: E402
from simpletuner.regularizers import tread as tread_module  # noqa: E402
from simpletuner.regularizers.base import Regularizers  # noqa: E402
from simpletuner.regularizers.layersync import LayerSync  # noqa: E402
from simpletuner.regularizers.tread import Tread  # noqa: E402
from tests.regularizers.test_tread import inputs, tiny_family  # noqa: E402


def route(ratio: float, start: int, end: int) -> dict:
    return {"selection_ratio": ratio, "start_layer_idx": start, "end_layer_idx": end}


#: flux: two routes, one across the double/single-stream boundary; sd3: its two blocks in one route
ROUTES = {"flux": {"routes": [route(0.5, 1, 2), route(0.25, 3, 3)]}, "sd3": {"routes": [route(0.5, 0, 1)]}}


class Step:
    """One training step of a tiny denoiser with TREAD (and ``extra`` regularizers), checkpointed or not."""

    def __init__(self, family: str, checkpointing: bool, interval: int | None = None, extra=(), routes=None,
                 lora_dropout: float | None = None):
        self.family = family
        self.model = tiny_family(family)
        if lora_dropout is not None:
            add_lora(self.model.denoiser, lora_dropout)
        blocks = [block for _, block in self.model.transformer_blocks()]
        if checkpointing:
            checkpoint_every_nth_block(self.model.denoiser, blocks, interval)
        self.model.denoiser.train()
        self.block_calls = [0] * len(blocks)  # forward + recomputation calls per block
        for index, block in enumerate(blocks):
            block.register_forward_pre_hook(lambda *_, index=index: self.count(index))
        self.tread = Tread(routes or ROUTES[family])
        self.regularizers = Regularizers([*extra, self.tread], self.model)

    def count(self, index: int) -> None:
        self.block_calls[index] += 1

    def train_step(self, seed: int = 7, between=None) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """Loss, parameter gradients and torch's RNG state after forward and backward; ``between`` runs
        after the forward, before the backward."""
        torch.manual_seed(seed)
        with self.regularizers.capturing():
            output = self.model.denoiser(**inputs(self.family))[0]
            if between is not None:
                between()
        loss = self.regularizers.add_terms(LossOutput(output.pow(2).mean()), {}, step=0).loss
        loss.backward()
        grads = {name: p.grad.clone() for name, p in self.model.denoiser.named_parameters() if p.grad is not None}
        return loss.detach(), grads, torch.get_rng_state()


def add_lora(denoiser: torch.nn.Module, dropout: float) -> None:
    """A PEFT LoRA on the attention projections, both factors random so every one gets a gradient."""
    from peft import LoraConfig

    denoiser.add_adapter(LoraConfig(r=4, lora_alpha=4, lora_dropout=dropout,
                                    target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    torch.manual_seed(3)
    for name, parameter in denoiser.named_parameters():
        parameter.requires_grad_("lora_" in name)
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.1)


def assert_same_step(plain, checkpointed) -> None:
    (plain_loss, plain_grads, plain_rng), (loss, grads, rng) = plain, checkpointed
    assert torch.equal(loss, plain_loss)
    assert sorted(grads) == sorted(plain_grads) and len(grads) >= 8
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-6, atol=1e-7, msg=name)
    assert torch.equal(rng, plain_rng)  # a replay draws nothing


@pytest.mark.parametrize("interval", [None, 2])
@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_a_checkpointed_step_equals_the_plain_one(family: str, interval: int | None, monkeypatch):
    draws = []
    original = tread_module.draw_kept_positions
    monkeypatch.setattr(tread_module, "draw_kept_positions",
                        lambda tokens, ratio, device: draws.append(ratio) or original(tokens, ratio, device))
    plain = Step(family, checkpointing=False)
    plain_step = plain.train_step()
    plain_draws = list(draws)
    checkpointed = Step(family, checkpointing=True, interval=interval)
    checkpointed_step = checkpointed.train_step()
    assert plain_draws == [r["selection_ratio"] for r in ROUTES[family]["routes"]]
    assert draws[len(plain_draws):] == plain_draws  # one draw per route, none during the recomputation
    assert plain.block_calls == [1] * len(plain.block_calls)
    recomputed = [calls == 2 for calls in checkpointed.block_calls]
    assert recomputed == [index % (interval or 1) == 0 for index in range(len(recomputed))]
    assert_same_step(plain_step, checkpointed_step)


def test_lora_dropout_in_a_recomputed_start_block_draws_what_the_forward_drew():
    """The start block draws the tokens, then its LoRA dropout draws its masks from the same RNG: the
    recomputation must see the RNG where the draw left it."""
    plain = Step("flux", checkpointing=False, lora_dropout=0.5).train_step()
    checkpointed = Step("flux", checkpointing=True, lora_dropout=0.5).train_step()
    assert all("lora_" in name for name in plain[1])
    assert_same_step(plain, checkpointed)


def test_layersync_across_a_route_trains_the_same_with_checkpointing():
    def step(checkpointing: bool) -> Step:  # student inside the route (block 1), teacher after it (block 3)
        return Step("flux", checkpointing, extra=[LayerSync(student_block=2, teacher_block=4, weight=0.5)],
                    routes={"routes": [route(0.5, 1, 2)]})

    plain, checkpointed = step(False).train_step(), step(True).train_step()
    assert_same_step(plain, checkpointed)


def test_a_no_gradient_forward_before_the_backward_does_not_change_what_is_replayed():
    def no_gradient_forward(step: Step):  # e.g. a rollout in the same training forward, drawing its own tokens
        def run():
            with torch.no_grad():
                step.model.denoiser(**inputs("sd3"))
        return run

    plain = Step("sd3", checkpointing=False)
    checkpointed = Step("sd3", checkpointing=True)
    plain_step = plain.train_step(between=no_gradient_forward(plain))
    checkpointed_step = checkpointed.train_step(between=no_gradient_forward(checkpointed))
    no_gradient_draw = next(iter(checkpointed.regularizers.switch.kept_tokens.values())).positions
    assert not torch.equal(no_gradient_draw, checkpointed.tread.recorded[0].kept)  # the forward's own draw replayed
    assert_same_step(plain_step, checkpointed_step)


def test_forwards_after_a_checkpointed_step_run_the_untouched_model():
    step = Step("flux", checkpointing=True)
    with torch.no_grad():
        untouched = step.model.denoiser(**inputs("flux"))[0]
    step.train_step()
    assert step.tread.recorded  # kept for a recomputation until the next training forward
    state = torch.get_rng_state()
    with torch.no_grad():  # validation, EMA sampling
        validation = step.model.denoiser(**inputs("flux"))[0]
    evaluation = step.model.denoiser(**inputs("flux"))[0]  # with gradients, outside any backward
    assert torch.equal(validation, untouched) and torch.equal(evaluation.detach(), untouched)
    assert torch.equal(torch.get_rng_state(), state)
