"""The ggml type of each tensor for `--dtype`: f32, f16, q8_0 as llama.cpp's converter writes
them, and q4_0, q4_k_m, q5_k_m, q6_k as `llama-quantize` chooses them (without an importance
matrix) when it quantizes an f16 file of the model.

llama-quantize's choices for a dense model (re-derived from llama.cpp's `llama-quant.cpp`):
- 1-D tensors and `*_norm.weight` stay f32; every other 2-D weight gets the file type's default
  (q4_K for q4_k_m, q5_K for q5_k_m, q6_K, q4_0) unless a rule below says otherwise;
- the output head (or, when the embeddings are tied, `token_embd`) gets q6_K, or q8_0 when its rows
  are not a multiple of the default's block size (and then the fallbacks below apply);
- `_m` variants: `attn_v` and `ffn_down` of the "more bits" layers get q6_K: the first and last
  eighth of the layers and every third layer in between (`use_more_bits`); a 70B-class model
  (80 layers, grouped-query attention) gets q5_K for its other `attn_v`;
- a k-quant whose rows are not a multiple of 256 falls back to q5_0 (q4_K), q5_1 (q5_K) or q8_0
  (q6_K); a 32-block type whose rows are not a multiple of 32 falls back to f16.
"""

from __future__ import annotations

from mlxsft.config import GGUF_DTYPES
from mlxsft.model.gguf_quants import (
    BLOCKS,
    GGML_F16,
    GGML_F32,
    GGML_Q4_0,
    GGML_Q4_K,
    GGML_Q5_0,
    GGML_Q5_1,
    GGML_Q5_K,
    GGML_Q6_K,
    GGML_Q8_0,
)

# --dtype -> llama_ftype (general.file_type)
FILE_TYPE = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}
assert set(FILE_TYPE) == set(GGUF_DTYPES)  # config.py owns the --dtype choices
_DEFAULT = {"q4_0": GGML_Q4_0, "q4_k_m": GGML_Q4_K, "q5_k_m": GGML_Q5_K, "q6_k": GGML_Q6_K}
_FALLBACK = {GGML_Q4_K: GGML_Q5_0, GGML_Q5_K: GGML_Q5_1, GGML_Q6_K: GGML_Q8_0}


def use_more_bits(i_layer: int, n_layer: int) -> bool:
    """llama.cpp's pick of layers that keep more bits in the `_m` mixes."""
    e = n_layer // 8
    return i_layer < e or i_layer >= 7 * n_layer // 8 or (i_layer - e) % 3 == 2


def _layer(name: str) -> int:
    return int(name.split(".")[1]) if name.startswith("blk.") else -1


def _fits(n_cols: int, ggml_type: int) -> bool:
    return n_cols % BLOCKS[ggml_type][0] == 0


def _fallback(n_cols: int, t: int) -> int:
    if _fits(n_cols, t):
        return t
    t = _FALLBACK.get(t, t)
    return t if _fits(n_cols, t) else GGML_F16


def _quantized_type(
    name: str, n_cols: int, dtype: str, tied: bool, n_layer: int, big_gqa: bool
) -> int:
    """llama-quantize's type for a 2-D weight `name` (llama.cpp name) with rows of `n_cols`."""
    t = _DEFAULT[dtype]
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        return _fallback(n_cols, GGML_Q6_K if _fits(n_cols, t) else GGML_Q8_0)
    m_mix = dtype in ("q4_k_m", "q5_k_m")
    if ".attn_v." in name or ".attn_qkv." in name:  # one per layer: its counter is the layer
        if m_mix and use_more_bits(_layer(name), n_layer):
            t = GGML_Q6_K
        elif big_gqa and t == GGML_Q4_K:
            t = GGML_Q5_K
    elif ".ffn_down" in name and m_mix and use_more_bits(_layer(name), n_layer):
        t = GGML_Q6_K
    return _fallback(n_cols, t)


def tensor_types(
    tensors: list[tuple[str, tuple[int, ...]]], dtype: str, config: dict
) -> dict[str, int]:
    """{llama.cpp tensor name: ggml type} for (name, NumPy shape) pairs and `--dtype`."""
    if dtype not in FILE_TYPE:
        raise ValueError(f"unknown GGUF dtype {dtype!r}: one of {', '.join(GGUF_DTYPES)}")
    names = {n for n, _ in tensors}
    tied = "output.weight" not in names
    n_layer = int(config["num_hidden_layers"])
    n_head = config["num_attention_heads"]
    big_gqa = n_layer == 80 and (
        config.get("model_type") == "qwen2"
        or (
            config.get("model_type") in ("llama", "mistral")
            and config.get("num_key_value_heads", n_head) != n_head
        )
    )
    out = {}
    for name, shape in tensors:
        if len(shape) < 2 or name.endswith("_norm.weight") or dtype == "f32":
            out[name] = GGML_F32
        elif dtype == "f16":
            out[name] = GGML_F16
        elif dtype == "q8_0":
            out[name] = _fallback(shape[-1], GGML_Q8_0)
        else:
            out[name] = _quantized_type(name, shape[-1], dtype, tied, n_layer, big_gqa)
    return out
