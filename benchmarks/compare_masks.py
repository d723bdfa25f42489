"""Which tokens get trained: mlxsft's response masks vs `mlx_lm.lora --mask-prompt`, on real chats.

For every row of a chat file (`messages` or ShareGPT `conversations`), both tools tokenize the same conversation with the
same tokenizer and chat template. We count, per tool, how many tokens of assistant replies (plus
their end-of-turn marker) are trained, and how many trained tokens belong to anything else
(user/system text, role headers, the newline after an end-of-turn marker).

    python benchmarks/compare_masks.py [DATA.jsonl] [--model TOKENIZER_DIR]

Defaults: ../shared/fixtures/data/openai-chat/toy_chat_fine_tuning.jsonl with the Qwen2.5
tokenizer from ../shared/fixtures/tokenizers (both real; skipped when absent).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "fixtures"


def mlx_lm_mask(tokenizer, messages: list[dict]) -> np.ndarray:
    """Targets mlx-lm trains with --mask-prompt: every token from the last turn's offset on."""
    from mlx_lm.tuner.datasets import ChatDataset

    ids, offset = ChatDataset([], tokenizer, mask_prompt=True).process({"messages": messages})
    mask = np.zeros(len(ids), np.int32)
    mask[max(offset, 1) :] = 1
    return np.asarray(ids), mask


def reference_mask(tokenizer, messages: list[dict], ids: np.ndarray) -> np.ndarray:
    """Ground truth by characters: assistant contents + the end-of-turn marker right after each."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    assert list(enc["input_ids"]) == list(ids)
    eot = tokenizer.eos_token or ""
    spans, cursor = [], 0
    for m in messages:
        start = text.find(m["content"], cursor)
        assert start >= 0
        end = start + len(m["content"])
        if m["role"] == "assistant":
            if eot and text.startswith(eot, end):
                end += len(eot)
            spans.append((start, end))
        cursor = end
    return np.array(
        [int(any(a < e and b > s for s, e in spans)) for a, b in enc["offset_mapping"]], np.int32
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "data", nargs="?", default=SHARED / "data/openai-chat/toy_chat_fine_tuning.jsonl"
    )
    ap.add_argument("--model", default=SHARED / "tokenizers/qwen2.5-instruct")
    args = ap.parse_args()
    if not Path(args.data).exists() or not Path(args.model).exists():
        print("fixtures not found; pass DATA and --model", file=sys.stderr)
        return 2
    from transformers import AutoTokenizer

    from mlxsft.data.encode import encode_example
    from mlxsft.data.formats import read_examples
    from mlxsft.data.templates import resolve_template

    tok = AutoTokenizer.from_pretrained(str(args.model))
    template = resolve_template("auto", tok)
    examples, errors = read_examples(Path(args.data))
    assert not errors, errors[:3]
    totals = {
        k: 0 for k in ("rows", "multi", "ref", "ours_ok", "ours_extra", "mlx_ok", "mlx_extra")
    }
    for ex in examples:
        messages = [{"role": m.role, "content": m.content} for m in ex.messages]
        ours = encode_example(ex, tok, template)
        ids, mlx = mlx_lm_mask(tok, messages)
        assert list(ids) == list(ours.input_ids)
        ref = reference_mask(tok, messages, ids)
        totals["rows"] += 1
        totals["multi"] += sum(m["role"] == "assistant" for m in messages) > 1
        totals["ref"] += int(ref.sum())
        for name, mask in (("ours", ours.loss_mask), ("mlx", mlx)):
            totals[f"{name}_ok"] += int((mask & ref).sum())
            totals[f"{name}_extra"] += int((mask & (1 - ref)).sum())
    t = totals
    print(f"{args.data} with {Path(args.model).name}: {t['rows']} rows, {t['multi']} multi-turn")
    print(f"assistant reply tokens (+ end-of-turn): {t['ref']}")
    print("| tool | reply tokens trained | share | other tokens trained |")
    print("|---|---|---|---|")
    for name, label in (("ours", "mlxsft train"), ("mlx", "mlx_lm.lora --mask-prompt")):
        ok, extra = t[f"{name}_ok"], t[f"{name}_extra"]
        print(f"| {label} | {ok} | {100 * ok / max(t['ref'], 1):.1f}% | {extra} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
