"""`--train-tokens auto|none|TOKENS`: which embedding / LM-head rows a run trains, and the warning
when a trained target token looks untrained in the base model.

Candidates are the special tokens the run's data actually uses (template turn markers, the
end-of-turn token, EOS), found in the encoded training examples. `auto` trains those whose rows
look untrained by `model.token_rows.check_rows` (a row shared, to cosine 0.999, by two or more
other rows, or a row norm under half the median); `TOKENS` is a comma list of token strings or
ids trained whatever they look like.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from mlxsft.data.types import Encoded
from mlxsft.errors import UserError


def special_ids(tokenizer: Any) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    ids |= {int(i) for i in (getattr(tokenizer, "added_tokens_decoder", {}) or {})}
    return ids


def used_special_ids(tokenizer: Any, encoded: Sequence[Encoded]) -> tuple[list[int], list[int]]:
    """(special ids anywhere in the examples, special ids that are training targets)."""
    special = np.array(sorted(special_ids(tokenizer)), dtype=np.int64)
    if not special.size:
        return [], []
    anywhere: set[int] = set()
    targets: set[int] = set()
    for e in encoded:
        ids = np.asarray(e.input_ids)
        hit = np.isin(ids, special)
        anywhere |= set(ids[hit].tolist())
        targets |= set(ids[hit & (np.asarray(e.loss_mask) > 0)].tolist())
    return sorted(anywhere), sorted(targets)


def parse_tokens(spec: str, tokenizer: Any) -> list[int]:
    """`</s>,<|im_end|>` or `2,5` -> token ids; unknown tokens are a UserError."""
    ids = []
    unk = getattr(tokenizer, "unk_token_id", None)
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if item.lstrip("-").isdigit():
            ids.append(int(item))
            continue
        i = tokenizer.convert_tokens_to_ids(item)
        if i is None or (i == unk and item != getattr(tokenizer, "unk_token", None)):
            raise UserError(
                f"--train-tokens: {item!r} is not a token of this tokenizer",
                hint="give token strings as the tokenizer spells them (e.g. </s>) or token ids",
            )
        ids.append(int(i))
    if not ids:
        raise UserError("--train-tokens: no tokens given", hint="auto, none, or e.g. '</s>'")
    return sorted(set(ids))


def _names(tokenizer: Any, ids: Sequence[int]) -> str:
    return ", ".join(f"{tokenizer.convert_ids_to_tokens(int(i))} ({i})" for i in ids)


CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")  # ChatML's turn markers (built-in chatml template)


def add_chat_tokens(model: Any, tokenizer: Any) -> tuple[list[int], int, str]:
    """`--add-chat-tokens`: add the ChatML markers the tokenizer lacks as special tokens, grow the
    embedding and head to fit (new rows = mean row) -> (marker ids, rows, note)."""
    from mlxsft.model import token_rows

    missing = [t for t in CHAT_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
    ids = [int(i) for i in tokenizer.convert_tokens_to_ids(list(CHAT_TOKENS))]
    before = token_rows.n_rows(model)
    rows = max(before, max(ids) + 1)
    token_rows.resize_vocab(model, rows)
    added = f"added {', '.join(missing)}" if missing else "the tokenizer already has them"
    grown = f"; embedding grown {before} -> {rows} rows (mean row)" if rows > before else ""
    return ids, rows, f"chat tokens: {added} (ids {ids}){grown}; template chatml"


def setup_token_rows(
    spec: str,
    model: Any,
    tokenizer: Any,
    encoded: Sequence[Encoded],
    adapter_config: dict[str, Any],
    *,
    added: list[int] | None = None,
    vocab_size: int | None = None,
) -> list[str]:
    """Apply the rows `spec` asks for to `model` (recorded in `adapter_config`); notes to print.
    `added` token ids (--add-chat-tokens) are always trained; `vocab_size` is then recorded.

    With no rows trained, warns when a special token that is a training target looks untrained.
    """
    from mlxsft.model import token_rows

    spec = (spec or "none").strip()
    if adapter_config.get("trainable_tokens"):  # continuing an adapter that has them
        return [f"token rows: continuing {adapter_config['trainable_tokens']['indices']}"]
    full = adapter_config.get("fine_tune_type") == "full"
    if full and spec != "none":
        raise UserError(
            "--train-tokens is for LoRA/DoRA runs", hint="a full fine-tune trains every row"
        )
    anywhere, targets = used_special_ids(tokenizer, encoded)
    if added:
        spec = spec if spec != "none" else ",".join(str(i) for i in added)
    if spec == "none" and (full or not targets):
        return []
    if spec == "none":
        bad = token_rows.untrained(token_rows.check_rows(model, targets, tokenizer))
        return [
            f"warning: {c.token!r} (id {i}) is trained as a target but looks untrained in the base "
            f"model ({c.why()}); LoRA cannot teach it, so replies may not stop: add "
            "--train-tokens auto"
            for i, c in bad.items()
        ]
    if spec == "auto":
        checks = token_rows.check_rows(model, anywhere, tokenizer) if anywhere else []
        chosen = token_rows.untrained(checks)
        for i in added or []:  # new rows: trained whatever they look like
            chosen.setdefault(
                i, token_rows.RowCheck(i, tokenizer.convert_ids_to_tokens(i), 0, 1.0, "added")
            )
        if not chosen:
            looked = _names(tokenizer, anywhere) if anywhere else "no special tokens in the data"
            return [f"token rows (auto): none; these look trained: {looked}"]
        ids = sorted(chosen)
        why = "; ".join(f"{chosen[i].token}: {chosen[i].why()}" for i in ids)
        note = f"token rows (auto): training {_names(tokenizer, ids)} ({why})"
    else:
        ids = parse_tokens(spec, tokenizer)
        note = f"token rows: training {_names(tokenizer, ids)}"
    entry = token_rows.apply_token_rows(model, ids)
    if vocab_size is not None:
        entry["vocab_size"] = vocab_size
    adapter_config["trainable_tokens"] = entry
    return [note + f" in {' + '.join(entry['modules'])}"]
