"""The one training loss: summed cross-entropy over trained targets, in float32.

Read top to bottom: `ce_sum` is what the train and eval steps call. It builds the attention mask
(block-diagonal causal for packed rows, so no example attends to another; None = the model's own
causal mask) and hands over to one of two ways of computing the same number:

- `full_ce`: full (B, L, V) logits, masked cross-entropy. Simple; autodiff keeps the logits for
  the backward pass (~5 GB at batch 4 x 2048 x 152k).
- `selective_ce`: the LM head runs only at the K trained positions (K = `n_select`, a bucket of
  the trained-token count, so `mx.compile` sees few shapes), `chunk_size` rows at a time inside a
  custom function whose VJP recomputes each chunk's logits (`_chunked_head_ce`): at most one
  (chunk, V) block exists at a time. Same loss and gradients (tests/unit/test_loss.py).
  A model whose head cannot be applied that way (an unknown architecture, a trainable head other
  than a bias-free Linear/Embedding) falls back to `full_ce` with one warning.

Both return the SUM (not the mean), so callers can divide by the trained tokens of a whole
optimizer step (micro-batches and ranks together).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlxsft import _mlxlm

# Below this vocabulary the logits are no bigger than one layer's activations, so selection saves
# little, while each trained-token bucket costs a compilation: `choose_loss` uses "full" there.
SELECTIVE_MIN_VOCAB = 8192
CHUNK_ELEMENTS = 1 << 22  # default chunk: rows x vocab ~ 4M floats (16 MB per (C, V) buffer)
N_BUCKETS = 8  # K is rounded up to a multiple of n_positions / N_BUCKETS

_warned: set[str] = set()


def ce_sum(
    model: nn.Module,
    inputs: mx.array,
    targets: mx.array,
    target_mask: mx.array,
    segment_ids: mx.array | None = None,
    *,
    loss: str = "full",
    n_select: int | None = None,
    chunk_size: int | None = None,
) -> tuple[mx.array, mx.array]:
    """(sum of CE over trained targets, number of trained targets), both float32 scalars.

    inputs, targets, target_mask: (B, L). `segment_ids` (B, L): 0 = padding, 1..k = example in
    the row -> block-diagonal causal mask; None means every row holds at most one left-aligned
    example, so the model's own causal mask is exact (and cheaper). `loss` is "full" or
    "selective" (then `n_select`, see `select_bucket`, and `chunk_size` apply).
    """
    attn_mask = None if segment_ids is None else _mlxlm.block_causal_mask(segment_ids)
    target_mask = target_mask.astype(mx.float32)
    if loss == "selective":
        total = selective_ce(
            model, inputs, targets, target_mask, attn_mask, n_select=n_select, chunk_size=chunk_size
        )
    else:
        total = full_ce(model, inputs, targets, target_mask, attn_mask)
    return total.astype(mx.float32), target_mask.sum()


def n_select_for(loss: str, n_trained: int, n_positions: int) -> int | None:
    """The static gather size of a batch (a compile-cache key) for `loss`; None for "full"."""
    return select_bucket(n_trained, n_positions) if loss == "selective" else None


def choose_loss(loss: str, model: nn.Module) -> str:
    """The loss a run uses: "selective" only pays off from SELECTIVE_MIN_VOCAB tokens on."""
    if loss == "selective" and _mlxlm.vocab_size(model) < SELECTIVE_MIN_VOCAB:
        return "full"
    return loss


def full_ce(
    model: nn.Module,
    inputs: mx.array,
    targets: mx.array,
    target_mask: mx.array,
    attn_mask: mx.array | None = None,
) -> mx.array:
    """Sum of CE over positions where target_mask == 1, from full (B, L, V) float32 logits."""
    logits = _mlxlm.forward(model, inputs, attn_mask).astype(mx.float32)  # (B, L, V)
    nll = mx.logsumexp(logits, axis=-1) - mx.take_along_axis(logits, targets[..., None], -1)[..., 0]
    return (nll * target_mask.astype(mx.float32)).sum()


def selective_ce(
    model: nn.Module,
    inputs: mx.array,
    targets: mx.array,
    target_mask: mx.array,
    attn_mask: mx.array | None = None,
    *,
    n_select: int | None = None,
    chunk_size: int | None = None,
) -> mx.array:
    """The same sum as `full_ce`, with the LM head only at trained positions, in chunks.

    `n_select` (a Python int >= the number of trained targets) fixes the gathered shape for
    `mx.compile`; None computes it from the mask (eager mode only). `chunk_size` rows of logits
    exist at a time (None: `default_chunk_size(vocab)`).
    """
    try:
        head_fn, weights, cap, vocab = _head(model)
    except ValueError as exc:
        reason = str(exc)
        if reason not in _warned:
            _warned.add(reason)
            warnings.warn(f"selective loss disabled, using full logits: {reason}", stacklevel=2)
        return full_ce(model, inputs, targets, target_mask, attn_mask)
    B, L = inputs.shape
    m = target_mask.reshape(-1).astype(mx.float32)  # (N,)
    if n_select is None:
        n_select = select_bucket(int(m.sum().item()), B * L)
    n_select = max(1, min(int(n_select), B * L))
    # Trained positions first (mask 1 sorts before 0); the extra K - n_trained get weight 0.
    idx = mx.argsort(-m)[:n_select] if n_select < B * L else mx.arange(B * L)  # (K,)
    h = _mlxlm.hidden_states(model, inputs, attn_mask).reshape(B * L, -1)[idx]  # (K, D)
    chunk = max(1, chunk_size or default_chunk_size(vocab))
    return _chunked_head_ce(head_fn, cap, chunk)(h, targets.reshape(-1)[idx], m[idx], *weights)


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
    module, tied, cap = _mlxlm.output_head(model)
    if callable(getattr(module, "head_parts", None)):  # trainable token rows (model/token_rows.py)
        fn, ws, vocab = module.head_parts()
        return fn, ws, cap, vocab
    vocab = int(module.weight.shape[0])  # (V, D), or (V, D * bits / 32) quantized
    if type(module) in (nn.Linear, nn.Embedding) and "bias" not in module:
        return (lambda h, w: h @ w.T), [module.weight], cap, vocab  # (N, D) @ (D, V)
    if tree_flatten(module.trainable_parameters()):
        raise ValueError(f"a trainable {type(module).__name__} LM head is not supported")
    fn = module.as_linear if tied else module
    return (lambda h: fn(h)), [], cap, vocab


def _chunked_head_ce(head_fn: Callable[..., mx.array], cap: float | None, chunk: int) -> Callable:
    """A custom function (h (K, D), targets (K,), weights (K,), *head weights) -> scalar CE sum
    whose VJP recomputes each chunk's logits instead of keeping them."""

    @mx.custom_function
    def ce(h, targets, weights, *ws):
        total = mx.array(0.0, mx.float32)
        for s in range(0, h.shape[0], chunk):
            # Chain the chunks so MLX evaluates them one after another (one (C, V) block alive).
            h_c = mx.depends(h[s : s + chunk], total) if s else h[s : s + chunk]
            z = head_fn(h_c, *ws).astype(mx.float32)  # (C, V)
            z = mx.tanh(z / cap) * cap if cap else z
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
