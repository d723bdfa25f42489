"""Engine invariances (float32): packed == one by one, padded == one by one, no pad target trained,
K micro-batches == one big batch, compiled == eager, grad checkpointing changes nothing."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlxsft import _mlxlm
from mlxsft.data.batching import Batch, epoch_batches, make_batch, plan_epoch
from mlxsft.data.types import Encoded
from mlxsft.model.lora import apply_adapters
from mlxsft.train.loss import ce_sum
from mlxsft.train.step import enable_grad_checkpoint, make_eval_step, make_train_step

ARCHS = ["tiny_llama", "tiny_qwen2", "tiny_gemma", "tiny_phi3"]


def dataset(n: int = 9, seed: int = 0, max_tokens: int = 24) -> list[Encoded]:
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        length = int(rng.integers(4, max_tokens + 1))
        ids = rng.integers(3, 500, size=length).astype(np.int32)
        mask = (rng.random(length) < 0.7).astype(np.int32)
        mask[0] = 0
        out.append(Encoded(ids, mask, f"t:{k}"))
    return out


def lora_model(path, seed: int = 0, dropout: float = 0.0) -> nn.Module:
    """A LoRA model whose adapters are non-zero (so every adapter gradient is non-trivial)."""
    model = _mlxlm.load_model(path)[0]
    mx.random.seed(seed)
    apply_adapters(model, fine_tune_type="lora", rank=4, alpha=8.0, dropout=dropout)
    rng = np.random.default_rng(seed)
    model.load_weights(
        [
            (k, v + mx.array(0.05 * rng.standard_normal(v.shape).astype(np.float32)))
            for k, v in tree_flatten(model.trainable_parameters())
            if k.endswith("lora_b")
        ],
        strict=False,
    )
    return model


def batch_loss(model, b: Batch) -> tuple[mx.array, mx.array]:
    seg = mx.array(b.segment_ids) if b.packed else None
    return ce_sum(model, mx.array(b.inputs), mx.array(b.targets), mx.array(b.target_mask), seg)


def single(e: Encoded) -> Batch:
    """One example alone, unpadded."""
    n = e.n_tokens - 1
    return make_batch(
        [e], plan_epoch([e], batch_size=1, max_seq_len=n, pack=False, seed=0, epoch=0)[0]
    )


def total_loss_and_grads(model, batches: list[Batch]):
    def f(model):
        sums = [batch_loss(model, b) for b in batches]
        return sum(s for s, _ in sums), sum(n for _, n in sums)

    (total, n), grads = nn.value_and_grad(model, lambda: f(model))()
    return float(total), float(n), dict(tree_flatten(grads))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("pack", [True, False])
def test_batched_loss_and_grads_equal_one_by_one(request, arch, pack):
    model = lora_model(request.getfixturevalue(arch))
    data = dataset()
    batches = epoch_batches(data, batch_size=2, max_seq_len=40, pack=pack, seed=1, epoch=0)
    if pack:  # the test must exercise rows holding several examples
        assert max(int(b.segment_ids.max()) for b in batches) >= 2
    else:
        assert any((b.segment_ids == 0).any() for b in batches)  # padded rows
    total, n, grads = total_loss_and_grads(model, batches)
    ref_total, ref_n, ref_grads = total_loss_and_grads(model, [single(e) for e in data])
    assert n == ref_n == sum(int(e.loss_mask[1:].sum()) for e in data)
    assert total == pytest.approx(ref_total, rel=1e-5)
    assert grads.keys() == ref_grads.keys()
    for k in grads:
        scale = float(np.abs(ref_grads[k]).max())  # float32 summation order: relative to |g|
        np.testing.assert_allclose(grads[k], ref_grads[k], rtol=1e-4, atol=1e-5 * scale, err_msg=k)


@pytest.mark.parametrize("pack", [True, False])
def test_no_pad_target_is_trained(tiny_llama, pack):
    """Changing ids at padding (inputs and targets) changes neither the loss nor any gradient."""
    model = lora_model(tiny_llama)
    batches = epoch_batches(dataset(5), batch_size=2, max_seq_len=40, pack=pack, seed=0, epoch=0)
    junk = []
    rng = np.random.default_rng(5)
    for b in batches:
        pad = b.segment_ids == 0
        assert pad.any() and not b.target_mask[pad].any()
        inputs, targets = b.inputs.copy(), b.targets.copy()
        inputs[pad] = rng.integers(3, 500, size=int(pad.sum()))
        targets[pad] = rng.integers(3, 500, size=int(pad.sum()))
        junk.append(Batch(inputs, targets, b.target_mask, b.segment_ids, b.n_trained, b.packed))
    a = total_loss_and_grads(model, batches)
    b = total_loss_and_grads(model, junk)
    assert a[:2] == b[:2]
    for k in a[2]:
        np.testing.assert_array_equal(a[2][k], b[2][k])


def weights(model) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())}


@pytest.mark.parametrize("max_grad_norm", [None, 0.05])
def test_micro_batches_equal_one_big_batch(tiny_llama, max_grad_norm):
    data = dataset(16, seed=3)
    (big,) = epoch_batches(data, batch_size=8, max_seq_len=96, pack=True, seed=0, epoch=0)
    micro = big.split(4)
    assert len({m.n_trained for m in micro}) > 1  # unequal token counts: weighting matters
    before = weights(lora_model(tiny_llama))
    results = []
    for batches in ([big], micro):
        model = lora_model(tiny_llama)
        step = make_train_step(model, optim.SGD(learning_rate=1.0), max_grad_norm=max_grad_norm)
        loss, n = step(batches)
        results.append((loss, n, weights(model), step.last_grad_norm))
    (loss1, n1, w1, g1), (loss2, n2, w2, g2) = results
    assert n1 == n2 == big.n_trained
    assert loss1 == pytest.approx(loss2, rel=1e-5)
    assert g1 == pytest.approx(g2, rel=1e-4)
    # exact token weighting: the update is -(grad of summed CE) / N, clipped by global norm
    total, n, grads = total_loss_and_grads(lora_model(tiny_llama), [big])
    assert loss1 == pytest.approx(total / n, rel=1e-5)
    norm = float(np.sqrt(sum(np.sum((np.array(g) / n) ** 2) for g in grads.values())))
    assert g1 == pytest.approx(norm, rel=1e-4)
    factor = min(1.0, max_grad_norm / norm) if max_grad_norm else 1.0
    for k in w1:
        np.testing.assert_allclose(w1[k], w2[k], rtol=1e-5, atol=1e-6, err_msg=k)
        expected = before[k] - factor * np.array(grads[k]) / n
        np.testing.assert_allclose(w1[k], expected, rtol=1e-4, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_compiled_equals_eager(tiny_llama, dropout):
    data = dataset(12, seed=4)
    batches = epoch_batches(data, batch_size=2, max_seq_len=40, pack=True, seed=0, epoch=0)[:3]
    runs = []
    for compile in (True, False):
        model = lora_model(tiny_llama, dropout=dropout)
        mx.random.seed(42)
        step = make_train_step(model, optim.AdamW(1e-2), max_grad_norm=1.0, compile=compile)
        losses = [step([b]) for b in batches]
        runs.append((losses, weights(model), step.n_compilations))
    (l1, w1, c1), (l2, w2, c2) = runs
    assert c1 == 2 and c2 == 0  # one micro-step trace + one update trace for a fixed shape
    for (a, na), (b, nb) in zip(l1, l2, strict=True):
        assert na == nb and a == pytest.approx(b, rel=1e-5)
    for k in w1:
        np.testing.assert_allclose(w1[k], w2[k], rtol=1e-4, atol=1e-6, err_msg=k)


def test_dropout_draws_fresh_masks_under_compile(tiny_llama):
    model = lora_model(tiny_llama, dropout=0.5)
    step = make_train_step(model, optim.SGD(learning_rate=0.0), max_grad_norm=None)
    (b,) = epoch_batches(dataset(3), batch_size=4, max_seq_len=64, pack=True, seed=0, epoch=0)
    first, second = step([b])[0], step([b])[0]  # lr 0: only the dropout mask differs
    assert first != second
    assert step.n_compilations == 2


def test_compilations_bounded_and_eval_matches(tiny_llama):
    model = lora_model(tiny_llama)
    step = make_train_step(model, optim.Adam(1e-2), max_grad_norm=1.0)
    eval_step = make_eval_step(model)
    data = dataset(30, seed=6)
    batches = epoch_batches(data, batch_size=2, max_seq_len=40, pack=True, seed=0, epoch=0)
    padded = epoch_batches(data[:4], batch_size=2, max_seq_len=40, pack=False, seed=0, epoch=0)
    before = float(eval_step(batches[0])[0])
    assert eval_step.n_compilations == 1
    for b in batches:
        step([b])
    assert step.n_compilations == 2
    # the compiled eval step sees the updated weights (model state is a compiled input), with
    # no new trace
    assert float(eval_step(batches[0])[0]) != pytest.approx(before, rel=1e-3)
    assert eval_step.n_compilations == 1
    for b in batches[:2] + padded:
        s, n = eval_step(b)
        ref_s, ref_n = batch_loss(model, b)
        assert float(n) == float(ref_n) == b.n_trained
        assert float(s) == pytest.approx(float(ref_s), rel=1e-5)


def test_all_reduce_sums_tokens_grads_and_loss(tiny_llama):
    """Two identical ranks (all_reduce = x * 2) take exactly the single-rank step."""
    (b,) = epoch_batches(dataset(6), batch_size=2, max_seq_len=64, pack=True, seed=0, epoch=0)
    out = []
    for all_reduce in (None, lambda x: 2 * x):
        model = lora_model(tiny_llama)
        step = make_train_step(model, optim.SGD(0.5), max_grad_norm=None, all_reduce=all_reduce)
        out.append((step([b]), weights(model)))
    (r1, w1), (r2, w2) = out
    assert r2[1] == 2 * r1[1] and r2[0] == pytest.approx(r1[0], rel=1e-6)
    for k in w1:
        np.testing.assert_allclose(w1[k], w2[k], rtol=1e-6, atol=1e-7, err_msg=k)


@pytest.mark.parametrize(
    "kind,fixture", [("lora", "tiny_llama_q4"), ("dora", "tiny_llama_q4"), ("full", "tiny_llama")]
)
def test_step_trains_only_what_it_should(request, kind, fixture):
    model = _mlxlm.load_model(request.getfixturevalue(fixture))[0]
    apply_adapters(model, fine_tune_type=kind, rank=4)
    frozen = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    trainable = set(weights(model))
    step = make_train_step(model, optim.Adam(1e-2), max_grad_norm=1.0)
    (b,) = epoch_batches(dataset(4), batch_size=2, max_seq_len=64, pack=True, seed=0, epoch=0)
    losses = [step([b])[0] for _ in range(4)]
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    after = dict(tree_flatten(model.parameters()))
    for k, v in frozen.items():
        changed = not np.array_equal(np.array(after[k]), v)
        assert changed == (k in trainable), k


def test_grad_checkpoint_per_instance(tiny_llama):
    plain, ckpt = lora_model(tiny_llama), lora_model(tiny_llama)
    cls = type(plain.layers[0])
    enable_grad_checkpoint(ckpt)
    assert type(ckpt.layers[0]) is not cls and isinstance(ckpt.layers[0], cls)
    assert type(plain.layers[0]) is cls  # the class itself and other instances are untouched
    assert cls.__call__ is not type(ckpt.layers[0]).__call__
    batches = epoch_batches(dataset(4), batch_size=2, max_seq_len=40, pack=True, seed=0, epoch=0)
    a = total_loss_and_grads(plain, batches)
    b = total_loss_and_grads(ckpt, batches)
    assert a[0] == pytest.approx(b[0], rel=1e-6) and a[1] == b[1]
    for k in a[2]:
        np.testing.assert_allclose(a[2][k], b[2][k], rtol=1e-5, atol=1e-7, err_msg=k)
    for model in (plain, ckpt):  # and inside the compiled step
        make_train_step(model, optim.SGD(1.0), max_grad_norm=None)(batches)
    wa, wb = weights(plain), weights(ckpt)
    for k in wa:
        np.testing.assert_allclose(wa[k], wb[k], rtol=1e-5, atol=1e-7, err_msg=k)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gemma"])
def test_selective_head_step_equals_full(request, fixture):
    """The chunked/selective LM-head loss slots in behind the same step: same losses, weights."""
    path = request.getfixturevalue(fixture)
    batches = epoch_batches(
        dataset(30, seed=8), batch_size=2, max_seq_len=32, pack=True, seed=0, epoch=0
    )
    runs = []
    for kw in ({}, {"loss": "selective", "chunk_size": 16}):
        model = lora_model(path)
        # SGD: the update is linear in the gradient, so weights compare gradients; Adam's
        # normalisation would magnify float-rounding differences of near-zero gradients.
        step = make_train_step(model, optim.SGD(learning_rate=0.5), max_grad_norm=1.0, **kw)
        losses = [step([b])[0] for b in batches[:3]] + [step(batches[3].split(2))[0]]
        eval_step = make_eval_step(model, **kw)
        runs.append((losses, weights(model), float(eval_step(batches[0])[0]), step.n_compilations))
    (l1, w1, e1, c1), (l2, w2, e2, c2) = runs
    np.testing.assert_allclose(l2, l1, rtol=1e-5)
    assert e2 == pytest.approx(e1, rel=1e-5)
    assert c1 == 4 and 4 <= c2 <= 1 + 2 * 8  # bounded by the head's buckets
    for k in w1:
        np.testing.assert_allclose(w2[k], w1[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_grouped_all_reduce(monkeypatch):
    from mlxsft.train import step as step_mod

    monkeypatch.setattr(step_mod, "REDUCE_GROUP", 10)
    tree = {
        "a": mx.arange(6, dtype=mx.float32).reshape(2, 3),
        "b": [mx.ones((4,)), mx.full((3,), 2.0, dtype=mx.bfloat16)],
        "c": mx.arange(5, dtype=mx.float32),
    }
    calls = []

    def reduce(x):
        calls.append((x.size, x.dtype))
        return x * 3

    out = step_mod._reduce_grouped(reduce, tree)
    assert calls == [(10, mx.float32), (3, mx.bfloat16), (5, mx.float32)]
    for (k, got), (_, want) in zip(tree_flatten(out), tree_flatten(tree), strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape, k
        np.testing.assert_array_equal(
            np.array(got.astype(mx.float32)), 3 * np.array(want.astype(mx.float32))
        )


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_bfloat16_base_trains_float32_adapters(tiny_checkpoint, kind):
    model = _mlxlm.load_model(tiny_checkpoint("llama", dtype="bfloat16"))[0]
    assert model.layers[0].self_attn.q_proj.weight.dtype == mx.bfloat16
    apply_adapters(model, fine_tune_type=kind, rank=4)
    step = make_train_step(model, optim.Adam(1e-2), max_grad_norm=1.0)
    (b,) = epoch_batches(dataset(4), batch_size=2, max_seq_len=64, pack=True, seed=0, epoch=0)
    losses = [step([b])[0] for _ in range(4)]
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    assert {v.dtype for _, v in tree_flatten(model.trainable_parameters())} == {mx.float32}
    s, n = make_eval_step(model)(b)
    assert s.dtype == mx.float32 and float(n) == b.n_trained
