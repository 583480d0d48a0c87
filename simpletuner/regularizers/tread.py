"""TREAD: during the training forward, a random share of the image tokens skips a range of blocks.

``--tread_config`` lists routes, ``{"routes": [{"selection_ratio": 0.5, "start_layer_idx": 2,
"end_layer_idx": -2}]}``: at the route's start block a ``selection_ratio`` share of the image tokens is
taken out of the sequence and set aside, the blocks from start to end (both included) run on the
tokens that remain, and after the end block the set-aside tokens go back to their own positions with
the values they had before the start block. Fewer tokens through those blocks make the step cheaper;
every token still reaches the loss. Block indices count the family's transformer blocks
(``ModelFamily.transformer_blocks``, execution order) from 0; negative ones count from the end (-1 is
the last block).

It adds no loss term (:meth:`Tread.term` is None); it exists as a regularizer because it fits the same
seam: hooks on the family's blocks that act only while the trainer's capture switch is on, i.e. only
in the training forward, so validation, evaluation and EMA sampling run the untouched model.

One selection is drawn per forward and shared by the batch, from torch's global RNG (so a resumed run
draws the same tokens). Sharing is deliberate: diffusers' Flux hands every block one rotary table
``(cos, sin)`` of shape ``[text + image tokens, dim]`` for the whole batch, so every sample must keep
the same token positions for each kept token to keep its own rotary embedding.

Gradient checkpointing: diffusers runs each checkpointed block through ``torch.utils.checkpoint``,
which calls the block (and so these hooks) again during the backward pass to recompute what it did
not keep, after the trainer has switched capturing off. TREAD keeps the routing of each route in the
last training forward that ran with gradients (the kept positions and the tokens that entered the
range) until the next one, and a routed block called while autograd runs a backward replays it: same
kept tokens, same rotary and mask rows, same put-back. A replay draws nothing: checkpoint restores the
RNG state of the block's start before recomputing it, and the replay moves it on to where the original
draw left it, so what the block draws itself (LoRA dropout) is drawn again identically; checkpoint puts
the RNG back afterwards, so the run's random stream is that of the run without checkpointing, and so
are the loss and every gradient; this holds for any subset
of checkpointed blocks (``--gradient_checkpointing_interval``). One routed forward with gradients per
backward is assumed, which is what every training method here does (no-gradient forwards, such as a
scheduled-sampling rollout, do not replace the record).

Regularizers that compare block tokens (LayerSync, CREPA) learn from ``CaptureSwitch.kept_tokens``
which blocks ran on the kept tokens only (simpletuner/regularizers/routing.py).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch

from simpletuner.methods.base import Stateless
from simpletuner.regularizers.base import CaptureSwitch, image_tokens
from simpletuner.regularizers.routing import KeptTokens


@dataclass(frozen=True)
class Route:
    """One routed block range, 0-based and inclusive (negative indices already resolved)."""

    selection_ratio: float
    start: int
    end: int


@dataclass
class Routed:
    """One route's routing in a training forward: what the start block set aside until the end block
    restores it."""

    full: torch.Tensor          # the image tokens as they entered the start block [B, N, D]
    kept: torch.Tensor          # sorted positions (in 0..N-1) of the tokens that run the range
    rng_before: torch.Tensor    # torch's CPU RNG state just before the draw, and just after it
    rng_after: torch.Tensor


def build(model, config) -> Tread:
    """``--tread_config`` (the registry's builder)."""
    return Tread(config.tread_config)


def route_settings(tread_config: Any) -> list[dict]:
    """The ``routes`` list of a parsed ``--tread_config``."""
    if not isinstance(tread_config, dict) or not isinstance(tread_config.get("routes"), list):
        raise ValueError('`--tread_config` must be a JSON object with a "routes" list, e.g. {"routes": '
                         '[{"selection_ratio": 0.5, "start_layer_idx": 2, "end_layer_idx": -2}]}')
    return tread_config["routes"]


def resolve_block(index: int, count: int) -> int | None:
    """A 0-based block index from a possibly negative one; None when outside ``count`` blocks."""
    resolved = index + count if index < 0 else index
    return resolved if 0 <= resolved < count else None


def resolve_routes(tread_config: Any, count: int) -> list[Route]:
    routes = []
    for number, settings in enumerate(route_settings(tread_config)):
        start = resolve_block(settings["start_layer_idx"], count)
        end = resolve_block(settings["end_layer_idx"], count)
        if start is None or end is None or start > end:
            raise ValueError(f"`--tread_config` route {number}: blocks {settings['start_layer_idx']}.."
                             f"{settings['end_layer_idx']} do not name a range of the denoiser's {count} "
                             f"transformer blocks (0..{count - 1}, or -{count}..-1 from the end; start <= end)")
        routes.append(Route(float(settings["selection_ratio"]), start, end))
    ordered = sorted(routes, key=lambda route: route.start)
    if any(later.start <= earlier.end for earlier, later in zip(ordered, ordered[1:])):
        raise ValueError("`--tread_config` routes overlap; give each route its own block range")
    return routes


def bound_arguments(module: torch.nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """A block call's arguments by name, whether passed by keyword (the plain forward) or by position
    (diffusers' gradient-checkpointing path)."""
    return dict(inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments)


def draw_kept_positions(tokens: int, ratio: float, device: torch.device) -> torch.Tensor | None:
    """Sorted positions of the tokens that stay, or None when no token is routed (ratio 0, tiny N)."""
    routed = int(tokens * ratio)
    if routed == 0:
        return None
    order = torch.randperm(tokens)  # global CPU RNG: same draw on every device, restored on resume
    return order[routed:].sort().values.to(device)


def slice_joint_kwargs(arguments: dict[str, Any], kept: torch.Tensor, tokens: int) -> None:
    """Keep the per-token entries of the kept image tokens: Flux's rotary table and key mask cover the
    text tokens first, then the image tokens."""
    rotary = arguments.get("image_rotary_emb")
    joint = arguments.get("joint_attention_kwargs") or {}
    mask = joint.get("attention_mask")
    if rotary is None and mask is None:
        return
    text = arguments["encoder_hidden_states"].shape[1]
    positions = torch.cat([torch.arange(text, device=kept.device), text + kept])
    if rotary is not None:
        if isinstance(rotary, torch.Tensor) or rotary[0].shape[0] != text + tokens:
            raise RuntimeError("TREAD expected the rotary table as (cos, sin) over text then image tokens")
        arguments["image_rotary_emb"] = tuple(table[positions.to(table.device)] for table in rotary)
    if mask is not None:
        if mask.ndim != 2:
            raise RuntimeError(f"TREAD can route a [batch, tokens] key mask only, not shape {tuple(mask.shape)}")
        arguments["joint_attention_kwargs"] = {**joint, "attention_mask": mask[:, positions.to(mask.device)]}


def with_image_tokens(output: Any, tokens: torch.Tensor) -> Any:
    """A block's output with its image tokens replaced (joint blocks return ``(text, image)``)."""
    if isinstance(output, tuple):
        return (*output[:-1], tokens)
    return tokens


def autograd_is_recomputing() -> bool:
    """Whether this call happens while autograd runs a backward pass: the only block calls made then
    are ``torch.utils.checkpoint`` recomputing a block of the training forward (torch's own checkpoint
    and module tracker ask the engine the same way)."""
    return torch._C._current_graph_task_id() != -1


class Tread(Stateless):
    name = "tread"

    def __init__(self, tread_config: Any):
        self.tread_config = tread_config
        self.routes: list[Route] = []
        #: Each route's routing in the training forward under way, from its start block to its end block.
        self.routed: dict[int, Routed] = {}
        #: Each route's routing in the last training forward that ran with gradients: what a checkpoint
        #: recomputation in its backward pass replays (kept until the next such forward).
        self.recorded: dict[int, Routed] = {}
        #: What the end block's call in progress puts back (set by its pre-hook on every call).
        self.restoring: dict[int, Routed | None] = {}
        self.handles: list = []
        self.capture: CaptureSwitch | None = None

    def attach(self, model, capture: CaptureSwitch) -> None:
        blocks = [block for _, block in model.transformer_blocks()]
        if not blocks:
            raise ValueError(f"TREAD needs a transformer denoiser; {model.config.model_family}'s has no transformer "
                             "blocks")
        self.capture = capture
        self.routes = resolve_routes(self.tread_config, len(blocks))
        for number, route in enumerate(self.routes):
            inside = blocks[route.start:route.end + 1]
            for index, block in enumerate(inside, start=route.start):
                self.handles.append(block.register_forward_pre_hook(self._enter(number, route, index, inside),
                                                                    with_kwargs=True))
            self.handles.append(blocks[route.end].register_forward_hook(self._put_back(number)))

    def _enter(self, number: int, route: Route, index: int, inside: list[torch.nn.Module]):
        """The pre-hook of block ``index`` of a route: the call runs on the kept tokens when the route
        is routed in this training forward, or replays the recorded routing in a recomputation."""
        def hook(module, args, kwargs):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            routed = self._routing_for_call(number, route, index, hidden, inside)
            if index == route.end:
                self.restoring[number] = routed
            if routed is None:
                return None
            arguments = bound_arguments(module, args, kwargs)
            if arguments.get("attention_mask") is not None:
                raise RuntimeError("TREAD cannot route tokens of a block given a self-attention mask")
            if index == route.start:
                arguments["hidden_states"] = hidden[:, routed.kept]
            slice_joint_kwargs(arguments, routed.kept, routed.full.shape[1])
            return (), arguments
        return hook

    def _routing_for_call(self, number: int, route: Route, index: int, hidden: torch.Tensor,
                          inside: list[torch.nn.Module]) -> Routed | None:
        if autograd_is_recomputing():
            return self._replayed(number, route, index, hidden)
        if self.capture is None or not self.capture.on:
            return None  # validation, evaluation, EMA sampling: the untouched model
        if index == route.start:
            return self._draw(number, route, hidden, inside)
        return self.routed.get(number)

    def _replayed(self, number: int, route: Route, index: int, hidden: torch.Tensor) -> Routed | None:
        """The recorded routing of the forward a checkpoint recomputes, after checking that the call
        receives as many tokens as that forward gave this block."""
        routed = self.recorded.get(number)
        if routed is None:
            return None
        expected = routed.full.shape[1] if index == route.start else routed.kept.numel()
        if hidden.shape[1] != expected:
            raise RuntimeError(f"TREAD: gradient checkpointing recomputes block {index} with {hidden.shape[1]} image "
                               f"tokens, but the training forward gave it {expected}; only the last routed forward "
                               "with gradients before a backward pass can be recomputed")
        if index == route.start and torch.equal(torch.get_rng_state(), routed.rng_before):
            # checkpoint restored the RNG to before the draw: move it on as the draw did, so the rest
            # of the block (LoRA dropout) draws what it drew in the forward
            torch.set_rng_state(routed.rng_after)
        return routed

    def _draw(self, number: int, route: Route, hidden: torch.Tensor, inside: list[torch.nn.Module]) -> Routed | None:
        """A new selection at the route's start block in a training forward (none at ratio 0)."""
        self.routed.pop(number, None)
        for block in inside:
            self.capture.kept_tokens.pop(block, None)
        if torch.is_grad_enabled():
            self.recorded.pop(number, None)
        rng_before = torch.get_rng_state()
        kept = draw_kept_positions(hidden.shape[1], route.selection_ratio, hidden.device)
        if kept is None:
            return None
        routed = self.routed[number] = Routed(full=hidden, kept=kept, rng_before=rng_before,
                                              rng_after=torch.get_rng_state())
        if torch.is_grad_enabled():
            self.recorded[number] = routed
        record = KeptTokens(route=number, start=route.start, end=route.end, positions=kept, total=hidden.shape[1])
        for block in inside:
            self.capture.kept_tokens[block] = record
        return routed

    def _put_back(self, number: int):
        def hook(module, inputs, output):
            routed = self.restoring.pop(number, None)
            if routed is None:
                return None
            if self.routed.get(number) is routed:
                del self.routed[number]  # the forward is past the route (a recomputation uses ``recorded``)
            ran = image_tokens(output)
            restored = routed.full.to(ran.dtype).index_copy(1, routed.kept, ran)
            return with_image_tokens(output, restored)
        return hook

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.routed.clear()
        self.recorded.clear()
        self.restoring.clear()
        if self.capture is not None:
            self.capture.kept_tokens.clear()

    def term(self, batch: dict, step: int) -> None:
        return None  # routing saves compute; it adds nothing to the loss
