"""Selective chunked cross-entropy == the full-logits loss, in value and gradients."""

from __future__ import annotations

import warnings

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlxsft import _mlxlm
from mlxsft.train import loss as loss_module
from mlxsft.train.loss import (
    choose_loss,
    default_chunk_size,
    full_ce,
    select_bucket,
    selective_ce,
)

B, L = 2, 24


def _batch(vocab: int, seed: int = 0, packed: bool = True):
    rng = np.random.default_rng(seed)
    inputs = mx.array(rng.integers(3, vocab, (B, L)), mx.int32)
    targets = mx.array(rng.integers(3, vocab, (B, L)), mx.int32)
    seg = np.ones((B, L), np.int32)
    seg[0, 10:] = 2  # two examples packed in row 0
    seg[1, 20:] = 0  # padding at the end of row 1
    tmask = (rng.random((B, L)) < 0.4) & (seg > 0)
    mask = _mlxlm.block_causal_mask(mx.array(seg)) if packed else None
    return inputs, targets, mx.array(tmask.astype(np.float32)), mask


def _value_and_grads(model: nn.Module, fn, batch, **kw):
    def loss(params):
        model.update(params)
        return fn(model, *batch, **kw)

    value, grads = mx.value_and_grad(loss)(model.trainable_parameters())
    return float(value), dict(tree_flatten(grads))


def _assert_same(model, batch, atol=2e-5, **kw):
    v0, g0 = _value_and_grads(model, full_ce, batch)
    v1, g1 = _value_and_grads(model, selective_ce, batch, **kw)
    assert v1 == pytest.approx(v0, rel=1e-5)
    assert g0.keys() == g1.keys() and g0
    for name in g0:
        np.testing.assert_allclose(np.array(g1[name]), np.array(g0[name]), atol=atol, err_msg=name)


@pytest.mark.parametrize(
    "fixture", ["tiny_llama", "tiny_llama_base", "tiny_qwen2", "tiny_gemma", "tiny_phi3"]
)
def test_loss_and_all_gradients_match_plain(request, fixture):
    model, _ = _mlxlm.load_model(request.getfixturevalue(fixture))
    batch = _batch(model.args.vocab_size)
    n = int(batch[2].sum().item())
    _assert_same(model, batch, chunk_size=5, n_select=select_bucket(n, B * L))


def test_gemma2_soft_capping(tiny_checkpoint):
    model, _ = _mlxlm.load_model(tiny_checkpoint("gemma2", tie_word_embeddings=True))
    assert model.final_logit_softcapping == 30.0
    _assert_same(model, _batch(model.args.vocab_size), atol=5e-5, chunk_size=7)


def test_unpacked_and_no_selection(tiny_llama):
    model, _ = _mlxlm.load_model(tiny_llama)
    batch = _batch(model.args.vocab_size, seed=1, packed=False)
    _assert_same(model, batch, n_select=B * L)  # K = all positions, one chunk


def test_quantized_frozen_head(tiny_llama_q4):
    model, _ = _mlxlm.load_model(tiny_llama_q4)
    assert type(model.lm_head) is nn.QuantizedLinear
    model.freeze()
    model.model.norm.unfreeze()
    model.model.layers[1].input_layernorm.unfreeze()
    _assert_same(model, _batch(model.args.vocab_size), chunk_size=4)


def test_compiled_equals_eager_and_retraces_per_bucket(tiny_llama):
    model, _ = _mlxlm.load_model(tiny_llama)
    inputs, targets, tmask, mask = _batch(model.args.vocab_size)
    traces = []

    def fn(inputs, targets, tmask, mask, k):
        traces.append(k)
        return selective_ce(model, inputs, targets, tmask, mask, n_select=k, chunk_size=8)

    compiled = mx.compile(fn)
    k = select_bucket(int(tmask.sum().item()), B * L)
    eager = fn(inputs, targets, tmask, mask, k).item()
    for kk in (k, k, B * L):
        assert compiled(inputs, targets, tmask, mask, kk).item() == pytest.approx(eager, 1e-6)
    assert traces == [k, k, B * L]  # eager call, then one trace per distinct bucket


def test_select_bucket_and_chunk_size():
    assert [select_bucket(n, 48) for n in (0, 1, 6, 7, 18, 47, 48)] == [6, 6, 6, 12, 18, 48, 48]
    assert select_bucket(1000, 4096) == 1024
    assert default_chunk_size(32768) == 128
    assert default_chunk_size(151936) == 64  # 27 rows -> at least 64
    assert default_chunk_size(1 << 30) == 64


def test_unknown_architecture_falls_back_and_says_so(tiny_llama):
    model, _ = _mlxlm.load_model(tiny_llama)
    model.model_type = "mystery"
    batch = _batch(model.args.vocab_size)
    loss_module._warned.clear()
    with pytest.warns(UserWarning, match="selective loss disabled.*mystery"):
        got = selective_ce(model, *batch[:3]).item()
    assert got == pytest.approx(full_ce(model, *batch[:3]).item(), rel=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once, not every step
        selective_ce(model, *batch[:3])


def test_trainable_head_with_bias_falls_back(tiny_llama):
    model, _ = _mlxlm.load_model(tiny_llama)
    model.lm_head = nn.Linear(model.args.hidden_size, model.args.vocab_size, bias=True)
    loss_module._warned.clear()
    with pytest.warns(UserWarning, match="trainable Linear LM head"):
        _assert_same(model, _batch(model.args.vocab_size))


def test_peak_memory_is_a_fraction_of_full_logits():
    config = {
        "model_type": "llama",
        "vocab_size": 8192,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
    }
    model = _mlxlm.build_model(config)
    model.freeze()
    model.model.norm.unfreeze()  # LoRA-like: the head is frozen
    mx.eval(model.parameters())
    rng = np.random.default_rng(0)
    shape = (2, 256)
    inputs = mx.array(rng.integers(0, 8192, shape), mx.int32)
    targets = mx.array(rng.integers(0, 8192, shape), mx.int32)
    tmask = mx.array((rng.random(shape) < 0.5).astype(np.float32))
    peaks = {}
    for fn in (full_ce, selective_ce):
        mx.eval(inputs, targets, tmask)
        mx.clear_cache()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        _value_and_grads(
            model,
            fn,
            (inputs, targets, tmask),
            **({"chunk_size": 16} if fn is selective_ce else {}),
        )
        peaks[fn.__name__] = mx.get_peak_memory() - base
    logits_bytes = 2 * 256 * 8192 * 4  # 16 MB of float32 logits
    assert peaks["full_ce"] > logits_bytes
    assert peaks["selective_ce"] < 0.3 * peaks["full_ce"], peaks


def test_bfloat16_model(tiny_checkpoint):
    model, _ = _mlxlm.load_model(tiny_checkpoint("llama", dtype="bfloat16"))
    assert model.model.norm.weight.dtype == mx.bfloat16
    batch = _batch(model.args.vocab_size)
    v0, g0 = _value_and_grads(model, full_ce, batch)
    v1, g1 = _value_and_grads(model, selective_ce, batch, chunk_size=6)
    assert v1 == pytest.approx(v0, rel=1e-3)
    for name in g0:  # bf16 gradients: compare relative to the gradient's scale
        a, b = np.array(g0[name].astype(mx.float32)), np.array(g1[name].astype(mx.float32))
        assert np.abs(a - b).max() <= 0.02 * np.abs(a).max() + 1e-6, name


def test_compiled_train_step_same_update_as_full_logits(tiny_llama):
    """The engine's compiled LoRA step: selective loss == full-logits loss, loss and update."""
    import mlx.optimizers as optim

    from mlxsft.data.batching import Batch
    from mlxsft.model.lora import apply_adapters
    from mlxsft.train.step import make_train_step

    inputs, targets, tmask, _ = _batch(512)
    seg = np.ones((B, L), np.int32)
    seg[0, 10:] = 2
    seg[1, 20:] = 0
    batch = Batch(
        np.array(inputs), np.array(targets), np.array(tmask), seg, int(np.array(tmask).sum())
    )
    results = []
    for kind in ("full", "selective"):
        model, _ = _mlxlm.load_model(tiny_llama)
        mx.random.seed(0)
        apply_adapters(model, rank=4)
        step = make_train_step(model, optim.Adam(1e-2), max_grad_norm=None, loss=kind)
        loss, n = step([batch])
        loss2, _ = step([batch])
        params = dict(tree_flatten(model.trainable_parameters()))
        results.append((loss, loss2, n, params))
    (l0, l0b, n0, p0), (l1, l1b, n1, p1) = results
    assert n0 == n1 == batch.n_trained
    assert l1 == pytest.approx(l0, rel=1e-5) and l1b == pytest.approx(l0b, rel=1e-4)
    for name in p0:
        np.testing.assert_allclose(np.array(p1[name]), np.array(p0[name]), atol=1e-4)


def test_selective_only_for_a_large_vocabulary(tiny_llama):
    small, _ = _mlxlm.load_model(tiny_llama)
    assert small.args.vocab_size < loss_module.SELECTIVE_MIN_VOCAB
    assert choose_loss("selective", small) == "full"
    assert choose_loss("full", small) == "full"
    big = _mlxlm.build_model(
        {
            "model_type": "llama",
            "vocab_size": loss_module.SELECTIVE_MIN_VOCAB,
            "hidden_size": 8,
            "intermediate_size": 8,
            "num_hidden_layers": 1,
            "num_attention_heads": 1,
            "rms_norm_eps": 1e-6,
        }
    )
    assert choose_loss("selective", big) == "selective"
    assert choose_loss("full", big) == "full"
