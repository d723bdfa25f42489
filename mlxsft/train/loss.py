"""The one training loss: summed cross-entropy over trained targets, in float32.

`ce_sum` returns the SUM (not the mean) and the token count, so callers can divide by the number
of trained tokens of a whole optimizer step (micro-batches and ranks together). Packed rows get a
block-diagonal causal mask built from `segment_ids`, so no example attends to another.

How hidden states become a CE sum is a swappable `LossHead`: `FULL_HEAD` builds full (B, L, V)
logits; `selective_head()` runs the LM head only at trained positions, in chunks
(train/chunked_ce.py). A head may want a static gather size `n_select` per batch (a Python int,
so `mx.compile` keys on it); the train/eval steps compute it with `head.select(n_trained, B * L)`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from mlxsft import _mlxlm

# (model, inputs (B, L), attn_mask (B, 1, L, L) | None, targets (B, L), target_mask (B, L) f32,
#  n_select: int | None) -> scalar float32 sum of CE over positions where target_mask == 1
CEFn = Callable[[nn.Module, mx.array, mx.array | None, mx.array, mx.array, int | None], mx.array]


@dataclass(frozen=True)
class LossHead:
    """A CE implementation plus, optionally, its static size rule (n_trained, n_positions) -> int."""

    ce: CEFn
    select: Callable[[int, int], int] | None = None
    name: str = "full"


def full_logits_ce(
    model: nn.Module,
    inputs: mx.array,
    attn_mask: mx.array | None,
    targets: mx.array,
    target_mask: mx.array,
    n_select: int | None = None,
) -> mx.array:
    """Sum of CE over trained targets from full logits (computed in float32)."""
    logits = _mlxlm.forward(model, inputs, attn_mask).astype(mx.float32)  # (B, L, V)
    ce = nn.losses.cross_entropy(logits, targets)  # (B, L)
    return mx.where(target_mask > 0, ce, 0.0).sum()


FULL_HEAD = LossHead(full_logits_ce)


def selective_head(chunk_size: int | None = None) -> LossHead:
    """The LM head only at trained positions, `chunk_size` rows at a time (less memory)."""
    from mlxsft.train import chunked_ce

    chunk = chunk_size or chunked_ce.DEFAULT_CHUNK

    def ce(model, inputs, attn_mask, targets, target_mask, n_select=None) -> mx.array:
        total, _ = chunked_ce.selective_ce_sum(
            model, inputs, targets, target_mask, attn_mask, n_select=n_select, chunk_size=chunk
        )
        return total

    return LossHead(ce, chunked_ce.select_bucket, "selective")


def ce_sum(
    model: nn.Module,
    inputs: mx.array,
    targets: mx.array,
    target_mask: mx.array,
    segment_ids: mx.array | None = None,
    *,
    head: LossHead = FULL_HEAD,
    n_select: int | None = None,
) -> tuple[mx.array, mx.array]:
    """(sum of CE over trained targets, number of trained targets), both float32 scalars.

    `segment_ids` (B, L): 0 = padding, 1..k = example in the row -> block-diagonal causal mask.
    None means every row holds at most one left-aligned example, so the model's own causal mask
    is exact (and cheaper).
    """
    attn_mask = None if segment_ids is None else _mlxlm.block_causal_mask(segment_ids)
    target_mask = target_mask.astype(mx.float32)
    total = head.ce(model, inputs, attn_mask, targets, target_mask, n_select)
    return total.astype(mx.float32), target_mask.sum()


def head_for(name: str) -> LossHead:
    """The LossHead a config's `loss` names ("selective" or "full")."""
    return selective_head() if name == "selective" else FULL_HEAD
