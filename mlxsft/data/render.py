"""The one conversation renderer: training and inference turn a conversation into token ids here.

`Renderer(tokenizer, template)` gives
- `render(example, train_on)` -> `Encoded(input_ids, loss_mask)` (untruncated; `encode.py` cuts),
- `prompt_ids(messages)` (with the generation prompt), `conversation_ids(messages)`,
  `text_ids(text)` (a raw prompt) and `stop_ids` (EOS + the template's end-of-turn token).

Every path tokenizes the rendered text once with `add_special_tokens=False`, so ids equal
`tokenizer.apply_chat_template(messages)`; a built-in template (or raw text) gets the tokenizer's
BOS in front when the tokenizer adds one itself and the text does not already start with it.
`--train-on` is decided in `turn_policy` only. Trained character spans come from rendering the
conversation up to each assistant turn; when a template renders earlier turns differently once
later turns exist (not prefix-stable), the turn is located in the full text instead, and if it
cannot be found the example is dropped rather than trained on the wrong tokens. Tokens whose
characters overlap a trained span are trained.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from mlxsft.config import TRAIN_ON
from mlxsft.data.generation_tag import has_generation_tags
from mlxsft.data.templates import ChatTemplate, TemplateRenderError, render_marked
from mlxsft.data.types import Dropped, Encoded, Example, Message
from mlxsft.errors import UserError

EOT_MARKERS = (
    "<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "</s>", "<|endoftext|>", "<|eom_id|>",
)  # fmt: skip
Span = tuple[int, int]


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


def turn_policy(example: Example, train_on: str) -> dict[int, bool]:
    """The --train-on decision (made here only): assistant message index -> True (trained) or
    False (`train: false`, kept out even under "all"); unlisted messages are context. Under "all"
    every token outside the False turns is trained."""
    if train_on not in TRAIN_ON:
        raise ValueError(f"train_on must be one of {TRAIN_ON}, got {train_on!r}")
    turns = [i for i, m in enumerate(example.messages) if m.role == "assistant"]
    policy = {i: False for i in turns if example.messages[i].train is False}
    for i in turns[-1:] if train_on == "last" else turns:
        policy.setdefault(i, True)
    return policy


class _Rendered:
    """The text to tokenize and the located assistant turns: index -> (span, ends with marker)."""

    def __init__(self, text: str, *, prepend_bos: bool):
        self.text = text
        self.prepend_bos = prepend_bos
        self.turns: dict[int, tuple[Span, bool]] = {}
        self.not_prefix_stable = False
        self.generation_disagrees = False


def _raw_render(example: Example, tokenizer: Any) -> _Rendered:
    """completion: prompt+completion+EOS, the completion+EOS being the turn; text: text+EOS."""
    eos = getattr(tokenizer, "eos_token", None) or ""
    messages = example.messages
    prompt = messages[0].content if example.kind == "completion" else ""
    r = _Rendered(prompt + messages[-1].content + eos, prepend_bos=True)
    r.turns[len(messages) - 1] = ((len(prompt), len(r.text)), bool(eos))
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
    example: Example, template: ChatTemplate, markers: tuple[str, ...], located: set[int]
) -> _Rendered | Dropped:
    """Render with `template` and locate the assistant turns in `located`."""
    msgs = template_messages(example)
    where, tools = example.source, example.tools
    full = template.render(msgs, tools=tools, where=where)  # raises TemplateRenderError
    r = _Rendered(full, prepend_bos=template.builtin)
    marked = _generation_spans(example, template, msgs, full, where)
    if marked is not None and len(marked) != sum(m.role == "assistant" for m in example.messages):
        r.generation_disagrees, marked = True, None  # tags not one per assistant turn: ignored
    cursor = 0
    for i, m in enumerate(example.messages):
        if i not in located:
            at = full.find(m.content, cursor) if m.content else -1
            cursor = at + len(m.content) if at >= 0 else cursor
            continue
        found = _turn_span(template, msgs, i, full, markers, where, tools)
        if marked is not None:  # the template says where the reply is; cross-check
            span = marked[i]
            r.generation_disagrees |= found is None or found[0] != span
            same = found is not None and found[0] == span
            eot = found[1] if same else any(full[: span[1]].endswith(mk) for mk in markers)
            found = (span, eot)
        if found is None:
            header = _generation_header(template, msgs, i, tools, where)
            found = _search_span(full, msgs[i]["content"], cursor, markers, header)
            if found is None:
                reason = "not prefix-stable: cannot locate an assistant turn in the render"
                return Dropped(where, reason, detail=f"message {i}")
            r.not_prefix_stable = True
        r.turns[i] = found
        cursor = max(cursor, found[0][1])
    return r


def _generation_spans(
    example: Example, template: ChatTemplate, msgs: list[dict[str, Any]], full: str, where: str
) -> dict[int, Span] | None:
    """{assistant message index: span} from the template's `{% generation %}` tags, None when
    the template has none; [] (a mismatch) when the marked render is not the plain one."""
    if not has_generation_tags(template.source):
        return None
    text, spans = render_marked(template, msgs, tools=example.tools, where=where)
    assistant = [i for i, m in enumerate(example.messages) if m.role == "assistant"]
    if text != full or len(spans) != len(assistant):
        return {}
    return dict(zip(assistant, spans, strict=True))


def _overlaps(s: int, e: int, spans: list[Span]) -> bool:
    return any(s < b and e > a for a, b in spans)


def _end_of_turn_ids(template: ChatTemplate, tokenizer: Any) -> set[int]:
    """The special token a rendered assistant turn ends with (e.g. `<|im_end|>`), if any."""
    content = "Zq8 reply"
    try:
        text = template.render(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": content}]
        )
    except ValueError:
        return set()
    at = text.rfind(content)
    tail = text[at + len(content) :] if at >= 0 else ""
    ids = tokenizer(tail, add_special_tokens=False)["input_ids"] if tail.strip() else []
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    special |= set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    return {ids[0]} if ids and ids[0] in special else set()


class Renderer:
    """A tokenizer and chat template (None: raw text only) turning conversations into ids.
    `eos_token_id` (the model config's, an int or a list) adds to the stop tokens."""

    def __init__(
        self,
        tokenizer: Any,
        template: ChatTemplate | None,
        *,
        eos_token_id: int | list[int] | None = None,
    ):
        self.tokenizer = tokenizer
        self.template = template
        self.bos_id = bos_if_added(tokenizer)
        self.markers = eot_markers(tokenizer)
        self._eos = eos_token_id
        self._stop_ids: frozenset[int] | None = None

    # -- tokenizing: the one BOS rule ------------------------------------------------------------
    def _tokenize(self, text: str, *, add_bos: bool) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and character offsets of `text`; BOS (offsets (0, 0)) in front when `add_bos`,
        the tokenizer adds one and the text does not already start with it."""
        bos = getattr(self.tokenizer, "bos_token", None)
        add_bos = add_bos and self.bos_id is not None and not (bos and text.startswith(bos))
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        head = [self.bos_id] if add_bos else []
        offsets = [(0, 0)] * len(head) + [tuple(o) for o in enc["offset_mapping"]]
        return head + list(enc["input_ids"]), offsets

    def _chat_template(self) -> ChatTemplate:
        if self.template is None:
            raise UserError("no chat template in use", hint="drop --raw to render messages")
        return self.template

    # -- training --------------------------------------------------------------------------------
    def render(self, example: Example, train_on: str = "responses") -> Encoded | Dropped:
        """`example` -> Encoded(input_ids, loss_mask) under `train_on` (not truncated), or Dropped
        when the template raises, a turn cannot be located or nothing is trained."""
        policy = turn_policy(example, train_on)
        if example.kind in ("completion", "text"):
            r = _raw_render(example, self.tokenizer)
        elif self.template is None:
            raise ValueError(f"{example.source}: a {example.kind} example needs a chat template")
        else:
            try:
                r = _template_render(example, self.template, self.markers, set(policy))
            except TemplateRenderError as exc:
                return Dropped(example.source, "template raised", detail=exc.problem)
            if isinstance(r, Dropped):
                return r
        trained = [span for i, (span, _) in r.turns.items() if policy.get(i)]
        excluded = [span for i, (span, _) in r.turns.items() if policy.get(i) is False]
        missing_eot = any(not marked for i, (_, marked) in r.turns.items() if policy.get(i))
        if train_on == "all":
            trained = [(0, len(r.text))]
        ids, offsets = self._tokenize(r.text, add_bos=r.prepend_bos)
        mask = np.zeros(len(ids), dtype=np.int32)
        for k, (s, e) in enumerate(offsets):
            if e > s and _overlaps(s, e, trained) and not _overlaps(s, e, excluded):
                mask[k] = 1
        mask[:1] = 0  # position 0 is never a target
        if not mask.any():
            return Dropped(example.source, "fully masked", detail="no trained tokens")
        ids_arr = np.asarray(ids, dtype=np.int32)
        return Encoded(
            ids_arr,
            mask,
            example.source,
            False,
            missing_eot,
            r.not_prefix_stable,
            getattr(r, "generation_disagrees", False),
        )

    # -- inference -------------------------------------------------------------------------------
    def prompt_ids(
        self, messages: Sequence[Message | dict[str, Any]], *, tools: list[dict] | None = None
    ) -> list[int]:
        """Ids of `messages` rendered with the generation prompt, tokenized as in training."""
        template = self._chat_template()
        text = template.render(_dicts(messages), add_generation_prompt=True, tools=tools)
        return self._tokenize(text, add_bos=template.builtin)[0]

    def conversation_ids(
        self, messages: Sequence[Message | dict[str, Any]], *, tools: list[dict] | None = None
    ) -> list[int]:
        """Ids of a whole conversation as training encodes it (no generation prompt)."""
        template = self._chat_template()
        text = template.render(_dicts(messages), tools=tools)
        return self._tokenize(text, add_bos=template.builtin)[0]

    def text_ids(self, text: str) -> list[int]:
        """Ids of a plain-text prompt (BOS added when the tokenizer adds one)."""
        return self._tokenize(text, add_bos=True)[0]

    @property
    def stop_ids(self) -> frozenset[int]:
        """Generation stops at these: EOS (tokenizer and model config) and the token the
        template ends an assistant turn with (e.g. `<|im_end|>`)."""
        if self._stop_ids is None:
            eos = self._eos
            stop = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
            if getattr(self.tokenizer, "eos_token_id", None) is not None:
                stop.add(self.tokenizer.eos_token_id)
            if self.template is not None:
                stop |= _end_of_turn_ids(self.template, self.tokenizer)
            self._stop_ids = frozenset(stop)
        return self._stop_ids


def _dicts(messages: Sequence[Message | dict[str, Any]]) -> list[dict[str, Any]]:
    return [m.to_template_dict() if isinstance(m, Message) else dict(m) for m in messages]
