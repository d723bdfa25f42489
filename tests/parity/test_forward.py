"""`_mlxlm.forward` / `hidden_states` / `lm_head` against mlx-lm's own forward pass.

Without a mask they must equal `model(inputs)` exactly; with a block-diagonal causal mask each
packed sequence must get the logits it gets alone (float32, 1e-5).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlxsft import _mlxlm
from mlxsft.errors import ModelError
from mlxsft.model import loading

FIXTURES = [
    "tiny_llama",
    "tiny_llama_base",
    "tiny_qwen2",
    "tiny_gemma",
    "tiny_phi3",
    "tiny_llama_q4",
]
EXTRA_ARCHS = ["qwen3", "gemma2", "mistral"]


def _ids(shape: tuple[int, ...], seed: int) -> mx.array:
    return mx.array(np.random.default_rng(seed).integers(3, 500, shape), mx.int32)


@pytest.fixture(scope="module", params=FIXTURES + EXTRA_ARCHS)
def model(request, tiny_checkpoint) -> nn.Module:
    if request.param in EXTRA_ARCHS:
        path = tiny_checkpoint(request.param, tie_word_embeddings=request.param != "mistral")
    else:
        path = request.getfixturevalue(request.param)
    return loading.load(path).model


def test_forward_without_mask_is_the_model(model):
    x = _ids((2, 9), 0)
    expected = model(x)  # (B, L, V)
    assert mx.array_equal(_mlxlm.forward(model, x), expected).item()
    h = _mlxlm.hidden_states(model, x)  # (B, L, D)
    assert mx.array_equal(_mlxlm.lm_head(model, h), expected).item()


def test_causal_mask_is_the_model(model):
    x = _ids((2, 9), 1)
    causal = _mlxlm.block_causal_mask(mx.zeros((2, 9), mx.int32))  # (B, 1, L, L)
    assert mx.allclose(_mlxlm.forward(model, x, causal), model(x), atol=1e-5).item()


@pytest.mark.parametrize("additive", [False, True])
def test_block_diagonal_mask_equals_sequences_alone(model, additive):
    a, b = _ids((1, 7), 2), _ids((1, 5), 3)
    packed = mx.concatenate([a, b], axis=1)  # (1, 12)
    mask = _mlxlm.block_causal_mask(mx.array([[0] * 7 + [1] * 5]))
    if additive:
        mask = mx.where(mask, 0.0, -mx.inf)
    logits = _mlxlm.forward(model, packed, mask)
    assert mx.allclose(logits[:, :7], model(a), atol=1e-5, rtol=1e-5).item()
    assert mx.allclose(logits[:, 7:], model(b), atol=1e-5, rtol=1e-5).item()


def test_batched_rows_with_padding(model):
    """Two rows packed differently; pad positions form their own segment (no NaNs)."""
    a, b, c = _ids((1, 4), 4), _ids((1, 6), 5), _ids((1, 8), 6)
    pad = mx.zeros((1, 2), mx.int32)
    rows = mx.concatenate(
        [mx.concatenate([a, b, pad], axis=1), mx.concatenate([c, pad, pad], axis=1)]
    )  # (2, 12)
    seg = mx.array([[0] * 4 + [1] * 6 + [2] * 2, [0] * 8 + [1] * 4])
    logits = _mlxlm.forward(model, rows, _mlxlm.block_causal_mask(seg))
    assert mx.isfinite(logits).all().item()
    for got, alone in [(logits[:1, :4], a), (logits[:1, 4:10], b), (logits[1:, :8], c)]:
        assert mx.allclose(got, model(alone), atol=1e-5, rtol=1e-5).item()


def test_loaded_model_matches_mlx_lm_load(tiny_llama):
    import mlx_lm

    ours = loading.load(tiny_llama).model
    theirs, _ = mlx_lm.load(str(tiny_llama))
    x = _ids((1, 10), 7)
    assert mx.array_equal(_mlxlm.forward(ours, x), theirs(x)).item()


SLIDING = {
    "llama": {
        "layer_types": ["sliding_attention", "full_attention"],
        "sliding_window": 4,
        "tie_word_embeddings": False,
    },
    "gemma3_text": {"sliding_window": 4, "sliding_window_pattern": 2, "query_pre_attn_scalar": 16},
}


@pytest.mark.parametrize("arch", sorted(SLIDING))
def test_sliding_window_layers(arch):
    """Layers with a sliding window keep it under a custom mask (L > window)."""
    config = {
        "model_type": arch,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "intermediate_size": 64,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "rms_norm_eps": 1e-6,
        "vocab_size": 64,
        "rope_theta": 10000.0,
        **SLIDING[arch],
    }
    model = _mlxlm.build_model(config)
    mx.eval(model.parameters())
    x = mx.array(np.random.default_rng(8).integers(0, 64, (1, 10)), mx.int32)
    causal = _mlxlm.block_causal_mask(mx.zeros((1, 10), mx.int32))
    assert mx.allclose(_mlxlm.forward(model, x, causal), model(x), atol=1e-5).item()


def test_unsupported_architecture_is_reported():
    class Other(nn.Module):
        model_type = "mamba"

        def __call__(self, x):
            return x

    other = Other()
    assert not _mlxlm.supports_mask(other)
    mask = _mlxlm.block_causal_mask(mx.zeros((1, 3), mx.int32))
    with pytest.raises(ModelError, match="not supported for model_type 'mamba'"):
        _mlxlm.forward(other, mx.zeros((1, 3), mx.int32), mask)


def test_mask_shape_is_checked(tiny_llama):
    model = loading.load(tiny_llama).model
    with pytest.raises(ValueError, match="shape"):
        _mlxlm.forward(model, mx.zeros((1, 4), mx.int32), mx.ones((4, 4), mx.bool_))
