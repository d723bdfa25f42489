"""The exported GGUF means the same model: a NumPy forward pass that reads the file the way
llama.cpp does (its tensor names, its metadata, adjacent-pair RoPE for `llama`, NEOX RoPE for
`qwen2`/`qwen3`, token_embd as the output when `output.weight` is absent) gives mlx-lm's logits.
"""

from __future__ import annotations

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


def gguf_forward(path, ids: list[int]) -> np.ndarray:
    """Logits (L, V) of a llama/qwen2/qwen3 GGUF file, computed in float64."""
    meta, tensors = read_gguf(path)
    T = {k: v.data.astype(np.float64) for k, v in tensors.items()}
    arch = meta["general.architecture"]
    n_head, n_kv = meta[f"{arch}.attention.head_count"], meta[f"{arch}.attention.head_count_kv"]
    eps, base = meta[f"{arch}.attention.layer_norm_rms_epsilon"], meta[f"{arch}.rope.freq_base"]
    neox = arch in ("qwen2", "qwen3")
    x = T["token_embd.weight"][ids]  # (L, D)
    L = len(ids)
    causal = np.tril(np.ones((L, L), bool))
    for i in range(meta[f"{arch}.block_count"]):
        p = f"blk.{i}."

        def lin(name, h, p=p):
            y = h @ T[p + name + ".weight"].T
            return y + T[p + name + ".bias"] if p + name + ".bias" in T else y

        h = _rms(x, T[p + "attn_norm.weight"], eps)
        q, k, v = (
            lin(n, h).reshape(L, -1, meta[f"{arch}.rope.dimension_count"])
            for n in ("attn_q", "attn_k", "attn_v")
        )
        if p + "attn_q_norm.weight" in T:
            q, k = (
                _rms(q, T[p + "attn_q_norm.weight"], eps),
                _rms(k, T[p + "attn_k_norm.weight"], eps),
            )
        q, k = _rope(q, base, neox), _rope(k, base, neox)
        k, v = np.repeat(k, n_head // n_kv, 1), np.repeat(v, n_head // n_kv, 1)  # (L, H, hd)
        scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(q.shape[-1])
        scores = np.where(causal, scores, -np.inf)
        att = np.exp(scores - scores.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        x = x + lin("attn_output", np.einsum("hqk,khd->qhd", att, v).reshape(L, -1))
        h = _rms(x, T[p + "ffn_norm.weight"], eps)
        g = lin("ffn_gate", h)
        x = x + lin("ffn_down", g / (1 + np.exp(-g)) * lin("ffn_up", h))
    h = _rms(x, T["output_norm.weight"], eps)
    return h @ T.get("output.weight", T["token_embd.weight"]).T


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_gguf_logits_equal_mlx(arch, tiny_checkpoint, tmp_path):
    model_dir = tiny_checkpoint(arch, chat_template="chatml", tie_word_embeddings=arch == "qwen2")
    adapter = write_random_adapter(model_dir, tmp_path / "a", targets=("q_proj", "k_proj"))
    path = tmp_path / "m.gguf"
    args = ["export", "--model", str(model_dir), "--adapter", str(adapter), "--format", "gguf"]
    result = CliRunner().invoke(main, [*args, "--output", str(path), "--dtype", "f32"])
    assert result.exit_code == 0, result.output
    ref = adapted_logits(model_dir, adapter, IDS)
    assert np.abs(gguf_forward(path, IDS) - ref).max() < 1e-4
