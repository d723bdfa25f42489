"""PEFT adapter export/import: key names, shapes, config, exact round trip, logits."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _export_utils import adapted_logits, write_random_adapter
from safetensors.numpy import load_file

from mlxsft.errors import UserError
from mlxsft.export.peft import export_peft
from mlxsft.model.peft import convert_peft_to_mlx, ensure_mlx_adapter, import_peft, is_peft_adapter

IDS = [1, 40, 41, 300, 7, 99, 12]


@pytest.fixture(scope="module")
def lora_dir(tiny_llama, tmp_path_factory):
    return write_random_adapter(tiny_llama, tmp_path_factory.mktemp("lora") / "a")


@pytest.fixture(scope="module")
def dora_dir(tiny_qwen2, tmp_path_factory):
    out = tmp_path_factory.mktemp("dora") / "a"
    return write_random_adapter(
        tiny_qwen2, out, fine_tune_type="dora", targets=("k_proj", "o_proj")
    )


def test_peft_names_shapes_and_config(lora_dir, tiny_llama, tmp_path):
    out = export_peft(lora_dir, tmp_path / "peft", base_model="org/tiny")
    assert is_peft_adapter(out) and not is_peft_adapter(lora_dir)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8.0
    assert cfg["target_modules"] == ["down_proj", "q_proj", "v_proj"]
    assert cfg["layers_to_transform"] == [0, 1]
    assert cfg["base_model_name_or_path"] == "org/tiny"
    assert cfg["use_dora"] is False
    (lora_dir / "config.yaml").write_text("model: org/from-run\n")
    try:
        no_model = json.loads(
            (export_peft(lora_dir, tmp_path / "p2") / "adapter_config.json").read_text()
        )
    finally:
        (lora_dir / "config.yaml").unlink()
    assert no_model["base_model_name_or_path"] == "org/from-run"
    w = load_file(out / "adapter_model.safetensors")
    assert len(w) == 2 * 3 * 2  # layers x modules x (A, B)
    pre = "base_model.model.model.layers.0."
    assert w[pre + "self_attn.q_proj.lora_A.weight"].shape == (4, 64)  # (r, in)
    assert w[pre + "self_attn.q_proj.lora_B.weight"].shape == (64, 4)  # (out, r)
    assert w[pre + "self_attn.v_proj.lora_B.weight"].shape == (32, 4)  # 2 kv heads x 16
    assert w[pre + "mlp.down_proj.lora_A.weight"].shape == (4, 128)
    mlx = load_file(lora_dir / "adapters.safetensors")
    a = mlx["model.layers.0.self_attn.q_proj.lora_a"]
    assert np.array_equal(w[pre + "self_attn.q_proj.lora_A.weight"], a.T)


@pytest.mark.parametrize("which", ["lora_dir", "dora_dir"])
def test_round_trip_exact(which, request, tmp_path):
    src = request.getfixturevalue(which)
    peft_dir = export_peft(src, tmp_path / "peft")
    back = import_peft(peft_dir, tmp_path / "mlx")
    a, b = load_file(src / "adapters.safetensors"), load_file(back / "adapters.safetensors")
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
    src_cfg = json.loads((src / "adapter_config.json").read_text())
    cfg = json.loads((back / "adapter_config.json").read_text())
    assert cfg["fine_tune_type"] == src_cfg["fine_tune_type"]
    for key in ("rank", "scale"):
        assert cfg["lora_parameters"][key] == src_cfg["lora_parameters"][key], key
    assert cfg["lora_parameters"]["keys"] == sorted(src_cfg["lora_parameters"]["keys"])


def test_dora_magnitude_key(dora_dir):
    from mlxsft.export.peft import convert_mlx_to_peft

    w, cfg = convert_mlx_to_peft(dora_dir)
    assert cfg["use_dora"] is True
    m = w["base_model.model.model.layers.1.self_attn.o_proj.lora_magnitude_vector"]
    assert m.shape == (64,)


def test_peft_adapter_loads_with_same_logits(lora_dir, tiny_llama, tmp_path):
    peft_dir = export_peft(lora_dir, tmp_path / "peft")
    assert ensure_mlx_adapter(lora_dir) == lora_dir
    ref = adapted_logits(tiny_llama, lora_dir, IDS)
    got = adapted_logits(tiny_llama, peft_dir, IDS)
    assert np.array_equal(ref, got)
    assert np.abs(ref - adapted_logits(tiny_llama, None, IDS)).max() > 1e-2  # adapter matters


def test_ensure_mlx_adapter_feeds_mlx_lm_loader(lora_dir, tiny_llama, tmp_path):
    import mlx.core as mx

    from mlxsft.model.loading import load

    peft_dir = export_peft(lora_dir, tmp_path / "peft")
    before = sorted(p.name for p in peft_dir.iterdir())
    mlx_dir = ensure_mlx_adapter(peft_dir, tmp_path / "cache")
    assert mlx_dir.parent == tmp_path / "cache" and (mlx_dir / "adapters.safetensors").is_file()
    assert sorted(p.name for p in peft_dir.iterdir()) == before  # the PEFT dir is not written
    model = load(str(tiny_llama), adapter=str(mlx_dir)).model  # mlx-lm's own adapter loader
    got = np.array(model(mx.array([IDS]))[0])
    assert np.abs(got - adapted_logits(tiny_llama, lora_dir, IDS)).max() < 1e-5


def test_full_fine_tune_and_bad_peft_are_user_errors(tmp_path, lora_dir):
    full = tmp_path / "full"
    full.mkdir()
    (full / "adapter_config.json").write_text('{"fine_tune_type": "full"}')
    with pytest.raises(UserError, match="no LoRA adapter"):
        export_peft(full, tmp_path / "x")
    peft_dir = export_peft(lora_dir, tmp_path / "p")
    cfg = json.loads((peft_dir / "adapter_config.json").read_text())
    (peft_dir / "adapter_config.json").write_text(json.dumps({**cfg, "use_rslora": True}))
    with pytest.raises(UserError, match="use_rslora"):
        convert_peft_to_mlx(peft_dir)


@pytest.mark.optional
@pytest.mark.parametrize(
    ("which", "base"), [("lora_dir", "tiny_llama"), ("dora_dir", "tiny_qwen2")]
)
def test_hf_peft_reproduces_mlxsft_logits(which, base, request, tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter, base_dir = request.getfixturevalue(which), request.getfixturevalue(base)
    peft_dir = export_peft(adapter, tmp_path / "peft")
    hf_base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(hf_base, str(peft_dir)).eval()
    with torch.no_grad():
        got = model(torch.tensor([IDS])).logits[0].numpy()
    ref = adapted_logits(base_dir, adapter, IDS)
    assert np.abs(got - ref).max() < 1e-4


def test_peft_weights_get_the_usual_file_mode(lora_dir, tmp_path):
    """Not safetensors' private 0600 temp-file mode: readable like the config beside it."""
    import os

    out = export_peft(lora_dir, tmp_path / "peft")
    umask = os.umask(0)
    os.umask(umask)
    weights = out / "adapter_model.safetensors"
    assert weights.stat().st_mode & 0o777 == 0o666 & ~umask
    assert weights.stat().st_mode & 0o777 == (out / "adapter_config.json").stat().st_mode & 0o777
