"""Untrusted model files: corrupt/truncated safetensors, impossible config values, FIFOs and
configs written by transformers 5 (RoPE under `rope_parameters`)."""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
from pathlib import Path

import mlx.core as mx
import pytest

from mlxsft.errors import ModelError
from mlxsft.model.files import check_safetensors, normalize_config
from mlxsft.model.loading import load


def _st(path: Path) -> Path:
    mx.save_safetensors(str(path), {"a": mx.zeros((4, 3)), "b": mx.ones((5,), mx.int32)})
    return path


def test_valid_safetensors_pass(tmp_path):
    check_safetensors(_st(tmp_path / "w.safetensors"))


@pytest.mark.parametrize(
    "damage, problem",
    [
        (lambda b: b[:-5], "truncated safetensors file"),
        (lambda b: b[:6], "not a valid safetensors file"),
        (lambda b: (10**15).to_bytes(8, "little") + b[8:], "not a valid safetensors file"),
        (lambda b: b[:8] + b"\xff" * (len(b) - 8), "corrupt safetensors header (not JSON)"),
        (lambda b: b.replace(b'"shape":[4,3]', b'"shape":[9,9]'), "corrupt safetensors header"),
    ],
)
def test_damaged_safetensors_are_refused(tmp_path, damage, problem):
    path = _st(tmp_path / "w.safetensors")
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ModelError, match=re.escape(problem)):
        check_safetensors(path)


def _copy(model: Path, dst: Path, **config) -> Path:
    shutil.copytree(model, dst)
    data = json.loads((dst / "config.json").read_text())
    for key, value in config.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    (dst / "config.json").write_text(json.dumps(data))
    return dst


@pytest.mark.parametrize(
    "config, problem",
    [
        ({"vocab_size": 10**12}, "impossible config value vocab_size = 1000000000000"),
        ({"num_attention_heads": 0}, "impossible config value num_attention_heads = 0"),
        ({"hidden_size": "64"}, "impossible config value hidden_size = '64'"),
        ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads 3"),
        ({"model_type": "cache"}, "unsupported model_type 'cache'"),
        ({"model_type": ["llama"]}, "unsupported model_type"),
    ],
)
def test_impossible_configs_are_refused_in_one_line(tiny_llama, tmp_path, config, problem):
    model = _copy(tiny_llama, tmp_path / "m", **config)
    with pytest.raises(ModelError, match=re.escape(problem)) as info:
        load(model)
    assert "\n" not in str(info.value)


def test_truncated_weights_refused_before_mlx_reads_them(tiny_llama, tmp_path):
    model = _copy(tiny_llama, tmp_path / "m")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelError, match="truncated safetensors file"):
        load(model)


@pytest.mark.parametrize("name", ["model.safetensors", "tokenizer.json"])
def test_a_fifo_in_the_model_dir_never_blocks(tiny_llama, tmp_path, name):
    model = _copy(tiny_llama, tmp_path / "m")
    (model / name).unlink()
    os.mkfifo(model / name)
    errors: list[str] = []

    def run() -> None:
        try:
            load(model)
        except ModelError as exc:
            errors.append(str(exc))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(30)
    assert errors and "not a regular file" in errors[0] and name in errors[0]


def test_rope_theta_of_transformers_5_configs_is_used(tiny_llama, tmp_path):
    model = _copy(
        tiny_llama, tmp_path / "m", rope_theta=None,
        rope_parameters={"rope_theta": 12345.0, "rope_type": "default"},
    )  # fmt: skip
    loaded = load(model)
    assert loaded.model.model.layers[0].self_attn.rope.base == 12345.0
    assert loaded.config["rope_theta"] == 12345.0


def test_normalize_config_both_ways(shared_fixtures):
    """The real SmolLM2 config (written by transformers 5.24) without its top-level rope_theta
    gives theta 100,000 (mlx-lm alone would use its default 10,000)."""
    path = shared_fixtures / "models" / "smollm2-135m-instruct-mlx-q4" / "config.json"
    config = json.loads(path.read_text())
    config.pop("rope_theta")
    assert normalize_config(config)["rope_theta"] == 100000.0
    old = {"rope_theta": 5e5, "rope_scaling": {"type": "llama3", "factor": 8.0}}
    new = normalize_config(old)["rope_parameters"]
    assert new == {"rope_theta": 5e5, "rope_type": "llama3", "factor": 8.0}
    assert normalize_config({"rope_parameters": new})["rope_scaling"] == {
        "rope_type": "llama3",
        "factor": 8.0,
    }
    per_type = {"rope_parameters": {"full_attention": {"rope_theta": 1e6},
                                    "sliding_attention": {"rope_theta": 1e4}}}  # fmt: skip
    got = normalize_config(per_type)
    assert (got["rope_theta"], got["rope_local_base_freq"]) == (1e6, 1e4)
