"""Real chat templates and tokenizers (../shared/fixtures, skipped when absent).

- Our sandboxed rendering equals transformers' for every fixture template.
- With a model's own template, input_ids equal `tokenizer.apply_chat_template(messages)`.
- For every fixture template that renders a plain multi-turn chat, decoding exactly the trained
  tokens gives the assistant contents plus their end-of-turn markers, and no user/system text.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import numpy as np
import pytest

from mlxsft.data.encode import encode_example
from mlxsft.data.formats import normalise, read_examples
from mlxsft.data.render import EOT_MARKERS
from mlxsft.data.templates import ChatTemplate, TemplateRenderError, resolve_template
from mlxsft.data.types import Encoded

FIXTURES = Path(__file__).resolve().parents[2] / ".." / "shared" / "fixtures"
TEMPLATES = FIXTURES / "chat_templates"
TOKENIZERS = FIXTURES / "tokenizers"
pytestmark = pytest.mark.skipif(not TEMPLATES.is_dir(), reason="shared fixtures absent")

SYSTEM = {"role": "system", "content": "You are SYSTEXT helper."}
TURNS = [
    {"role": "user", "content": "USERONE asks about apples."},
    {"role": "assistant", "content": "ASSTONE says apples are red."},
    {"role": "user", "content": "USERTWO asks about pears."},
    {"role": "assistant", "content": "ASSTTWO says pears are green."},
]
FORBIDDEN = ("SYSTEXT", "USERONE", "USERTWO", "user", "system")


def index() -> list[dict]:
    if not (TEMPLATES / "INDEX.json").is_file():
        return []
    return json.loads((TEMPLATES / "INDEX.json").read_text())


ENTRIES = index()


def load(name: str, *, fresh: bool = False):
    """A fixture tokenizer; shared (do not modify it) unless `fresh`."""
    if not (TOKENIZERS / name).is_dir():
        pytest.skip(f"tokenizer fixture {name} absent")
    return _load(name) if fresh else _shared(name)


def _load(name: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZERS / name))


_shared = functools.lru_cache(maxsize=None)(_load)


MARKER = re.compile(r"<\|[^|\s'\"]{1,40}\|>|<｜[^｜\s]{1,40}｜>|</?[a-z_]{2,30}(?::[a-z_]+)?>")


@pytest.fixture(scope="module")
def markers() -> list[str]:
    """Every special marker the fixture templates write, to register as special tokens."""
    found = {e[k] for e in ENTRIES for k in ("bos_token", "eos_token") if e.get(k)}
    for entry in ENTRIES:
        found |= set(MARKER.findall((TEMPLATES / entry["file"]).read_text()))
    return sorted(found | set(EOT_MARKERS))


@pytest.fixture(scope="module")
def qwen(markers):
    tok = load("qwen2.5-instruct", fresh=True)
    tok.add_special_tokens({"additional_special_tokens": markers})
    return tok


def ids_of(out) -> list[int]:
    return list(out["input_ids"] if not isinstance(out, list) else out)


@pytest.mark.parametrize("entry", ENTRIES, ids=[e["file"] for e in ENTRIES])
def test_rendering_matches_transformers(entry):
    from transformers.utils.chat_template_utils import render_jinja_template

    source = (TEMPLATES / entry["file"]).read_text()
    special = {k: entry[k] for k in ("bos_token", "eos_token") if entry.get(k)}
    tpl = ChatTemplate(entry["file"], source, builtin=False, special_tokens=tuple(special.items()))
    for msgs in ([SYSTEM, *TURNS], TURNS, TURNS[:3]):
        for gen in (False, True):
            try:
                theirs = render_jinja_template(
                    [msgs], chat_template=source, add_generation_prompt=gen, **special
                )[0][0]
            except Exception as exc:  # the template rejects this shape: so must we
                with pytest.raises(TemplateRenderError):
                    tpl.render(msgs, add_generation_prompt=gen)
                assert type(exc).__name__ in (
                    "TemplateError",
                    "TypeError",
                    "UndefinedError",
                    "ValueError",
                )
                continue
            assert tpl.render(msgs, add_generation_prompt=gen) == theirs


def trained_runs(tok, enc: Encoded) -> list[str]:
    runs, start = [], None
    mask = list(enc.loss_mask) + [0]
    for i, m in enumerate(mask):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append(
                tok.decode([int(t) for t in enc.input_ids[start:i]], skip_special_tokens=False)
            )
            start = None
    return runs


# Text a template puts inside the assistant turn *after* its generation prompt, which the model
# must therefore produce itself (functionary v3.2 writes the recipient, ">>>all\n").
RESPONSE_PREFIXES = {
    "llama.cpp/meetkai-functionary-medium-v3.2.jinja": "all\n",
    "llama.cpp/openai-gpt-oss-120b.jinja": "final",  # <|channel|>final<|message|>
    "hf/openai-gpt-oss.jinja": "final",
}


def test_trained_tokens_are_assistant_contents_and_markers(qwen, markers):
    checked, skipped, problems = 0, [], []
    any_marker = "|".join(map(re.escape, markers))
    for entry in ENTRIES:
        name = entry["file"]
        qwen.bos_token = entry.get("bos_token")
        qwen.eos_token = entry.get("eos_token") or "<|im_end|>"
        tpl = resolve_template(str(TEMPLATES / name), qwen)
        for msgs in ([SYSTEM, *TURNS], TURNS):
            try:
                tpl.render(msgs)
                break
            except TemplateRenderError:
                continue
        else:
            skipped.append(name)
            continue
        checked += 1
        enc = encode_example(normalise({"messages": msgs}, "chat", name), qwen, tpl)
        if not isinstance(enc, Encoded):
            problems.append((name, enc))
            continue
        eot = tuple(m for m in {qwen.eos_token, *EOT_MARKERS} if m)
        runs = trained_runs(qwen, enc)
        contents = [m["content"] for m in TURNS[1::2]]
        if len(runs) != len(contents):
            problems.append((name, runs))
            continue
        for run, content in zip(runs, contents, strict=True):
            head, found, tail = run.partition(content)
            # before the content: whitespace, markers the model must emit first (Command R7B's
            # <|START_RESPONSE|>), an empty reasoning block the template adds, a known prefix
            bare = re.sub(any_marker, "", head).removeprefix(RESPONSE_PREFIXES.get(name, ""))
            # after it: markers only, ending with an end-of-turn one, unless the template has none
            ok = (
                found
                and not any(word in run for word in FORBIDDEN)
                and re.fullmatch(r"\s*(<think>\s*</think>\s*)?", bare)
                and re.sub(any_marker, "", tail).strip() == ""
                # no known end-of-turn marker: trained through the turn's own closing text, or
                # up to the content's last token (which may carry whitespace)
                and (tail.endswith(eot) or enc.missing_eot)
            )
            if not ok:
                problems.append((name, run))
    assert not problems, "\n".join(map(repr, problems))
    assert checked >= 60, (checked, skipped)


@pytest.mark.parametrize(
    "name", ["qwen2.5-instruct", "mistral-7b-instruct-v0.3", "phi-3-mini-128k-instruct"]
)
def test_own_template_ids_equal_apply_chat_template(name):
    tok = load(name)
    msgs = [SYSTEM, *TURNS] if name != "mistral-7b-instruct-v0.3" else TURNS
    enc = encode_example(
        normalise({"messages": msgs}, "chat", "x:1"), tok, resolve_template("auto", tok)
    )
    assert enc.input_ids.tolist() == ids_of(tok.apply_chat_template(msgs))
    assert [r.strip() for r in trained_runs(tok, enc)] == OWN_TRAINED[name]


A1, A2 = TURNS[1]["content"], TURNS[3]["content"]
OWN_TRAINED = {
    "qwen2.5-instruct": [f"{A1}<|im_end|>", f"{A2}<|im_end|>"],
    "mistral-7b-instruct-v0.3": [f"{A1}</s>", f"{A2}</s>"],
    # Phi-3's template closes a finished conversation with EOS: the model learns that too
    "phi-3-mini-128k-instruct": [f"{A1}<|end|>", f"{A2}<|end|><|endoftext|>"],
}


def test_qwen_tool_calling_conversation_matches_apply_chat_template():
    path = FIXTURES / "data" / "tool-calling" / "glaive_toolcall_en_demo.json"
    if not path.is_file():
        pytest.skip("data fixture absent")
    tok = load("qwen2.5-instruct")
    examples, errors = read_examples(path)
    tpl = resolve_template("auto", tok)
    for ex in examples[:5]:
        enc = encode_example(ex, tok, tpl)
        msgs = [m.to_template_dict() for m in ex.messages]
        assert enc.input_ids.tolist() == ids_of(tok.apply_chat_template(msgs, tools=ex.tools))
        assert not enc.not_prefix_stable and not enc.missing_eot
        n_assistant = sum(m.role == "assistant" for m in ex.messages)
        assert len(trained_runs(tok, enc)) == n_assistant


def test_llama2_alpaca_has_one_bos_and_unicode_survives():
    tok = load("llama-2")
    row = {"instruction": "Übersetze: 猫", "input": "", "output": "Katze 🐱"}
    enc = encode_example(normalise(row, "alpaca", "x:1"), tok, resolve_template("auto", tok))
    assert (
        enc.input_ids[0] == tok.bos_token_id and int(np.sum(enc.input_ids == tok.bos_token_id)) == 1
    )
    assert trained_runs(tok, enc) == ["Katze 🐱</s>"]


def test_qwen3_tool_calls_are_located_although_not_prefix_stable():
    """Qwen3 renders earlier assistant turns without their reasoning: every turn, tool calls
    included (empty content), is still found after its generation header."""
    path = FIXTURES / "data" / "tool-calling" / "glaive_toolcall_en_demo.json"
    template = TEMPLATES / "hf" / "Qwen-Qwen3@2025-revision.jinja"
    if not (path.is_file() and template.is_file()):
        pytest.skip("fixtures absent")
    tok = load("qwen2.5-instruct")
    tpl = resolve_template(str(template), tok)
    examples, _ = read_examples(path)
    for ex in examples[:8]:
        enc = encode_example(ex, tok, tpl)
        assert isinstance(enc, Encoded), enc
        runs = trained_runs(tok, enc)
        turns = [m for m in ex.messages if m.role == "assistant"]
        assert len(runs) == len(turns)
        for run, turn in zip(runs, turns, strict=True):
            assert run.endswith("<|im_end|>") and "<|im_start|>" not in run
            if turn.tool_calls:
                name = turn.tool_calls[0]["function"]["name"]
                assert run.startswith("<tool_call>\n") and f'"name": "{name}"' in run
            else:
                assert turn.content in run
