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


def load_model(path: Path, *, lazy: bool = False) -> tuple[nn.Module, dict]:
    """Load weights and config from a local HF-format dir; never runs remote code."""
    from mlx_lm.utils import load_model as _load_model

    return _load_model(Path(path), lazy=lazy, trust_remote_code=False)


def load_adapters(model: nn.Module, adapter_path: str | Path) -> nn.Module:
    """Apply an mlx-lm style adapter dir (`adapters.safetensors` + `adapter_config.json`)."""
    from mlx_lm.utils import load_adapters as _load_adapters

    return _load_adapters(model, str(adapter_path))


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


def is_quantized(model: nn.Module) -> bool:
    """True when any layer of `model` is quantized (QLoRA territory)."""
    return any(hasattr(m, "bits") for _, m in model.named_modules())


def make_cache(model: nn.Module) -> list[Any]:
    """A fresh KV cache for generation."""
    from mlx_lm.models.cache import make_prompt_cache

    return make_prompt_cache(model)


def as_array(x: Any) -> mx.array:
    return x if isinstance(x, mx.array) else mx.array(x)
