"""SwiGLU MLPs that keep less for the backward pass.

mlx-lm's llama/qwen2/qwen3 MLP computes down_proj(silu(gate) * up). Under autodiff MLX keeps
gate, up, sigmoid(gate), silu(gate) and the product for the backward pass: five arrays of the
intermediate width (1,536 on SmolLM2-135M, two thirds of a layer's saved activations).
`swiglu` is the same product as a custom function whose backward pass recomputes the sigmoid
from `gate`: it keeps gate, up and the product (which down_proj keeps anyway), so two of the
five are gone (0.68 of 4.01 GiB at batch 4 x 512 on SmolLM2-135M, at the same step time).

`use_lean_mlp` switches the MLPs `_mlxlm.swiglu_mlps` lists, on every backend (the forward
pass is the same arithmetic); tests/unit/test_mlp.py checks outputs and gradients against
mlx-lm's MLP. `MLXSFT_LEAN_MLP=0` turns it off (for comparisons).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn

from mlxsft import _mlxlm
from mlxsft.model.swap import swap_call


@mx.custom_function
def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """silu(gate) * up, whose VJP recomputes sigmoid(gate) instead of keeping it."""
    return nn.silu(gate) * up


@swiglu.vjp
def _swiglu_vjp(primals: list[mx.array], d_out: mx.array, out: mx.array) -> tuple:
    # Depending on the cotangent makes this a new computation: otherwise `mx.compile` merges the
    # sigmoid with the forward pass's, which then stays alive (as in mx.checkpoint).
    gate, up = mx.depends(list(primals), [d_out])
    sig = mx.sigmoid(gate)
    d_up = d_out * (gate * sig)
    # d silu(g) / dg = sig * (1 + g * (1 - sig))
    d_gate = (d_out * up) * (sig * (1 + gate * (1 - sig)))
    return d_gate, d_up


def _enabled() -> bool:
    return os.environ.get("MLXSFT_LEAN_MLP") != "0"


def applies_to(model_type: str | None) -> bool:
    """Whether `use_lean_mlp` switches models of `model_type` in this process."""
    return _enabled() and _mlxlm.has_swiglu_mlp(model_type)


def use_lean_mlp(model: nn.Module) -> int:
    """Make the SwiGLU MLPs of THIS model use `swiglu`; returns how many. Each instance gets a
    subclass of its class (`model.swap`). Call before compiling."""
    if not _enabled():
        return 0
    mlps = _mlxlm.swiglu_mlps(model)
    for mlp in mlps:
        swap_call(mlp, "LeanMLP", _lean_call)
    return len(mlps)


def _lean_call(base: type) -> Callable:
    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))

    return __call__
