"""Selective, chunked cross-entropy: the LM head runs only at trained positions, in chunks.

The plain loss computes `(B, L, V)` float logits for every position (prompt tokens included) and
autodiff keeps them for the backward pass: ~5 GB at batch 4 x 2048 x 152k. Here we

1. gather the hidden states of the K trained positions, K a bucket of the trained-token count so
   `mx.compile` sees few shapes (`select_bucket`);
2. compute logsumexp and the target logit chunk by chunk (`chunk_size` rows at a time) inside an
   `mx.custom_function` whose VJP recomputes each chunk's logits, so at most one `(chunk, V)`
   block exists at a time, forward or backward.

Same loss and gradients as the plain masked cross-entropy (tests/unit/test_chunked_ce.py). Tied
embeddings, untied heads, quantized heads (frozen) and gemma2 final-logit soft-capping are handled
through `_mlxlm.hidden_states` / `_mlxlm.lm_head`'s contract; other architectures, or a trainable
head that is not a plain bias-free Linear/Embedding, fall back to the plain path with a warning.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlxsft import _mlxlm

DEFAULT_CHUNK: int | None = None  # None: `default_chunk_size(vocab)`
CHUNK_ELEMENTS = 1 << 22  # default chunk: rows x vocab ~ 4M floats (16 MB per (C, V) buffer)
N_BUCKETS = 8  # K is rounded up to a multiple of n_positions / N_BUCKETS

_warned: set[str] = set()


def select_bucket(n_trained: int, n_positions: int, n_buckets: int = N_BUCKETS) -> int:
    """Number of positions to gather for a batch with `n_trained` targets out of `n_positions`.

    Rounds up to a multiple of ceil(n_positions / n_buckets), so a fixed (B, L) shape compiles at
    most `n_buckets` loss shapes and at most 1/n_buckets of the positions are gathered needlessly.
    """
    step = max(1, -(-n_positions // n_buckets))
    return int(min(n_positions, max(step, -(-n_trained // step) * step)))


def default_chunk_size(vocab_size: int) -> int:
    """Rows per LM-head chunk: a power of two with rows x vocab <= CHUNK_ELEMENTS, at least 64.

    Each chunk holds ~4 (C, V) float32 buffers at once in the backward pass (logits, softmax,
    scaled gradient, its cast), so this bounds the loss's working set to ~64 MB at vocabs up to 64k.
    """
    rows = max(1, CHUNK_ELEMENTS // max(1, vocab_size))
    return max(64, 1 << (rows.bit_length() - 1))


def _head(model: nn.Module) -> tuple[Callable[..., mx.array], list[mx.array], float | None, int]:
    """(head_fn(h, *weights) -> logits before capping, weights, soft-cap, vocab) or ValueError.

    A dense bias-free head passes its weight as a differentiable input (full fine-tuning trains
    it); any other head (quantized, LoRA-wrapped) must be frozen and is captured as a constant.
    """
    if not _mlxlm.supports_mask(model):
        raise ValueError(f"model_type {_mlxlm.model_type(model)!r} is not known to mlxsft")
    tied = "lm_head" not in model
    module = model.model.embed_tokens if tied else model.lm_head
    cap = getattr(model, "final_logit_softcapping", None) or None
    vocab = int(module.weight.shape[0])  # (V, D), or (V, D * bits / 32) quantized
    if type(module) in (nn.Linear, nn.Embedding) and "bias" not in module:
        return (lambda h, w: h @ w.T), [module.weight], cap, vocab  # (N, D) @ (D, V)
    if tree_flatten(module.trainable_parameters()):
        raise ValueError(f"a trainable {type(module).__name__} LM head is not supported")
    fn = module.as_linear if tied else module
    return (lambda h: fn(h)), [], cap, vocab


def _make_loss(head_fn: Callable[..., mx.array], cap: float | None, chunk: int) -> Callable:
    """A custom function (h (K, D), targets (K,), weights (K,), *head weights) -> scalar CE sum."""

    def logits_of(h: mx.array, ws: list[mx.array]) -> mx.array:
        z = head_fn(h, *ws).astype(mx.float32)  # (C, V)
        return mx.tanh(z / cap) * cap if cap else z

    @mx.custom_function
    def ce(h, targets, weights, *ws):
        total = mx.array(0.0, mx.float32)
        for s in range(0, h.shape[0], chunk):
            # Chain the chunks so MLX evaluates them one after another (one (C, V) block alive).
            h_c = mx.depends(h[s : s + chunk], total) if s else h[s : s + chunk]
            z = logits_of(h_c, ws)  # (C, V)
            t = targets[s : s + chunk, None]  # (C, 1)
            nll = mx.logsumexp(z, axis=-1) - mx.take_along_axis(z, t, axis=-1)[:, 0]  # (C,)
            total = total + (nll * weights[s : s + chunk]).sum()
        return total

    @ce.vjp
    def ce_vjp(primals, cotangent, output):
        h, targets, weights, *ws = primals
        dh, dws = [], [mx.zeros_like(w) for w in ws]
        for s in range(0, h.shape[0], chunk):
            h_c, t = h[s : s + chunk], targets[s : s + chunk]
            if dh:  # after the previous chunk, as in the forward pass
                h_c = mx.depends(h_c, dh[-1])
            raw = head_fn(h_c, *ws)  # (C, V) in the model's dtype, before capping
            u = raw.astype(mx.float32)
            z = mx.tanh(u / cap) * cap if cap else u
            g = mx.softmax(z, axis=-1)  # (C, V)
            g = mx.put_along_axis(g, t[:, None], mx.take_along_axis(g, t[:, None], -1) - 1, -1)
            g = g * (weights[s : s + chunk] * cotangent)[:, None]
            if cap:
                g = g * (1 - mx.square(z / cap))  # d(cap * tanh(u / cap)) / du
            _, grads = mx.vjp(lambda h_, *w_: head_fn(h_, *w_), [h_c, *ws], [g.astype(raw.dtype)])
            dh.append(grads[0])
            dws = [a + b for a, b in zip(dws, grads[1:], strict=True)]
        return (
            mx.concatenate(dh).astype(h.dtype),
            mx.zeros_like(targets),
            mx.zeros_like(weights),
            *dws,
        )

    return ce


def plain_ce_sum(
    model: nn.Module,
    inputs: mx.array,
    targets: mx.array,
    target_mask: mx.array,
    mask: mx.array | None = None,
) -> tuple[mx.array, mx.array]:
    """The reference: full (B, L, V) logits, masked cross-entropy sum and trained-token count."""
    logits = _mlxlm.forward(model, inputs, mask).astype(mx.float32)  # (B, L, V)
    nll = mx.logsumexp(logits, axis=-1) - mx.take_along_axis(logits, targets[..., None], -1)[..., 0]
    m = target_mask.astype(mx.float32)  # (B, L)
    return (nll * m).sum(), m.sum()


def selective_ce_sum(
    model: nn.Module,
    inputs: mx.array,
    targets: mx.array,
    target_mask: mx.array,
    mask: mx.array | None = None,
    *,
    n_select: int | None = None,
    chunk_size: int | None = None,
) -> tuple[mx.array, mx.array]:
    """(sum of cross-entropy over trained targets, number of trained targets), like `plain_ce_sum`.

    inputs, targets, target_mask: (B, L); mask: None (causal) or a (B, 1, L, L) attention mask.
    `n_select` (a Python int, >= the number of trained targets; see `select_bucket`) fixes the
    gathered shape for `mx.compile`; None computes it from the mask (eager mode only).
    `chunk_size` rows of logits exist at a time (None: `default_chunk_size(vocab)`).
    """
    try:
        head_fn, ws, cap, vocab = _head(model)
    except ValueError as exc:
        reason = str(exc)
        if reason not in _warned:
            _warned.add(reason)
            warnings.warn(f"selective loss disabled, using full logits: {reason}", stacklevel=2)
        return plain_ce_sum(model, inputs, targets, target_mask, mask)
    B, L = inputs.shape
    m = target_mask.reshape(-1).astype(mx.float32)  # (N,)
    if n_select is None:
        n_select = select_bucket(int(m.sum().item()), B * L)
    n_select = max(1, min(int(n_select), B * L))
    # Trained positions first (mask 1 sorts before 0); the extra K - n_trained get weight 0.
    idx = mx.argsort(-m)[:n_select] if n_select < B * L else mx.arange(B * L)  # (K,)
    h = _mlxlm.hidden_states(model, inputs, mask).reshape(B * L, -1)[idx]  # (K, D)
    if chunk_size is None:
        chunk_size = default_chunk_size(vocab)
    ce = _make_loss(head_fn, cap, max(1, chunk_size))
    total = ce(h, targets.reshape(-1)[idx], m[idx], *ws)
    return total, m.sum()
