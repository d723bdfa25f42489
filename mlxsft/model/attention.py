"""Causal attention that skips the blocks a causal mask hides (for MLX's CPU backend).

On the CPU, `mx.fast.scaled_dot_product_attention` is a composite of plain ops: it scores every
query against every key, masks the upper triangle and runs a softmax over all L x L entries, and
MLX's CPU element-wise ops are scalar (an `exp` costs ~15 ns). `causal_attention` splits the
queries into blocks of `BLOCK` rows and scores block [a, b) only against keys [0, b): about
(n + 1) / 2n of the work and of the probabilities kept for the backward pass (n blocks), with
the same result. With `recompute` (under --grad-checkpoint, for long rows) each block's backward
pass recomputes its probabilities instead (as flash attention does): no L x L array is kept.
Grouped-query heads share their keys by broadcasting, without a copy.

`use_block_attention` decides where it runs (the CPU backend; training and evaluation, not
generation with a KV cache; the attention classes `_mlxlm.plain_attentions` lists);
tests/unit/test_attention.py checks outputs and gradients against the model's own attention.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mlxsft import _mlxlm
from mlxsft.model.swap import swap_call

BLOCK = 128  # query rows per block: fewest masked scores without many small matmuls (L=512..2048)
# `use_block_attention(recompute=True)` recomputes only rows of at least this many tokens: below,
# the kept probabilities are a small part of memory and recomputing them cost ~20% of a
# --grad-checkpoint step (SmolLM2-135M, 4 x 512: 194 s against 162 s, 1.44 against 1.46 GB).
RECOMPUTE_FROM = 1024


def handles_mask(mask: object, length: int) -> bool:
    """True for the masks `causal_attention` takes: None/"causal" (plain causal) or a bool
    (B or 1, 1, L, L) mask that already includes causality (packed rows, sliding windows)."""
    if mask is None or (isinstance(mask, str) and mask == "causal"):
        return True
    return (
        isinstance(mask, mx.array)
        and mask.dtype == mx.bool_
        and mask.ndim == 4
        and mask.shape[1] == 1
        and mask.shape[-2:] == (length, length)
    )


def causal_attention(
    queries: mx.array,
    keys: mx.array,
    values: mx.array,
    scale: float,
    mask: mx.array | str | None = None,
    block: int = BLOCK,
    recompute: bool = False,
) -> mx.array:
    """softmax(scale * Q K^T + causal mask) V, block by block.

    queries (B, H, L, D), keys and values (B, KV, L, D) with H a multiple of KV; `mask` as in
    `handles_mask` (a bool mask must allow every key the causal mask allows it to see, and no
    later key). `recompute`: the backward pass recomputes each block's probabilities instead
    of keeping them (less memory, more time). Returns (B, H, L, D) in the queries' dtype.
    """
    B, H, L, D = queries.shape
    kv = keys.shape[1]
    q = (queries * scale).reshape(B, kv, H // kv, L, D)  # group the heads that share a key
    k_t = keys[:, :, None].swapaxes(-1, -2)  # (B, KV, 1, D, L)
    v = values[:, :, None]  # (B, KV, 1, L, Dv)
    boolean = isinstance(mask, mx.array)
    pos = mx.arange(L)
    outs = []
    for a in range(0, L, block):
        b = min(a + block, L)
        # (B, 1, 1, b - a, b) from the caller's mask, else plain causal (b - a, b)
        allowed = mask[:, :, None, a:b, :b] if boolean else pos[None, :b] <= pos[a:b, None]
        qb, kb, vb = q[:, :, :, a:b], k_t[..., :b], v[..., :b, :]
        outs.append(_block(qb, kb, vb, allowed) if recompute else _probs(qb, kb, allowed) @ vb)
    out = outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=3)
    return out.reshape(B, H, L, -1)


@mx.custom_function
def _block(q: mx.array, k_t: mx.array, v: mx.array, allowed: mx.array) -> mx.array:
    """One query block: q (B, KV, G, n, D) already scaled, k_t (B, KV, 1, D, m), v (B, KV, 1,
    m, Dv), `allowed` (n, m) or (B, 1, 1, n, m). Its VJP recomputes the probabilities instead
    of keeping them: nothing of size n x m outlives the block."""
    return _probs(q, k_t, allowed) @ v


def _probs(q: mx.array, k_t: mx.array, allowed: mx.array) -> mx.array:
    scores = mx.where(allowed, q @ k_t, mx.array(-mx.inf, q.dtype))
    return mx.softmax(scores, axis=-1, precise=True)


@_block.vjp
def _block_vjp(primals: list[mx.array], d_out: mx.array, out: mx.array) -> tuple:
    q, k_t, v, allowed = primals
    # Depending on the cotangent makes this a new computation: otherwise `mx.compile` merges it
    # with the forward pass's identical one, whose probabilities then stay alive (as in
    # mx.checkpoint).
    q, k_t = mx.depends([q, k_t], [d_out])
    probs = _probs(q, k_t, allowed)
    d_v = (probs.swapaxes(-1, -2) @ d_out).sum(axis=2, keepdims=True)  # sum the shared heads
    d_probs = d_out @ v.swapaxes(-1, -2)
    # softmax backward: P * (dP - rowsum(dP * P)), and rowsum(dP * P) == rowsum(dO * O)
    d_scores = probs * (d_probs - (d_out * out).sum(axis=-1, keepdims=True))
    d_q = d_scores @ k_t.swapaxes(-1, -2)
    d_k_t = (q.swapaxes(-1, -2) @ d_scores).sum(axis=2, keepdims=True)
    return d_q, d_k_t, d_v, mx.zeros_like(allowed)


def kept_fraction(length: int, block: int = BLOCK) -> float:
    """Scores computed (and probabilities kept for the backward pass, without `recompute`) per
    layer by `causal_attention`, as a fraction of MLX's L x L."""
    return sum((min(a + block, length) - a) * min(a + block, length)
               for a in range(0, length, block)) / length**2  # fmt: skip


def largest_block(length: int, block: int = BLOCK) -> int:
    """Scores per (row, head) in `causal_attention`'s largest block (the last: block x L); the
    only L-quadratic arrays alive at a time, in the forward and in the backward pass."""
    return min(block, length) * length


def _enabled() -> bool:
    return mx.default_device() == mx.cpu and os.environ.get("MLXSFT_BLOCK_ATTENTION") != "0"


def applies_to(model_type: str | None) -> bool:
    """Whether `use_block_attention` switches models of `model_type` in this process."""
    return _enabled() and _mlxlm.has_plain_attention(model_type)


def use_block_attention(model: nn.Module, *, recompute: bool = False) -> int:
    """On the CPU backend, make the verified attention layers of THIS model use
    `causal_attention` (with `recompute` for rows of RECOMPUTE_FROM tokens or more) when called
    without a KV cache (training, evaluation); returns how many.
    Each instance gets a subclass of its class (`model.swap`); generation
    (with a cache), other devices and other masks keep the model's own code. Call before
    compiling. `MLXSFT_BLOCK_ATTENTION=0` turns it off (for comparisons)."""
    if not _enabled():
        return 0
    attentions = _mlxlm.plain_attentions(model)
    for attn in attentions:
        swap_call(attn, "BlockAttention", _block_call)
        attn._mlxsft_recompute = recompute
    return len(attentions)


def _block_call(base: type) -> Callable:
    def __call__(self, x: mx.array, mask: Any = None, cache: Any = None) -> mx.array:
        B, L, _ = x.shape
        if cache is not None or not handles_mask(mask, L):
            return base.__call__(self, x, mask, cache)
        q = self.q_proj(x).reshape(B, L, self.n_heads, -1)
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
        recompute = self._mlxsft_recompute and L >= RECOMPUTE_FROM
        out = causal_attention(self.rope(q), self.rope(k), v, self.scale, mask, recompute=recompute)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))

    return __call__
