"""`mlxsft fuse` and `mlxsft export` end to end on tiny checkpoints (CLI -> files -> read back)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _export_utils import adapted_logits, write_random_adapter
from click.testing import CliRunner

from mlxsft.cli import main
from mlxsft.export.gguf_model import gguf_name, permute_qk
from mlxsft.model import gguf

IDS = [1, 40, 41, 300, 7, 99, 12, 5]


def run(*args: str) -> str:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def fused_logits(out_dir) -> np.ndarray:
    return adapted_logits(out_dir, None, IDS)


@pytest.fixture(scope="module")
def llama_adapter(tiny_llama, tmp_path_factory):
    out = write_random_adapter(tiny_llama, tmp_path_factory.mktemp("ad") / "lora")
    rows = [
        {"type": "train", "step": 9, "loss": 1.75, "lr": 1e-4},
        {"type": "eval", "step": 10, "val_loss": 1.25, "val_ppl": 3.49},
        {"type": "train", "step": 10, "loss": 1.5, "lr": 1e-4},
    ]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "config.yaml").write_text("model: tiny\ndata: data/chat\niters: 10\n")
    return out


def test_fuse_lora_llama(tiny_llama, llama_adapter, tmp_path):
    out = tmp_path / "fused"
    text = run(
        "fuse", "--model", str(tiny_llama), "--adapter", str(llama_adapter), "--output", str(out)
    )
    assert "max |logit diff|" in text and "retained after fusing 100.0%" in text
    assert "warning" not in text
    assert (
        f"merged adapter {llama_adapter} with base {tiny_llama} (the base is not changed)" in text
    )
    assert f"wrote the fused model to {out}" in text
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [2, 4]
    card = (out / "README.md").read_text()
    assert f"base_model: {tiny_llama}" in card and "- Data: `data/chat`" in card
    assert "| val_loss | 1.25 |" in card and "| eval_step | 10 |" in card
    assert "| train_loss | 1.5 |" in card and "| train_step | 10 |" in card
    assert "| fine_tune_type | lora |" in card and "| iters | 10 |" in card
    ref = adapted_logits(tiny_llama, llama_adapter, IDS)
    assert np.abs(fused_logits(out) - ref).max() < 1e-4
    import mlx.core as mx
    from mlx_lm import load

    model, _ = load(str(out))
    mlx_lm_logits = np.array(model(mx.array([IDS]))[0])
    assert np.abs(mlx_lm_logits - ref).max() < 1e-4


def test_fuse_dora_qwen2_with_biases(tiny_qwen2, tmp_path):
    adapter = write_random_adapter(tiny_qwen2, tmp_path / "dora", fine_tune_type="dora")
    out = tmp_path / "fused"
    run("fuse", "--model", str(tiny_qwen2), "--adapter", str(adapter), "--output", str(out))
    ref = adapted_logits(tiny_qwen2, adapter, IDS)
    assert np.abs(fused_logits(out) - ref).max() < 1e-4


def test_fuse_qlora_dequantize(tiny_llama_q4, tmp_path):
    adapter = write_random_adapter(tiny_llama_q4, tmp_path / "qlora")
    out = tmp_path / "fused"
    run(
        "fuse", "--model", str(tiny_llama_q4), "--adapter", str(adapter), "--output", str(out),
        "--dequantize",
    )  # fmt: skip
    config = json.loads((out / "config.json").read_text())
    assert "quantization" not in config
    # both RoPE spellings, so transformers 4 and 5 and mlx-lm all read the same theta
    assert config["rope_parameters"]["rope_theta"] == config["rope_theta"]
    from safetensors.numpy import load_file

    weights = load_file(out / "model.safetensors")
    assert not any(k.endswith(".scales") for k in weights)
    assert weights["model.layers.0.self_attn.q_proj.weight"].dtype == np.float32
    ref = adapted_logits(tiny_llama_q4, adapter, IDS)
    assert np.abs(fused_logits(out) - ref).max() < 1e-4


def test_requantize_warns_when_adapter_is_erased(tiny_llama, tmp_path):
    weak = write_random_adapter(tiny_llama, tmp_path / "weak", b_scale=0.01)
    out = tmp_path / "q4"
    text = run(
        "fuse", "--model", str(tiny_llama), "--adapter", str(weak), "--output", str(out),
        "--quantize", "4",
    )  # fmt: skip
    assert "after re-quantising to 4 bits" in text
    assert "warning: quantisation erased most of the adapter's effect" in text
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 4


def test_quantized_base_needs_dequantize_to_requantize(tiny_llama_q4, tmp_path):
    adapter = write_random_adapter(tiny_llama_q4, tmp_path / "a")
    args = ["fuse", "--model", str(tiny_llama_q4), "--adapter", str(adapter)]
    result = CliRunner().invoke(main, [*args, "--output", str(tmp_path / "o"), "--quantize", "8"])
    assert result.exit_code == 2
    assert "already quantized" in result.output and "--dequantize" in result.output


@pytest.mark.optional
def test_transformers_loads_fused(tiny_llama, llama_adapter, tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    out = tmp_path / "fused"
    run("fuse", "--model", str(tiny_llama), "--adapter", str(llama_adapter), "--output", str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        got = model(torch.tensor([IDS])).logits[0].numpy()
    assert np.abs(got - adapted_logits(tiny_llama, llama_adapter, IDS)).max() < 1e-4


def _expected_tensors(model_dir, adapter, config) -> dict[str, np.ndarray]:
    """float32 fused weights under llama.cpp names, q/k permuted for llama/mistral."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlxsft.export.fuse import load_with_adapter
    from mlxsft.model import lora

    model = lora.fuse_adapters(load_with_adapter(str(model_dir), adapter).model, dequantize=True)
    out = {}
    for k, v in tree_flatten(model.parameters()):
        x = np.array(v.astype(mx.float32))
        name = gguf_name(k)
        if config["model_type"] in ("llama", "mistral") and ".attn_q." in name:
            x = permute_qk(x, config["num_attention_heads"])
        elif config["model_type"] in ("llama", "mistral") and ".attn_k." in name:
            x = permute_qk(x, config["num_key_value_heads"])
        out[name] = x
    return out


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_gguf_export_reads_back(arch, tiny_checkpoint, tmp_path):
    model_dir = tiny_checkpoint(arch, chat_template="chatml", tie_word_embeddings=arch == "qwen2")
    adapter = (
        write_random_adapter(model_dir, tmp_path / "a") if arch in ("llama", "qwen3") else None
    )
    path = tmp_path / "out" / f"{arch}.gguf"
    args = ["export", "--model", str(model_dir), "--format", "gguf", "--output", str(path)]
    run(*args, *(["--adapter", str(adapter)] if adapter else []), "--dtype", "f32")
    config = json.loads((model_dir / "config.json").read_text())
    expected = _expected_tensors(model_dir, adapter, config)
    meta, tensors = gguf.read_gguf(path)
    assert set(tensors) == set(expected)
    for name, t in tensors.items():
        assert t.ggml_type == gguf.GGML_F32 and np.array_equal(t.data, expected[name]), name
    a = {"llama": "llama", "mistral": "llama"}.get(arch, arch)
    assert meta["general.architecture"] == a
    assert meta[f"{a}.block_count"] == 2 and meta[f"{a}.embedding_length"] == 64
    assert meta[f"{a}.attention.head_count"] == 4 and meta[f"{a}.attention.head_count_kv"] == 2
    assert meta[f"{a}.feed_forward_length"] == 128 and meta[f"{a}.context_length"] == 4096
    assert meta[f"{a}.rope.freq_base"] == config["rope_theta"]
    assert meta[f"{a}.attention.layer_norm_rms_epsilon"] == np.float32(1e-6)
    assert len(meta["tokenizer.ggml.tokens"]) == 512 and meta["tokenizer.ggml.model"] == "gpt2"
    own = json.loads((model_dir / "tokenizer_config.json").read_text())["chat_template"]
    assert meta["tokenizer.chat_template"] == own
    assert ("output.weight" in tensors) == (arch != "qwen2")
    assert ("blk.0.attn_q.bias" in tensors) == (arch == "qwen2")
    assert ("blk.1.attn_k_norm.weight" in tensors) == (arch == "qwen3")
    modelfile = (path.parent / "Modelfile").read_text()
    assert f"FROM ./{arch}.gguf" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    try:
        import gguf as ggufpkg
    except ImportError:
        return
    reader = ggufpkg.GGUFReader(str(path))
    fields = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert list(fields) == list(meta)
    for key, field in fields.items():
        got, ours = field.contents(), meta[key]
        if isinstance(ours, np.ndarray):
            assert np.array_equal(np.asarray(got, dtype=ours.dtype), ours), key
        else:
            assert got == ours, key
    assert reader.fields["general.architecture"].contents() == a
    for t in reader.tensors:
        assert np.array_equal(
            np.asarray(t.data).reshape(tensors[t.name].shape), tensors[t.name].data
        )


def test_gguf_q8_0_and_f16(tiny_llama_base, tmp_path):
    for dtype, want in (("q8_0", gguf.GGML_Q8_0), ("f16", gguf.GGML_F16)):
        path = tmp_path / f"m-{dtype}.gguf"
        args = [
            "export",
            "--model",
            str(tiny_llama_base),
            "--format",
            "gguf",
            "--output",
            str(path),
        ]
        run(*args, "--dtype", dtype)
        meta, tensors = gguf.read_gguf(path)
        assert meta["general.file_type"] == {"q8_0": 7, "f16": 1}[dtype]
        assert tensors["blk.0.ffn_down.weight"].ggml_type == want
        assert tensors["blk.0.attn_norm.weight"].ggml_type == gguf.GGML_F32
        emb = tensors["token_embd.weight"].data
        config = json.loads((tiny_llama_base / "config.json").read_text())
        ref = _expected_tensors(tiny_llama_base, None, config)["token_embd.weight"]
        assert emb.shape == ref.shape == (512, 64)
        tol = np.abs(ref).max() / 127 / 2 * 1.01 if dtype == "q8_0" else np.abs(ref).max() / 1024
        assert np.abs(emb - ref).max() <= tol
    modelfile = (tmp_path / "Modelfile").read_text()
    assert "chat format: alpaca" in modelfile  # a base model has no chat template


@pytest.mark.parametrize("dtype", ["q4_k_m", "q5_k_m", "q6_k", "q4_0"])
def test_gguf_k_quants(dtype, tiny_checkpoint, tmp_path):
    """256-wide rows so the k-quants apply; read back with llama.cpp's `gguf` package, every
    tensor dequantized by its own dequantizer, against the float weights."""
    from mlxsft.export import gguf_mix

    model_dir = tiny_checkpoint("llama", hidden_size=256, intermediate_size=512, n_heads=4)
    path = tmp_path / "m.gguf"
    run(
        "export",
        "--model",
        str(model_dir),
        "--format",
        "gguf",
        "--output",
        str(path),
        "--dtype",
        dtype,
    )
    config = json.loads((model_dir / "config.json").read_text())
    expected = _expected_tensors(model_dir, None, config)
    meta, tensors = gguf.read_gguf(path)
    assert meta["general.file_type"] == gguf_mix.FILE_TYPE[dtype]
    want = gguf_mix.tensor_types([(n, x.shape) for n, x in expected.items()], dtype, config)
    assert {n: t.ggml_type for n, t in tensors.items()} == want
    k = {"q4_k_m": gguf.GGML_Q4_K, "q5_k_m": gguf.GGML_Q5_K, "q6_k": gguf.GGML_Q6_K}
    k["q4_0"] = gguf.GGML_Q4_0
    assert tensors["blk.0.ffn_down.weight"].ggml_type == k[dtype]
    if dtype.endswith("_m"):  # layer 1 of 2 is a "more bits" layer
        assert tensors["blk.1.attn_v.weight"].ggml_type == gguf.GGML_Q6_K
    ggufpkg = pytest.importorskip("gguf")
    reader = ggufpkg.GGUFReader(str(path))
    assert reader.fields["general.file_type"].contents() == gguf_mix.FILE_TYPE[dtype]
    for t in reader.tensors:
        ours = tensors[t.name]
        assert int(t.tensor_type) == ours.ggml_type
        back = ggufpkg.quants.dequantize(t.data, t.tensor_type).reshape(ours.shape)
        assert np.array_equal(back, ours.data), t.name
        x = expected[t.name]
        rel = np.sqrt(np.mean((back - x) ** 2) / np.mean(x**2))
        assert rel < (0.12 if dtype in ("q4_k_m", "q4_0") else 0.05), t.name


def test_gguf_rejects_unsupported_arch():
    from mlxsft.export.gguf_model import model_metadata

    config = {"model_type": "mamba", "hidden_size": 8, "num_attention_heads": 2}
    with pytest.raises(ValueError, match="GGUF export supports model_type"):
        model_metadata(config, "m", "f16")
    gemma2 = {"model_type": "gemma2", "hidden_size": 64, "num_attention_heads": 4}
    gemma2 |= {"num_hidden_layers": 2, "intermediate_size": 8, "query_pre_attn_scalar": 99}
    with pytest.raises(ValueError, match="query_pre_attn_scalar 99"):
        model_metadata(gemma2, "m", "f16")


def test_export_peft_cli(llama_adapter, tmp_path):
    out = tmp_path / "peft"
    text = run("export", "--adapter", str(llama_adapter), "--format", "peft", "--output", str(out))
    assert "wrote PEFT adapter" in text
    assert (out / "adapter_model.safetensors").is_file()
    result = CliRunner().invoke(main, ["export", "--format", "peft", "--output", str(out)])
    assert result.exit_code == 2 and "needs --adapter" in result.output
    args = ["export", "--adapter", str(llama_adapter), "--format", "peft", "--output", str(out)]
    result = CliRunner().invoke(main, [*args, "--dtype", "q8_0"])
    assert result.exit_code == 2 and "--dtype applies to --format gguf only" in result.output


def test_sharded_output_loads(tiny_llama, llama_adapter, tmp_path):
    from mlxsft.export.fuse import load_with_adapter
    from mlxsft.export.hf import save_hf_model
    from mlxsft.model import lora

    loaded = load_with_adapter(str(tiny_llama), llama_adapter)
    lora.fuse_adapters(loaded.model)
    out = save_hf_model(
        tmp_path / "sharded", loaded.model, loaded.config, loaded.path, max_shard_bytes=100_000
    )
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(shards) >= 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(set(index["weight_map"].values())) == shards
    assert len(index["weight_map"]) == 21  # 2 layers x 9 + embed, norm, lm_head
    assert not (out / "model.safetensors").exists()
    ref = adapted_logits(tiny_llama, llama_adapter, IDS)
    assert np.abs(fused_logits(out) - ref).max() < 1e-4


def test_fuse_refuses_to_overwrite_the_base(tiny_llama, llama_adapter):
    args = ["fuse", "--model", str(tiny_llama), "--adapter", str(llama_adapter)]
    result = CliRunner().invoke(main, [*args, "--output", str(tiny_llama)])
    assert result.exit_code == 2 and "would overwrite the base model" in result.output
    assert (tiny_llama / "model.safetensors").is_file()


def test_fuse_accepts_a_peft_adapter(tiny_llama, llama_adapter, tmp_path):
    peft_dir = tmp_path / "peft"
    run("export", "--adapter", str(llama_adapter), "--format", "peft", "--output", str(peft_dir))
    out = tmp_path / "fused"
    run("fuse", "--model", str(tiny_llama), "--adapter", str(peft_dir), "--output", str(out))
    ref = adapted_logits(tiny_llama, llama_adapter, IDS)
    assert np.abs(fused_logits(out) - ref).max() < 1e-4
    assert sorted(p.name for p in peft_dir.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]


def test_fuse_full_fine_tune_writes_its_weights(tiny_llama, tmp_path):
    full = write_random_adapter(tiny_llama, tmp_path / "full", fine_tune_type="full")
    out = tmp_path / "fused"
    text = run("fuse", "--model", str(tiny_llama), "--adapter", str(full), "--output", str(out))
    assert "is a full fine-tune: nothing to merge" in text and "adapter effect" not in text
    assert np.abs(fused_logits(out) - adapted_logits(tiny_llama, full, IDS)).max() < 1e-4


@pytest.mark.parametrize("spec", ["chatml", "alpaca", "tokenizer", "file", "missing-file"])
def test_gguf_and_modelfile_carry_the_trained_template(spec, tiny_llama, tmp_path):
    """The GGUF's tokenizer.chat_template and the Modelfile follow the run's config.yaml
    `template` (what training used), not the base model's."""
    from mlxsft.data.templates import builtin_source

    own = json.loads((tiny_llama / "tokenizer_config.json").read_text())["chat_template"]
    adapter = write_random_adapter(tiny_llama, tmp_path / "a")
    jinja = tmp_path / "mine.jinja"
    jinja.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}")
    value = {"file": str(jinja), "missing-file": str(tmp_path / "gone.jinja")}.get(spec, spec)
    (adapter / "config.yaml").write_text(f"model: tiny\ntemplate: {value}\n")
    path = tmp_path / "out" / "m.gguf"
    args = ["export", "--model", str(tiny_llama), "--adapter", str(adapter), "--format", "gguf"]
    text = run(*args, "--output", str(path), "--dtype", "f32")
    meta, _ = gguf.read_gguf(path)
    want = {"chatml": builtin_source("chatml"), "alpaca": builtin_source("alpaca")}
    want |= {"file": jinja.read_text(), "tokenizer": own, "missing-file": own}
    assert meta["tokenizer.chat_template"] == want[spec]
    modelfile = (path.parent / "Modelfile").read_text()
    family = {"alpaca": "alpaca", "file": None}.get(spec, "chatml")  # the tiny model's is chatml
    if family:
        assert f"# chat format: {family}\n" in modelfile
    else:
        assert "TEMPLATE" not in modelfile and "tokenizer.chat_template" in modelfile
    assert ("warning: the run's template" in text) == (spec == "missing-file")
