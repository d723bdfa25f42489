"""ggml block quantization in NumPy: byte-identical to ggml's reference quantizers, and the
per-tensor type mix of llama-quantize.

The SHA-256 digests below are of the bytes ggml's own C `quantize_row_*_ref` produces for
`golden_inputs()`; `benchmarks/verify_ggml_quants.py` compiles ggml-quants.c and prints them
(and checks random tensors and real model weights). The `gguf` package (llama.cpp's Python
package, a test-only dependency) is a second reference: it quantizes the 32-value types itself
and dequantizes every type.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from mlxsft.export.gguf_mix import tensor_types, use_more_bits
from mlxsft.model import gguf_quants as Q

GGML_DIGESTS = {  # ggml (llama-cpp-python 0.3.36's vendored llama.cpp), x86-64, -O3, no -march
    Q.GGML_Q4_0: "8cdd813336d2d985a215d10a438c459e7f5ba68fe511c3fb6790923ac50dab15",
    Q.GGML_Q4_1: "4cac533341fddf170a219b85fc24985748fed5848bd16dafc011f36cc331cbdb",
    Q.GGML_Q5_0: "acc925bcaf97cf7ddb41a2fd4a9467c57cd5025c2a20be0f5d8b2bf91bd62807",
    Q.GGML_Q5_1: "b60669e0ffbf9fe152509412df4dc76b1ce8f0ef68428c5fd4d09803d44585e9",
    Q.GGML_Q8_0: "3370a6384b156fd303070019e632d887217d95ab7394a1a9a626bf3db9164548",
    Q.GGML_Q4_K: "471817ed0e430ec231489523eb89d69be01f9cfd1314ae29e0c22bd58a8f4873",
    Q.GGML_Q5_K: "c03b3aebabc98170bbf82b447eec734aeded5d6aacf716860596cdc30c733cce",
    Q.GGML_Q6_K: "315ae5937fed3aad5814715a900b9527d12cb504798dc836d56df45922a13623",
}
# bits per weight, and the largest rmse / rms(x) on normal data (measured ~0.07 .. 0.003)
BPW = {Q.GGML_Q4_0: 4.5, Q.GGML_Q4_1: 5, Q.GGML_Q5_0: 5.5, Q.GGML_Q5_1: 6, Q.GGML_Q8_0: 8.5}
BPW |= {Q.GGML_Q4_K: 4.5, Q.GGML_Q5_K: 5.5, Q.GGML_Q6_K: 6.5625}
REL_RMSE = {Q.GGML_Q4_0: 0.1, Q.GGML_Q4_1: 0.1, Q.GGML_Q4_K: 0.08, Q.GGML_Q5_0: 0.05}
REL_RMSE |= {Q.GGML_Q5_1: 0.045, Q.GGML_Q5_K: 0.04, Q.GGML_Q6_K: 0.02, Q.GGML_Q8_0: 0.006}


def golden_inputs() -> np.ndarray:
    """Same as benchmarks/verify_ggml_quants.py:golden_inputs (edge rows included)."""
    rng = np.random.default_rng(1234)
    x = rng.standard_normal((8, 512)) * np.array([[1.0], [0.02], [3.0], [1], [1], [1], [1], [1]])
    x[3] = rng.standard_t(2, 512)
    x[4] = rng.standard_normal(512) * (rng.random(512) < 0.1)
    x[5] = 0.0
    x[6, :256], x[6, 256:] = 0.25, -0.5
    x[7] = rng.integers(-8, 8, 512)
    return x.astype(np.float32)


@pytest.mark.parametrize("t", sorted(GGML_DIGESTS), ids=lambda t: Q.TYPE_NAMES[t])
def test_bytes_identical_to_ggml_reference(t):
    raw = Q.quantize(golden_inputs(), t)
    qk, size = Q.BLOCKS[t]
    assert raw.shape == (8, 512 // qk * size) and raw.dtype == np.uint8
    assert size * 8 / qk == BPW[t]
    assert hashlib.sha256(raw.tobytes()).hexdigest() == GGML_DIGESTS[t]


@pytest.mark.parametrize("t", sorted(GGML_DIGESTS), ids=lambda t: Q.TYPE_NAMES[t])
def test_against_gguf_package(t):
    """Our bytes dequantize identically with gguf's dequantizer; for the types gguf quantizes
    itself (all but the k-quants), its bytes equal ours."""
    ggufpkg = pytest.importorskip("gguf")
    x = golden_inputs()
    raw = Q.quantize(x, t)
    qtype = ggufpkg.GGMLQuantizationType(t)
    assert np.array_equal(ggufpkg.quants.dequantize(raw, qtype), Q.dequantize(raw, t, x.shape))
    if t not in (Q.GGML_Q4_K, Q.GGML_Q5_K, Q.GGML_Q6_K):
        assert np.array_equal(ggufpkg.quants.quantize(x, qtype), raw)


@pytest.mark.parametrize("t", sorted(GGML_DIGESTS), ids=lambda t: Q.TYPE_NAMES[t])
def test_error_bounded(t):
    x = np.random.default_rng(5).standard_normal((16, 1024)).astype(np.float32) * 0.05
    back = Q.dequantize(Q.quantize(x, t), t, x.shape)
    rel = np.sqrt(np.mean((back - x) ** 2)) / np.sqrt(np.mean(x**2))
    assert rel < REL_RMSE[t]
    # the zero row and a constant row survive exactly (or nearly, through the f16 scale)
    z = np.zeros((2, 256), np.float32)
    z[1] = -0.5
    back = Q.dequantize(Q.quantize(z, t), t, z.shape)
    assert not back[0].any() and np.abs(back[1] + 0.5).max() <= 0.5 * 2**-11


def test_q4_0_hand_block():
    """d = max / -8 with max the signed value of largest magnitude; q = trunc(x / d + 8.5)."""
    x = np.zeros(32, np.float32)
    x[0], x[1], x[17] = -8.0, 4.0, 1.0  # d = 1.0
    raw = Q.quantize(x, Q.GGML_Q4_0)
    assert raw[:2].view(np.float16)[0] == 1.0
    q = np.concatenate([raw[2:] & 15, raw[2:] >> 4])
    assert q.tolist() == [0, 12] + [8] * 15 + [9] + [8] * 14
    assert np.array_equal(Q.dequantize(raw, Q.GGML_Q4_0, (32,)), x)


def test_rows_must_fit_blocks():
    with pytest.raises(ValueError, match="multiple of 256"):
        Q.quantize(np.zeros((2, 96), np.float32), Q.GGML_Q4_K)


def test_use_more_bits_layers():
    # 24 layers (Qwen2.5-0.5B): first/last eighth (0-2, 21-23) and every third from layer 5
    assert [i for i in range(24) if use_more_bits(i, 24)] == [
        0,
        1,
        2,
        5,
        8,
        11,
        14,
        17,
        20,
        21,
        22,
        23,
    ]
    assert [i for i in range(8) if use_more_bits(i, 8)] == [0, 3, 6, 7]


def _names(n_layer: int, tied: bool) -> list[tuple[str, tuple[int, ...]]]:
    out = [("token_embd.weight", (1000, 512)), ("output_norm.weight", (512,))]
    if not tied:
        out.append(("output.weight", (1000, 512)))
    for i in range(n_layer):
        out += [
            (f"blk.{i}.attn_norm.weight", (512,)),
            (f"blk.{i}.attn_q.weight", (512, 512)),
            (f"blk.{i}.attn_k.weight", (128, 512)),
            (f"blk.{i}.attn_v.weight", (128, 512)),
            (f"blk.{i}.attn_output.weight", (512, 512)),
            (f"blk.{i}.ffn_gate.weight", (1536, 512)),
            (f"blk.{i}.ffn_up.weight", (1536, 512)),
            (f"blk.{i}.ffn_down.weight", (512, 1536)),
            (f"blk.{i}.ffn_norm.weight", (512,)),
        ]
    return out


def test_q4_k_m_mix():
    config = {"model_type": "llama", "num_hidden_layers": 8, "num_attention_heads": 8}
    types = tensor_types(_names(8, tied=False), "q4_k_m", config)
    six = [0, 3, 6, 7]
    for i in range(8):
        want = Q.GGML_Q6_K if i in six else Q.GGML_Q4_K
        assert types[f"blk.{i}.attn_v.weight"] == want and types[f"blk.{i}.ffn_down.weight"] == want
        for n in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"):
            assert types[f"blk.{i}.{n}.weight"] == Q.GGML_Q4_K
        assert types[f"blk.{i}.attn_norm.weight"] == Q.GGML_F32
    assert types["output.weight"] == Q.GGML_Q6_K and types["token_embd.weight"] == Q.GGML_Q4_K
    assert types["output_norm.weight"] == Q.GGML_F32
    tied = tensor_types(_names(8, tied=True), "q4_k_m", config)
    assert tied["token_embd.weight"] == Q.GGML_Q6_K
    q5 = tensor_types(_names(8, tied=False), "q5_k_m", config)
    assert q5["blk.3.ffn_down.weight"] == Q.GGML_Q6_K and q5["blk.4.ffn_down.weight"] == Q.GGML_Q5_K
    q6 = tensor_types(_names(8, tied=False), "q6_k", config)
    assert {q6[f"blk.{i}.ffn_down.weight"] for i in range(8)} == {Q.GGML_Q6_K}
    q40 = tensor_types(_names(8, tied=True), "q4_0", config)
    assert q40["blk.0.attn_v.weight"] == Q.GGML_Q4_0 and q40["token_embd.weight"] == Q.GGML_Q6_K


def test_mix_fallbacks_for_rows_not_multiple_of_256():
    """SmolLM2-135M's 576-wide rows: k-quants fall back to 32-blocks, the tied head to q8_0."""
    config = {"model_type": "llama", "num_hidden_layers": 30, "num_attention_heads": 9}
    names = [
        ("token_embd.weight", (49152, 576)),
        ("blk.0.attn_v.weight", (192, 576)),
        ("blk.4.attn_q.weight", (576, 576)),
        ("blk.0.ffn_down.weight", (576, 1536)),
        ("blk.4.ffn_down.weight", (576, 1536)),
        ("blk.4.ffn_up.weight", (1536, 576)),
        ("odd.weight", (4, 100)),
    ]
    t = tensor_types(names, "q4_k_m", config)
    assert t["token_embd.weight"] == Q.GGML_Q8_0
    assert t["blk.0.attn_v.weight"] == Q.GGML_Q8_0  # q6_K -> q8_0
    assert t["blk.4.attn_q.weight"] == t["blk.4.ffn_up.weight"] == Q.GGML_Q5_0  # q4_K -> q5_0
    assert t["blk.0.ffn_down.weight"] == Q.GGML_Q6_K and t["blk.4.ffn_down.weight"] == Q.GGML_Q4_K
    assert t["odd.weight"] == Q.GGML_F16
    assert tensor_types(names, "q5_k_m", config)["blk.4.attn_q.weight"] == Q.GGML_Q5_1
    assert tensor_types(names, "q4_0", config)["token_embd.weight"] == Q.GGML_Q8_0  # q6_K->q8_0


def test_70b_attn_v():
    config = {"model_type": "llama", "num_hidden_layers": 80, "num_attention_heads": 64}
    names = [("blk.11.attn_v.weight", (1024, 8192)), ("blk.12.attn_v.weight", (1024, 8192))]
    mha = tensor_types(names, "q4_k_m", config)
    assert mha["blk.11.attn_v.weight"] == Q.GGML_Q4_K and mha["blk.12.attn_v.weight"] == Q.GGML_Q6_K
    gqa = tensor_types(names, "q4_k_m", {**config, "num_key_value_heads": 8})
    assert gqa["blk.11.attn_v.weight"] == Q.GGML_Q5_K and gqa["blk.12.attn_v.weight"] == Q.GGML_Q6_K
