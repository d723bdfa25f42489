"""Built-in templates render the families' formats; the sandbox behaves like transformers'."""

from __future__ import annotations

import pytest
from helpers_tokenizer import build_tokenizer

from mlxsft.data.formats import normalise
from mlxsft.data.render import template_messages
from mlxsft.data.templates import BUILTIN, TemplateRenderError, resolve_template
from mlxsft.errors import UserError

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Bye?"},
    {"role": "assistant", "content": "Bye."},
]
EXPECTED = {
    "chatml": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
    "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nBye?<|im_end|>\n"
    "<|im_start|>assistant\nBye.<|im_end|>\n",
    "llama3": "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nBye?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nBye.<|eot_id|>",
    "mistral": "[INST] Be brief.\n\nHi! [/INST] Hello.</s>[INST] Bye? [/INST] Bye.</s>",
    "gemma": "<start_of_turn>user\nBe brief.\n\nHi!<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n"
    "<start_of_turn>user\nBye?<end_of_turn>\n<start_of_turn>model\nBye.<end_of_turn>\n",
    "phi3": "<|system|>\nBe brief.<|end|>\n<|user|>\nHi!<|end|>\n<|assistant|>\nHello.<|end|>\n"
    "<|user|>\nBye?<|end|>\n<|assistant|>\nBye.<|end|>\n",
    "alpaca": "Be brief.\n\n### Instruction:\nHi!\n\n### Response:\nHello.</s>"
    "\n\n### Instruction:\nBye?\n\n### Response:\nBye.</s>",
}
GENERATION_PROMPT = {
    "chatml": "<|im_start|>assistant\n",
    "llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "mistral": "",
    "gemma": "<start_of_turn>model\n",
    "phi3": "<|assistant|>\n",
    "alpaca": "\n\n### Response:\n",
}
PREAMBLE = "Below is an instruction that describes a task"
WITH_INPUT = ", paired with an input that provides further context"
TAIL = ". Write a response that appropriately completes the request."


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.mark.parametrize("name", BUILTIN)
def test_builtin_renders_family_format(tok, name):
    tpl = resolve_template(name, tok)
    assert tpl.builtin and tpl.name == name
    assert tpl.render(CHAT) == EXPECTED[name]
    prompt = tpl.render(CHAT[:-1], add_generation_prompt=True)
    assert prompt == tpl.render(CHAT[:-1]) + GENERATION_PROMPT[name]


@pytest.mark.parametrize("name", BUILTIN)
def test_builtin_matches_transformers_apply_chat_template(tok, name):
    tpl = resolve_template(name, tok)
    tok.chat_template = tpl.source
    try:
        for gen in (False, True):
            ours = tpl.render(CHAT[:-1] if gen else CHAT, add_generation_prompt=gen)
            theirs = tok.apply_chat_template(
                CHAT[:-1] if gen else CHAT, tokenize=False, add_generation_prompt=gen
            )
            assert ours == theirs
    finally:
        tok.chat_template = None


def test_alpaca_classic_with_and_without_input(tok):
    tpl = resolve_template("alpaca", tok)
    with_input = normalise({"instruction": "Add.", "input": "1 2", "output": "3"}, "alpaca", "f:1")
    assert tpl.render(template_messages(with_input)) == (
        f"{PREAMBLE}{WITH_INPUT}{TAIL}\n\n### Instruction:\nAdd.\n\n### Input:\n1 2\n\n"
        "### Response:\n3</s>"
    )
    no_input = normalise({"instruction": "Hi.", "input": "", "output": "Hey"}, "alpaca", "f:2")
    assert tpl.render(template_messages(no_input), add_generation_prompt=False) == (
        f"{PREAMBLE}{TAIL}\n\n### Instruction:\nHi.\n\n### Response:\nHey</s>"
    )
    # a chat template sees the input joined to the instruction
    assert template_messages(with_input)[0]["content"] == "Add.\n\n1 2"


def test_tool_calls_render_in_builtins(tok):
    msgs = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "w", "arguments": {"city": "Zürich"}}}]},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "Sunny."},
    ]  # fmt: skip
    chatml = resolve_template("chatml", tok).render(msgs)
    assert (
        '<tool_call>\n{"name": "w", "arguments": {"city": "Zürich"}}\n</tool_call><|im_end|>'
        in chatml
    )
    assert "<|im_start|>tool\nsunny<|im_end|>" in chatml
    llama3 = resolve_template("llama3", tok).render(msgs)
    assert '{"name": "w", "parameters": {"city": "Zürich"}}<|eot_id|>' in llama3
    assert "<|start_header_id|>ipython<|end_header_id|>\n\nsunny<|eot_id|>" in llama3


def test_resolve(tok, tmp_path):
    assert resolve_template("auto", tok).name == "alpaca"
    with pytest.raises(UserError, match="no chat template"):
        resolve_template("tokenizer", tok)
    own = build_tokenizer(chat_template="{{ messages[0]['content'] }}")
    assert resolve_template("auto", own).name == "tokenizer"
    assert resolve_template("tokenizer", own).render(CHAT) == "Be brief."
    path = tmp_path / "t.jinja"
    path.write_text(
        "{{ bos_token }}{% for m in messages %}{{ m['content'] }}|{% endfor %}{{ extra }}"
    )
    tpl = resolve_template(str(path), tok)
    assert not tpl.builtin and tpl.render(CHAT[:2], extra="X") == "<s>Be brief.|Hi!|X"
    with pytest.raises(UserError, match="template file not found"):
        resolve_template(str(tmp_path / "missing.jinja"), tok)
    with pytest.raises(UserError, match="unknown template 'vicuna'"):
        resolve_template("vicuna", tok)
    path.write_text("{% for %}")
    with pytest.raises(UserError, match="does not parse"):
        resolve_template(str(path), tok)


def test_raise_exception_and_failures_become_one_line_errors(tok, tmp_path):
    path = tmp_path / "strict.jinja"
    path.write_text(
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('No system!') }}{% endif %}"
    )
    with pytest.raises(TemplateRenderError) as err:
        resolve_template(str(path), tok).render(CHAT, where="d.jsonl:3")
    assert str(err.value).startswith("d.jsonl:3: template ") and "raised: No system!" in str(
        err.value
    )
    path.write_text("{{ messages[0]['content'] + 1 }}")
    with pytest.raises(TemplateRenderError, match="failed: TypeError"):
        resolve_template(str(path), tok).render(CHAT, where="d.jsonl:3")


def test_sandbox_helpers_match_hf(tok, tmp_path):
    source = (
        "{{ messages[0] | tojson }}|{{ tools | tojson(indent=2) }}|{{ strftime_now('%Y') | length }}"
        "|{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.role }}{% endfor %}"
    )
    msgs = [{"role": "user", "content": "ünï <b>"}, {"role": "assistant", "content": "x"}]
    tools = [{"name": "f"}]
    path = tmp_path / "t.jinja"
    path.write_text(source)
    ours = resolve_template(str(path), tok).render(msgs, tools=tools)
    assert ours.startswith(
        '{"role": "user", "content": "ünï <b>"}|[\n  {\n    "name": "f"\n  }\n]|4|user'
    )
    tok.chat_template = source
    try:
        assert ours == tok.apply_chat_template(msgs, tools=tools, tokenize=False)
    finally:
        tok.chat_template = None
    path.write_text("{{ ''.__class__.__mro__ }}")
    with pytest.raises(TemplateRenderError, match="SecurityError|unsafe"):  # sandboxed
        resolve_template(str(path), tok).render(msgs)


def test_warns_when_builtin_markers_are_not_tokens(tok):
    from mlxsft.data.templates import template_warnings

    assert template_warnings(resolve_template("chatml", tok), tok) == []

    class NoMarkers:
        def get_vocab(self):
            return {"a": 0}

    (warning,) = template_warnings(resolve_template("llama3", tok), NoMarkers())
    assert "<|start_header_id|>, <|end_header_id|>, <|eot_id|> not single tokens" in warning
    assert template_warnings(resolve_template("alpaca", tok), NoMarkers()) == []
