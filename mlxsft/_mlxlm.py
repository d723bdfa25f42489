"""The one module that reaches into mlx-lm internals.

Everything else in mlxsft calls these functions instead of importing `mlx_lm.*` itself, so an
mlx-lm upgrade that moves things breaks one file. It owns: architecture lookup, loading and
quantizing models, and a forward pass that accepts a custom (B, 1, L, L) attention mask so packed
rows get block-diagonal causal attention without monkey-patching the model classes.
"""

from __future__ import annotations

import contextlib
import io
import pkgutil
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

# Modules under mlx_lm.models that are helpers, not architectures.
_NOT_ARCHITECTURES = {
    "activations",
    "base",
    "bitlinear_layers",
    "cache",
    "gated_delta",
    "mla",
    "pipeline",
    "rope_utils",
    "ssm",
    "switch_layers",
}


def supported_model_types() -> list[str]:
    """The `model_type` values mlx-lm can build (module names plus its remapped aliases)."""
    import mlx_lm.models
    from mlx_lm.utils import MODEL_REMAPPING

    names = {
        m.name
        for m in pkgutil.iter_modules(mlx_lm.models.__path__)
        if m.name not in _NOT_ARCHITECTURES
    }
    names |= {alias for alias, target in MODEL_REMAPPING.items() if target in names}
    return sorted(names)


def model_classes(config: dict) -> tuple[type[nn.Module], type]:
    """(Model, ModelArgs) for a config's `model_type`; ValueError when mlx-lm has none."""
    from mlx_lm.utils import _get_classes

    return _get_classes(config)


def build_model(config: dict) -> nn.Module:
    """A freshly initialised (random) mlx-lm model for an HF-style config dict."""
    model_cls, args_cls = model_classes(config)
    return model_cls(args_cls.from_dict(config))


def load_model(
    path: Path, *, lazy: bool = False, overrides: dict | None = None
) -> tuple[nn.Module, dict]:
    """Load weights and config (with `overrides` applied) from a local HF-format dir; never runs
    remote code."""
    from mlx_lm.utils import load_model as _load_model

    return _load_model(Path(path), lazy=lazy, model_config=overrides, trust_remote_code=False)


def load_tokenizer_wrapper(path: Path, eos_token_ids: Any = None) -> Any:
    """mlx-lm's TokenizerWrapper (streaming detokenizer, eos set) for generation."""
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(Path(path), eos_token_ids=eos_token_ids)


def quantize(
    model: nn.Module, config: dict, bits: int, *, group_size: int = 64, mode: str = "affine"
) -> tuple[nn.Module, dict]:
    """Quantize in place exactly as `mlx_lm.convert -q` does; returns (model, new config)."""
    from mlx_lm.utils import quantize_model

    with contextlib.redirect_stdout(io.StringIO()):  # mlx-lm prints bits-per-weight
        return quantize_model(model, config, group_size, bits, mode=mode)


def dequantize(model: nn.Module) -> nn.Module:
    """Replace quantized layers by float ones (in place)."""
    from mlx_lm.utils import dequantize_model

    return dequantize_model(model)


def dense_weight(module: nn.Module) -> mx.array:
    """The float weight of a Linear / Embedding ((out, in) or (V, D)), dequantized when needed."""
    if hasattr(module, "bits"):
        return mx.dequantize(
            module.weight,
            module.scales,
            module.get("biases"),
            group_size=module.group_size,
            bits=module.bits,
            mode=getattr(module, "mode", "affine"),
        )
    return module.weight


def is_quantized(model: nn.Module) -> bool:
    """True when any layer of `model` is quantized (QLoRA territory)."""
    return any(hasattr(m, "bits") for _, m in model.named_modules())


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks of an mlx-lm model (its `layers`), first to last; [] when it has none."""
    return list(getattr(model, "layers", None) or [])


# Architectures whose Attention.__call__ without a cache is exactly: q/k/v projections, per-head
# q_norm/k_norm if present (qwen3), RoPE, SDPA with `self.scale` and the given mask, o_proj;
# `model.attention` recomputes that (tests/unit/test_attention.py compares it with each class).
_PLAIN_ATTENTION = ("llama", "qwen2", "qwen3")
# Architectures whose MLP.__call__ is exactly down_proj(silu(gate_proj(x)) * up_proj(x));
# `model.mlp` reproduces that (tests/unit/test_mlp.py compares it with each class).
_SWIGLU_MLP = ("llama", "qwen2", "qwen3")


def has_plain_attention(model_type: str | None) -> bool:
    """True when `model_type`'s attention class is one of `_PLAIN_ATTENTION`'s (aliases too)."""
    return _remapped(model_type) in _PLAIN_ATTENTION


def has_swiglu_mlp(model_type: str | None) -> bool:
    """True when `model_type`'s MLP class is one of `_SWIGLU_MLP`'s (aliases too)."""
    return _remapped(model_type) in _SWIGLU_MLP


def _remapped(model_type: str | None) -> str | None:
    from mlx_lm.utils import MODEL_REMAPPING

    return MODEL_REMAPPING.get(model_type, model_type)


def plain_attentions(model: nn.Module) -> list[nn.Module]:
    """The attention modules of `model` whose class is one of `_PLAIN_ATTENTION`'s."""
    return _layer_modules(model, "self_attn", "Attention", _PLAIN_ATTENTION)


def swiglu_mlps(model: nn.Module) -> list[nn.Module]:
    """The MLP modules of `model` whose class is one of `_SWIGLU_MLP`'s."""
    return _layer_modules(model, "mlp", "MLP", _SWIGLU_MLP)


def _layer_modules(
    model: nn.Module, attr: str, class_name: str, archs: tuple[str, ...]
) -> list[nn.Module]:
    """Each decoder block's `attr` module whose class is `class_name` of one of `archs`."""
    import importlib

    classes = tuple(
        getattr(importlib.import_module(f"mlx_lm.models.{name}"), class_name) for name in archs
    )
    found = [getattr(layer, attr, None) for layer in transformer_blocks(model)]
    return [m for m in found if isinstance(m, classes)]


def make_cache(model: nn.Module, max_kv_size: int | None = None) -> list[Any]:
    """A fresh KV cache for generation."""
    from mlx_lm.models.cache import make_prompt_cache

    return make_prompt_cache(model, max_kv_size=max_kv_size)


# ---------------------------------------------------------------------------------------------
# Forward passes with a custom attention mask.
#
# mlx-lm's inner models build their own causal mask (`create_attention_mask`) and have no mask
# argument, but every decoder layer takes `layer(h, mask, cache)` and hands `mask` on to
# `mx.fast.scaled_dot_product_attention` (or, for gemma2, adds it to the scores). So for the
# architectures below we run the inner model's steps ourselves (embed -> layers -> norm) with the
# caller's mask. Each entry was checked against the mlx-lm source: `hidden_states(attn_mask=causal)`
# equals the model's own pass (tests/parity/test_forward.py).
# ---------------------------------------------------------------------------------------------

# model_type -> how the inner model scales its embeddings: None, "float" (h * sqrt(D) in h's
# dtype, gemma/gemma2) or "bf16" (sqrt(D) rounded to bfloat16 first, gemma3_text).
_MASK_ARCHS: dict[str, str | None] = {
    "llama": None,
    "mistral": None,
    "qwen2": None,
    "qwen3": None,
    "phi3": None,
    "gemma": "float",
    "gemma2": "float",
    "gemma3_text": "bf16",
}


def model_type(model: nn.Module) -> str | None:
    """The `model_type` an mlx-lm model was built from."""
    mt = getattr(model, "model_type", None)
    if mt is None and hasattr(model, "args"):
        mt = getattr(model.args, "model_type", None)
    return mt


def supports_mask(model: nn.Module) -> bool:
    """True when `forward`/`hidden_states` accept a custom mask (packing) for this model."""
    inner = getattr(model, "model", None)
    return (
        model_type(model) in _MASK_ARCHS
        and inner is not None
        and getattr(inner, "pipeline_size", 1) == 1
    )


def _check_supported(model: nn.Module) -> nn.Module:
    if not supports_mask(model):
        from mlxsft.errors import ModelError

        raise ModelError(
            f"custom attention masks are not supported for model_type {model_type(model)!r}",
            hint=f"use padding instead of packing (--no-pack); supported: {sorted(_MASK_ARCHS)}",
        )
    return model.model


def block_causal_mask(segment_ids: mx.array) -> mx.array:
    """(B, L) segment ids -> (B, 1, L, L) bool mask: causal, and only within a segment.

    Give padding its own segment id (any value): pad positions then attend to each other and
    never to real tokens, and no query row is fully masked (which would make NaNs).
    """
    seg = segment_ids
    L = seg.shape[-1]
    pos = mx.arange(L)
    causal = pos[:, None] >= pos[None, :]  # (L, L)
    same = seg[:, :, None] == seg[:, None, :]  # (B, L, L)
    return (same & causal)[:, None]  # (B, 1, L, L)


def _layer_window(inner: nn.Module, layer: nn.Module) -> int | None:
    """The sliding-window size of a layer, or None for full attention."""
    if getattr(layer, "use_sliding", False):  # llama-style layer_types
        return inner.sliding_window
    if getattr(getattr(layer, "self_attn", None), "is_sliding", False):  # gemma3_text
        return inner.window_size
    return None


def _layer_mask(mask: mx.array, inner: nn.Module, layer: nn.Module, dtype: mx.Dtype) -> mx.array:
    """Adapt the caller's (B, 1, L, L) mask to one layer: sliding window, gemma2's 5-D scores."""
    window = _layer_window(inner, layer)
    if window is not None and window < mask.shape[-1]:
        L = mask.shape[-1]
        pos = mx.arange(L)
        in_window = (pos[:, None] - pos[None, :]) < window  # (L, L)
        if mask.dtype == mx.bool_:
            mask = mask & in_window
        else:
            mask = mx.where(in_window, mask, mx.array(-mx.inf, mask.dtype))
    if mask.dtype != mx.bool_ and mask.dtype != dtype:
        mask = mask.astype(dtype)
    attn = getattr(layer, "self_attn", None)
    if hasattr(attn, "attn_logit_softcapping") and getattr(attn, "repeats", 1) > 1:
        # gemma2 computes the scores itself, shaped (B, n_kv, repeats, L, L)
        mask = mask[:, :, None]  # (B, 1, 1, L, L)
    return mask


def hidden_states(
    model: nn.Module, inputs: mx.array, attn_mask: mx.array | None = None
) -> mx.array:
    """Final normed hidden states (B, L, D) for token ids `inputs` (B, L).

    `attn_mask` is a (B, 1, L, L) bool (True = attend) or additive float mask; None means the model's
    own causal mask. Every query row must attend to at least one key (see `block_causal_mask`).
    Positions are not reset inside a row: with RoPE only relative positions matter, so a
    block-diagonal causal mask gives each packed example the logits it would get alone.
    """
    inner = _check_supported(model)
    if attn_mask is None:
        return inner(inputs)
    B, L = inputs.shape
    if attn_mask.ndim != 4 or attn_mask.shape[1] != 1 or attn_mask.shape[-2:] != (L, L):
        raise ValueError(f"attention mask must have shape (B, 1, {L}, {L}), got {attn_mask.shape}")
    h = inner.embed_tokens(inputs)  # (B, L, D)
    scale = _MASK_ARCHS[model_type(model)]
    if scale == "float":
        h = h * (inner.args.hidden_size**0.5)
    elif scale == "bf16":
        h = h * mx.array(inner.args.hidden_size**0.5, mx.bfloat16).astype(h.dtype)
    for layer in inner.layers:
        h = layer(h, _layer_mask(attn_mask, inner, layer, h.dtype), None)
    return inner.norm(h)


def output_head(model: nn.Module) -> tuple[nn.Module, bool, float | None]:
    """(the module that maps hidden states to logits, tied?, final-logit soft-cap or None).

    Tied models have no `lm_head` child: their embedding (`as_linear`) is the head.
    """
    _check_supported(model)
    tied = "lm_head" not in model
    module = model.model.embed_tokens if tied else model.lm_head
    return module, tied, getattr(model, "final_logit_softcapping", None) or None


def vocab_size(model: nn.Module) -> int:
    """Rows of the output head (the vocabulary the logits cover)."""
    module, _, _ = output_head(model)
    rows = getattr(module, "n_rows", None)  # a token-row wrapper (model/token_rows.py)
    return int(rows) if rows is not None else int(module.weight.shape[0])


def lm_head(model: nn.Module, h: mx.array) -> mx.array:
    """Logits (..., V) from final hidden states (..., D): tied or untied, gemma2 soft-capping."""
    module, tied, cap = output_head(model)
    logits = (module.as_linear if tied else module)(h)  # (..., V)
    if cap:
        logits = mx.tanh(logits / cap) * cap
    return logits


def forward(model: nn.Module, inputs: mx.array, attn_mask: mx.array | None = None) -> mx.array:
    """Logits (B, L, V) for `inputs` (B, L); `attn_mask` as in `hidden_states`.

    Without a mask this is exactly `model(inputs)` (any architecture); with one it needs
    `supports_mask(model)`.
    """
    if attn_mask is None:
        return model(inputs)
    return lm_head(model, hidden_states(model, inputs, attn_mask))


# ---------------------------------------------------------------------------------------------
# Generation (mlxsft/generate.py, mlxsft/chat.py): mlx-lm's own step loop, samplers, logits
# processors, streaming detokenizers and KV-cache trimming.
# ---------------------------------------------------------------------------------------------


def make_sampler(temp: float, top_p: float, top_k: int, min_p: float) -> Any:
    """mlx-lm's sampler: greedy when `temp == 0`; top-p/top-k/min-p filters otherwise."""
    from mlx_lm.sample_utils import make_sampler as _make_sampler

    return _make_sampler(temp=temp, top_p=top_p, top_k=top_k, min_p=min_p)


def make_logits_processors(repetition_penalty: float | None, context_size: int = 20) -> list:
    """mlx-lm's logits processors (only the repetition penalty is exposed)."""
    from mlx_lm.sample_utils import make_logits_processors as _make

    return _make(repetition_penalty=repetition_penalty, repetition_context_size=context_size)


def generate_step(
    prompt: mx.array,
    model: nn.Module,
    *,
    max_tokens: int,
    sampler: Any,
    logits_processors: list | None,
    prompt_cache: list[Any],
) -> Any:
    """mlx-lm's `generate_step` on its generation stream: yields (token id, logprobs (V,)).

    Every yielded token has already been fed to `prompt_cache` (mlx-lm computes one step ahead).
    """
    from mlx_lm.generate import generate_step as _generate_step

    return _generate_step(
        prompt,
        model,
        max_tokens=max_tokens,
        sampler=sampler,
        logits_processors=logits_processors,
        prompt_cache=prompt_cache,
    )


def generation_context(model: nn.Module) -> Any:
    """mlx-lm's wired-memory context for generation (a no-op off Apple silicon)."""
    from mlx_lm.generate import generation_stream, wired_limit

    return wired_limit(model, [generation_stream])


def streaming_detokenizer(tokenizer: Any, model_path: Path | None = None) -> Any:
    """A fresh streaming detokenizer (`add_token`, `finalize`, `last_segment`), chosen the way
    mlx-lm chooses it from tokenizer.json's decoder (BPE/SPM are O(1) per token)."""
    import json
    from functools import partial

    from mlx_lm import tokenizer_utils as tu

    cls: Any = tu.NaiveStreamingDetokenizer
    file = Path(model_path) / "tokenizer.json" if model_path is not None else None
    if file is not None and file.is_file():
        decoder = json.loads(file.read_text(encoding="utf-8")).get("decoder")
        if decoder:
            if tu._is_spm_decoder(decoder):
                cls = tu.SPMStreamingDetokenizer
            elif tu._is_spm_decoder_no_space(decoder):
                cls = partial(tu.SPMStreamingDetokenizer, trim_space=False)
            elif tu._is_bpe_decoder(decoder):
                cls = tu.BPEStreamingDetokenizer
    detokenizer = cls(tokenizer)
    detokenizer.reset()
    return detokenizer


def cache_lengths(cache: list[Any]) -> list[int]:
    """Tokens held by each layer's KV cache."""
    return [int(getattr(c, "offset", 0)) for c in cache]


def trim_cache_to(cache: list[Any], n_tokens: int) -> bool:
    """Trim every layer's cache to its first `n_tokens`; False (cache untouched) if impossible."""
    from mlx_lm.models.cache import can_trim_prompt_cache

    lengths = cache_lengths(cache)
    if any(n < n_tokens for n in lengths):
        return False
    if any(n > n_tokens for n in lengths) and not can_trim_prompt_cache(cache):
        return False
    for c, n in zip(cache, lengths, strict=True):
        if n > n_tokens:
            c.trim(n - n_tokens)
    return True


# ---------------------------------------------------------------------------------------------
# The input embedding and the output head (trainable token rows, model/token_rows.py).
# ---------------------------------------------------------------------------------------------

# Parameter paths of the two matrices in mlx-lm models ("embedding" also serves as a tied head).
EMBEDDING_PATH = "model.embed_tokens"
HEAD_PATH = "lm_head"


def input_embedding(model: nn.Module) -> nn.Module:
    """The token embedding (nn.Embedding / QuantizedEmbedding, or a wrapper put there)."""
    inner = getattr(model, "model", None)
    if inner is None or "embed_tokens" not in inner:
        from mlxsft.errors import ModelError

        raise ModelError(f"{type(model).__name__} has no token embedding mlxsft knows of")
    return inner.embed_tokens


def untied_head(model: nn.Module) -> nn.Module | None:
    """The untied LM head, or None when the head is the embedding (tied)."""
    return model.lm_head if "lm_head" in model else None


def set_input_embedding(model: nn.Module, module: nn.Module) -> None:
    input_embedding(model)  # checks it exists
    model.model.embed_tokens = module


def set_output_head(model: nn.Module, module: nn.Module) -> None:
    model.lm_head = module
