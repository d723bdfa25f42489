"""GGUF writer/reader: q8_0 blocks, metadata types, q/k permutation, vocab, and a real llama.cpp file.

The `gguf` PyPI package (llama.cpp's own reader) is a test-only dependency: its checks skip
when it is not installed.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from mlxsft.export.gguf_model import gguf_name, permute_qk, write_model_gguf
from mlxsft.export.gguf_vocab import CONTROL, NORMAL, UNUSED, vocab_metadata
from mlxsft.export.modelfile import modelfile_text, template_family
from mlxsft.model import gguf, gguf_quants

METADATA = {
    "general.architecture": "llama",
    "general.name": "tiny ünïcode",
    "llama.block_count": 2,
    "llama.rope.freq_base": 10000.0,
    "tokenizer.ggml.add_bos_token": True,
    "neg": -5,
    "tokenizer.ggml.tokens": ["<s>", "a b", "ü"],
    "tokenizer.ggml.scores": np.array([0.0, -1.5, -2.0], dtype=np.float32),
    "tokenizer.ggml.token_type": np.array([3, 1, 1], dtype=np.int32),
}


def _tensors():
    rng = np.random.default_rng(0)
    return [
        ("a.weight", rng.standard_normal((3, 64)).astype(np.float32), gguf.GGML_F32),
        ("b.weight", rng.standard_normal((5, 32)).astype(np.float32), gguf.GGML_F16),
        ("c.weight", rng.standard_normal((4, 96)).astype(np.float32), gguf.GGML_Q8_0),
        ("d.bias", rng.standard_normal(7).astype(np.float32), gguf.GGML_F32),
    ] + [  # one tensor of every quantized type
        (f"{gguf.TYPE_NAMES[t]}.weight", rng.standard_normal((3, 512)).astype(np.float32), t)
        for t in gguf_quants.BLOCKS
        if t not in (gguf.GGML_F32, gguf.GGML_F16)
    ]


def test_q8_0_block_exact():
    x = (np.arange(32, dtype=np.float32) - 16.0) / 4  # amax 4.0 at index 0
    raw = gguf.quantize(x[None], gguf.GGML_Q8_0)
    assert raw.shape == (1, 34)
    d = raw[0, :2].view(np.float16)[0]
    assert d == np.float16(4.0 / 127)
    qs = raw[0, 2:].view(np.int8)
    # round half away from zero of x * 127 / 4
    expected = np.sign(x) * np.floor(np.abs(x * (127 / 4.0)) + 0.5)
    assert qs.tolist() == expected.astype(np.int8).tolist()
    assert qs[0] == -127 and qs[16] == 0 and qs[17] == 8  # 0.25 * 31.75 = 7.94 -> 8
    back = gguf.dequantize(raw, gguf.GGML_Q8_0, (32,))
    assert np.abs(back - x).max() <= float(d) / 2 + 1e-6
    assert not gguf.quantize(np.zeros((1, 32)), gguf.GGML_Q8_0).any()  # zero block: d = 0, q = 0


def test_write_read_roundtrip(tmp_path):
    path = gguf.write_gguf(tmp_path / "t.gguf", METADATA, _tensors())
    meta, tensors = gguf.read_gguf(path)
    assert list(meta) == list(METADATA)
    for k, v in METADATA.items():
        if isinstance(v, np.ndarray):
            assert meta[k].dtype == v.dtype and np.array_equal(meta[k], v)
        else:
            assert meta[k] == v, k
    assert list(tensors) == [name for name, _, _ in _tensors()]
    for name, x, t in _tensors():
        got = tensors[name]
        assert got.ggml_type == t and got.shape == x.shape
        want = np.asarray(gguf.encode_tensor(x, t))
        if t in (gguf.GGML_F32, gguf.GGML_F16):
            assert got.raw is None and np.array_equal(got.data, want)
        else:
            assert np.array_equal(got.raw, want)
            assert np.array_equal(got.data, gguf.dequantize(want, t, x.shape))
    # tensor data starts aligned; the file ends on the alignment too
    assert path.stat().st_size % gguf.ALIGNMENT == 0


def test_roundtrip_with_llama_cpp_reader(tmp_path):
    ggufpkg = pytest.importorskip("gguf")
    path = gguf.write_gguf(tmp_path / "t.gguf", METADATA, _tensors())
    r = ggufpkg.GGUFReader(str(path))
    assert r.fields["GGUF.version"].contents() == 3
    for k, v in METADATA.items():
        got = r.fields[k].contents()
        assert (list(v) if isinstance(v, np.ndarray) else v) == pytest.approx(got), k
    assert r.fields["llama.block_count"].types == [ggufpkg.GGUFValueType.UINT32]
    assert r.fields["neg"].types == [ggufpkg.GGUFValueType.INT64]
    by_name = {t.name: t for t in r.tensors}
    for name, x, t in _tensors():
        rt = by_name[name]
        assert int(rt.tensor_type) == t
        assert list(rt.shape) == list(reversed(x.shape))  # ggml order
        if t not in (gguf.GGML_F32, gguf.GGML_F16):  # gguf's own dequantizer on our bytes
            data = ggufpkg.quants.dequantize(rt.data, rt.tensor_type)
            assert np.array_equal(data, gguf.dequantize(gguf.quantize(x, t), t, x.shape))
        else:
            assert np.array_equal(np.asarray(rt.data).reshape(x.shape), gguf.encode_tensor(x, t))


def _rope(x: np.ndarray, pos: int, interleaved: bool) -> np.ndarray:
    """RoPE on one head (hd,): rotate-half (HF) or adjacent pairs (llama.cpp normal)."""
    hd = x.shape[0]
    theta = pos / 10000.0 ** (np.arange(0, hd, 2) / hd)  # (hd/2,)
    c, s = np.cos(theta), np.sin(theta)
    if interleaved:
        a, b = x[0::2], x[1::2]
        out = np.empty_like(x)
        out[0::2], out[1::2] = a * c - b * s, a * s + b * c
        return out
    a, b = x[: hd // 2], x[hd // 2 :]
    return np.concatenate([a * c - b * s, a * s + b * c])


def test_permute_qk_turns_rotate_half_into_interleaved_rope():
    rng = np.random.default_rng(1)
    n_head, hd, dim = 3, 8, 16
    w = rng.standard_normal((n_head * hd, dim))
    x = rng.standard_normal(dim)
    wp = permute_qk(w, n_head)
    for pos in (0, 5):
        for h in range(n_head):
            hf = _rope((w @ x)[h * hd : (h + 1) * hd], pos, interleaved=False)
            cpp = _rope((wp @ x)[h * hd : (h + 1) * hd], pos, interleaved=True)
            # the same rotated values, pairs (i, i + hd/2) stored adjacently
            assert np.allclose(cpp, permute_qk(hf[:, None], 1)[:, 0])
    assert np.array_equal(permute_qk(np.arange(8.0), 1), [0, 4, 1, 5, 2, 6, 3, 7])


def test_tensor_names():
    assert gguf_name("model.embed_tokens.weight") == "token_embd.weight"
    assert gguf_name("model.layers.3.self_attn.k_proj.bias") == "blk.3.attn_k.bias"
    assert gguf_name("model.layers.0.self_attn.q_norm.weight") == "blk.0.attn_q_norm.weight"
    assert gguf_name("model.layers.1.mlp.down_proj.weight") == "blk.1.ffn_down.weight"
    assert gguf_name("model.layers.1.post_attention_layernorm.weight") == "blk.1.ffn_norm.weight"
    with pytest.raises(ValueError, match="no llama.cpp name"):
        gguf_name("model.layers.0.mlp.experts.weight")


def test_byte_level_vocab(tiny_qwen2):
    meta = vocab_metadata(tiny_qwen2, 520)
    tok = json.loads((tiny_qwen2 / "tokenizer.json").read_text())
    n = len(tok["model"]["vocab"])
    assert meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.ggml.pre"] == "gpt-2"
    assert len(meta["tokenizer.ggml.tokens"]) == 520
    assert meta["tokenizer.ggml.tokens"][:3] == ["<pad>", "<s>", "</s>"]
    assert meta["tokenizer.ggml.tokens"][-1] == "[PAD519]"
    types = meta["tokenizer.ggml.token_type"]
    assert types[0] == CONTROL and types[n - 1] == NORMAL and types[-1] == UNUSED
    assert len(meta["tokenizer.ggml.merges"]) == len(tok["model"]["merges"])
    assert "tokenizer.ggml.scores" not in meta
    assert meta["tokenizer.ggml.eos_token_id"] == 2 and meta["tokenizer.ggml.bos_token_id"] == 1
    assert meta["tokenizer.ggml.add_bos_token"] is False
    assert "<|im_start|>" in meta["tokenizer.chat_template"]


def test_matches_llama_cpp_conversion_of_stories260k(shared_fixtures, tmp_path):
    """Our f32 GGUF of the HF stories260K == the llama.cpp file: every tensor, tokenizer, params."""
    hf = shared_fixtures / "models" / "stories260K-hf"
    ref_path = shared_fixtures / "models" / "stories260K" / "stories260K.gguf"
    if not (hf / "model.safetensors").is_file() or not ref_path.is_file():
        pytest.skip("stories260K fixtures absent")
    from safetensors.numpy import load_file

    config = json.loads((hf / "config.json").read_text())
    out = write_model_gguf(
        tmp_path / "s.gguf", load_file(hf / "model.safetensors"), config, hf, dtype="f32"
    )
    meta, tensors = gguf.read_gguf(out)
    ref_meta, ref_tensors = gguf.read_gguf(ref_path)
    # the HF model ties its embeddings, so llama.cpp's separate output.weight is absent
    assert set(ref_tensors) - set(tensors) == {"output.weight"}
    assert np.array_equal(ref_tensors["output.weight"].data, tensors["token_embd.weight"].data)
    for name, t in tensors.items():
        assert t.shape == ref_tensors[name].shape, name
        assert np.array_equal(t.data, ref_tensors[name].data), name
    for key, value in ref_meta.items():
        if key in (
            "general.name",
            "tokenizer.ggml.seperator_token_id",
            "tokenizer.ggml.padding_token_id",
        ):
            continue  # file name; "no token" sentinels llama2.c's converter writes
        if isinstance(value, (list, np.ndarray)):
            assert np.array_equal(np.asarray(meta[key]), np.asarray(value)), key
        else:
            assert meta[key] == value, key


def test_modelfile_templates():
    assert template_family(None) == "alpaca"
    assert template_family("{{ '<|im_start|>' }}") == "chatml"
    assert template_family("<|start_header_id|>...<|eot_id|>") == "llama3"
    assert template_family("{{ '[INST] ' }}") == "mistral"
    assert template_family("{{ weird }}") is None
    text = modelfile_text("m.gguf", "<|im_start|>", eos_token="</s>")
    assert text.splitlines()[1] == "FROM ./m.gguf"
    assert 'PARAMETER stop "<|im_end|>"' in text and 'PARAMETER stop "</s>"' in text
    assert 'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n' in text
    unknown = modelfile_text("m.gguf", "{{ weird }}")
    assert "TEMPLATE" not in unknown and "tokenizer.chat_template" in unknown


def test_sentencepiece_vocab_matches_llama2_gguf(shared_fixtures):
    """Llama-2's tokenizer.model -> the same tokens/scores/types as a published Llama-2 GGUF."""
    tok_dir = shared_fixtures / "tokenizers" / "llama-2"
    ref = shared_fixtures / "models" / "llama-2-tiny-random" / "llama-2-tiny-random.gguf"
    if not (tok_dir / "tokenizer.model").is_file() or not ref.is_file():
        pytest.skip("llama-2 fixtures absent")
    meta = vocab_metadata(tok_dir, 32000)
    ref_meta, _ = gguf.read_gguf(ref)
    assert meta["tokenizer.ggml.model"] == ref_meta["tokenizer.ggml.model"] == "llama"
    assert meta["tokenizer.ggml.tokens"] == ref_meta["tokenizer.ggml.tokens"]
    assert np.array_equal(meta["tokenizer.ggml.scores"], ref_meta["tokenizer.ggml.scores"])
    assert np.array_equal(meta["tokenizer.ggml.token_type"], ref_meta["tokenizer.ggml.token_type"])
    for key in ("bos", "eos", "unknown"):
        k = f"tokenizer.ggml.{key}_token_id"
        assert meta[k] == ref_meta[k], k


def test_qwen2_vocab_from_vocab_json(shared_fixtures):
    tok_dir = shared_fixtures / "tokenizers" / "qwen2.5-instruct"
    if not (tok_dir / "vocab.json").is_file():
        pytest.skip("qwen2.5 tokenizer fixture absent")
    meta = vocab_metadata(tok_dir, 151936)  # Qwen2.5-0.5B's embedding rows
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "qwen2"
    assert len(meta["tokenizer.ggml.merges"]) == 151387
    assert tokens[151645] == "<|im_end|>" and types[151645] == CONTROL
    assert tokens[151665] == "[PAD151665]" and types[151665] == UNUSED
    assert meta["tokenizer.ggml.eos_token_id"] == 151645
    assert "<|im_start|>" in meta["tokenizer.chat_template"]


def test_llama3_rope_freqs_and_unsupported_scaling():
    from mlxsft.export.gguf_model import llama3_rope_factors, model_metadata

    config = {
        "model_type": "llama",
        "hidden_size": 4096,
        "num_attention_heads": 32,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    }
    f = llama3_rope_factors(config)
    assert f.shape == (64,) and f.dtype == np.float32
    assert f[0] == 1.0 and f[-1] == 8.0 and np.all(np.diff(f) >= 0)
    # wavelength 2*pi*500000^(i/64): below 8192/4 -> 1, above 8192 -> 8, smooth in between
    wavelen = 2 * np.pi * 500000.0 ** (np.arange(0, 128, 2) / 128)
    assert np.array_equal(f[wavelen < 2048], np.ones((wavelen < 2048).sum()))
    assert np.array_equal(f[wavelen > 8192], np.full((wavelen > 8192).sum(), 8.0))
    mid = (wavelen >= 2048) & (wavelen <= 8192)
    assert mid.any() and np.all((f[mid] > 1.0) & (f[mid] < 8.0))
    assert llama3_rope_factors({**config, "rope_scaling": None}) is None
    with pytest.raises(ValueError, match="yarn"):
        llama3_rope_factors({**config, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    linear = {**config, "rope_scaling": {"type": "linear", "factor": 2.0}, "num_hidden_layers": 1}
    meta = model_metadata({**linear, "intermediate_size": 8}, "m", "f16")
    assert meta["llama.rope.scaling.type"] == "linear" and meta["llama.rope.scaling.factor"] == 2.0
    assert meta["general.file_type"] == 1
