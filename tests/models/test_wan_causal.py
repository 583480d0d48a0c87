"""The chunk cache of simpletuner/models/wan_causal.py on the tiny Wan transformer: chunks generated from the
cache equal one forward over the whole clip under a block-causal attention mask (applied by an independent
reference processor written here), an empty cache changes nothing, gradient checkpointing recomputes with the
context its forward saw, and detaching gives the model back as it was."""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")

from simpletuner.models.wan_causal import ChunkCache  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

HEIGHT = WIDTH = 4  # latent cells: 2 x 2 tokens per frame with Wan's (1, 2, 2) patches
TOKENS_PER_FRAME = (HEIGHT // 2) * (WIDTH // 2)


@pytest.fixture(scope="module")
def transformer():
    from simpletuner.testing.tiny.wan import build_tiny_pipeline

    model = build_tiny_pipeline(seed=0, variant="t2v-2.1")[0].transformer.eval()
    return model.requires_grad_(False)


def clip(frames: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 16, frames, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(seed))


def text(seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(seed))


def forward(transformer, latents: torch.Tensor, timestep: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
    return transformer(hidden_states=latents, timestep=timestep, encoder_hidden_states=prompt, return_dict=False)[0]


class BlockCausalReference:
    """A self-attention processor that sees the whole clip and masks it block-causally: a token attends to
    the tokens of its own chunk and of the chunks before it. Its own projections, its own rotary (complex
    multiplication in float64) and a boolean mask: nothing shared with the cache's processor."""

    def __init__(self, chunk_of_token: torch.Tensor):
        self.allowed = chunk_of_token.view(1, -1) <= chunk_of_token.view(-1, 1)  # [query, key]

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None,
                 **kwargs):
        def heads(states):
            return states.unflatten(2, (attn.heads, -1))

        query = heads(attn.norm_q(attn.to_q(hidden_states)))
        key = heads(attn.norm_k(attn.to_k(hidden_states)))
        value = heads(attn.to_v(hidden_states))
        cos, sin = rotary_emb
        turn = torch.complex(cos[..., 0::2].double(), sin[..., 0::2].double())

        def rotated(states):
            pairs = torch.view_as_complex(states.double().unflatten(-1, (-1, 2)).contiguous())
            return torch.view_as_real(pairs * turn).flatten(-2).to(states.dtype)

        query, key = rotated(query), rotated(key)
        scores = torch.einsum("bqhd,bkhd->bhqk", query, key) / query.shape[-1] ** 0.5
        scores = scores.masked_fill(~self.allowed, float("-inf"))
        output = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(dim=-1), value).flatten(2, 3)
        return attn.to_out[1](attn.to_out[0](output))


def block_causal_reference(transformer, chunks: list[torch.Tensor], timesteps: list[float],
                           prompt: torch.Tensor) -> list[torch.Tensor]:
    """The whole clip ``[chunk 1 ; chunk 2 ; ...]`` in one forward, a timestep per token (each chunk's),
    under the block-causal mask; returns each chunk's part of the output."""
    whole = torch.cat(chunks, dim=2)
    sizes = [chunk.shape[2] for chunk in chunks]
    chunk_of_frame = torch.repeat_interleave(torch.arange(len(chunks)), torch.tensor(sizes))
    chunk_of_token = chunk_of_frame.repeat_interleave(TOKENS_PER_FRAME)
    per_token = torch.tensor(timesteps)[chunk_of_token].expand(whole.shape[0], -1)
    originals = [block.attn1.processor for block in transformer.blocks]
    for block in transformer.blocks:
        block.attn1.set_processor(BlockCausalReference(chunk_of_token))
    try:
        with torch.no_grad():
            output = forward(transformer, whole, per_token, prompt)
    finally:
        for block, original in zip(transformer.blocks, originals):
            block.attn1.set_processor(original)
    return list(output.split(sizes, dim=2))


def test_chunks_from_the_cache_equal_the_block_causal_forward_of_the_whole_clip(transformer):
    """Chunk 1 written (context level), chunk 2 written after it, chunk 3 read from both: each output is the
    same chunk's output of one forward over the clip with a block-causal mask."""
    chunks = [clip(2, seed=0), clip(2, seed=1), clip(1, seed=2)]
    prompt = text()
    context_t, current_t = 50.0, 800.0
    expected = block_causal_reference(transformer, chunks, [context_t, context_t, current_t], prompt)
    cache = ChunkCache(transformer)
    try:
        outputs = []
        for chunk in chunks[:2]:
            with cache.writing():
                outputs.append(forward(transformer, chunk, torch.full((2,), context_t), prompt))
        assert cache.frames == 4 and cache.tokens == 4 * TOKENS_PER_FRAME
        with cache.reading(), torch.no_grad():
            outputs.append(forward(transformer, chunks[2], torch.full((2,), current_t), prompt))
        assert cache.frames == 4  # reading leaves the cache as it was
    finally:
        cache.detach()
    for ours, reference in zip(outputs, expected):
        torch.testing.assert_close(ours, reference, atol=2e-5, rtol=1e-4)
    # the context matters: chunk 3 alone (bidirectional, frame 0) is something else
    with torch.no_grad():
        alone = forward(transformer, chunks[2], torch.full((2,), current_t), prompt)
    assert (alone - expected[2]).abs().max() > 1e-3


def test_chunk_two_read_from_chunk_ones_cache(transformer):
    """The assignment's case as such: chunk 2 predicted from chunk 1's cache (rotary offset by 3 frames)."""
    first, second = clip(3, seed=4), clip(2, seed=5)
    prompt = text(seed=6)
    expected = block_causal_reference(transformer, [first, second], [0.0, 600.0], prompt)[1]
    cache = ChunkCache(transformer)
    try:
        with cache.writing():
            forward(transformer, first, torch.zeros(2), prompt)
        with cache.reading(), torch.no_grad():
            ours = forward(transformer, second, torch.full((2,), 600.0), prompt)
    finally:
        cache.detach()
    torch.testing.assert_close(ours, expected, atol=2e-5, rtol=1e-4)


def test_reading_an_empty_cache_is_the_plain_forward_and_detach_restores_the_model(transformer):
    latents, prompt, timestep = clip(3, seed=7), text(seed=8), torch.full((2,), 400.0)
    originals = [block.attn1.processor for block in transformer.blocks]
    with torch.no_grad():
        plain = forward(transformer, latents, timestep, prompt)
    cache = ChunkCache(transformer)
    with torch.no_grad():
        outside = forward(transformer, latents, timestep, prompt)  # attached, outside any mode: the plain model
        with cache.reading():
            empty = forward(transformer, latents, timestep, prompt)
    assert cache.frames == 0 and cache.tokens == 0
    torch.testing.assert_close(outside, plain, atol=0, rtol=0)
    torch.testing.assert_close(empty, plain, atol=2e-5, rtol=1e-4)
    with cache.writing():
        forward(transformer, latents, timestep, prompt)
    assert cache.frames == 3
    cache.clear()
    assert cache.frames == 0 and cache.tokens == 0
    cache.detach()
    assert [block.attn1.processor for block in transformer.blocks] == originals
    assert not transformer.rope._forward_hooks and not transformer._forward_hooks
    with pytest.raises(RuntimeError, match="detached"):
        with cache.reading():
            pass


def test_a_cache_too_long_for_the_rotary_table_is_refused_by_name(transformer):
    cache = ChunkCache(transformer)  # the tiny model has rope_max_seq_len 32
    try:
        cache.frames = 30
        with pytest.raises(ValueError, match="rope_max_seq_len"), cache.reading(), torch.no_grad():
            forward(transformer, clip(3), torch.zeros(2), text())
    finally:
        cache.detach()


def test_gradient_checkpointing_recomputes_with_the_context_its_forward_saw(transformer):
    """The backward runs after the cache moved on (another chunk written, then cleared); a checkpointed block
    recomputed then must still attend to the context of its forward: gradients equal the plain ones."""
    first, second, prompt = clip(2, seed=9), clip(1, seed=10), text(seed=11)
    weight = transformer.blocks[0].attn1.to_k.weight

    def gradients(checkpointing: bool) -> tuple[torch.Tensor, torch.Tensor]:
        transformer.gradient_checkpointing = False
        if checkpointing:
            transformer.enable_gradient_checkpointing()
        weight.requires_grad_(True)
        weight.grad = None
        latents = second.clone().requires_grad_(True)
        cache = ChunkCache(transformer)
        try:
            with cache.writing():
                forward(transformer, first, torch.zeros(2), prompt)
            with cache.reading():
                output = forward(transformer, latents, torch.full((2,), 700.0), prompt)
            with cache.writing():
                forward(transformer, second, torch.zeros(2), prompt)  # the cache moves on before the backward
            cache.clear()
            output.pow(2).mean().backward()
        finally:
            cache.detach()
            transformer.gradient_checkpointing = False
            weight.requires_grad_(False)
        return latents.grad, weight.grad

    plain, checkpointed = gradients(False), gradients(True)
    assert plain[1].abs().sum() > 0
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
