"""Validation loss: the same masks, batches and loss as training, summed over ranks; and the
`mlxsft eval` entry point."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx

from mlxsft.config import TrainConfig
from mlxsft.data.batching import make_batch, plan_epoch
from mlxsft.data.types import Encoded
from mlxsft.errors import UserError
from mlxsft.train.distributed import World, init_world


def evaluate(
    eval_step: Any,
    encoded: Sequence[Encoded],
    *,
    batch_size: int,
    max_seq_len: int,
    pack: bool,
    world: World,
    on_batch: Callable[[int, int], None] | None = None,
) -> tuple[float, int]:
    """(mean CE over trained tokens, trained tokens) over all of `encoded` in file order; each
    rank evaluates its rows of every batch and the sums are all-reduced. `on_batch(done, total)`
    is called after each batch (progress)."""
    plans = plan_epoch(
        encoded,
        batch_size=batch_size,
        max_seq_len=max_seq_len,
        pack=pack,
        seed=0,
        epoch=0,
        shuffle=False,
    )
    total, count = mx.array(0.0), mx.array(0.0)
    for i, plan in enumerate(plans, start=1):
        s, n = eval_step(world.shard(make_batch(encoded, plan)))
        total, count = total + s, count + n
        mx.eval(total, count)
        if on_batch is not None:
            on_batch(i, len(plans))
    if world.size > 1:
        total, count = world.all_reduce([total, count])
    n_tokens = int(count.item())
    return float(total.item()) / max(n_tokens, 1), n_tokens


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 700.0))


def default_split(data: str) -> str:
    """A DATA directory is evaluated on test, else valid, else train; a file on itself."""
    if not Path(data).is_dir():
        return "train"
    from mlxsft.data.reading import find_splits

    found = find_splits(data)
    return next(s for s in ("test", "valid", "train") if s in found)


def evaluate_model(
    cfg: TrainConfig,
    *,
    split: str | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """`mlxsft eval`: loss, perplexity and trained tokens of cfg.model (+ cfg.adapter) on
    cfg.data, batched and masked as training does (`on_batch` as in `evaluate`)."""
    from mlxsft.model.attention import use_block_attention
    from mlxsft.train.loss import choose_loss
    from mlxsft.train.setup import encode_rows, load_model, read_split, use_packing
    from mlxsft.train.step import make_eval_step

    if not cfg.model or not cfg.data:
        raise UserError("eval needs --model and --data")
    split = split or default_split(cfg.data)
    rows = read_split(cfg, cfg.data, split)
    loaded, _, notes = load_model(cfg, train=False)
    for line in notes:
        print(line, file=sys.stderr)
    model = loaded.model
    use_block_attention(model)
    label = split if Path(cfg.data).is_dir() else Path(cfg.data).name
    encoded, note = encode_rows(cfg, loaded.tokenizer, rows, label)
    loss, n = evaluate(
        make_eval_step(model, loss=choose_loss(cfg.loss, model)),
        encoded,
        batch_size=cfg.batch_size,
        max_seq_len=cfg.max_seq_len,
        pack=use_packing(cfg, model),
        world=init_world(),
        on_batch=on_batch,
    )
    return {
        "split": label,  # the split of a DATA directory, else the file name
        "loss": loss,
        "perplexity": perplexity(loss),
        "tokens": n,
        "examples": len(encoded),
        "note": note,
    }
