"""A llama-family GGUF file (llama, qwen2, qwen3, gemma, gemma2, phi3) -> an MLX model directory
that the normal loader reads.

`--model file.gguf` (train, eval, generate, chat, fuse, export) goes through `model_dir(path)`: the
file is converted once into `<$MLXSFT_GGUF_CACHE or the temp dir>/mlxsft-gguf-<hash>/` (keyed by
its path, size and mtime)
holding config.json (HF keys rebuilt from the metadata), model.safetensors (HF weight names) and
tokenizer.json + tokenizer_config.json (rebuilt from `tokenizer.ggml.*` by gguf_tokenizer.py, with
the chat template).

Weights keep their exact numbers: q4_0, q4_1 and q8_0 blocks (32 values, an f16 scale and, for
q4_1, an f16 min) become MLX affine-quantized arrays with group size 32 (scale d, bias -8d / m /
-128d; float32 scales, so dequantized values equal ggml's), so a quantized GGUF trains as QLoRA;
f16/f32 tensors stay as they are; other types (k-quants, q5_0/q5_1) are dequantized to float32.
llama/mistral q/k rows are permuted back from llama.cpp's adjacent-pair RoPE layout to HF's.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from mlxsft.errors import ModelError
from mlxsft.model import gguf
from mlxsft.model.gguf_tokenizer import write_tokenizer

# HF model_type -> GGUF architecture, and llama.cpp's tensor names
ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
ARCHS |= {"gemma": "gemma", "gemma2": "gemma2", "phi3": "phi3"}
NORM_PLUS_ONE = {"gemma", "gemma2"}  # HF norm = x * (1 + w); llama.cpp stores 1 + w
PERMUTE_QK = {"llama"}  # GGUF archs that use llama.cpp's normal (GPT-J style) RoPE
TOP_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
# where an architecture's layers differ from llama's
ARCH_LAYER_NAMES = {
    "gemma2": {
        **LAYER_NAMES,
        "post_attention_layernorm": "attn_post_norm",
        "pre_feedforward_layernorm": "ffn_norm",
        "post_feedforward_layernorm": "ffn_post_norm",
    },
    "phi3": {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.qkv_proj": "attn_qkv",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    },
}
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_GGUF_LAYER = re.compile(r"^blk\.(\d+)\.(.+)\.(weight|bias)$")
_FROM_TOP = {v: k for k, v in TOP_NAMES.items()}
NATIVE = {gguf.GGML_Q4_0: 4, gguf.GGML_Q4_1: 4, gguf.GGML_Q8_0: 8}  # bits in MLX
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_ARCHITECTURES |= {"qwen3": "Qwen3ForCausalLM", "gemma": "GemmaForCausalLM"}
_ARCHITECTURES |= {"gemma2": "Gemma2ForCausalLM", "phi3": "Phi3ForCausalLM"}


def gguf_name(hf_name: str, arch: str = "llama") -> str | None:
    """llama.cpp's name for an HF weight name of GGUF architecture `arch`; None for buffers
    llama.cpp drops."""
    if hf_name in TOP_NAMES:
        return TOP_NAMES[hf_name]
    if hf_name.endswith("rotary_emb.inv_freq"):
        return None
    m = _HF_LAYER.match(hf_name)
    layer_names = ARCH_LAYER_NAMES.get(arch, LAYER_NAMES)
    if m and m.group(2) in layer_names:
        return f"blk.{m.group(1)}.{layer_names[m.group(2)]}.{m.group(3)}"
    raise ModelError(f"GGUF export: no llama.cpp name for weight {hf_name!r}")


def hf_name(name: str, arch: str = "llama") -> str:
    """The HF weight name of a llama.cpp tensor name of GGUF architecture `arch`."""
    if name in _FROM_TOP:
        return _FROM_TOP[name]
    m = _GGUF_LAYER.match(name)
    from_layer = {v: k for k, v in ARCH_LAYER_NAMES.get(arch, LAYER_NAMES).items()}
    if m and m.group(2) in from_layer:
        return f"model.layers.{m.group(1)}.{from_layer[m.group(2)]}.{m.group(3)}"
    raise ModelError(f"GGUF tensor {name!r} has no place in a llama-family model")


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of q/k (n_head * head_dim, ...) from rotate-half to interleaved RoPE order.

    Per head, HF keeps the first halves of the rotated pairs then the second halves; llama.cpp
    wants pairs adjacent: row (h, i, j) -> (h, j, i) for i in {0, 1}, j < head_dim / 2.
    """
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of `permute_qk` (llama.cpp row order -> HF)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ----------------------------------------------------------------------------------- config


def _head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def llama3_rope_factors(config: dict) -> np.ndarray | None:
    """`rope_freqs.weight` for Llama 3.1+ (`rope_scaling.rope_type == "llama3"`), as llama.cpp."""
    rs = config.get("rope_scaling") or {}
    rope_type = (rs.get("rope_type") or rs.get("type") or "").lower()
    if rope_type in ("", "default"):
        return None
    if rope_type != "llama3":
        if rope_type == "linear":
            return None  # written as metadata
        raise ModelError(f"GGUF export: rope_scaling type {rope_type!r} is not supported")
    dim, base = _head_dim(config), config.get("rope_theta", 10000.0)
    factor = rs.get("factor", 8.0)
    low, high = rs.get("low_freq_factor", 1.0), rs.get("high_freq_factor", 4.0)
    old_ctx = rs.get("original_max_position_embeddings", 8192)
    low_wl, high_wl = old_ctx / low, old_ctx / high
    out = []
    for freq in 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim)):
        wavelen = 2 * math.pi / freq
        if wavelen < high_wl:
            out.append(1.0)
        elif wavelen > low_wl:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


# Llama 3.1 (factor 8) / 3.2 (factor 32) rope scaling; a rope_freqs table is matched against these
LLAMA3_ROPE_CANDIDATES = [
    {"factor": f, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192}
    for f in (8.0, 16.0, 32.0)
]  # fmt: skip


def llama3_rope_scaling(table: np.ndarray, config: dict) -> dict:
    """The `rope_scaling` whose llama.cpp `rope_freqs` table is `table` (Llama 3.1+)."""
    for cand in LLAMA3_ROPE_CANDIDATES:
        rs = {"rope_type": "llama3", **cand}
        factors = llama3_rope_factors({**config, "rope_scaling": rs})
        if factors is not None and factors.shape == table.shape and np.array_equal(factors, table):
            return rs
    raise ModelError(
        "GGUF rope_freqs table matches no known Llama 3 rope scaling",
        hint="use the model's Hugging Face release instead",
    )


def hf_config(meta: dict[str, Any], tensors: dict[str, gguf.Tensor]) -> dict[str, Any]:
    """An HF config.json dict for a llama / qwen2 / qwen3 / gemma / gemma2 / phi3 GGUF."""
    arch = meta.get("general.architecture")
    if arch not in _ARCHITECTURES:
        raise ModelError(
            f"GGUF architecture {arch!r} is not supported ({', '.join(_ARCHITECTURES)} are)",
            hint="use the model's Hugging Face release instead",
        )

    def key(k: str, default: Any = None) -> Any:
        v = meta.get(f"{arch}.{k}", default)
        return v.item() if isinstance(v, np.generic) else v

    n_head = int(key("attention.head_count"))
    config: dict[str, Any] = {
        "architectures": [_ARCHITECTURES[arch]],
        "model_type": arch,
        "hidden_size": int(key("embedding_length")),
        "num_hidden_layers": int(key("block_count")),
        "intermediate_size": int(key("feed_forward_length")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(key("attention.head_count_kv", n_head)),
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(key("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(key("context_length", 4096)),
        "vocab_size": int(tensors["token_embd.weight"].shape[0]),
        "tie_word_embeddings": "output.weight" not in tensors,
    }
    if key("attention.key_length") is not None:
        config["head_dim"] = int(key("attention.key_length"))
    if key("rope.scaling.type") == "linear":
        config["rope_scaling"] = {"type": "linear", "factor": float(key("rope.scaling.factor"))}
    if "rope_freqs.weight" in tensors:  # Llama 3.1+: recover rope_scaling from the table
        table = np.asarray(tensors["rope_freqs.weight"].data, dtype=np.float32)
        config["rope_scaling"] = llama3_rope_scaling(table, config)
    if arch == "llama" and "blk.0.attn_q.bias" in tensors:
        config["attention_bias"] = True
    config.update(_arch_config(arch, config, key))
    n_tokens = len(meta.get("tokenizer.ggml.tokens", ()))
    for kind in ("bos", "eos", "pad"):
        tid = meta.get(f"tokenizer.ggml.{'padding' if kind == 'pad' else kind}_token_id")
        if tid is not None and int(tid) < n_tokens:  # llama2.c's converter writes -1 for "none"
            config[f"{kind}_token_id"] = int(tid)
    return config


def _arch_config(arch: str, config: dict[str, Any], key: Any) -> dict[str, Any]:
    """The HF keys gemma / gemma2 / phi3 need beyond llama's."""
    out: dict[str, Any] = {}
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    if arch in NORM_PLUS_ONE:
        out.update(hidden_act="gelu_pytorch_tanh", head_dim=head_dim, tie_word_embeddings=True)
    if arch == "gemma2":
        n_layer, n = (
            config["num_hidden_layers"],
            config["hidden_size"] // config["num_attention_heads"],
        )
        out["query_pre_attn_scalar"] = n if n_layer == 46 else head_dim  # as llama.cpp computes
        out["sliding_window"] = int(key("attention.sliding_window", 4096))
        for k in ("attn_logit_softcapping", "final_logit_softcapping"):
            if key(k) is not None:
                out[k] = float(key(k))
    if arch == "phi3":
        orig = key("rope.scaling.original_context_length")
        out["original_max_position_embeddings"] = int(orig or config["max_position_embeddings"])
        rot = key("rope.dimension_count")
        if rot is not None and int(rot) != head_dim:
            out["partial_rotary_factor"] = int(rot) / head_dim
        if key("attention.sliding_window") is not None:
            out["sliding_window"] = int(key("attention.sliding_window"))
    return out


# ---------------------------------------------------------------------------------- weights


def _pack(q: np.ndarray, bits: int) -> np.ndarray:
    """(rows, n) small unsigned ints -> (rows, n * bits / 32) uint32, value k at bits k*bits."""
    per = 32 // bits
    q = q.astype(np.uint32).reshape(q.shape[0], -1, per)
    return (q << (np.arange(per, dtype=np.uint32) * bits)).sum(axis=-1, dtype=np.uint32)


def mlx_quantized(t: gguf.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A q4_0 / q4_1 / q8_0 tensor as MLX affine (weight uint32, scales, biases), group 32."""
    rows = t.shape[0]
    blocks = np.asarray(t.raw).reshape(-1, gguf.BLOCKS[t.ggml_type][1])  # (rows * groups, size)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)[:, 0]
    if t.ggml_type == gguf.GGML_Q8_0:
        q = blocks[:, 2:].view(np.int8).astype(np.int16) + 128
        bias = -128 * d
    else:
        nib = blocks[:, 4:] if t.ggml_type == gguf.GGML_Q4_1 else blocks[:, 2:]
        q = np.concatenate([nib & 15, nib >> 4], axis=1)
        if t.ggml_type == gguf.GGML_Q4_1:
            bias = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)[:, 0]
        else:
            bias = -8 * d
    bits = NATIVE[t.ggml_type]
    return _pack(q.reshape(rows, -1), bits), d.reshape(rows, -1), bias.reshape(rows, -1)


def hf_weights(
    tensors: dict[str, gguf.Tensor], config: dict[str, Any]
) -> tuple[dict[str, np.ndarray], bool]:
    """HF-named NumPy arrays (`.weight`, plus `.scales`/`.biases` for native quantized tensors)
    and whether any tensor is quantized."""
    out: dict[str, np.ndarray] = {}
    quantized = False
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    arch = ARCHS[config["model_type"]]
    for name, t in tensors.items():
        if name == "rope_freqs.weight":
            continue  # turned into config["rope_scaling"]
        hf = hf_name(name, arch)
        n_head = None
        if config["model_type"] == "llama" and name.split(".")[-2] in heads:
            n_head = heads[name.split(".")[-2]]

        def fix(x: np.ndarray, n_head: int | None = n_head) -> np.ndarray:
            return unpermute_qk(x, n_head) if n_head else x

        if t.ggml_type in NATIVE and len(t.shape) == 2:
            w, s, b = mlx_quantized(t)
            base = hf[: -len(".weight")]
            out[hf], out[base + ".scales"], out[base + ".biases"] = fix(w), fix(s), fix(b)
            quantized = True
        elif t.ggml_type in (gguf.GGML_F32, gguf.GGML_F16):
            out[hf] = fix(np.ascontiguousarray(t.data))
        else:
            out[hf] = fix(gguf.dequantize(t.raw, t.ggml_type, t.shape))
        if arch in NORM_PLUS_ONE and name.endswith("norm.weight"):
            out[hf] = (out[hf].astype(np.float32) - np.float32(1)).astype(out[hf].dtype)
    return out, quantized


# ------------------------------------------------------------------------------- the entry


def model_dir(path: Path, cache_root: Path | None = None) -> Path:
    """The converted MLX model directory for the GGUF file `path` (converted on first use)."""
    st = path.stat()
    key = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    root = cache_root or os.environ.get("MLXSFT_GGUF_CACHE") or tempfile.gettempdir()
    out = Path(root) / ("mlxsft-gguf-" + hashlib.sha256(key.encode()).hexdigest()[:16])
    if (out / "config.json").is_file():
        return out
    try:
        meta, tensors = gguf.read_gguf(path, dequantize_all=False)
    except (ValueError, OSError, struct.error) as exc:
        raise ModelError(f"cannot read the GGUF file: {exc}", where=str(path)) from None
    config = hf_config(meta, tensors)
    weights, quantized = hf_weights(tensors, config)
    if quantized:
        config["quantization"] = {"group_size": 32, "bits": 4}  # per layer: from the shapes
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))  # a private partial dir
    write_tokenizer(meta, tmp)
    import mlx.core as mx

    mx.save_safetensors(
        str(tmp / "model.safetensors"),
        {k: mx.array(v) for k, v in weights.items()},
        metadata={"format": "mlx"},
    )
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    (tmp / "source.txt").write_text(f"converted by mlxsft from {path.resolve()}\n")
    try:
        tmp.rename(out)
    except OSError:  # another process finished the same conversion first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "config.json").is_file():
            raise
    return out
