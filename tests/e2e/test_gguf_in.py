"""`--model file.gguf`: a GGUF written by mlxsft's own writer loads back as the same model
(llama, qwen2, qwen3, gemma, gemma2, phi3).

f32 files give the original logits and tokenization exactly; q8_0 / q4_0 tensors load as MLX
affine-quantized layers whose dequantized values equal ggml's (no requantization), so they train
as QLoRA; k-quant tensors are dequantized to float32. The shared stories260K.gguf (written by
llama.cpp itself, SentencePiece vocabulary) checks the other tokenizer kind.
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file
from test_gguf_forward import gguf_forward

from mlxsft.cli import main
from mlxsft.export.gguf_model import write_model_gguf
from mlxsft.model import gguf
from mlxsft.model.loading import load

IDS = [1, 40, 41, 300, 7, 99, 12, 5, 260]


@pytest.fixture(autouse=True)
def _gguf_cache(tmp_path, monkeypatch):
    """Converted GGUF model dirs go under the test's tmp dir, not the system temp dir."""
    monkeypatch.setenv("MLXSFT_GGUF_CACHE", str(tmp_path / "gguf-cache"))


PROBES = [" 12345 hello world", "don't stop\n\n  indented\ttab", "ünïcode <|im_start|>user hi"]


def _gguf(model_dir, out, dtype):
    config = json.loads((model_dir / "config.json").read_text())
    weights = load_file(model_dir / "model.safetensors")
    return write_model_gguf(out, weights, config, model_dir, dtype=dtype)


def _logits(model, ids=IDS) -> np.ndarray:
    from mlxsft import _mlxlm

    return np.array(_mlxlm.forward(model, mx.array([ids], dtype=mx.int32))[0].astype(mx.float32))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma", "gemma2", "phi3"])
def test_f32_gguf_round_trips_exactly(arch, tiny_checkpoint, tmp_path):
    model_dir = tiny_checkpoint(arch, chat_template="chatml", tie_word_embeddings=arch == "qwen2")
    path = _gguf(model_dir, tmp_path / "m.gguf", "f32")
    ref, got = load(str(model_dir)), load(str(path))
    diff = np.abs(_logits(got.model) - _logits(ref.model)).max()
    # gemma norms travel as 1 + w (llama.cpp's convention): w -> (1 + w) - 1 rounds in float32
    assert diff <= (1e-5 if arch.startswith("gemma") else 0.0)
    for text in PROBES:
        assert got.tokenizer(text)["input_ids"] == ref.tokenizer(text)["input_ids"], text
    assert got.tokenizer.chat_template == ref.tokenizer.chat_template
    assert got.tokenizer.eos_token == ref.tokenizer.eos_token
    assert got.config["tie_word_embeddings"] == ref.config.get("tie_word_embeddings", False)


@pytest.mark.parametrize("dtype", ["q8_0", "q4_0"])
def test_quantized_gguf_loads_as_mlx_quantized(dtype, tiny_checkpoint, tmp_path):
    import mlx.nn as nn

    model_dir = tiny_checkpoint("llama", chat_template="chatml")
    path = _gguf(model_dir, tmp_path / "m.gguf", dtype)
    loaded = load(str(path))
    q = loaded.model.model.layers[0].self_attn.q_proj
    assert isinstance(q, nn.QuantizedLinear) and q.group_size == 32
    assert q.bits == (8 if dtype == "q8_0" else 4)
    # the layer's dequantized weight is ggml's, row-permuted back to HF's q layout
    _, tensors = gguf.read_gguf(path)
    w = np.array(mx.dequantize(q.weight, q.scales, q.biases, 32, q.bits))
    from mlxsft.model.gguf_in import permute_qk

    assert np.array_equal(permute_qk(w, 4), tensors["blk.0.attn_q.weight"].data)
    # and the model computes what a float64 forward pass over the file's values computes
    assert np.abs(_logits(loaded.model) - gguf_forward(path, IDS)).max() < 1e-3


def test_k_quant_gguf_is_dequantized(tiny_checkpoint, tmp_path):
    model_dir = tiny_checkpoint("llama", hidden_size=256, intermediate_size=512, n_heads=4)
    path = _gguf(model_dir, tmp_path / "m.gguf", "q4_k_m")
    loaded = load(str(path))
    assert "quantization" not in loaded.config  # q4_K / q6_K / q8_0 mix: all dequantized
    assert np.abs(_logits(loaded.model) - gguf_forward(path, IDS)).max() < 1e-3


def test_qlora_train_and_fuse_on_a_quantized_gguf(tiny_checkpoint, tmp_path):
    model_dir = tiny_checkpoint("llama", chat_template="chatml")
    path = _gguf(model_dir, tmp_path / "m.gguf", "q4_0")
    rows = [
        {"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": w}]}
        for w in ("a b", "c d", "e f", "g h") * 4
    ]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    args = ["train", "--model", str(path), "--data", str(data), "-o", str(out), "--iters", "3"]
    args += ["--batch-size", "2", "--max-seq-len", "32", "--eval-every", "0"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert (out / "adapters.safetensors").is_file()
    fused = tmp_path / "fused"
    args = ["fuse", "--model", str(path), "--adapter", str(out), "--output", str(fused)]
    result = CliRunner().invoke(main, [*args, "--dequantize"])
    assert result.exit_code == 0, result.output
    config = json.loads((fused / "config.json").read_text())
    assert "quantization" not in config and (fused / "tokenizer.json").is_file()


def test_unsupported_gguf_is_one_line_error(tmp_path):
    path = gguf.write_gguf(
        tmp_path / "x.gguf", {"general.architecture": "mamba"}, [("a.weight", np.zeros(4), 0)]
    )
    result = CliRunner().invoke(main, ["generate", "--model", str(path), "--prompt", "hi"])
    assert result.exit_code == 2 and "GGUF architecture 'mamba' is not supported" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_llama_cpp_stories260k_gguf(shared_fixtures):
    """llama.cpp's own f32 conversion of stories260K (SentencePiece vocabulary) loads as the HF
    model: same logits; tokenization as SentencePiece's (and transformers', except that
    transformers does not add the dummy-prefix space to a text that starts with a space)."""
    from sentencepiece import SentencePieceProcessor

    hf = shared_fixtures / "models" / "stories260K-hf"
    path = shared_fixtures / "models" / "stories260K" / "stories260K.gguf"
    if not path.is_file() or not (hf / "model.safetensors").is_file():
        pytest.skip("stories260K fixtures absent")
    ref, got = load(str(hf)), load(str(path))
    ids = [1, 40, 41, 300, 7, 99, 12, 5]
    assert np.abs(_logits(got.model, ids) - _logits(ref.model, ids)).max() < 1e-5
    sp = SentencePieceProcessor(model_file=str(hf / "tokenizer.model"))
    texts = ["Once upon a time, there was a little girl.", "Lily's dog  ran 12345 ü"]
    for text in [*texts, " 12345  spaces", "  x"]:
        mine = got.tokenizer(text)["input_ids"]
        assert mine == [1, *sp.encode(text)], text
        if not text.startswith(" "):
            assert mine == ref.tokenizer(text)["input_ids"], text
        assert got.tokenizer.decode(mine, skip_special_tokens=True) == sp.decode(sp.encode(text))


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_exported_pre_tokenizer_splits_like_training(arch, tiny_checkpoint, tmp_path):
    """transformers loads a qwen2 tokenizer with Qwen2's digit-by-digit split even when its
    tokenizer.json says GPT-2: the export picks `tokenizer.ggml.pre` by tokenizing probe texts,
    and the GGUF's tokenizer (llama.cpp's split rules) then tokenizes like training did."""
    from mlxsft.export.gguf_vocab import PRE_PROBES

    model_dir = tiny_checkpoint(arch, chat_template="chatml", tie_word_embeddings=arch == "qwen2")
    path = tmp_path / "m.gguf"
    args = ["export", "--model", str(model_dir), "--format", "gguf", "--output", str(path)]
    result = CliRunner().invoke(main, [*args, "--dtype", "f32"])
    assert result.exit_code == 0 and "warning" not in result.output, result.output
    meta, _ = gguf.read_gguf(path)
    assert meta["tokenizer.ggml.pre"] == {"qwen2": "qwen2", "llama": "gpt-2"}[arch]
    trained, shipped = load(str(model_dir)).tokenizer, load(str(path)).tokenizer
    for text in PRE_PROBES:
        ids = trained(text, add_special_tokens=False)["input_ids"]
        assert shipped(text, add_special_tokens=False)["input_ids"] == ids, text
    if arch == "qwen2":  # the rule in its tokenizer.json (GPT-2's) would have been wrong
        from tokenizers import Tokenizer

        by_file = Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(" 12345").ids
        assert trained(" 12345", add_special_tokens=False)["input_ids"] != by_file


def test_pre_tokenizer_type_reports_no_match():
    from mlxsft.export.gguf_vocab import pre_tokenizer_type

    meta = {"tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.tokens": ["a", "b"]}
    meta["tokenizer.ggml.merges"] = []

    def tokenizer(text, add_special_tokens=False):
        return {"input_ids": [99]}  # nothing splits like this

    assert pre_tokenizer_type(tokenizer, meta) == ("gpt-2", False)


def test_llama3_rope_freqs_round_trip(tiny_checkpoint, tmp_path):
    """A Llama 3.2-style rope_scaling is written as llama.cpp's rope_freqs table and recovered
    from it on the way in."""
    import shutil

    src = tiny_checkpoint("llama", chat_template="chatml")
    model_dir = tmp_path / "llama3"
    shutil.copytree(src, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["rope_scaling"] = {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    config["rope_theta"] = 500000.0
    (model_dir / "config.json").write_text(json.dumps(config))
    path = _gguf(model_dir, tmp_path / "m.gguf", "f32")
    _, tensors = gguf.read_gguf(path)
    assert "rope_freqs.weight" in tensors
    ref, got = load(str(model_dir)), load(str(path))
    assert got.config["rope_scaling"] == config["rope_scaling"]
    long_ids = list(range(1, 300))
    assert np.array_equal(_logits(got.model, long_ids), _logits(ref.model, long_ids))
