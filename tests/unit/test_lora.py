"""LoRA / DoRA: init == base, fused == base + adapter, save/load round trip, mlx_lm.load parity."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlxsft import _mlxlm
from mlxsft.errors import UserError
from mlxsft.model.lora import (
    DoRALinear,
    LoRALinear,
    apply_adapters,
    fuse_adapters,
    load_adapters,
    n_parameters,
    save_adapters,
)

TOKENS = mx.array(np.random.default_rng(0).integers(3, 500, size=(2, 12)), dtype=mx.int32)


def load(path: Path) -> nn.Module:
    return _mlxlm.load_model(path)[0]


def logits(model: nn.Module) -> np.ndarray:
    return np.array(model(TOKENS).astype(mx.float32))


def randomize_adapters(model: nn.Module, seed: int = 1) -> None:
    """Non-zero lora_b (and a perturbed DoRA magnitude) so adapters change the output."""
    rng = np.random.default_rng(seed)
    new = []
    for name, p in tree_flatten(model.trainable_parameters()):
        noise = rng.standard_normal(p.shape).astype(np.float32)
        scale = 0.05 if name.endswith("lora_b") else 0.01
        new.append((name, p + mx.array(scale * noise)))
    model.load_weights(new, strict=False)


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_init_equals_base(tiny_llama, kind):
    model = load(tiny_llama)
    base = logits(model)
    apply_adapters(model, fine_tune_type=kind, rank=4, alpha=8.0)
    out = logits(model)
    if kind == "lora":
        np.testing.assert_array_equal(out, base)  # lora_b == 0: exactly the base
    else:
        np.testing.assert_allclose(out, base, atol=1e-5)


def test_apply_freezes_base_and_names_match_mlx_lm(tiny_llama):
    model = load(tiny_llama)
    config = apply_adapters(
        model, fine_tune_type="lora", rank=4, alpha=32.0, target_modules="q_proj,v_proj"
    )
    assert config == {
        "fine_tune_type": "lora",
        "num_layers": 2,
        "lora_parameters": {
            "rank": 4,
            "scale": 8.0,
            "dropout": 0.0,
            "keys": ["self_attn.v_proj", "self_attn.q_proj"],
            "alpha": 32.0,
        },
    }
    trainable = dict(tree_flatten(model.trainable_parameters()))
    assert sorted(trainable) == sorted(
        f"model.layers.{i}.self_attn.{p}.lora_{ab}"
        for i in range(2)
        for p in ("q_proj", "v_proj")
        for ab in "ab"
    )
    assert trainable["model.layers.0.self_attn.q_proj.lora_a"].shape == (64, 4)
    assert trainable["model.layers.0.self_attn.q_proj.lora_b"].shape == (4, 64)


def test_all_linear_last_layer_only_and_never_head(tiny_llama):
    model = load(tiny_llama)
    config = apply_adapters(model, fine_tune_type="dora", num_layers=1)
    assert config["num_layers"] == 1
    assert sorted(config["lora_parameters"]["keys"]) == [
        "mlp.down_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "self_attn.k_proj",
        "self_attn.o_proj",
        "self_attn.q_proj",
        "self_attn.v_proj",
    ]
    names = [k for k, _ in tree_flatten(model.trainable_parameters())]
    assert all(k.startswith("model.layers.1.") for k in names)
    assert {k.rsplit(".", 1)[1] for k in names} == {"lora_a", "lora_b", "m"}
    assert not isinstance(model.lm_head, LoRALinear)


def test_phi3_fused_projections(tiny_phi3):
    model = load(tiny_phi3)
    config = apply_adapters(model, fine_tune_type="lora", target_modules=["qkv_proj"])
    assert config["lora_parameters"]["keys"] == ["self_attn.qkv_proj"]


def test_bad_targets_and_full_on_quantized(tiny_llama, tiny_llama_q4):
    with pytest.raises(UserError, match="not found"):
        apply_adapters(load(tiny_llama), target_modules="c_attn")
    with pytest.raises(UserError, match="quantized"):
        apply_adapters(load(tiny_llama_q4), fine_tune_type="full")
    with pytest.raises(UserError, match="fine_tune_type"):
        apply_adapters(load(tiny_llama), fine_tune_type="qlora")


def test_full_unfreezes_everything(tiny_llama):
    model = load(tiny_llama)
    n_all = len(tree_flatten(model.parameters()))
    config = apply_adapters(model, fine_tune_type="full")
    assert config == {"fine_tune_type": "full", "num_layers": -1}
    assert len(tree_flatten(model.trainable_parameters())) == n_all
    last = load(tiny_llama)
    assert apply_adapters(last, fine_tune_type="full", num_layers=1)["num_layers"] == 1
    names = [k for k, _ in tree_flatten(last.trainable_parameters())]
    assert names and all(k.startswith("model.layers.1.") for k in names)
    with pytest.raises(UserError, match="num_layers"):
        apply_adapters(load(tiny_llama), num_layers=0)


@pytest.mark.parametrize("kind", ["lora", "dora"])
@pytest.mark.parametrize("quantized", [False, True])
def test_fused_equals_base_plus_adapter(tiny_llama, tiny_llama_q4, kind, quantized):
    model = load(tiny_llama_q4 if quantized else tiny_llama)
    apply_adapters(model, fine_tune_type=kind, rank=4, alpha=8.0)
    randomize_adapters(model)
    adapted = logits(model)
    fuse_adapters(model, dequantize=quantized)
    assert not any(isinstance(m, LoRALinear) for _, m in model.named_modules())
    assert not _mlxlm.is_quantized(model)
    # dequantize + add in float32: only summation-order rounding differs
    np.testing.assert_allclose(logits(model), adapted, atol=1e-5, rtol=1e-5)


def test_fuse_keeps_quantization(tiny_llama_q4):
    model = load(tiny_llama_q4)
    apply_adapters(model, fine_tune_type="lora", rank=4)
    randomize_adapters(model)
    lora = model.layers[0].self_attn.q_proj
    dense = lora.fuse(dequantize=True)  # float Linear: W + scale * (A @ B)^T
    expected = nn.QuantizedLinear.from_linear(dense, group_size=64, bits=4)
    fuse_adapters(model)
    q = model.layers[0].self_attn.q_proj
    assert isinstance(q, nn.QuantizedLinear) and q.bits == 4 and q.group_size == 64
    np.testing.assert_array_equal(np.array(q.weight), np.array(expected.weight))
    np.testing.assert_array_equal(np.array(q.scales), np.array(expected.scales))


@pytest.mark.parametrize("kind", ["lora", "dora"])
@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2", "tiny_llama_q4"])
def test_save_load_and_mlx_lm_parity(request, tmp_path, kind, fixture):
    import mlx_lm

    path = request.getfixturevalue(fixture)
    model = load(path)
    config = apply_adapters(model, fine_tune_type=kind, rank=4, alpha=8.0, num_layers=1)
    randomize_adapters(model)
    ours = logits(model)
    save_adapters(model, tmp_path, config)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["lora_parameters"]["scale"] == 2.0 and saved["fine_tune_type"] == kind
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "adapter_config.json",
        "adapters.safetensors",
    ]
    reloaded = load_adapters(load(path), tmp_path)
    np.testing.assert_array_equal(logits(reloaded), ours)
    theirs, _ = mlx_lm.load(str(path), adapter_path=str(tmp_path))
    np.testing.assert_allclose(logits(theirs), ours, atol=1e-5, rtol=1e-5)


def test_load_mlx_lm_written_config(tiny_llama, tmp_path):
    """An adapter config as mlx_lm.lora writes it (scale, no alpha) loads with alpha = scale*r."""
    model = load(tiny_llama)
    config = apply_adapters(model, fine_tune_type="lora", rank=2, alpha=40.0)
    randomize_adapters(model)
    ours = logits(model)
    del config["lora_parameters"]["alpha"]
    save_adapters(model, tmp_path, config)
    other = load_adapters(load(tiny_llama), tmp_path)
    assert isinstance(other.layers[0].mlp.up_proj, LoRALinear)
    assert other.layers[0].mlp.up_proj.scale == 20.0
    np.testing.assert_array_equal(logits(other), ours)


def test_dora_is_lora_subclass_with_magnitude(tiny_llama):
    model = load(tiny_llama)
    apply_adapters(model, fine_tune_type="dora", target_modules="o_proj")
    layer = model.layers[0].self_attn.o_proj
    assert isinstance(layer, DoRALinear)
    w = np.array(layer.linear.weight)
    np.testing.assert_allclose(np.array(layer.m), np.linalg.norm(w, axis=1), rtol=1e-6)


def test_full_save_and_mlx_lm_parity(tiny_llama_base, tmp_path):
    import mlx_lm

    model = load(tiny_llama_base)
    config = apply_adapters(model, fine_tune_type="full")
    randomize_adapters(model)  # perturbs every (trainable) weight
    ours = logits(model)
    save_adapters(model, tmp_path, config)
    np.testing.assert_array_equal(logits(load_adapters(load(tiny_llama_base), tmp_path)), ours)
    theirs, _ = mlx_lm.load(str(tiny_llama_base), adapter_path=str(tmp_path))
    np.testing.assert_allclose(logits(theirs), ours, atol=1e-5, rtol=1e-5)


def test_parameter_counts_and_no_double_wrap(tiny_llama, tiny_llama_q4):
    dense, quant = load(tiny_llama), load(tiny_llama_q4)
    assert n_parameters(quant)[1] == n_parameters(dense)[1]  # unpacked sizes
    apply_adapters(dense, fine_tune_type="lora", rank=4, target_modules="q_proj")
    # 2 layers x q_proj (64 -> 64): lora_a (64, 4) + lora_b (4, 64)
    assert n_parameters(dense)[0] == 2 * (64 * 4 + 4 * 64)
    with pytest.raises(UserError, match="already has adapters"):
        apply_adapters(dense, fine_tune_type="lora")


def test_fuse_handles_mlx_lm_adapter_layers(tiny_llama, tmp_path):
    """A model whose adapters mlx-lm applied (its own LoRA classes) fuses the same way."""
    from mlx_lm.utils import load_adapters as mlx_lm_load_adapters

    model = load(tiny_llama)
    config = apply_adapters(model, fine_tune_type="lora", rank=4)
    randomize_adapters(model)
    save_adapters(model, tmp_path, config)
    theirs = mlx_lm_load_adapters(load(tiny_llama), str(tmp_path))
    assert type(theirs.layers[0].mlp.up_proj).__module__.startswith("mlx_lm")
    adapted = logits(theirs)
    with pytest.raises(UserError, match="already has adapters"):
        apply_adapters(theirs)
    fuse_adapters(theirs)
    assert not any("lora_a" in m for _, m in theirs.named_modules())
    np.testing.assert_allclose(logits(theirs), adapted, atol=1e-5, rtol=1e-5)
