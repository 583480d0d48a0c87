"""A key/value cache of context chunks for diffusers' ``WanTransformer3DModel``: the attention that lets
a bidirectional Wan transformer generate a clip chunk by chunk (CausVid, Self-Forcing;
simpletuner/methods/distillation/causal_distillation.py).

A causal video generator denoises chunk ``k`` of a clip while the chunks before it are finished. It
runs the transformer on chunk ``k`` alone, and every self-attention layer attends to the keys and values
of the earlier chunks next to chunk ``k``'s own. Those keys and values are computed once, by one forward
over each finished chunk (re-noised at the run's ``context_noise``), and kept here:

* **writing** (``with cache.writing(): model(chunk)``): the forward attends to what the cache holds plus
  its own tokens, and then each block's self-attention appends its tokens' keys and values (after the
  query/key norms and the rotary embedding) to the cache. Writes never carry gradients: the cache is
  context, given to the chunks after it, never learnt through;
* **reading** (``with cache.reading(): model(chunk)``): the forward attends to ``[cached ; own]`` keys and
  values and leaves the cache as it is;
* outside both, the transformer is the plain bidirectional model (the teacher, the fake score and
  validation see nothing of the cache).

Rotary positions: the transformer numbers the frames of its input from 0, but a chunk read after ``n``
cached latent frames sits at frames ``n, n + 1, ...`` of the clip. A hook on the model's ``rope`` module
replaces its tables by the ones of frames ``n ..`` (computed by the same module for the longer clip and
cut to the chunk's tokens); cross-attention to the text is untouched. Together that makes chunk ``k``'s
output equal to the full clip's under a block-causal mask (tests/models/test_wan_causal.py).

Gradient checkpointing recomputes a block at backward time, when the cache may already hold later
chunks or have been cleared. So a forward's context travels inside the rotary tables it hands every
block (:class:`ContextRotary`), an argument checkpointing keeps: a recomputed block sees exactly the
context its forward saw. The processors read nothing else from the cache.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch


@dataclass
class ForwardContext:
    """What one cached forward attends to: per block, the keys and values cached before it started
    (``[B, tokens, heads, head_dim]``, or None while empty); ``store`` is the cache to append to (a
    writing forward) or None (a reading one)."""

    keys: list[torch.Tensor | None]
    values: list[torch.Tensor | None]
    store: "ChunkCache | None" = None
    written: set[int] = field(default_factory=set)


class ContextRotary(tuple):
    """The ``(cos, sin)`` rotary tables of one cached forward, with the :class:`ForwardContext` it attends
    to (see the module docstring for why the context rides on this argument)."""

    context: ForwardContext

    @classmethod
    def of(cls, tables: tuple[torch.Tensor, torch.Tensor], context: ForwardContext) -> "ContextRotary":
        rotary = cls(tables)
        rotary.context = context
        return rotary


def rotate(states: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Wan's rotary embedding of ``states`` ``[B, tokens, heads, head_dim]``: each consecutive pair of
    channels ``(a, b)`` turns by the pair's angle (the tables hold every angle's cosine and sine twice)."""
    cos, sin = rotary
    first, second = states[..., 0::2], states[..., 1::2]
    cos, sin = cos[..., 0::2], sin[..., 0::2]
    turned = torch.stack((first * cos - second * sin, first * sin + second * cos), dim=-1)
    return turned.flatten(-2).type_as(states)


def project_self_attention(attn, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries, keys and values of a ``WanAttention`` self-attention, normed and split into heads."""
    if getattr(attn, "fused_projections", False):
        query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
    else:
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    query, key = attn.norm_q(query), attn.norm_k(key)
    return tuple(states.unflatten(2, (attn.heads, -1)) for states in (query, key, value))


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Plain softmax attention on ``[B, tokens, heads, head_dim]`` tensors, heads merged back."""
    output = torch.nn.functional.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2),
                                                              value.transpose(1, 2))
    return output.transpose(1, 2).flatten(2, 3).type_as(query)


class CachedSelfAttention:
    """The self-attention processor of one block while a :class:`ChunkCache` is attached. A forward
    outside ``reading()`` / ``writing()`` goes to the block's original processor unchanged."""

    def __init__(self, index: int, original: Any):
        self.index = index
        self.original = original

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, rotary_emb: Any = None, **kwargs) -> torch.Tensor:
        if not isinstance(rotary_emb, ContextRotary):
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, **kwargs)
        context = rotary_emb.context
        query, key, value = project_self_attention(attn, hidden_states)
        query, key = rotate(query, rotary_emb), rotate(key, rotary_emb)
        if context.store is not None:
            context.store.append(self.index, key.detach(), value.detach())
            context.written.add(self.index)
        past_keys, past_values = context.keys[self.index], context.values[self.index]
        if past_keys is not None:
            if past_keys.shape[0] != key.shape[0]:
                raise ValueError(f"the chunk cache holds context for a batch of {past_keys.shape[0]}, but this forward "
                                 f"has a batch of {key.shape[0]}; clear() the cache before a new batch")
            key = torch.cat([past_keys.to(key.dtype), key], dim=1)
            value = torch.cat([past_values.to(value.dtype), value], dim=1)
        output = attend(query, key, value)
        return attn.to_out[1](attn.to_out[0](output))


class ChunkCache:
    """The keys and values of a clip's finished chunks, per block of ``transformer`` (a diffusers
    ``WanTransformer3DModel``); see the module docstring. Attached on creation, until :meth:`detach`.

    ``frames`` is the number of latent frames cached (the rotary offset of the next chunk).
    """

    def __init__(self, transformer: torch.nn.Module):
        if not hasattr(transformer, "blocks") or not hasattr(transformer, "rope"):
            raise TypeError(f"the chunk cache works on diffusers' WanTransformer3DModel (blocks and rope); got "
                            f"{type(transformer).__name__}")
        self.transformer = transformer
        self.blocks = list(transformer.blocks)
        self.frames = 0
        self.keys: list[torch.Tensor | None] = [None] * len(self.blocks)
        self.values: list[torch.Tensor | None] = [None] * len(self.blocks)
        self._mode: str | None = None
        self._forward: ForwardContext | None = None
        self._incoming_frames = 0
        self._originals = [block.attn1.processor for block in self.blocks]
        for index, block in enumerate(self.blocks):
            block.attn1.set_processor(CachedSelfAttention(index, self._originals[index]))
        self._hooks = [transformer.rope.register_forward_hook(self._rotary_hook),
                       transformer.register_forward_hook(self._finish_forward)]

    # --- use -----------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def reading(self) -> Iterator["ChunkCache"]:
        """Forwards inside attend to the cached chunks; the cache does not change."""
        with self._in_mode("read"):
            yield self

    @contextlib.contextmanager
    def writing(self) -> Iterator["ChunkCache"]:
        """Forwards inside (without gradients) append their chunk to the cache after attending to it."""
        with self._in_mode("write"), torch.no_grad():
            yield self

    def clear(self) -> None:
        """Forget every cached chunk (a new clip starts at frame 0)."""
        self.frames = 0
        self.keys = [None] * len(self.blocks)
        self.values = [None] * len(self.blocks)

    def detach(self) -> None:
        """Give every block its original processor back and remove the hooks; the model is plain again."""
        for block, original in zip(self.blocks, self._originals):
            block.attn1.set_processor(original)
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self.clear()

    @property
    def mode(self) -> str | None:
        """``"read"``, ``"write"`` or None (the plain model answers)."""
        return self._mode

    @property
    def tokens(self) -> int:
        """Cached tokens per block (0 while empty)."""
        return 0 if self.keys[0] is None else int(self.keys[0].shape[1])

    # --- inside ---------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _in_mode(self, mode: str) -> Iterator[None]:
        if self._mode is not None:
            raise RuntimeError(f"the chunk cache is already {self._mode}ing; reading and writing do not nest")
        if not self._hooks:
            raise RuntimeError("the chunk cache was detached from its transformer")
        self._mode = mode
        try:
            yield
        finally:
            self._mode = None

    def append(self, index: int, key: torch.Tensor, value: torch.Tensor) -> None:
        if self.keys[index] is not None and self.keys[index].shape[0] != key.shape[0]:
            raise ValueError(f"the chunk cache holds context for a batch of {self.keys[index].shape[0]}, but this "
                             f"chunk has a batch of {key.shape[0]}; clear() the cache before a new batch")
        self.keys[index] = key if self.keys[index] is None else torch.cat([self.keys[index], key], dim=1)
        self.values[index] = value if self.values[index] is None else torch.cat([self.values[index], value], dim=1)

    def _rotary_hook(self, rope: torch.nn.Module, inputs: tuple, output: Any) -> Any:
        """Inside a mode: the chunk's rotary tables at frames ``frames ..``, carrying this forward's context."""
        if self._mode is None:
            return None
        latents = inputs[0]
        self._incoming_frames = int(latents.shape[2])
        context = ForwardContext(list(self.keys), list(self.values), self if self._mode == "write" else None)
        self._forward = context
        if self.frames == 0:
            return ContextRotary.of(tuple(output), context)
        return ContextRotary.of(self._shifted_tables(rope, latents), context)

    def _shifted_tables(self, rope: torch.nn.Module, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The tables of ``latents``' tokens placed after the cached frames: the module's own tables for
        the whole clip so far, cut to the chunk's tokens (positions count patches, so frames ``// p_t``)."""
        frames_per_patch, patch_height, patch_width = rope.patch_size
        if self.frames % frames_per_patch:
            raise ValueError(f"the chunk cache holds {self.frames} latent frames, not a multiple of the model's "
                             f"temporal patch size {frames_per_patch}; cache whole patches")
        batch, channels, frames, height, width = latents.shape
        total = (self.frames + frames) // frames_per_patch
        if total > rope.max_seq_len:
            raise ValueError(f"the chunk cache holds {self.frames} latent frames and this chunk adds {frames}: more "
                             f"than the {rope.max_seq_len} positions the model's rotary embedding has "
                             "(rope_max_seq_len); generate a shorter clip")
        whole = torch.empty((1, 1, self.frames + frames, height, width), device="meta")
        cos, sin = rope.forward(whole)  # .forward: not through this hook again
        skipped = (self.frames // frames_per_patch) * (height // patch_height) * (width // patch_width)
        return cos[:, skipped:], sin[:, skipped:]

    def _finish_forward(self, transformer: torch.nn.Module, inputs: tuple, output: Any) -> None:
        """A writing forward's chunk now counts as cached frames (every block has appended its part)."""
        context, self._forward = self._forward, None
        if self._mode != "write" or context is None:
            return
        if len(context.written) != len(self.blocks):
            raise RuntimeError(f"a writing forward cached {len(context.written)} of {len(self.blocks)} blocks; the "
                               "chunk cache's processors were replaced")
        self.frames += self._incoming_frames
