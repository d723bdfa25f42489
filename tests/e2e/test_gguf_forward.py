"""The exported GGUF means the same model: a NumPy forward pass that reads the file the way
llama.cpp does (its tensor names, its metadata, adjacent-pair RoPE for `llama`, NEOX RoPE for
the others, token_embd as the output when `output.weight` is absent, Gemma's scaled embeddings,
GELU and stored 1 + w norms, Gemma 2's extra norms and soft-capping, Phi-3's fused tensors) gives
mlx-lm's logits.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from _export_utils import adapted_logits, write_random_adapter
from click.testing import CliRunner

from mlxsft.cli import main
from mlxsft.model.gguf import read_gguf

IDS = [1, 40, 41, 300, 7, 99, 12, 5, 260]


def _rms(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _rope(x: np.ndarray, base: float, neox: bool) -> np.ndarray:
    """x (L, H, hd): llama.cpp's rope, NORMAL (pairs 2i, 2i+1) or NEOX (pairs i, i + hd/2)."""
    L, _, hd = x.shape
    theta = np.arange(L)[:, None] / base ** (np.arange(0, hd, 2) / hd)  # (L, hd/2)
    c, s = np.cos(theta)[:, None], np.sin(theta)[:, None]  # (L, 1, hd/2)
    a, b = (x[..., : hd // 2], x[..., hd // 2 :]) if neox else (x[..., 0::2], x[..., 1::2])
    ra, rb = a * c - b * s, a * s + b * c
    if neox:
        return np.concatenate([ra, rb], -1)
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = ra, rb
    return out


def gguf_forward(path, ids: list[int], erf_gelu: bool = False) -> np.ndarray:
    """Logits (L, V) of a llama/qwen2/qwen3/gemma/gemma2/phi3 GGUF file, in float64, the way
    llama.cpp's graphs for these architectures compute them (Gemma's GELU is the tanh
    approximation, as in HF and llama.cpp; `erf_gelu` uses the exact one, as mlx-lm's gemma)."""
    meta, tensors = read_gguf(path)
    T = {k: v.data.astype(np.float64) for k, v in tensors.items()}
    arch = meta["general.architecture"]
    n_head, n_kv = meta[f"{arch}.attention.head_count"], meta[f"{arch}.attention.head_count_kv"]
    eps = meta[f"{arch}.attention.layer_norm_rms_epsilon"]
    base = meta.get(f"{arch}.rope.freq_base", 10000.0)
    hd = meta.get(f"{arch}.attention.key_length") or meta[f"{arch}.embedding_length"] // n_head
    neox = arch != "llama"
    gemma = arch in ("gemma", "gemma2")
    cap = meta.get(f"{arch}.attn_logit_softcapping")
    x = T["token_embd.weight"][ids]  # (L, D)
    if gemma:
        x = x * np.sqrt(x.shape[-1])
    L = len(ids)
    causal = np.tril(np.ones((L, L), bool))
    for i in range(meta[f"{arch}.block_count"]):
        p = f"blk.{i}."

        def lin(name, h, p=p):
            y = h @ T[p + name + ".weight"].T
            return y + T[p + name + ".bias"] if p + name + ".bias" in T else y

        h = _rms(x, T[p + "attn_norm.weight"], eps)
        if p + "attn_qkv.weight" in T:  # phi3: fused q, k, v
            qkv = lin("attn_qkv", h)
            q, k, v = np.split(qkv, [n_head * hd, (n_head + n_kv) * hd], axis=-1)
        else:
            q, k, v = (lin(n, h) for n in ("attn_q", "attn_k", "attn_v"))
        q, k, v = (t.reshape(L, -1, hd) for t in (q, k, v))
        if p + "attn_q_norm.weight" in T:
            q, k = (
                _rms(q, T[p + "attn_q_norm.weight"], eps),
                _rms(k, T[p + "attn_k_norm.weight"], eps),
            )
        q, k = _rope(q, base, neox), _rope(k, base, neox)
        k, v = np.repeat(k, n_head // n_kv, 1), np.repeat(v, n_head // n_kv, 1)  # (L, H, hd)
        scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd)
        if cap:
            scores = cap * np.tanh(scores / cap)
        scores = np.where(causal, scores, -np.inf)
        att = np.exp(scores - scores.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        o = lin("attn_output", np.einsum("hqk,khd->qhd", att, v).reshape(L, -1))
        if p + "attn_post_norm.weight" in T:
            o = _rms(o, T[p + "attn_post_norm.weight"], eps)
        x = x + o
        h = _rms(x, T[p + "ffn_norm.weight"], eps)
        if p + "ffn_gate.weight" in T:
            g, u = lin("ffn_gate", h), lin("ffn_up", h)
        else:  # phi3: ffn_up holds gate then up
            g, u = np.split(lin("ffn_up", h), 2, axis=-1)
        if gemma and erf_gelu:
            act = 0.5 * g * (1 + np.vectorize(math.erf)(g / np.sqrt(2)))
        elif gemma:  # GELU, tanh approximation
            act = 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g**3)))
        else:
            act = g / (1 + np.exp(-g))
        y = lin("ffn_down", act * u)
        if p + "ffn_post_norm.weight" in T:
            y = _rms(y, T[p + "ffn_post_norm.weight"], eps)
        x = x + y
    h = _rms(x, T["output_norm.weight"], eps)
    logits = h @ T.get("output.weight", T["token_embd.weight"]).T
    if final := meta.get(f"{arch}.final_logit_softcapping"):
        logits = final * np.tanh(logits / final)
    return logits


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma", "gemma2", "phi3"])
def test_gguf_logits_equal_mlx(arch, tiny_checkpoint, tmp_path):
    model_dir = tiny_checkpoint(arch, chat_template="chatml", tie_word_embeddings=arch == "qwen2")
    targets = ("qkv_proj", "o_proj") if arch == "phi3" else ("q_proj", "k_proj")
    adapter = write_random_adapter(model_dir, tmp_path / "a", targets=targets)
    path = tmp_path / "m.gguf"
    args = ["export", "--model", str(model_dir), "--adapter", str(adapter), "--format", "gguf"]
    result = CliRunner().invoke(main, [*args, "--output", str(path), "--dtype", "f32"])
    assert result.exit_code == 0, result.output
    ref = adapted_logits(model_dir, adapter, IDS)
    # mlx-lm's gemma (not gemma2) uses the exact GELU where HF and llama.cpp use the tanh one
    assert np.abs(gguf_forward(path, IDS, erf_gelu=arch == "gemma") - ref).max() < 1e-4
