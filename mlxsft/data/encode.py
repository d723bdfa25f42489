"""Example -> Encoded(input_ids, loss_mask): render to text, find the trained character spans, then
tokenize the whole text once and mark every token whose characters overlap a trained span.

Tokenizing the full render once (with `add_special_tokens=False`) makes `input_ids` equal
`tokenizer.apply_chat_template(messages)`. Spans come from rendering the conversation up to each
assistant turn; when a template renders earlier turns differently once later turns exist (not
prefix-stable), the turn's content is located in the full text instead, and if it cannot be found
the example is dropped rather than trained on the wrong tokens.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mlxsft.data.templates import ChatTemplate, TemplateRenderError
from mlxsft.data.types import Dropped, Encoded, Example

TRAIN_ON = ("responses", "last", "all")
EOT_MARKERS = (
    "<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "</s>", "<|endoftext|>", "<|eom_id|>",
)  # fmt: skip
Span = tuple[int, int]


class _Rendered:
    """The text to tokenize, its trained character spans and what was noticed on the way."""

    def __init__(self, text: str, spans: list[Span], *, prepend_bos: bool = False):
        self.text = text
        self.spans = spans
        self.prepend_bos = prepend_bos
        self.missing_eot = False
        self.not_prefix_stable = False
        self.excluded: list[Span] = []  # `train: false` turns, kept out even with train_on="all"


def bos_if_added(tokenizer: Any) -> int | None:
    """The BOS id if this tokenizer puts one in front of ordinary text, else None."""
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos_id is None:
        return None
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos_id if ids and ids[0] == bos_id else None


def eot_markers(tokenizer: Any) -> tuple[str, ...]:
    eos = getattr(tokenizer, "eos_token", None)
    return tuple(dict.fromkeys(([eos] if eos else []) + list(EOT_MARKERS)))


def template_messages(example: Example) -> list[dict[str, Any]]:
    """Messages as a chat template sees them; an alpaca row's input joins its instruction."""
    out = [m.to_template_dict() for m in example.messages]
    if example.kind == "alpaca":
        for m in out:
            if m["role"] == "user":
                m["instruction"], m["input"] = m["content"], example.context
                if example.context:
                    m["content"] = f"{m['content']}\n\n{example.context}"
                break
    return out


def _trainable(example: Example, train_on: str) -> list[int]:
    """Indices of the assistant messages whose turns are trained under `train_on`."""
    idx = [i for i, m in enumerate(example.messages) if m.role == "assistant"]
    if train_on == "last":
        idx = idx[-1:]
    return [i for i in idx if example.messages[i].train is not False]


def _raw_render(example: Example, tokenizer: Any, train_on: str) -> _Rendered:
    """completion: prompt+completion+EOS, completion+EOS trained; text: text+EOS, all trained."""
    eos = getattr(tokenizer, "eos_token", None) or ""
    if example.kind == "text":
        text = example.messages[0].content + eos
        r = _Rendered(text, [(0, len(text))])
    else:
        prompt, completion = example.messages[0].content, example.messages[1].content
        text = prompt + completion + eos
        start = 0 if train_on == "all" else len(prompt)
        r = _Rendered(text, [(start, len(text))] if example.messages[1].train is not False else [])
    r.missing_eot = not eos
    r.prepend_bos = True
    return r


def _last_marker_end(text: str, start: int, end: int, markers: tuple[str, ...]) -> int | None:
    best = None
    for marker in markers:
        at = text.rfind(marker, start, end)
        if at >= 0 and (best is None or at + len(marker) > best):
            best = at + len(marker)
    return best


def _common_prefix_len(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _turn_span(template, msgs, i, full, markers, where, tools) -> tuple[Span, bool] | None:
    """[start, end) of assistant turn i in `full` by prefix rendering, and whether it has an
    end-of-turn marker; None when this turn is not prefix-stable."""
    try:
        prefix = template.render(msgs[:i], add_generation_prompt=True, tools=tools, where=where)
        upto = template.render(msgs[: i + 1], tools=tools, where=where)
    except TemplateRenderError:
        return None
    if not (upto.startswith(prefix) and full.startswith(prefix)):
        return None
    start = len(prefix)
    if full.startswith(upto):
        end = len(upto)
    else:  # e.g. a template that closes the final turn differently (trailing EOS, <|return|>)
        end = _common_prefix_len(full, upto)
        content = msgs[i].get("content", "").strip()
        marker_end = _last_marker_end(full, start, end, markers)
        if marker_end is None or (content and content not in full[start:marker_end]):
            return None
    marker_end = _last_marker_end(full, start, end, markers)
    if marker_end is not None:
        return (start, marker_end), True
    return (start, start + len(full[start:end].rstrip())), False


def _generation_header(template, msgs, i, tools, where) -> str:
    """What add_generation_prompt appends before assistant turn i ("<|im_start|>assistant\n")."""
    try:
        bare = template.render(msgs[:i], tools=tools, where=where)
        prompt = template.render(msgs[:i], add_generation_prompt=True, tools=tools, where=where)
    except TemplateRenderError:
        return ""
    return prompt[len(bare) :] if prompt.startswith(bare) else ""


def _search_span(full, content, cursor, markers, header) -> tuple[Span, bool] | None:
    """Fallback for a turn that is not prefix-stable: the turn starts after the next generation
    header at or after `cursor` and runs to the first end-of-turn marker; without a header, the
    content itself is searched for, plus an immediately following marker."""
    at = full.find(header, cursor) if header.strip() else -1
    if at >= 0:
        start = at + len(header)
        ends = [full.find(m, start) for m in markers]
        ends = [(e, m) for e, m in zip(ends, markers, strict=True) if e >= 0]
        if ends:
            end, marker = min(ends)
            if content.strip() in full[start:end]:
                return (start, end + len(marker)), True
    for needle in (content, content.strip()):
        if not needle:
            continue
        at = full.find(needle, cursor)
        if at < 0:
            continue
        end = at + len(needle)
        rest = full[end:]
        gap = len(rest) - len(rest.lstrip(" \t"))
        for marker in markers:
            if rest.startswith(marker, gap):
                return (at, end + gap + len(marker)), True
        return (at, end), False
    return None


def _template_render(
    example: Example, template: ChatTemplate, tokenizer: Any, train_on: str
) -> _Rendered | Dropped:
    msgs = template_messages(example)
    where, tools = example.source, example.tools
    full = template.render(msgs, tools=tools, where=where)  # raises TemplateRenderError
    markers = eot_markers(tokenizer)
    trainable = set(_trainable(example, train_on))
    r = _Rendered(full, [], prepend_bos=template.builtin)
    cursor = 0
    for i, m in enumerate(example.messages):
        if m.role != "assistant" or (i not in trainable and m.train is not False):
            at = full.find(m.content, cursor) if m.content else -1
            cursor = at + len(m.content) if at >= 0 else cursor
            continue
        found = _turn_span(template, msgs, i, full, markers, where, tools)
        if found is None:
            header = _generation_header(template, msgs, i, tools, where)
            found = _search_span(full, msgs[i]["content"], cursor, markers, header)
            if found is None:
                reason = "not prefix-stable: cannot locate an assistant turn in the render"
                return Dropped(where, reason, detail=f"message {i}")
            r.not_prefix_stable = True
        span, has_marker = found
        cursor = max(cursor, span[1])
        if m.train is False:
            r.excluded.append(span)
            continue
        r.spans.append(span)
        r.missing_eot |= not has_marker
    if train_on == "all":
        r.spans = [(0, len(full))]
    return r


def _mask_from_offsets(offsets: list[tuple[int, int]], spans: list[Span], excluded: list[Span]):
    mask = np.zeros(len(offsets), dtype=np.int32)
    for k, (s, e) in enumerate(offsets):
        if e <= s:
            continue
        if any(s < b and e > a for a, b in spans) and not any(s < b and e > a for a, b in excluded):
            mask[k] = 1
    return mask


def truncate(ids: np.ndarray, mask: np.ndarray, max_len: int, bos_id: int | None):
    """Cut to `max_len`: from the right if trained tokens survive, else drop leading prompt
    tokens (keeping BOS). Returns (ids, mask) or None when nothing trained would remain."""
    n = len(ids)
    if n <= max_len:
        return ids, mask
    if mask[:max_len].any():
        return ids[:max_len], mask[:max_len]
    head = 1 if bos_id is not None and n and ids[0] == bos_id else 0
    first = int(np.argmax(mask)) if mask.any() else n
    start = min(head + (n - max_len), first)  # drop only untrained prompt tokens
    ids = np.concatenate([ids[:head], ids[start:]])[:max_len]
    mask = np.concatenate([mask[:head], mask[start:]])[:max_len].copy()
    mask[:1] = 0
    return (ids, mask) if mask.any() else None


def encode_example(
    example: Example,
    tokenizer: Any,
    template: ChatTemplate | None,
    train_on: str = "responses",
    max_seq_len: int | None = None,
    *,
    bos_id: int | None | bool = False,
) -> Encoded | Dropped:
    """Encode one example. `bos_id` defaults to probing the tokenizer (pass it to save a call)."""
    if train_on not in TRAIN_ON:
        raise ValueError(f"train_on must be one of {TRAIN_ON}, got {train_on!r}")
    if bos_id is False:
        bos_id = bos_if_added(tokenizer)
    if example.kind in ("completion", "text"):
        r = _raw_render(example, tokenizer, train_on)
    elif template is None:
        raise ValueError(f"{example.source}: a {example.kind} example needs a chat template")
    else:
        try:
            r = _template_render(example, template, tokenizer, train_on)
        except TemplateRenderError as exc:
            return Dropped(example.source, "template raised", detail=exc.problem)
        if isinstance(r, Dropped):
            return r
    bos_token = getattr(tokenizer, "bos_token", None)
    add_bos = (
        r.prepend_bos and bos_id is not None and not (bos_token and r.text.startswith(bos_token))
    )
    enc = tokenizer(r.text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(([bos_id] if add_bos else []) + list(enc["input_ids"]), dtype=np.int32)
    offsets = ([(0, 0)] if add_bos else []) + [tuple(o) for o in enc["offset_mapping"]]
    mask = _mask_from_offsets(offsets, r.spans, r.excluded)
    if len(mask):
        mask[0] = 0  # position 0 is never a target
    if not mask.any():
        return Dropped(example.source, "fully masked", detail="no trained tokens")
    truncated = False
    if max_seq_len is not None and len(ids) > max_seq_len:
        cut = truncate(ids, mask, max_seq_len, bos_id)
        if cut is None:
            return Dropped(example.source, "no trained tokens within max_seq_len")
        ids, mask = cut
        truncated = True
    return Encoded(ids, mask, example.source, truncated, r.missing_eot, r.not_prefix_stable)


def encode_dataset(
    examples: list[Example],
    tokenizer: Any,
    template: ChatTemplate | None,
    train_on: str = "responses",
    max_seq_len: int | None = None,
    batch_size: int = 4,
):
    """Encode every example -> (list[Encoded], DatasetStats); dropped ones are counted."""
    from mlxsft.data.stats import compute_stats

    bos_id = bos_if_added(tokenizer)
    encoded: list[Encoded] = []
    dropped: list[Dropped] = []
    for ex in examples:
        out = encode_example(ex, tokenizer, template, train_on, max_seq_len, bos_id=bos_id)
        (encoded if isinstance(out, Encoded) else dropped).append(out)
    return encoded, compute_stats(encoded, dropped, batch_size=batch_size)
