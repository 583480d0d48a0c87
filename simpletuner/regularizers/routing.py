"""Which image tokens a block ran on, when TREAD (simpletuner/regularizers/tread.py) routed some around it.

A block inside a TREAD route sees only the route's kept tokens, in their original order. A regularizer
that compares such a block's tokens with another token set (a block outside the route, or a target
laid over the whole image) must compare the same tokens on both sides; :class:`KeptTokens` says which
ones, and :func:`on_shared_tokens` cuts two captures down to the tokens both have.

Two blocks in two different routes ran on two independent random subsets, so they have no fixed set
of tokens in common (the overlap can even be empty); comparing them is refused with a message that
names both blocks and their routes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KeptTokens:
    """The image tokens a routed block ran on in one training forward."""

    route: int               # the route's number in ``--tread_config``
    start: int               # the route's first and last block (0-based, inclusive)
    end: int
    positions: torch.Tensor  # sorted positions of the kept tokens among ``total``
    total: int               # image tokens before routing

    def describe(self) -> str:
        return f"TREAD route {self.route} (blocks {self.start}..{self.end})"


def gather_tokens(tokens: torch.Tensor, kept: KeptTokens) -> torch.Tensor:
    """``tokens`` (B, N, C), all ``kept.total`` of them, cut to the kept ones (B, K, C)."""
    if tokens.shape[1] != kept.total:
        raise RuntimeError(f"expected all {kept.total} image tokens to gather the kept ones of {kept.describe()}, "
                           f"got {tokens.shape[1]}")
    return tokens[:, kept.positions.to(tokens.device)]


def on_shared_tokens(first: torch.Tensor, first_kept: KeptTokens | None, second: torch.Tensor,
                     second_kept: KeptTokens | None, names: tuple[str, str]) -> tuple[torch.Tensor, torch.Tensor]:
    """``first`` and ``second`` (B, tokens, C) cut to the tokens both blocks ran on.

    ``*_kept`` is None for a block that ran on every token. A block that ran on all tokens is
    gathered at the other one's kept positions; two blocks of the same route already hold the same
    tokens; two blocks in different routes are refused (``names`` say which blocks, for the message).
    """
    if first_kept is None and second_kept is None:
        return first, second
    if first_kept is None:
        return gather_tokens(first, second_kept), second
    if second_kept is None:
        return first, gather_tokens(second, first_kept)
    if first_kept.route != second_kept.route:
        raise RuntimeError(f"{names[0]} runs inside {first_kept.describe()} and {names[1]} inside "
                           f"{second_kept.describe()}: the two routes keep different random tokens, so the blocks "
                           "have no tokens in common to compare; move one of the blocks outside every route, or both "
                           "into the same route (`--tread_config`)")
    return first, second
