"""Fixed-shape training batches: best-fit-decreasing packing or padded length buckets (NumPy only).

An example of n tokens contributes n - 1 positions: inputs = ids[:-1], targets = ids[1:],
target mask = loss_mask[1:]. A row holds `seq_len` positions; `segment_ids` numbers the examples
in a row 1..k (0 = padding) so the loss can build a block-diagonal causal attention mask.

`plan_epoch` decides which examples go in which row of which batch (cheap, deterministic from
(seed, epoch), so a resume can skip to a cursor); `make_batch` fills the arrays for one plan.
Invariants (tested): every example appears exactly once per epoch, and no padding position is
ever a trained target.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mlxsft.data.types import Encoded

# Bucket step for padded (--no-pack) batches: lengths round up to a multiple of this, so at most
# ~max_seq_len / step distinct shapes are compiled.
MIN_BUCKET = 32
MAX_BUCKETS = 16


@dataclass
class Batch:
    """One fixed-shape batch. All arrays are (B, L)."""

    inputs: np.ndarray  # (B, L) int32
    targets: np.ndarray  # (B, L) int32
    target_mask: np.ndarray  # (B, L) float32, 1 = trained target
    segment_ids: np.ndarray  # (B, L) int32, 0 = padding, 1..k = example within the row
    n_trained: int  # target_mask.sum()
    packed: bool = True  # False: at most one example per row, so a plain causal mask suffices

    @property
    def shape(self) -> tuple[int, int]:
        return self.inputs.shape  # type: ignore[return-value]

    def split(self, n: int) -> list[Batch]:
        """`n` equal row slices (micro-batches or ranks); B must be divisible by n."""
        b = self.inputs.shape[0]
        assert b % n == 0, f"batch of {b} rows does not split into {n}"
        k = b // n
        return [self.rows(slice(i * k, (i + 1) * k)) for i in range(n)]

    def rows(self, index: slice | np.ndarray) -> Batch:
        mask = self.target_mask[index]
        return Batch(
            self.inputs[index],
            self.targets[index],
            mask,
            self.segment_ids[index],
            int(mask.sum()),
            self.packed,
        )


@dataclass(frozen=True)
class BatchPlan:
    """Which examples fill each row of a batch (`()` = an empty, fully masked row)."""

    rows: tuple[tuple[int, ...], ...]
    seq_len: int
    packed: bool

    @property
    def examples(self) -> list[int]:
        return [i for row in self.rows for i in row]

    def shard(self, index: int, n_shards: int) -> BatchPlan:
        """Rows of shard `index` of `n_shards` (data parallel: plan batch_size * world rows, each
        rank takes its shard; every rank then runs the same number of steps)."""
        assert len(self.rows) % n_shards == 0, f"{len(self.rows)} rows into {n_shards} shards"
        k = len(self.rows) // n_shards
        return BatchPlan(self.rows[index * k : (index + 1) * k], self.seq_len, self.packed)


def _positions(lengths_or_encoded: Sequence[int] | Sequence[Encoded]) -> np.ndarray:
    """Trained-position count (tokens - 1) of each example."""
    lengths = [x.n_tokens if isinstance(x, Encoded) else int(x) for x in lengths_or_encoded]
    return np.maximum(np.asarray(lengths, dtype=np.int64) - 1, 0)


def bucket_len(n_positions: int, max_seq_len: int) -> int:
    """Padded row length for a batch whose longest example has `n_positions` positions."""
    step = max(MIN_BUCKET, -(-max_seq_len // MAX_BUCKETS))
    return int(min(max_seq_len, max(step, -(-n_positions // step) * step)))


def pack_rows(positions: np.ndarray, order: np.ndarray, capacity: int) -> list[list[int]]:
    """Best-fit decreasing: examples (visited longest first, ties in `order`) go into the row
    whose remaining space is smallest but sufficient; a new row when none fits."""
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    visit = sorted(range(len(positions)), key=lambda i: (-positions[i], rank[i]))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (remaining capacity, row index)
    for i in visit:
        need = int(positions[i])
        j = bisect_left(free, (need, -1))
        if j < len(free):
            space, r = free.pop(j)
        else:
            space, r = capacity, len(rows)
            rows.append([])
        rows[r].append(i)
        insort(free, (space - need, r))
    return rows


def plan_epoch(
    lengths_or_encoded: Sequence[int] | Sequence[Encoded],
    *,
    batch_size: int,
    max_seq_len: int,
    pack: bool,
    seed: int,
    epoch: int,
    shuffle: bool = True,
) -> list[BatchPlan]:
    """The batches of one epoch, deterministic from (seed, epoch).

    `max_seq_len` is the row length in positions; every example must already be truncated to at
    most max_seq_len + 1 tokens. The last batch is padded with empty rows so shapes stay fixed.
    """
    positions = _positions(lengths_or_encoded)
    assert batch_size >= 1 and max_seq_len >= 1
    too_long = np.flatnonzero(positions > max_seq_len)
    assert too_long.size == 0, f"example {too_long[:1]} longer than max_seq_len (truncate first)"
    rng = np.random.default_rng([seed, epoch])
    n = len(positions)
    order = rng.permutation(n) if shuffle else np.arange(n)
    if pack:
        rows = pack_rows(positions, order, max_seq_len)
        if shuffle:
            rows = [rows[i] for i in rng.permutation(len(rows))]
        groups = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
        plans = [_plan(g, batch_size, max_seq_len, True) for g in groups]
    else:
        # Real length bucketing: sort by length (random tie-break), then cut into batches.
        by_len = sorted(order.tolist(), key=lambda i: positions[i])
        groups = [[[i] for i in by_len[k : k + batch_size]] for k in range(0, n, batch_size)]
        plans = [
            _plan(g, batch_size, bucket_len(max(int(positions[r[0]]) for r in g), max_seq_len))
            for g in groups
        ]
    if shuffle:
        plans = [plans[i] for i in rng.permutation(len(plans))]
    return plans


def _plan(rows: list[list[int]], batch_size: int, seq_len: int, packed: bool = False) -> BatchPlan:
    padded = [tuple(r) for r in rows] + [()] * (batch_size - len(rows))
    return BatchPlan(tuple(padded), seq_len, packed)


def make_batch(encoded: Sequence[Encoded], plan: BatchPlan) -> Batch:
    """Fill the arrays for one plan (padding: id 0, target 0, mask 0, segment 0)."""
    b, length = len(plan.rows), plan.seq_len
    inputs = np.zeros((b, length), np.int32)
    targets = np.zeros((b, length), np.int32)
    target_mask = np.zeros((b, length), np.float32)
    segment_ids = np.zeros((b, length), np.int32)
    for r, row in enumerate(plan.rows):
        pos = 0
        for seg, i in enumerate(row, start=1):
            ids, mask = encoded[i].input_ids, encoded[i].loss_mask
            n = max(len(ids) - 1, 0)
            assert pos + n <= length, f"example {i} does not fit its row"
            inputs[r, pos : pos + n] = ids[:-1]
            targets[r, pos : pos + n] = ids[1:]
            target_mask[r, pos : pos + n] = mask[1:]
            segment_ids[r, pos : pos + n] = seg
            pos += n
    return Batch(inputs, targets, target_mask, segment_ids, int(target_mask.sum()), plan.packed)


def epoch_batches(
    encoded: Sequence[Encoded],
    *,
    batch_size: int,
    max_seq_len: int,
    pack: bool,
    seed: int,
    epoch: int,
    shuffle: bool = True,
) -> list[Batch]:
    """Convenience: `make_batch` for every plan of `plan_epoch` (small datasets, tests)."""
    plans = plan_epoch(
        encoded,
        batch_size=batch_size,
        max_seq_len=max_seq_len,
        pack=pack,
        seed=seed,
        epoch=epoch,
        shuffle=shuffle,
    )
    return [make_batch(encoded, p) for p in plans]
