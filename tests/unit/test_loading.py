"""Model loading: tiny checkpoints load through mlx-lm; every mistake is one clear ModelError line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import pytest

from mlxsft import _mlxlm
from mlxsft.demo_model import SPECIAL_TOKENS, build_tokenizer
from mlxsft.errors import ModelError
from mlxsft.model import loading


def _error(fn, *args, **kw) -> str:
    with pytest.raises(ModelError) as info:
        fn(*args, **kw)
    message = str(info.value)
    assert "\n" not in message, message
    return message


@pytest.fixture
def checkpoint_copy(tiny_llama, tmp_path) -> Path:
    """A writable copy of tiny_llama."""
    return Path(shutil.copytree(tiny_llama, tmp_path / "ckpt"))


# --- tiny checkpoints and tokenizers --------------------------------------------------------------


def test_tiny_tokenizer_is_an_hf_fast_tokenizer(tiny_llama, tiny_qwen2):
    tok = loading.load_tokenizer(tiny_llama)
    assert tok.is_fast
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    for i, marker in enumerate(SPECIAL_TOKENS):
        assert tok.convert_tokens_to_ids(marker) == i
    ids = tok("Hello world.")["input_ids"]
    assert ids[0] == 1 and tok.decode(ids[1:]) == "Hello world."
    assert tok("<|im_start|>user<|im_end|>")["input_ids"][1] == SPECIAL_TOKENS.index("<|im_start|>")
    # Qwen-style: no BOS; offsets cover the text exactly (spaces not trimmed)
    qtok = loading.load_tokenizer(tiny_qwen2)
    enc = qtok("Hi there", return_offsets_mapping=True)
    assert enc["input_ids"][0] != 1
    assert "".join("Hi there"[a:b] for a, b in enc["offset_mapping"]) == "Hi there"


def test_tiny_chat_template_renders(tiny_llama, tiny_llama_base):
    tok = loading.load_tokenizer(tiny_llama)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Yes."}]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nYes.<|im_end|>\n"
    assert loading.load_tokenizer(tiny_llama_base).chat_template is None


def test_build_tokenizer_is_deterministic(tmp_path):
    a = build_tokenizer(tmp_path / "a", vocab_size=320)
    b = build_tokenizer(tmp_path / "b", vocab_size=320)
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()


def test_tiny_checkpoint_files(tiny_llama, tiny_llama_q4):
    config = json.loads((tiny_llama / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert config["tie_word_embeddings"] is False
    assert "lm_head.weight" in mx.load(str(tiny_llama / "model.safetensors"))
    generation = json.loads((tiny_llama / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [2, SPECIAL_TOKENS.index("<|im_end|>")]
    q4 = json.loads((tiny_llama_q4 / "config.json").read_text())
    assert q4["quantization"] == {"group_size": 64, "bits": 4, "mode": "affine"}
    assert "model.layers.0.self_attn.q_proj.scales" in mx.load(
        str(tiny_llama_q4 / "model.safetensors")
    )


# --- loading -----------------------------------------------------------------------------------


def test_load_local(tiny_llama):
    loaded = loading.load(str(tiny_llama))
    assert loaded.path == tiny_llama.resolve()
    assert loaded.config["model_type"] == "llama"
    assert loaded.tokenizer.is_fast
    logits = loaded.model(mx.array([[1, 5, 6]]))
    assert logits.shape == (1, 3, loaded.config["vocab_size"])
    assert SPECIAL_TOKENS.index("<|im_end|>") in loaded.tokenizer_wrapper.eos_token_ids


def test_load_mlx_quantized(tiny_llama_q4):
    loaded = loading.load(tiny_llama_q4)
    assert _mlxlm.is_quantized(loaded.model)
    assert mx.isfinite(loaded.model(mx.array([[1, 5, 6]]))).all().item()


def test_quantize_on_load(tiny_llama):
    base = loading.load(tiny_llama)
    q = loading.load(tiny_llama, quantize=4)
    assert not _mlxlm.is_quantized(base.model) and _mlxlm.is_quantized(q.model)
    assert q.config["quantization"]["bits"] == 4
    x = mx.array([[1, 5, 6, 7]])
    a, b = base.model(x), q.model(x)
    assert not mx.array_equal(a, b)
    assert mx.abs(a - b).max().item() < 0.5 * mx.abs(a).max().item()


def test_quantize_errors(tiny_llama, tiny_llama_q4):
    assert "already 4-bit" in _error(loading.load, tiny_llama_q4, quantize=4)
    assert "7 bits" in _error(loading.load, tiny_llama, quantize=7)


def test_load_tokenizer_loads_no_weights(tiny_llama, monkeypatch):
    def boom(*args, **kw):
        raise AssertionError("weights loaded")

    monkeypatch.setattr(_mlxlm, "load_model", boom)
    monkeypatch.setattr(mx, "load", boom)
    assert loading.load_tokenizer(str(tiny_llama)).is_fast


def test_adapter_roundtrip(tiny_llama, tmp_path):
    """An mlx-lm layout adapter dir loads and changes the logits the way the live model does."""
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers

    loaded = loading.load(tiny_llama)
    model = loaded.model
    lora = {"rank": 4, "scale": 2.0, "dropout": 0.0, "keys": ["self_attn.q_proj"]}
    model.freeze()
    linear_to_lora_layers(model, 2, lora)
    params = dict(tree_flatten(model.trainable_parameters()))
    params = {k: mx.ones_like(v) * 0.05 for k, v in params.items()}
    model.load_weights(list(params.items()), strict=False)
    mx.save_safetensors(str(tmp_path / "adapters.safetensors"), params)
    config = {"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": lora}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    x = mx.array([[1, 5, 6, 7]])
    again = loading.load(tiny_llama, adapter=tmp_path)
    assert mx.allclose(again.model(x), model(x), atol=1e-5).item()
    assert not mx.allclose(again.model(x), loading.load(tiny_llama).model(x)).item()


# --- one-line errors ---------------------------------------------------------------------------


def test_missing_path_is_one_line():
    message = _error(loading.load, "./no/such/dir")
    assert message.startswith("./no/such/dir: model directory not found")
    assert "not found" in _error(loading.resolve_model_path, "nonexistent")


def test_file_instead_of_directory(tiny_llama):
    assert "must be a directory" in _error(loading.load, tiny_llama / "config.json")


def test_config_missing(checkpoint_copy):
    (checkpoint_copy / "config.json").unlink()
    assert "no config.json" in _error(loading.load, checkpoint_copy)


def test_config_invalid_json(checkpoint_copy):
    (checkpoint_copy / "config.json").write_text('{\n  "model_type": "llama",\n  oops\n}')
    message = _error(loading.load, checkpoint_copy)
    assert "config.json:3: invalid JSON" in message


def test_unsupported_model_type_lists_supported(checkpoint_copy):
    config = json.loads((checkpoint_copy / "config.json").read_text())
    (checkpoint_copy / "config.json").write_text(json.dumps({**config, "model_type": "nopeformer"}))
    message = _error(loading.load, checkpoint_copy)
    assert "unsupported model_type 'nopeformer'" in message
    for name in ("llama", "qwen2", "gemma", "phi3", "mistral"):
        assert f" {name}," in message


def test_missing_model_type(checkpoint_copy):
    config = json.loads((checkpoint_copy / "config.json").read_text())
    del config["model_type"]
    (checkpoint_copy / "config.json").write_text(json.dumps(config))
    assert "no model_type" in _error(loading.load, checkpoint_copy)


def test_pickled_weights_are_refused(checkpoint_copy):
    (checkpoint_copy / "model.safetensors").unlink()
    (checkpoint_copy / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    message = _error(loading.load, checkpoint_copy)
    assert "pytorch_model.bin" in message and "pickle" in message and "safetensors" in message


def test_non_hf_safetensors(checkpoint_copy):
    (checkpoint_copy / "model.safetensors").rename(checkpoint_copy / "consolidated.safetensors")
    assert "not in Hugging Face layout" in _error(loading.load, checkpoint_copy)


def test_no_weights_at_all(checkpoint_copy):
    (checkpoint_copy / "model.safetensors").unlink()
    assert "no model*.safetensors" in _error(loading.load, checkpoint_copy)


def test_remote_code_is_refused(checkpoint_copy):
    config = json.loads((checkpoint_copy / "config.json").read_text())
    (checkpoint_copy / "config.json").write_text(json.dumps({**config, "model_file": "x.py"}))
    assert "never does" in _error(loading.load, checkpoint_copy)


def test_no_tokenizer(checkpoint_copy):
    (checkpoint_copy / "tokenizer.json").unlink()
    assert "no tokenizer files" in _error(loading.load_tokenizer, checkpoint_copy)


def test_bad_adapter_dir(tiny_llama, tmp_path):
    assert "no adapter_config.json" in _error(loading.load, tiny_llama, adapter=tmp_path)


# --- the hub -------------------------------------------------------------------------------------


def test_hub_offline_real_call():
    message = _error(loading.load, "someone/not-a-real-model-xyz")
    assert "offline mode is on" in message and "local" in message


@pytest.mark.parametrize("kind", ["local_entry", "connection"])
def test_hub_unreachable(monkeypatch, kind):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def fail(*args, **kw):
        if kind == "local_entry":
            raise LocalEntryNotFoundError("An error happened ... check your internet connection")
        raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    message = _error(loading.resolve_model_path, "org/model")
    assert "hub is unreachable" in message and "local HF-format directory" in message


def test_hub_http_errors_are_redacted(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    httpx = pytest.importorskip(HfHubHTTPError.__mro__[1].__module__.split(".")[0])
    response = httpx.Response(404, request=httpx.Request("GET", "https://huggingface.co/x"))
    errors = iter(
        [
            RepositoryNotFoundError("404 Repository Not Found", response=response),
            HfHubHTTPError(
                "500 Server Error (token hf_abcdefghijklmnopqrstuvw)", response=response
            ),
        ]
    )

    def fail(*args, **kw):
        raise next(errors)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    assert "no such hub model 'org/model'" in _error(loading.resolve_model_path, "org/model")
    message = _error(loading.resolve_model_path, "org/model")
    assert "500 Server Error" in message and "hf_abcdefgh" not in message


def test_hub_fetches_only_needed_files(monkeypatch, tiny_llama):
    import huggingface_hub

    calls = []

    def fake(repo_id, revision=None, allow_patterns=None):
        calls.append((repo_id, revision, allow_patterns))
        return str(tiny_llama)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    loaded = loading.load("org/model", revision="main")
    assert loaded.path == tiny_llama.resolve()
    loading.load_tokenizer("org/model")
    (repo, revision, patterns), (_, _, tok_patterns) = calls[0], calls[-1]
    assert (repo, revision) == ("org/model", "main")
    assert "*.safetensors" in patterns and "*.safetensors" not in tok_patterns
    for name in ("pytorch_model.bin", "model.pt", "model.pth", "modeling_x.py"):
        assert not any(Path(name).match(p) for p in patterns)


# --- through the CLI: one line on stderr, exit status 2, no traceback ----------------------------


def test_cli_reports_model_errors_in_one_line(tmp_path, checkpoint_copy):
    from click.testing import CliRunner

    from mlxsft.cli import main

    data = tmp_path / "train.jsonl"
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    data.write_text(json.dumps(row) + "\n")
    (checkpoint_copy / "tokenizer.json").unlink()
    cases = {
        "./no/such/dir": "model directory not found",
        "someone/not-a-real-model-xyz": "offline mode is on",
        str(checkpoint_copy): "no tokenizer files",
    }
    for model, expected in cases.items():
        result = CliRunner().invoke(main, ["data", "inspect", str(data), "--model", model])
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0]
