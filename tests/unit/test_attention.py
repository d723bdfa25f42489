"""Block-causal attention (mlxsft/model/attention.py) == MLX's own attention: outputs and
gradients, plain causal and packed masks, and inside every verified architecture."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from helpers_layers import compiled_peak, lora_model, trainable_grads

from mlxsft import _mlxlm
from mlxsft.model.attention import (
    RECOMPUTE_FROM,
    causal_attention,
    handles_mask,
    kept_fraction,
    use_block_attention,
)


def _qkv(B: int, H: int, KV: int, L: int, D: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    return tuple(mx.array(rng.normal(size=(B, h, L, D)).astype(np.float32)) for h in (H, KV, KV))


def _packed_mask(B: int, L: int) -> mx.array:
    seg = np.ones((B, L), np.int32)
    seg[0, L // 3 :] = 2  # two examples in row 0
    if B > 1:
        seg[1, L - 5 :] = 0  # padding at the end of row 1
    return _mlxlm.block_causal_mask(mx.array(seg))


def _reference(q, k, v, mask):
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=0.3, mask=mask)


@pytest.mark.parametrize("L,block", [(1, 4), (7, 4), (8, 4), (37, 8), (40, 128), (64, 16)])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("recompute", [False, True])
def test_same_outputs_and_gradients_as_mlx_attention(L, block, packed, recompute):
    B, H, KV = 2, 6, 2  # grouped-query heads: 3 queries per key
    q, k, v = _qkv(B, H, KV, L)
    mask = _packed_mask(B, L) if packed else "causal"
    cot = mx.array(np.random.default_rng(1).normal(size=(B, H, L, 8)).astype(np.float32))

    def ours(q, k, v):
        return causal_attention(q, k, v, 0.3, mask, block=block, recompute=recompute)

    def ref(q, k, v):
        return _reference(q, k, v, mask)

    out, grads = mx.vjp(ours, [q, k, v], [cot])
    out_ref, grads_ref = mx.vjp(ref, [q, k, v], [cot])
    np.testing.assert_allclose(np.array(out[0]), np.array(out_ref[0]), atol=2e-6)
    for name, g, g_ref in zip("qkv", grads, grads_ref, strict=True):
        np.testing.assert_allclose(np.array(g), np.array(g_ref), atol=5e-6, err_msg=name)


def test_blocks_skip_hidden_keys():
    """A key after every query of a block never reaches it: changing the last key's value
    leaves every earlier output unchanged (exactly), as causality says."""
    q, k, v = _qkv(1, 2, 2, 12)
    v2 = mx.concatenate([v[:, :, :-1], v[:, :, -1:] + 100.0], axis=2)
    a = causal_attention(q, k, v, 0.5, None, block=4)
    b = causal_attention(q, k, v2, 0.5, None, block=4)
    np.testing.assert_array_equal(np.array(a[:, :, :-1]), np.array(b[:, :, :-1]))
    assert not np.allclose(np.array(a[:, :, -1]), np.array(b[:, :, -1]))


def test_handles_only_masks_it_understands():
    assert handles_mask(None, 5) and handles_mask("causal", 5)
    assert handles_mask(_packed_mask(2, 5), 5)
    assert not handles_mask(mx.zeros((2, 1, 5, 5)), 5)  # additive float mask: model's own code
    assert not handles_mask(_packed_mask(2, 5), 6)
    assert not handles_mask(mx.ones((2, 5, 5), mx.bool_), 5)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("packed,recompute", [(False, False), (True, False), (True, True)])
def test_models_train_the_same_with_block_attention(tiny_checkpoint, arch, packed, recompute):
    path = tiny_checkpoint(arch, n_layers=2, n_heads=4, n_kv_heads=2)
    models = [lora_model(path), lora_model(path)]
    assert use_block_attention(models[1], recompute=recompute) == 2
    assert type(models[1].layers[0].self_attn).__name__.startswith("BlockAttention")
    L = 300  # three blocks of 128, the last one partial
    inputs = mx.array(np.random.default_rng(0).integers(3, 500, (2, L)), mx.int32)
    mask = _packed_mask(2, L) if packed else None
    v0, g0 = trainable_grads(models[0], inputs, mask)
    v1, g1 = trainable_grads(models[1], inputs, mask)
    if recompute:  # compiled too: mx.compile must not merge the recomputation with the forward
        v2, g2 = trainable_grads(models[1], inputs, mask, compiled=True)
        assert v2 == pytest.approx(v1, rel=1e-5) and g2.keys() == g1.keys()
        for name in g1:
            np.testing.assert_allclose(np.array(g2[name]), np.array(g1[name]), atol=1e-6)
    assert v1 == pytest.approx(v0, rel=1e-5, abs=1e-6)
    assert g0.keys() == g1.keys() and len(g0) == 2 * 7 * 2
    for name in g0:
        np.testing.assert_allclose(np.array(g1[name]), np.array(g0[name]), atol=1e-5, err_msg=name)


def test_generation_and_other_architectures_keep_their_own_code(tiny_checkpoint, monkeypatch):
    model, _ = _mlxlm.load_model(tiny_checkpoint("llama"))
    use_block_attention(model)
    attn = model.layers[0].self_attn
    x = mx.array(np.random.default_rng(0).normal(size=(1, 5, 64)).astype(np.float32))
    cache = _mlxlm.make_cache(model)[0]
    calls = []
    monkeypatch.setattr("mlxsft.model.attention.causal_attention", lambda *a: calls.append(a))
    attn(x, mask="causal", cache=cache)  # with a KV cache: mlx-lm's code, not ours
    assert calls == [] and _mlxlm.cache_lengths([cache]) == [5]
    for arch in ("gemma", "phi3"):  # not verified: untouched
        other, _ = _mlxlm.load_model(tiny_checkpoint(arch))
        assert use_block_attention(other) == 0


def test_switch_off_for_comparisons(tiny_checkpoint, monkeypatch):
    model, _ = _mlxlm.load_model(tiny_checkpoint("llama"))
    monkeypatch.setenv("MLXSFT_BLOCK_ATTENTION", "0")
    assert use_block_attention(model) == 0
    assert not type(model.layers[0].self_attn).__name__.startswith("BlockAttention")


def test_recompute_keeps_no_probabilities_even_when_compiled(tiny_checkpoint):
    """Under mx.compile the recomputation must stay a separate computation (else compile merges
    it with the forward pass and the probabilities stay alive): the compiled peak drops by about
    the kept blocks' probabilities of every layer."""
    path = tiny_checkpoint("llama", n_layers=2, n_heads=4, n_kv_heads=2)
    L = RECOMPUTE_FROM  # shorter rows keep their probabilities even with recompute=True
    inputs = mx.array(np.random.default_rng(0).integers(3, 500, (1, L)), mx.int32)
    peaks = {}
    for recompute in (False, True):
        model = lora_model(path)
        use_block_attention(model, recompute=recompute)
        peaks[recompute] = compiled_peak(model, inputs)
    kept = 2 * 4 * kept_fraction(L) * L * L * 4  # 2 layers, 4 heads, float32
    assert peaks[False] - peaks[True] > 0.8 * kept, (peaks, kept)  # measured: 0.97 x kept
