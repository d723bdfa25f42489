"""Lean SwiGLU MLPs (mlxsft/model/mlp.py) == mlx-lm's MLPs: outputs, gradients (also inside
every verified architecture, eager and compiled), and the memory they leave out."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from helpers_layers import compiled_peak, lora_model, trainable_grads
from mlx_lm.models.activations import swiglu as mlx_lm_swiglu

from mlxsft import _mlxlm
from mlxsft.model.mlp import swiglu, use_lean_mlp


def _arrays(*shape: int, seed: int = 0, scale: float = 1.0) -> list[mx.array]:
    rng = np.random.default_rng(seed)
    return [mx.array((scale * rng.normal(size=shape)).astype(np.float32)) for _ in range(3)]


@pytest.mark.parametrize("scale", [1.0, 40.0])  # 40: sigmoids saturate at both ends
def test_swiglu_matches_mlx_lm_outputs_and_gradients(scale):
    gate, up, cot = _arrays(3, 5, 16, scale=scale)
    out, grads = mx.vjp(swiglu, [gate, up], [cot])
    out_ref, grads_ref = mx.vjp(lambda g, u: nn.silu(g) * u, [gate, up], [cot])
    np.testing.assert_array_equal(np.array(out[0]), np.array(mlx_lm_swiglu(gate, up)))
    np.testing.assert_array_equal(np.array(out[0]), np.array(out_ref[0]))
    for name, g, g_ref in zip(("gate", "up"), grads, grads_ref, strict=True):
        assert np.isfinite(np.array(g)).all()
        np.testing.assert_allclose(np.array(g), np.array(g_ref), rtol=1e-5, atol=1e-6 * scale,
                                   err_msg=name)  # fmt: skip


def _lora_model(path, lean: bool) -> nn.Module:
    model = lora_model(path)
    if lean:
        assert use_lean_mlp(model) == len(model.layers)
        assert type(model.layers[0].mlp).__name__.startswith("LeanMLP")
    return model


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_models_train_the_same_with_lean_mlps(tiny_checkpoint, arch):
    path = tiny_checkpoint(arch, n_layers=2, n_heads=4, n_kv_heads=2)
    inputs = mx.array(np.random.default_rng(0).integers(3, 500, (2, 40)), mx.int32)
    v0, g0 = trainable_grads(_lora_model(path, lean=False), inputs)
    lean = _lora_model(path, lean=True)
    for compiled in (False, True):
        v1, g1 = trainable_grads(lean, inputs, compiled=compiled)
        assert v1 == pytest.approx(v0, rel=1e-6)
        assert g0.keys() == g1.keys() and len(g0) == 2 * 7 * 2
        for name in g0:
            np.testing.assert_allclose(np.array(g1[name]), np.array(g0[name]), rtol=1e-4,
                                       atol=1e-7, err_msg=f"{name} compiled={compiled}")  # fmt: skip


def test_other_architectures_and_the_switch_keep_mlx_lm_code(tiny_checkpoint, monkeypatch):
    for arch in ("gemma", "phi3"):  # not verified: untouched
        other, _ = _mlxlm.load_model(tiny_checkpoint(arch))
        assert use_lean_mlp(other) == 0
    model, _ = _mlxlm.load_model(tiny_checkpoint("llama"))
    monkeypatch.setenv("MLXSFT_LEAN_MLP", "0")
    assert use_lean_mlp(model) == 0
    assert not type(model.layers[0].mlp).__name__.startswith("LeanMLP")


def test_compiled_step_keeps_one_fewer_intermediate_array(tiny_checkpoint):
    """silu(gate) is not kept, also under mx.compile: the compiled peak drops by about one
    (tokens, intermediate) array per layer."""
    layers, inter, rows, L = 2, 2048, 4, 256
    path = tiny_checkpoint("llama", n_layers=layers, intermediate_size=inter)
    inputs = mx.array(np.random.default_rng(0).integers(3, 500, (rows, L)), mx.int32)
    peaks = {}
    for lean in (False, True):
        peaks[lean] = compiled_peak(_lora_model(path, lean), inputs)
    one = layers * rows * L * inter * 4  # one float32 (tokens, intermediate) array per layer
    assert peaks[False] - peaks[True] > 0.8 * one, (peaks, one)  # measured: 1.0
