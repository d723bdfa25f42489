"""Packing and padded bucketing: exact arrays, every example once per epoch, no pad target."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from mlxsft.data.batching import (
    Batch,
    bucket_len,
    epoch_batches,
    make_batch,
    pack_rows,
    plan_epoch,
)
from mlxsft.data.types import Encoded


def enc(ids: list[int], mask: list[int], source: str = "t:1") -> Encoded:
    return Encoded(np.asarray(ids, np.int32), np.asarray(mask, np.int32), source)


def random_dataset(n: int, max_tokens: int, seed: int = 0) -> list[Encoded]:
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        length = int(rng.integers(2, max_tokens + 1))
        ids = rng.integers(1, 100, size=length)
        ids[0] = 1000 + k  # the first token identifies the example
        mask = (rng.random(length) < 0.6).astype(np.int32)
        mask[0] = 0
        out.append(enc(ids.tolist(), mask.tolist(), f"t:{k}"))
    return out


def test_make_batch_exact_arrays_packed():
    data = [enc([5, 6, 7, 8], [0, 0, 1, 1]), enc([9, 10, 11], [0, 1, 1])]
    plan = plan_epoch(data, batch_size=2, max_seq_len=6, pack=True, seed=0, epoch=0)
    assert len(plan) == 1
    assert plan[0].rows == ((0, 1), ())
    b = make_batch(data, plan[0])
    np.testing.assert_array_equal(b.inputs, [[5, 6, 7, 9, 10, 0], [0] * 6])
    np.testing.assert_array_equal(b.targets, [[6, 7, 8, 10, 11, 0], [0] * 6])
    np.testing.assert_array_equal(b.target_mask, [[0, 1, 1, 1, 1, 0], [0] * 6])
    np.testing.assert_array_equal(b.segment_ids, [[1, 1, 1, 2, 2, 0], [0] * 6])
    assert b.n_trained == 4 and b.packed
    assert b.inputs.dtype == np.int32 and b.target_mask.dtype == np.float32


def test_pack_rows_best_fit_decreasing():
    # positions 7, 5, 4, 3, 2, 1 into rows of 8: 7 -> A; 5 -> B; 4 -> C; 3 -> B (best fit, 0 left);
    # 2 -> C (2 left); 1 -> A (0 left).
    rows = pack_rows(np.array([7, 5, 4, 3, 2, 1]), np.arange(6), 8)
    assert rows == [[0, 5], [1, 3], [2, 4]]


def test_bucket_len():
    assert bucket_len(1, 64) == 32
    assert bucket_len(33, 64) == 64
    assert bucket_len(100, 2048) == 128
    assert bucket_len(2000, 2048) == 2048
    assert bucket_len(30, 20) == 20


@pytest.mark.parametrize("pack", [True, False])
def test_every_example_once_and_no_pad_target(pack: bool):
    data = random_dataset(203, 40)
    total_trained = sum(int(e.loss_mask[1:].sum()) for e in data)
    for epoch in range(2):
        batches = epoch_batches(data, batch_size=4, max_seq_len=48, pack=pack, seed=3, epoch=epoch)
        shapes = {b.shape for b in batches}
        assert all(s[0] == 4 for s in shapes)
        if pack:
            assert shapes == {(4, 48)}
        else:
            assert {s[1] for s in shapes} <= {32, 48}
        seen = Counter()
        for b in batches:
            pad = b.segment_ids == 0
            assert not b.target_mask[pad].any()  # no pad target is ever trained
            assert b.n_trained == int(b.target_mask.sum())
            for r in range(b.shape[0]):
                for s in np.unique(b.segment_ids[r][b.segment_ids[r] > 0]):
                    seg = b.segment_ids[r] == s
                    seen[int(b.inputs[r][seg][0])] += 1
                    assert np.ptp(seg.nonzero()[0]) == seg.sum() - 1  # contiguous
                if not pack:
                    assert b.segment_ids[r].max() <= 1
        assert seen == Counter({1000 + k: 1 for k in range(len(data))})
        assert sum(b.n_trained for b in batches) == total_trained


def test_plan_deterministic_and_varies_by_epoch():
    data = random_dataset(50, 30)
    kw = dict(batch_size=2, max_seq_len=32, seed=7)
    for pack in (True, False):
        a = plan_epoch(data, pack=pack, epoch=0, **kw)
        assert a == plan_epoch(data, pack=pack, epoch=0, **kw)
        assert a != plan_epoch(data, pack=pack, epoch=1, **kw)
        assert plan_epoch(data, pack=pack, epoch=0, shuffle=False, **kw) == plan_epoch(
            data, pack=pack, epoch=5, shuffle=False, **kw
        )


def test_no_pack_buckets_are_sorted_batches():
    data = random_dataset(40, 100)
    plans = plan_epoch(data, batch_size=4, max_seq_len=128, pack=False, seed=0, epoch=0)
    lens = [max(data[r[0]].n_tokens - 1 for r in p.rows if r) for p in plans]
    # Sorted chunks: each batch's lengths are a contiguous slice of the sorted lengths.
    spans = sorted(
        (
            min(data[r[0]].n_tokens for r in p.rows if r),
            max(data[r[0]].n_tokens for r in p.rows if r),
        )
        for p in plans
    )
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))
    assert all(p.seq_len == bucket_len(n, 128) for p, n in zip(plans, lens, strict=True))


def test_too_long_example_asserts():
    with pytest.raises(AssertionError):
        plan_epoch([10], batch_size=1, max_seq_len=8, pack=True, seed=0, epoch=0)
    plan_epoch([9], batch_size=1, max_seq_len=8, pack=True, seed=0, epoch=0)  # 8 positions fit


def test_split_rows():
    data = random_dataset(8, 10)
    (b,) = epoch_batches(data, batch_size=8, max_seq_len=16, pack=False, seed=0, epoch=0)
    parts = b.split(4)
    assert [p.shape[0] for p in parts] == [2] * 4
    assert sum(p.n_trained for p in parts) == b.n_trained
    np.testing.assert_array_equal(np.concatenate([p.inputs for p in parts]), b.inputs)
    assert isinstance(parts[0], Batch)


def test_plan_shard_matches_batch_split():
    data = random_dataset(30, 20)
    for plan in plan_epoch(data, batch_size=4, max_seq_len=32, pack=True, seed=0, epoch=0):
        whole = make_batch(data, plan).split(2)
        for rank in range(2):
            part = make_batch(data, plan.shard(rank, 2))
            np.testing.assert_array_equal(part.inputs, whole[rank].inputs)
            np.testing.assert_array_equal(part.target_mask, whole[rank].target_mask)
            assert part.n_trained == whole[rank].n_trained
