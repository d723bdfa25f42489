"""Lean SwiGLU MLPs (mlxsft/model/mlp.py) == mlx-lm's MLPs: outputs, gradients (also inside
every verified architecture, eager and compiled), and the memory they leave out."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models.activations import swiglu as mlx_lm_swiglu

from mlxsft import _mlxlm
from mlxsft.model.lora import apply_adapters
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
    model, _ = _mlxlm.load_model(path)
    mx.random.seed(0)  # the same LoRA A in every copy
    apply_adapters(model, fine_tune_type="lora", rank=4, alpha=8.0, dropout=0.0,
                   target_modules="all-linear", num_layers=-1)  # fmt: skip
    lora_b = [(k, mx.full(v.shape, 0.01)) for k, v in tree_flatten(model.trainable_parameters())
              if k.endswith("lora_b")]  # fmt: skip
    model.update(tree_unflatten(lora_b))  # non-zero B, so A gets gradients too
    if lean:
        assert use_lean_mlp(model) == len(model.layers)
        assert type(model.layers[0].mlp).__name__.startswith("LeanMLP")
    return model


def _loss(model: nn.Module, inputs: mx.array) -> mx.array:
    h = _mlxlm.hidden_states(model, inputs, None)
    return (h * mx.arange(h.shape[-1], dtype=h.dtype)).sum() / h.size


def _grads(model: nn.Module, inputs: mx.array, compiled: bool = False):
    fn = nn.value_and_grad(model, lambda x: _loss(model, x))
    if compiled:
        fn = mx.compile(fn, inputs=[model.state])
    value, grads = fn(inputs)
    return float(value), dict(tree_flatten(grads))


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_models_train_the_same_with_lean_mlps(tiny_checkpoint, arch):
    path = tiny_checkpoint(arch, n_layers=2, n_heads=4, n_kv_heads=2)
    inputs = mx.array(np.random.default_rng(0).integers(3, 500, (2, 40)), mx.int32)
    v0, g0 = _grads(_lora_model(path, lean=False), inputs)
    lean = _lora_model(path, lean=True)
    for compiled in (False, True):
        v1, g1 = _grads(lean, inputs, compiled=compiled)
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
        model = _lora_model(path, lean)
        mx.eval(model.parameters())  # no lazy initialisers inside the trace
        step = mx.compile(nn.value_and_grad(model, lambda x, m=model: _loss(m, x)),
                          inputs=[model.state], outputs=[model.state])  # fmt: skip
        mx.eval(step(inputs))  # compile outside the measurement
        mx.clear_cache()
        mx.reset_peak_memory()
        mx.eval(step(inputs))
        peaks[lean] = mx.get_peak_memory()
    one = layers * rows * L * inter * 4  # one float32 (tokens, intermediate) array per layer
    assert peaks[False] - peaks[True] > 0.8 * one, (peaks, one)  # measured: 1.0
