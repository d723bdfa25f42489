"""The tokenizer part of a GGUF file, read from a Hugging Face model directory.

Two kinds, as llama.cpp's converter writes them:
- `llama` (SentencePiece): tokens, scores and token types from `tokenizer.model`, or from a
  byte-fallback BPE `tokenizer.json` (scores = -id, the merge order SentencePiece BPE uses);
- `gpt2` (byte-level BPE): tokens, token types and merges from `tokenizer.json`.
Both are padded with `[PAD{i}]` (unused) tokens up to the embedding size, since llama.cpp requires
one token per embedding row.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from mlxsft.errors import ModelError

# llama.cpp token types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_text(value: Any) -> str | None:
    """A special token entry of tokenizer_config.json: a string or {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def chat_template_of(model_dir: Path) -> str | None:
    """The model's chat template: tokenizer_config.json's, or chat_template.jinja/.json."""
    cfg = _read_json(model_dir / "tokenizer_config.json")
    tpl = cfg.get("chat_template")
    if isinstance(tpl, list):  # named templates: take "default"
        tpl = next((t["template"] for t in tpl if t.get("name") == "default"), None)
    if tpl is None and (model_dir / "chat_template.jinja").is_file():
        tpl = (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
    if tpl is None and (model_dir / "chat_template.json").is_file():
        tpl = _read_json(model_dir / "chat_template.json").get("chat_template")
    return tpl


def _pre_type(tok: dict) -> str:
    """llama.cpp's `tokenizer.ggml.pre` name for a byte-level pre-tokenizer (a best guess)."""
    text = json.dumps(tok.get("pre_tokenizer") or {})
    if "\\\\p{N}{1,3}" in text:
        return "llama-bpe"  # Llama 3's split regex
    if "Split" in text and "\\\\p{N}" in text:
        return "qwen2"
    if '"ByteLevel"' in text:
        return "gpt-2"
    return "default"


def _fast_tokenizer_json(model_dir: Path) -> dict:
    """tokenizer.json content for a vocab.json + merges.txt tokenizer (built by transformers)."""
    from mlxsft.model.loading import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    return json.loads(tokenizer.backend_tokenizer.to_str())


def _sentencepiece_vocab(model_file: Path) -> tuple[list[str], list[float], list[int]]:
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor(model_file=str(model_file))
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        if sp.is_unknown(i):
            types.append(UNKNOWN)
        elif sp.is_control(i):
            types.append(CONTROL)
        elif sp.is_unused(i):
            types.append(UNUSED)
        elif sp.is_byte(i):
            types.append(BYTE)
        else:
            types.append(NORMAL)
    return tokens, scores, types


def _json_vocab(tok: dict) -> list[str | None]:
    """Tokens of tokenizer.json by id (model vocab + added tokens); None for gaps."""
    by_id: dict[int, str] = {i: t for t, i in tok["model"]["vocab"].items()}
    for added in tok.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
    n = max(by_id) + 1 if by_id else 0
    return [by_id.get(i) for i in range(n)]


def vocab_metadata(
    model_dir: Path, n_vocab: int, chat_template: str | None = None
) -> dict[str, Any]:
    """`tokenizer.ggml.*` metadata for the tokenizer in `model_dir`, plus `chat_template` (default:
    the model's own)."""
    tok = _read_json(model_dir / "tokenizer.json")
    if not tok and (model_dir / "vocab.json").is_file():
        tok = _fast_tokenizer_json(model_dir)
    cfg = _read_json(model_dir / "tokenizer_config.json")
    model = tok.get("model", {})
    added = {a["id"]: a for a in tok.get("added_tokens", [])}
    sp_file = model_dir / "tokenizer.model"
    meta: dict[str, Any] = {}
    if sp_file.is_file() and (not model or model.get("byte_fallback") or model["type"] != "BPE"):
        tokens, scores, types = _sentencepiece_vocab(sp_file)
        for i, a in sorted(added.items()):  # added tokens beyond the SentencePiece model
            if i >= len(tokens):
                tokens += [f"[PAD{j}]" for j in range(len(tokens), i)]
                scores += [-1000.0] * (i - len(scores))
                types += [UNUSED] * (i - len(types))
                tokens.append(a["content"])
                scores.append(-1000.0)
                types.append(CONTROL if a.get("special") else USER_DEFINED)
        meta["tokenizer.ggml.model"] = "llama"
        meta["tokenizer.ggml.pre"] = "default"
    elif model.get("type") == "BPE":
        vocab = _json_vocab(tok)
        tokens = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(vocab)]
        types, scores = [], []
        for i, t in enumerate(vocab):
            if t is None:
                types.append(UNUSED)
            elif i in added:
                types.append(CONTROL if added[i].get("special") else USER_DEFINED)
            elif model.get("byte_fallback") and t.startswith("<0x") and len(t) == 6:
                types.append(BYTE)
            else:
                types.append(NORMAL)
            scores.append(-float(i))
        if model.get("byte_fallback"):
            meta["tokenizer.ggml.model"] = "llama"
            meta["tokenizer.ggml.pre"] = "default"
        else:
            meta["tokenizer.ggml.model"] = "gpt2"
            meta["tokenizer.ggml.pre"] = _pre_type(tok)
            merges = model.get("merges", [])
            meta["tokenizer.ggml.merges"] = [
                m if isinstance(m, str) else " ".join(m) for m in merges
            ]
            scores = None
    else:
        raise ModelError(
            "GGUF export needs a BPE tokenizer.json or a SentencePiece tokenizer.model",
            where=str(model_dir),
            hint="only llama-family tokenizers (SentencePiece or byte-level BPE) are supported",
        )
    if len(tokens) > n_vocab:
        raise ModelError(
            f"the tokenizer has {len(tokens)} tokens but the embedding only {n_vocab} rows",
            where=str(model_dir),
        )
    pad = n_vocab - len(tokens)
    tokens += [f"[PAD{i}]" for i in range(len(tokens), n_vocab)]
    types += [UNUSED] * pad
    meta["tokenizer.ggml.tokens"] = tokens
    if scores is not None:
        meta["tokenizer.ggml.scores"] = np.array(scores + [-1000.0] * pad, dtype=np.float32)
    meta["tokenizer.ggml.token_type"] = np.array(types, dtype=np.int32)
    meta.update(_special_ids(model_dir, cfg, tokens))
    template = chat_template or chat_template_of(model_dir)
    if template:
        meta["tokenizer.chat_template"] = template
    return meta


def _special_ids(model_dir: Path, cfg: dict, tokens: list[str]) -> dict[str, Any]:
    """bos/eos/pad/unk ids and add_bos/add_eos flags, as llama.cpp's SpecialVocab writes them."""
    index = {t: i for i, t in reversed(list(enumerate(tokens)))}
    special = _read_json(model_dir / "special_tokens_map.json")
    model_cfg = _read_json(model_dir / "config.json")
    out: dict[str, Any] = {}
    for kind, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"), ("unk", "unknown")):
        text = _token_text(cfg.get(f"{kind}_token")) or _token_text(special.get(f"{kind}_token"))
        tid = index.get(text) if text else None
        if tid is None and isinstance(model_cfg.get(f"{kind}_token_id"), int):
            tid = model_cfg[f"{kind}_token_id"]
        if tid is not None:
            out[f"tokenizer.ggml.{key}_token_id"] = int(tid)
    if "add_bos_token" in cfg:
        out["tokenizer.ggml.add_bos_token"] = bool(cfg["add_bos_token"])
    if "add_eos_token" in cfg:
        out["tokenizer.ggml.add_eos_token"] = bool(cfg["add_eos_token"])
    return out


# Texts on which the byte-level pre-tokenizers disagree: digit runs (one by one, by three, whole),
# contractions, whitespace runs and newlines, scripts, emoji and punctuation.
PRE_PROBES = (
    " 12345",
    "1234567 apples, 3.14159!",
    "I'm sure we can't, WE'LL see; they've",
    "Hello\n\n\n  world\t\ttab  end ",
    "ünïcode Ωμέγα 你好世界 🙂",
    "x=a+b; // ==> <tag>",
)


def pre_tokenizer_type(tokenizer: Any, meta: dict[str, Any]) -> tuple[str, bool]:
    """`tokenizer.ggml.pre` for a `gpt2` vocabulary chosen by how `tokenizer` (the Hugging Face
    tokenizer training used) actually splits: the first llama.cpp pre-tokenizer whose token ids
    equal the tokenizer's on `PRE_PROBES`. (name, True), or (the config-based guess, False)."""
    from mlxsft.model.gguf_tokenizer import PRE_SPLITS, byte_level_tokenizer

    guess = meta.get("tokenizer.ggml.pre", "gpt-2")
    want = [list(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in PRE_PROBES]
    tokens, merges = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.merges"]
    for pre in dict.fromkeys([guess, "gpt-2", "qwen2", "llama-bpe", "smollm"]):
        if pre not in PRE_SPLITS:
            continue
        tk = byte_level_tokenizer(tokens, merges, pre)
        if [tk.encode(t, add_special_tokens=False).ids for t in PRE_PROBES] == want:
            return pre, True
    return guess, False
