"""A dense llama-family model (llama, mistral, qwen2, qwen3, gemma, gemma2, phi3) -> GGUF.

Mirrors llama.cpp's `convert_hf_to_gguf.py` for these architectures: llama.cpp tensor names, the
q/k row permutation for llama/mistral (whose HF weights are laid out for rotate-half RoPE while
llama.cpp's `llama` arch rotates adjacent pairs; qwen2/qwen3 use NEOX RoPE and are not permuted),
1-D tensors (norms, biases) kept in f32, and Llama 3's `rope_freqs` table for `rope_type: llama3`.
Gemma / Gemma 2 store `1 + w` for every RMSNorm weight (their HF norm multiplies by 1 + w,
llama.cpp's by w) and have tied embeddings; Gemma 2 adds post-attention / post-FFN norms, logit
soft-capping and the sliding window; Phi-3 keeps its fused `qkv_proj` and `gate_up_proj` as
llama.cpp's `attn_qkv` and `ffn_up`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mlxsft.config import GGUF_DTYPES
from mlxsft.errors import ModelError
from mlxsft.export.gguf_mix import FILE_TYPE, tensor_types
from mlxsft.export.gguf_vocab import pre_tokenizer_type, vocab_metadata
from mlxsft.model import gguf
from mlxsft.model.gguf_in import (  # noqa: F401
    ARCHS,
    NORM_PLUS_ONE,
    PERMUTE_QK,
    _head_dim,
    gguf_name,
    llama3_rope_factors,
    permute_qk,
)


def model_metadata(config: dict, name: str, dtype: str) -> dict[str, Any]:
    """`general.*` and `<arch>.*` hyper-parameters for an HF config dict."""
    mt = config.get("model_type")
    if mt not in ARCHS:
        raise ModelError(
            f"GGUF export supports model_type {sorted(ARCHS)}, not {mt!r}",
            hint="export to HF format with `mlxsft fuse` and convert with llama.cpp",
        )
    arch = ARCHS[mt]
    n_head = config["num_attention_heads"]
    meta: dict[str, Any] = {
        "general.architecture": arch,
        "general.name": name,
        "general.file_type": FILE_TYPE[dtype],
        "general.quantization_version": 2,
        f"{arch}.context_length": config.get("max_position_embeddings", 4096),
        f"{arch}.embedding_length": config["hidden_size"],
        f"{arch}.block_count": config["num_hidden_layers"],
        f"{arch}.feed_forward_length": config["intermediate_size"],
        f"{arch}.attention.head_count": n_head,
        f"{arch}.attention.head_count_kv": config.get("num_key_value_heads", n_head),
        f"{arch}.rope.freq_base": float(config.get("rope_theta", 10000.0)),
        f"{arch}.attention.layer_norm_rms_epsilon": float(config.get("rms_norm_eps", 1e-6)),
        f"{arch}.rope.dimension_count": _head_dim(config),
    }
    if arch in ("qwen3", "gemma", "gemma2") or _head_dim(config) != config["hidden_size"] // n_head:
        meta[f"{arch}.attention.key_length"] = _head_dim(config)
        meta[f"{arch}.attention.value_length"] = _head_dim(config)
    meta.update(_arch_metadata(arch, config))
    rs = config.get("rope_scaling") or {}
    if (rs.get("rope_type") or rs.get("type")) == "linear":
        meta[f"{arch}.rope.scaling.type"] = "linear"
        meta[f"{arch}.rope.scaling.factor"] = float(rs["factor"])
    return meta


def _arch_metadata(arch: str, config: dict) -> dict[str, Any]:
    """The keys llama.cpp's converter adds for gemma2 and phi3; refuses what llama.cpp would
    compute differently."""
    meta: dict[str, Any] = {}
    if arch == "gemma2":
        head_dim = _head_dim(config)
        # llama.cpp scales queries by 1/sqrt(head_dim) (hidden/heads for the 46-layer 27B)
        n = config["hidden_size"] // config["num_attention_heads"]
        want = n if config["num_hidden_layers"] == 46 else head_dim
        if config.get("query_pre_attn_scalar", want) != want:
            raise ModelError(
                f"GGUF export: gemma2 with query_pre_attn_scalar {config['query_pre_attn_scalar']}"
                f" (llama.cpp uses {want} for this model size)"
            )
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            if config.get(key) is not None:
                meta[f"gemma2.{key}"] = float(config[key])
        meta["gemma2.attention.sliding_window"] = int(config.get("sliding_window") or 4096)
    if arch == "phi3":
        rs = config.get("rope_scaling") or {}
        if (rs.get("rope_type") or rs.get("type")) in ("longrope", "su", "yarn"):
            raise ModelError("GGUF export: Phi-3 long-context rope scaling is not supported")
        orig = config.get("original_max_position_embeddings")
        meta["phi3.rope.scaling.original_context_length"] = int(
            orig or config.get("max_position_embeddings", 4096)
        )
        rot = config.get("partial_rotary_factor", 1.0)
        meta["phi3.rope.dimension_count"] = (
            int(rot * config["hidden_size"]) // config["num_attention_heads"]
        )
        if config.get("sliding_window"):
            meta["phi3.attention.sliding_window"] = int(config["sliding_window"])
    return meta


def _as_float32(w: Any) -> np.ndarray:
    """NumPy float32 copy of a NumPy or MLX array (bfloat16 included)."""
    if isinstance(w, np.ndarray):
        return w.astype(np.float32, copy=False)
    import mlx.core as mx

    return np.array(w.astype(mx.float32))


def model_tensors(
    weights: dict[str, Any], config: dict, dtype: str
) -> list[tuple[str, gguf.Lazy, int]]:
    """(gguf name, Lazy float32 array, ggml type) for HF-named float weights (NumPy or MLX)."""
    arch = ARCHS[config["model_type"]]
    n_head = config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads", n_head)
    lazy: dict[str, gguf.Lazy] = {}
    factors = llama3_rope_factors(config)
    if factors is not None:
        lazy["rope_freqs.weight"] = gguf.Lazy(factors.shape, lambda: factors)
    for hf_name, w in weights.items():
        name = gguf_name(hf_name, arch)
        if name is None or (arch in NORM_PLUS_ONE and name == "output.weight"):
            continue  # (gemma: llama.cpp always ties the head to the embeddings)
        heads = None
        if arch in PERMUTE_QK and ".attn_q." in name:
            heads = n_head
        elif arch in PERMUTE_QK and ".attn_k." in name:
            heads = n_kv
        shift = arch in NORM_PLUS_ONE and name.endswith("norm.weight")

        def produce(w=w, heads=heads, shift=shift) -> np.ndarray:
            x = _as_float32(w)
            if shift:
                x = x + np.float32(1)
            return permute_qk(x, heads) if heads else x

        lazy[name] = gguf.Lazy(tuple(w.shape), produce)
    types = tensor_types([(n, x.shape) for n, x in lazy.items()], dtype, config)
    return [(n, x, types[n]) for n, x in lazy.items()]


def write_model_gguf(
    path: str | Path,
    weights: dict[str, Any],
    config: dict,
    tokenizer_dir: Path,
    *,
    dtype: str = "f16",
    name: str | None = None,
    chat_template: str | None = None,
    tokenizer: Any = None,
    echo: Any = print,
) -> Path:
    """Write a GGUF file for float HF-named `weights` (NumPy or MLX) + `config`; the tokenizer
    comes from `tokenizer_dir`, the chat template too unless `chat_template` is given. With
    `tokenizer` (the loaded HF tokenizer) a byte-level vocabulary's `tokenizer.ggml.pre` is chosen
    by how it actually splits text."""
    if dtype not in GGUF_DTYPES:
        raise ModelError(f"unknown GGUF dtype {dtype!r}", hint=f"one of {list(GGUF_DTYPES)}")
    meta = model_metadata(config, name or Path(tokenizer_dir).name, dtype)
    tensors = model_tensors(weights, config, dtype)
    n_vocab = weights["model.embed_tokens.weight"].shape[0]
    meta[f"{meta['general.architecture']}.vocab_size"] = int(n_vocab)
    meta.update(vocab_metadata(Path(tokenizer_dir), n_vocab, chat_template))
    if meta["general.architecture"] in NORM_PLUS_ONE and meta["tokenizer.ggml.model"] == "llama":
        meta["tokenizer.ggml.add_space_prefix"] = False  # as llama.cpp's converter for Gemma
    if tokenizer is not None and meta["tokenizer.ggml.model"] == "gpt2":
        pre, matched = pre_tokenizer_type(tokenizer, meta)
        meta["tokenizer.ggml.pre"] = pre
        if not matched:
            echo(
                f"warning: no llama.cpp pre-tokenizer splits text like this tokenizer; wrote "
                f"{pre!r}, so llama.cpp may tokenize some text (digits, spaces) differently"
            )
    return gguf.write_gguf(path, meta, tensors)
