"""Helpers for the layer tests (test_attention.py, test_mlp.py): a tiny LoRA model whose every
adapter gets gradients, a loss on its hidden states, its gradients and a compiled step's peak."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from mlxsft import _mlxlm
from mlxsft.model.lora import apply_adapters


def lora_model(path: Path) -> nn.Module:
    """The checkpoint at `path` with rank-4 LoRA on all linears: the same A in every copy (seed
    0) and B = 0.01, so A gets gradients too."""
    model, _ = _mlxlm.load_model(path)
    mx.random.seed(0)
    apply_adapters(model, fine_tune_type="lora", rank=4, alpha=8.0, dropout=0.0,
                   target_modules="all-linear", num_layers=-1)  # fmt: skip
    lora_b = [(k, mx.full(v.shape, 0.01)) for k, v in tree_flatten(model.trainable_parameters())
              if k.endswith("lora_b")]  # fmt: skip
    model.update(tree_unflatten(lora_b))
    return model


def hidden_loss(model: nn.Module, inputs: mx.array, mask: mx.array | None = None) -> mx.array:
    """A loss that weighs every hidden-state feature differently (no LM head)."""
    h = _mlxlm.hidden_states(model, inputs, mask)
    return (h * mx.arange(h.shape[-1], dtype=h.dtype)).sum() / h.size


def trainable_grads(model: nn.Module, inputs: mx.array, mask: mx.array | None = None,
                    compiled: bool = False) -> tuple[float, dict]:  # fmt: skip
    """(loss, {name: gradient}) of `hidden_loss`, eager or compiled."""
    fn = nn.value_and_grad(model, lambda x: hidden_loss(model, x, mask))
    if compiled:
        fn = mx.compile(fn, inputs=[model.state])
    value, grads = fn(inputs)
    return float(value), dict(tree_flatten(grads))


def compiled_peak(model: nn.Module, inputs: mx.array) -> int:
    """Peak memory (bytes) of one compiled value-and-grad step of `hidden_loss`, compiled first."""
    mx.eval(model.parameters())  # no lazy initialisers inside the trace
    step = mx.compile(nn.value_and_grad(model, lambda x: hidden_loss(model, x)),
                      inputs=[model.state], outputs=[model.state])  # fmt: skip
    mx.eval(step(inputs))  # compile outside the measurement
    mx.clear_cache()
    mx.reset_peak_memory()
    mx.eval(step(inputs))
    return mx.get_peak_memory()
