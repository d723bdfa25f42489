"""Examples -> training arrays: each one rendered by `render.Renderer`, cut to `max_seq_len`, and
the ones left with nothing to train counted as dropped."""

from __future__ import annotations

from typing import Any

import numpy as np

from mlxsft.data.render import Renderer
from mlxsft.data.templates import ChatTemplate
from mlxsft.data.types import Dropped, Encoded, Example


def truncate(ids: np.ndarray, mask: np.ndarray, max_len: int, bos_id: int | None):
    """Cut to `max_len`: from the right if trained tokens survive, else drop leading prompt
    tokens (keeping BOS). Returns (ids, mask) or None when nothing trained would remain."""
    n = len(ids)
    if n <= max_len:
        return ids, mask
    if mask[:max_len].any():
        return ids[:max_len], mask[:max_len]
    head = 1 if bos_id is not None and n and ids[0] == bos_id else 0
    first = int(np.argmax(mask)) if mask.any() else n
    start = min(head + (n - max_len), first)  # drop only untrained prompt tokens
    ids = np.concatenate([ids[:head], ids[start:]])[:max_len]
    mask = np.concatenate([mask[:head], mask[start:]])[:max_len].copy()
    mask[:1] = 0
    return (ids, mask) if mask.any() else None


def encode_with(
    renderer: Renderer,
    example: Example,
    train_on: str = "responses",
    max_seq_len: int | None = None,
) -> Encoded | Dropped:
    """Render `example` and cut it to `max_seq_len` (None: no limit)."""
    out = renderer.render(example, train_on)
    if isinstance(out, Dropped) or max_seq_len is None or out.n_tokens <= max_seq_len:
        return out
    cut = truncate(out.input_ids, out.loss_mask, max_seq_len, renderer.bos_id)
    if cut is None:
        return Dropped(example.source, "no trained tokens within max_seq_len")
    out.input_ids, out.loss_mask = cut
    out.truncated = True
    return out


def encode_example(
    example: Example,
    tokenizer: Any,
    template: ChatTemplate | None,
    train_on: str = "responses",
    max_seq_len: int | None = None,
) -> Encoded | Dropped:
    """Encode one example (a dataset shares one Renderer: see encode_dataset)."""
    return encode_with(Renderer(tokenizer, template), example, train_on, max_seq_len)


def encode_dataset(
    examples: list[Example],
    tokenizer: Any,
    template: ChatTemplate | None,
    train_on: str = "responses",
    max_seq_len: int | None = None,
    batch_size: int = 4,
):
    """Encode every example -> (list[Encoded], DatasetStats); dropped ones are counted."""
    from mlxsft.data.stats import compute_stats

    renderer = Renderer(tokenizer, template)
    encoded: list[Encoded] = []
    dropped: list[Dropped] = []
    for ex in examples:
        out = encode_with(renderer, ex, train_on, max_seq_len)
        (encoded if isinstance(out, Encoded) else dropped).append(out)
    return encoded, compute_stats(encoded, dropped, batch_size=batch_size)
