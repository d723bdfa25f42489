"""SwiGLU MLPs that keep less for the backward pass.

mlx-lm's llama/qwen2/qwen3 MLP computes down_proj(silu(gate) * up). Under autodiff MLX keeps
gate, up, sigmoid(gate), silu(gate) and the product for the backward pass: five arrays of the
intermediate width (1,536 on SmolLM2-135M, two thirds of a layer's saved activations).
`swiglu` is the same product as a custom function whose backward pass needs only gate, up and
the sigmoid: silu(gate) is not kept (0.34 of 4.01 GiB at batch 4 x 512 on SmolLM2-135M, at the
same step time). Recomputing the sigmoid instead would save one more array (0.68 GiB in all),
but MLX's CPU sigmoid (~16 ns per element) made a step 5-11% slower, so it is not done.

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


def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """silu(gate) * up, keeping sigmoid(gate) but not silu(gate) for the backward pass."""
    return _swiglu(gate, up)[0]


@mx.custom_function
def _swiglu(gate: mx.array, up: mx.array) -> tuple[mx.array, mx.array]:
    # The sigmoid is a second output (unused by the caller) so the VJP gets it without keeping
    # silu(gate); silu(gate) * up as mlx-lm computes it: gate * sigmoid(gate), then * up.
    sig = mx.sigmoid(gate)
    return gate * sig * up, sig


@_swiglu.vjp
def _swiglu_vjp(primals: list[mx.array], cotangents: list[mx.array], outputs: list) -> tuple:
    gate, up = primals
    d_out, sig = cotangents[0], outputs[1]
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
