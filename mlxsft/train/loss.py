"""The one training loss: summed cross-entropy over trained targets, in float32.

`ce_sum` returns the SUM (not the mean) and the token count, so callers can divide by the number
of trained tokens of a whole optimizer step (micro-batches and ranks together). Packed rows get a
block-diagonal causal mask built from `segment_ids`, so no example attends to another.

The logits -> CE part is a swappable `CEFn` (`ce_fn=`): the default builds full (B, L, V)
logits; a chunked / selective LM-head loss (train/chunked_ce.py) can take the same arguments
and compute `_mlxlm.hidden_states` + the head only where `target_mask` is set.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn

from mlxsft import _mlxlm

# (model, inputs (B, L), attn_mask (B, 1, L, L) | None, targets (B, L), target_mask (B, L) f32)
#   -> scalar float32 sum of CE over positions where target_mask == 1
CEFn = Callable[[nn.Module, mx.array, mx.array | None, mx.array, mx.array], mx.array]


def full_logits_ce(
    model: nn.Module,
    inputs: mx.array,
    attn_mask: mx.array | None,
    targets: mx.array,
    target_mask: mx.array,
) -> mx.array:
    """Sum of CE over trained targets from full logits (computed in float32)."""
    logits = _mlxlm.forward(model, inputs, attn_mask).astype(mx.float32)  # (B, L, V)
    ce = nn.losses.cross_entropy(logits, targets)  # (B, L)
    return mx.where(target_mask > 0, ce, 0.0).sum()


def ce_sum(
    model: nn.Module,
    inputs: mx.array,
    targets: mx.array,
    target_mask: mx.array,
    segment_ids: mx.array | None = None,
    *,
    ce_fn: CEFn | None = None,
) -> tuple[mx.array, mx.array]:
    """(sum of CE over trained targets, number of trained targets), both float32 scalars.

    `segment_ids` (B, L): 0 = padding, 1..k = example in the row -> block-diagonal causal mask.
    None means every row holds at most one left-aligned example, so the model's own causal mask
    is exact (and cheaper).
    """
    attn_mask = None if segment_ids is None else _mlxlm.block_causal_mask(segment_ids)
    target_mask = target_mask.astype(mx.float32)
    total = (ce_fn or full_logits_ce)(model, inputs, attn_mask, targets, target_mask)
    return total.astype(mx.float32), target_mask.sum()
