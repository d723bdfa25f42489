"""A Hugging Face (`tokenizers`) tokenizer rebuilt from a GGUF file's `tokenizer.ggml.*` metadata.

`gpt2` vocabularies become byte-level BPE with llama.cpp's split rules for `tokenizer.ggml.pre`
(the same rules let the exporter check which pre-tokenizer name matches a tokenizer); `llama`
(SentencePiece) vocabularies become BPE with byte fallback, merges rebuilt from the scores.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from mlxsft.errors import ModelError

CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types

GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
# tokenizer.ggml.pre -> the split regexes llama.cpp applies in turn (HF spelling)
PRE_SPLITS: dict[str, list[str]] = {
    "gpt-2": [GPT2_SPLIT],
    "llama-bpe": [
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
        r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    ],
    "qwen2": [
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
        r"|\s*[\r\n]+|\s+(?!\S)|\s+"
    ],
    "smollm": [r"\p{N}", GPT2_SPLIT],
}
PRE_SPLITS["llama3"] = PRE_SPLITS["llama-bpe"]


def byte_level_tokenizer(tokens: list[str], merges: list[str], pre: str) -> Any:
    """A `tokenizers.Tokenizer` for a GGUF `gpt2` vocabulary with pre-tokenizer type `pre`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    if pre not in PRE_SPLITS:
        raise ModelError(
            f"GGUF pre-tokenizer {pre!r} is not supported ({', '.join(sorted(PRE_SPLITS))} are)",
            hint="use the model's Hugging Face release instead",
        )
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    bpe = models.BPE(vocab, pairs, ignore_merges=pre in ("llama-bpe", "llama3"))
    tk = Tokenizer(bpe)
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_SPLITS[pre]]
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tk.decoder = decoders.ByteLevel()
    return tk


def sentencepiece_tokenizer(tokens: list[str], scores: np.ndarray, meta: dict[str, Any]) -> Any:
    """A `tokenizers.Tokenizer` for a GGUF `llama` (SentencePiece BPE, byte fallback) vocabulary;
    merges are rebuilt from the scores, the merged piece's score being the merge's priority."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    vocab = {t: i for i, t in enumerate(tokens)}
    types = meta.get("tokenizer.ggml.token_type")
    found = []
    for tok, i in vocab.items():
        if types is not None and int(types[i]) != 1:
            continue  # only normal pieces are merge results
        for cut in range(1, len(tok)):
            left, right = tok[:cut], tok[cut:]
            if left in vocab and right in vocab:
                found.append((-float(scores[i]), i, left, right))
    merges = [(a, b) for _, _, a, b in sorted(found)]
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    unk_token = tokens[int(unk)] if unk is not None else None
    tk = Tokenizer(
        models.BPE(vocab, merges, unk_token=unk_token, byte_fallback=True, fuse_unk=True)
    )
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    norm = [normalizers.Prepend("▁")] if prefix else []
    tk.normalizer = normalizers.Sequence([*norm, normalizers.Replace(" ", "▁")])
    dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tk.decoder = decoders.Sequence([*dec, *([decoders.Strip(" ", 1, 0)] if prefix else [])])
    return tk


def write_tokenizer(meta: dict[str, Any], out: Path) -> None:
    """tokenizer.json + tokenizer_config.json rebuilt from `tokenizer.ggml.*` metadata."""
    from tokenizers import AddedToken, processors

    kind = meta.get("tokenizer.ggml.model")
    tokens = list(meta["tokenizer.ggml.tokens"])
    if kind == "gpt2":
        tk = byte_level_tokenizer(
            tokens, list(meta["tokenizer.ggml.merges"]), meta.get("tokenizer.ggml.pre", "gpt-2")
        )
    elif kind == "llama":
        tk = sentencepiece_tokenizer(tokens, meta["tokenizer.ggml.scores"], meta)
    else:
        raise ModelError(f"GGUF tokenizer model {kind!r} is not supported (gpt2, llama are)")
    types = meta.get("tokenizer.ggml.token_type")
    if types is not None:
        special = [t for t, k in zip(tokens, types, strict=True) if int(k) == CONTROL]
        user = [t for t, k in zip(tokens, types, strict=True) if int(k) == USER_DEFINED]
        tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
        tk.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])

    def tok(kind: str) -> str | None:
        tid = meta.get(f"tokenizer.ggml.{kind}_token_id")
        return tokens[int(tid)] if tid is not None and int(tid) < len(tokens) else None

    bos = tok("bos")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama"))
    steps = [processors.ByteLevel(trim_offsets=False)] if kind == "gpt2" else []
    if add_bos and bos is not None:
        bos_id = int(meta["tokenizer.ggml.bos_token_id"])
        template = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
        steps.append(template)
    if steps:
        tk.post_processor = processors.Sequence(steps)
    tk.save(str(out / "tokenizer.json"))
    cfg: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
    }
    for key, kind_ in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        if (text := tok(kind_)) is not None:
            cfg[f"{key}_token"] = text
    if meta.get("tokenizer.chat_template"):
        cfg["chat_template"] = meta["tokenizer.chat_template"]
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
