"""Exact (input_ids, loss_mask) for hand-built examples in every format and built-in template.

Expectations are written as tokens of the readable test tokenizer (tests/helpers_tokenizer.py),
joined by "·"; a token prefixed with "+" is trained (loss_mask 1). The ids are those tokens' ids.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers_tokenizer import build_tokenizer, tokens

from mlxsft.data.encode import encode_dataset, encode_example, truncate
from mlxsft.data.formats import normalise
from mlxsft.data.stats import padding_waste
from mlxsft.data.templates import ChatTemplate, resolve_template
from mlxsft.data.types import Dropped, Encoded, Example, Message

WORDS = [
    "Be brief. Weather in Paris? It is sunny. Thanks! You are welcome. get_weather city sunny",
    "Say hi: Hello world Add. 1 2 3 Hi. Hey Grüße, 世界 👋 Danke <think></think>",
]
CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "It is sunny."},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "You are welcome."},
    ]
}  # fmt: skip

# fmt: off
BUILTIN_EXPECTED = {
    "chatml": (
        "<s>·<|im_start|>·system·\n·Be· ·brief·.·<|im_end|>·\n·<|im_start|>·user·\n·Weather·"
        " ·in· ·Paris·?·<|im_end|>·\n·<|im_start|>·assistant·\n·+<·+tool_call·+>·+\n·"
        "+{·+\"·+name·+\"·+:·+ ·+\"·+get_weather·+\"·+,·+ ·+\"·+arguments·+\"·"
        "+:·+ ·+{·+\"·+city·+\"·+:·+ ·+\"·+Paris·+\"·+}·+}·+\n·"
        "+<·+/·+tool_call·+>·+<|im_end|>·\n·<|im_start|>·tool·\n·sunny·<|im_end|>·\n·<|im_start|>·assistant·"
        "\n·+It·+ ·+is·+ ·+sunny·+.·+<|im_end|>·\n·<|im_start|>·user·\n·Thanks·!·"
        "<|im_end|>·\n·<|im_start|>·assistant·\n·+You·+ ·+are·+ ·+welcome·+.·+<|im_end|>·\n·"
    ),
    "llama3": (
        "<s>·<|start_header_id|>·system·<|end_header_id|>·\n\n·Be· ·brief·.·<|eot_id|>·<|start_header_id|>·user·<|end_header_id|>·\n\n·"
        "Weather· ·in· ·Paris·?·<|eot_id|>·<|start_header_id|>·assistant·<|end_header_id|>·\n\n·+{·+\"·+name·"
        "+\"·+:·+ ·+\"·+get_weather·+\"·+,·+ ·+\"·+parameters·+\"·+:·+ ·+{·"
        "+\"·+city·+\"·+:·+ ·+\"·+Paris·+\"·+}·+}·+<|eot_id|>·<|start_header_id|>·ipython·<|end_header_id|>·"
        "\n\n·sunny·<|eot_id|>·<|start_header_id|>·assistant·<|end_header_id|>·\n\n·+It·+ ·+is·+ ·+sunny·+.·+<|eot_id|>·"
        "<|start_header_id|>·user·<|end_header_id|>·\n\n·Thanks·!·<|eot_id|>·<|start_header_id|>·assistant·<|end_header_id|>·\n\n·+You·+ ·+are·"
        "+ ·+welcome·+.·+<|eot_id|>·"
    ),
    "mistral": (
        "<s>·[·INST·]· ·Be· ·brief·.·\n\n·Weather· ·in· ·"
        "Paris·?· ·[·/·INST·]·+[·+TOOL_CALLS·+]·+ ·+[·+{·+\"·"
        "+name·+\"·+:·+ ·+\"·+get_weather·+\"·+,·+ ·+\"·+arguments·+\"·+:·+ ·"
        "+{·+\"·+city·+\"·+:·+ ·+\"·+Paris·+\"·+}·+}·+]·+</s>·[·"
        "TOOL_RESULTS·]· ·sunny· ·[·/·TOOL_RESULTS·]·+ ·+It·+ ·+is·+ ·"
        "+sunny·+.·+</s>·[·INST·]· ·Thanks·!· ·[·/·INST·]·"
        "+ ·+You·+ ·+are·+ ·+welcome·+.·+</s>·"
    ),
    "gemma": (
        "<s>·<start_of_turn>·user·\n·Be· ·brief·.·\n\n·Weather· ·in· ·Paris·"
        "?·<end_of_turn>·\n·<start_of_turn>·model·\n·+[·+{·+\"·+name·+\"·+:·+ ·+\"·"
        "+get_weather·+\"·+,·+ ·+\"·+arguments·+\"·+:·+ ·+{·+\"·+city·+\"·+:·"
        "+ ·+\"·+Paris·+\"·+}·+}·+]·+<end_of_turn>·\n·<start_of_turn>·user·\n·sunny·<end_of_turn>·"
        "\n·<start_of_turn>·model·\n·+It·+ ·+is·+ ·+sunny·+.·+<end_of_turn>·\n·<start_of_turn>·user·"
        "\n·Thanks·!·<end_of_turn>·\n·<start_of_turn>·model·\n·+You·+ ·+are·+ ·+welcome·+.·"
        "+<end_of_turn>·\n·"
    ),
    "phi3": (
        "<s>·<|system|>·\n·Be· ·brief·.·<|end|>·\n·<|user|>·\n·Weather· ·in·"
        " ·Paris·?·<|end|>·\n·<|assistant|>·\n·+[·+{·+\"·+name·+\"·+:·+ ·"
        "+\"·+get_weather·+\"·+,·+ ·+\"·+arguments·+\"·+:·+ ·+{·+\"·+city·+\"·"
        "+:·+ ·+\"·+Paris·+\"·+}·+}·+]·+<|end|>·\n·<|tool|>·\n·sunny·<|end|>·"
        "\n·<|assistant|>·\n·+It·+ ·+is·+ ·+sunny·+.·+<|end|>·\n·<|user|>·\n·Thanks·"
        "!·<|end|>·\n·<|assistant|>·\n·+You·+ ·+are·+ ·+welcome·+.·+<|end|>·\n·"
    ),
    "alpaca": (
        "<s>·Be· ·brief·.·\n\n·#·#·#· ·Instruction·:·\n·Weather·"
        " ·in· ·Paris·?·\n\n·#·#·#· ·Response·:·\n·+[·"
        "+{·+\"·+name·+\"·+:·+ ·+\"·+get_weather·+\"·+,·+ ·+\"·+arguments·+\"·"
        "+:·+ ·+{·+\"·+city·+\"·+:·+ ·+\"·+Paris·+\"·+}·+}·+]·"
        "+</s>·\n\n·#·#·#· ·Input·:·\n·sunny·\n\n·#·#·#·"
        " ·Response·:·\n·+It·+ ·+is·+ ·+sunny·+.·+</s>·\n\n·#·#·"
        "#· ·Instruction·:·\n·Thanks·!·\n\n·#·#·#· ·Response·:·"
        "\n·+You·+ ·+are·+ ·+welcome·+.·+</s>·"
    ),
}
# fmt: on


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(WORDS)


@pytest.fixture(scope="module")
def tok_nobos():
    return build_tokenizer(WORDS, add_bos=False)


def spelled(tokenizer, expected: str) -> tuple[list[int], list[int]]:
    """ "a·+b" -> (ids of [a, b], [0, 1])."""
    toks = expected.removesuffix("·").split("·")
    mask = [int(t.startswith("+") and len(t) > 1) for t in toks]
    toks = [t[1:] if m else t for t, m in zip(toks, mask, strict=True)]
    ids = tokenizer.convert_tokens_to_ids(toks)
    assert tokenizer.unk_token_id not in ids or "<unk>" in toks, toks
    return ids, mask


def check(tokenizer, enc, expected: str) -> None:
    assert isinstance(enc, Encoded), enc
    got = "·".join(
        ("+" + t if m else t)
        for t, m in zip(tokens(tokenizer, enc.input_ids), enc.loss_mask, strict=True)
    )
    assert got == expected.removesuffix("·")
    ids, mask = spelled(tokenizer, expected)
    assert enc.input_ids.dtype == np.int32 and enc.loss_mask.dtype == np.int32
    assert enc.input_ids.tolist() == ids and enc.loss_mask.tolist() == mask
    assert enc.loss_mask[0] == 0


def encode(tok, row, fmt, template="chatml", **kw):
    ex = normalise(row, fmt, "data.jsonl:1")
    return encode_example(ex, tok, resolve_template(template, tok) if template else None, **kw)


@pytest.mark.parametrize("name", sorted(BUILTIN_EXPECTED))
def test_builtin_templates_multi_turn_with_system_and_tools(tok, name):
    enc = encode(tok, CHAT, "chat", name)
    check(tok, enc, "".join(BUILTIN_EXPECTED[name]))
    assert not enc.missing_eot and not enc.not_prefix_stable and not enc.truncated


def test_completion_is_raw_concatenation(tok, tok_nobos):
    row = {"prompt": "Say hi:", "completion": " Hello"}
    check(tok, encode(tok, row, "completion"), "<s>·Say· ·hi·:·+ ·+Hello·+</s>")
    check(tok_nobos, encode(tok_nobos, row, "completion"), "Say· ·hi·:·+ ·+Hello·+</s>")
    check(tok, encode(tok, row, "completion", train_on="all"), "<s>·+Say·+ ·+hi·+:·+ ·+Hello·+</s>")


def test_text_trains_every_token_but_the_first(tok, tok_nobos):
    row = {"text": "Hello world"}
    check(tok, encode(tok, row, "text", None), "<s>·+Hello·+ ·+world·+</s>")
    check(tok_nobos, encode(tok_nobos, row, "text", None), "Hello·+ ·+world·+</s>")


def test_never_a_double_bos(tok):
    check(tok, encode(tok, {"text": "<s>Hello"}, "text"), "<s>·+Hello·+</s>")
    check(tok, encode(tok, {"prompt": "<s>Hi.", "completion": "Hey"}, "completion"),
          "<s>·Hi·.·+Hey·+</s>")  # fmt: skip
    # the model's own template writes BOS; the tokenizer would add one too: still one
    own = build_tokenizer(WORDS, chat_template=resolve_template("chatml", tok).source.replace(
        "{%- for message", "{{- bos_token }}{%- for message", 1))  # fmt: skip
    enc = encode(own, CHAT, "chat", "tokenizer")
    assert enc.input_ids.tolist() == own.apply_chat_template(CHAT["messages"])["input_ids"]
    assert enc.input_ids.tolist().count(own.bos_token_id) == 1


def test_alpaca_with_and_without_input(tok):
    row = {"instruction": "Add.", "input": "1 2", "output": "3"}
    check(tok, encode(tok, row, "alpaca", "alpaca"), (
        "<s>·Below· ·is· ·an· ·instruction· ·that· ·describes· ·a· ·task·,· ·paired· ·with· ·an· "
        "·input· ·that· ·provides· ·further· ·context·.· ·Write· ·a· ·response· ·that· "
        "·appropriately· ·completes· ·the· ·request·.·\n\n·#·#·#· ·Instruction·:·\n·Add·.·\n\n·"
        "#·#·#· ·Input·:·\n·1· ·2·\n\n·#·#·#· ·Response·:·\n·+3·+</s>"
    ))  # fmt: skip
    row = {"instruction": "Hi.", "input": "", "output": "Hey"}
    check(tok, encode(tok, row, "alpaca", "alpaca"), (
        "<s>·Below· ·is· ·an· ·instruction· ·that· ·describes· ·a· ·task·.· ·Write· ·a· ·response· "
        "·that· ·appropriately· ·completes· ·the· ·request·.·\n\n·#·#·#· ·Instruction·:·\n·Hi·.·"
        "\n\n·#·#·#· ·Response·:·\n·+Hey·+</s>"
    ))  # fmt: skip
    # under a chat template the input joins the instruction
    check(tok, encode(tok, {"instruction": "Add.", "input": "1 2", "output": "3"}, "alpaca"), (
        "<s>·<|im_start|>·user·\n·Add·.·\n\n·1· ·2·<|im_end|>·\n·<|im_start|>·assistant·\n·+3·"
        "+<|im_end|>·\n"
    ))  # fmt: skip


def test_sharegpt_and_unicode(tok):
    row = {
        "conversations": [
            {"from": "human", "value": "Grüße, 世界"},
            {"from": "gpt", "value": "👋 Danke"},
        ]
    }
    check(tok, encode(tok, row, "chat"), (
        "<s>·<|im_start|>·user·\n·Grüße·,· ·世界·<|im_end|>·\n·<|im_start|>·assistant·\n·+👋·+ ·+Danke·"
        "+<|im_end|>·\n"
    ))  # fmt: skip


TWO_TURNS = {
    "messages": [
        {"role": "user", "content": "Hi."},
        {"role": "assistant", "content": "Hey"},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "You are welcome."},
    ]
}
PROMPT_1 = "<s>·<|im_start|>·user·\n·Hi·.·<|im_end|>·\n·<|im_start|>·assistant·\n·"
PROMPT_2 = "<|im_start|>·user·\n·Thanks·!·<|im_end|>·\n·<|im_start|>·assistant·\n·"


def test_train_on_modes_and_train_false(tok):
    check(
        tok,
        encode(tok, TWO_TURNS, "chat", train_on="responses"),
        PROMPT_1 + "+Hey·+<|im_end|>·\n·" + PROMPT_2 + "+You·+ ·+are·+ ·+welcome·+.·+<|im_end|>·\n",
    )
    check(
        tok,
        encode(tok, TWO_TURNS, "chat", train_on="last"),
        PROMPT_1 + "Hey·<|im_end|>·\n·" + PROMPT_2 + "+You·+ ·+are·+ ·+welcome·+.·+<|im_end|>·\n",
    )
    all_trained = encode(tok, TWO_TURNS, "chat", train_on="all")
    assert all_trained.loss_mask.tolist() == [0] + [1] * (len(all_trained.loss_mask) - 1)
    row = {"messages": [dict(m) for m in TWO_TURNS["messages"]]}
    row["messages"][1]["train"] = False
    check(
        tok,
        encode(tok, row, "chat"),
        PROMPT_1 + "Hey·<|im_end|>·\n·" + PROMPT_2 + "+You·+ ·+are·+ ·+welcome·+.·+<|im_end|>·\n",
    )
    enc = encode(tok, row, "chat", train_on="all")  # train: false wins over --train-on all
    assert (
        "".join(t for t, m in zip(tokens(tok, enc.input_ids), enc.loss_mask, strict=True) if not m)
        == "<s>Hey<|im_end|>"
    )
    row["messages"][3]["train"] = False
    dropped = encode(tok, row, "chat")
    assert isinstance(dropped, Dropped) and dropped.reason == "fully masked"
    assert dropped.source == "data.jsonl:1"  # fmt: skip


def test_truncation(tok, tok_nobos):
    full = encode(tok, TWO_TURNS, "chat")
    n = len(full.input_ids)
    # trained tokens survive a cut from the right: keep the head
    cut = encode(tok, TWO_TURNS, "chat", max_seq_len=13)
    assert cut.truncated and cut.input_ids.tolist() == full.input_ids[:13].tolist()
    assert cut.loss_mask.tolist() == full.loss_mask[:13].tolist() and cut.n_trained == 2
    # only the last turn trained and beyond the cut: drop prompt tokens after BOS instead
    last = encode(tok, TWO_TURNS, "chat", train_on="last")
    cut = encode(tok, TWO_TURNS, "chat", train_on="last", max_seq_len=10)
    assert cut.truncated and len(cut.input_ids) == 10
    assert cut.input_ids.tolist() == [tok.bos_token_id] + last.input_ids[n - 9 :].tolist()
    assert cut.loss_mask.tolist() == [0] + last.loss_mask[n - 9 :].tolist()
    check(tok, cut, "<s>·\n·+You·+ ·+are·+ ·+welcome·+.·+<|im_end|>·\n")
    # nothing trained would remain: dropped and counted
    gone = encode(tok_nobos, {"text": "Hi"}, "text", None, max_seq_len=1)
    assert isinstance(gone, Dropped) and gone.reason == "no trained tokens within max_seq_len"
    ids, mask = np.arange(6, dtype=np.int32), np.array([0, 0, 0, 0, 1, 1], dtype=np.int32)
    assert [a.tolist() for a in truncate(ids, mask, 3, bos_id=0)] == [[0, 4, 5], [0, 1, 1]]
    assert [a.tolist() for a in truncate(ids, mask, 5, bos_id=None)] == [
        [0, 1, 2, 3, 4],
        [0, 0, 0, 0, 1],
    ]
    mask[4] = 0
    assert [a.tolist() for a in truncate(ids, mask, 5, bos_id=None)] == [
        [1, 2, 3, 4, 5],
        [0, 0, 0, 0, 1],
    ]


def test_missing_end_of_turn_and_not_prefix_stable(tok):
    plain = ChatTemplate("plain", "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}", builtin=False)  # fmt: skip
    ex = normalise(TWO_TURNS, "chat", "d:1")
    enc = encode_example(ex, tok, plain)
    assert enc.missing_eot and not enc.not_prefix_stable
    assert "·".join(
        ("+" + t if m else t)
        for t, m in zip(tokens(tok, enc.input_ids), enc.loss_mask, strict=True)
    ) == (
        "user·:· ·Hi·.·\n\n·assistant·:· ·+Hey·\n\n·user·:· ·Thanks·!·\n\n·assistant·:· ·+You·+ ·+are·+ ·+welcome·+.·\n\n"
    )  # trailing blank lines are not trained
    # Qwen3-like: only the final assistant turn gets a reasoning block
    thinking = ChatTemplate("thinking", (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] == 'assistant' and loop.last %}<think></think>{% endif %}"
        "{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"), builtin=False)  # fmt: skip
    enc = encode_example(ex, tok, thinking)
    assert enc.not_prefix_stable and not enc.missing_eot
    trained = [t for t, m in zip(tokens(tok, enc.input_ids), enc.loss_mask, strict=True) if m]
    assert trained == ["Hey", "<|im_end|>", "<", "think", ">", "<", "/", "think", ">", "You", " ", "are",
                       " ", "welcome", ".", "<|im_end|>"]  # fmt: skip
    # earlier turns rewritten beyond recognition: dropped, never trained on the wrong tokens
    rewrite = ChatTemplate("rewrite", (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{{ m['content'] if loop.last or m['role'] != 'assistant' else '...' }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"), builtin=False)  # fmt: skip
    out = encode_example(ex, tok, rewrite)
    assert isinstance(out, Dropped) and out.reason.startswith("not prefix-stable")


def test_template_that_raises_is_dropped_with_reason(tok):
    strict = ChatTemplate(
        "strict", "{{ raise_exception('System role not supported') }}", builtin=False
    )
    out = encode_example(normalise(TWO_TURNS, "chat", "d:3"), tok, strict)
    assert (
        isinstance(out, Dropped) and out.reason == "template raised" and "System role" in out.detail
    )


def test_encode_dataset_stats(tok):
    rows = [TWO_TURNS, {"messages": [{"role": "user", "content": "Hi."},
                                     {"role": "assistant", "content": "Hey", "train": False}]}]  # fmt: skip
    examples = [normalise(r, "chat", f"d:{i}") for i, r in enumerate(rows, 1)]
    examples.append(Example([Message("assistant", "Hello world")], "text", "d:3"))
    encoded, stats = encode_dataset(examples, tok, resolve_template("chatml", tok), batch_size=2)
    assert [e.source for e in encoded] == ["d:1", "d:3"]
    assert stats.n_examples == 3 and stats.n_dropped == 1 and stats.dropped == {"fully masked": 1}
    assert stats.n_fully_masked == 1
    assert stats.n_tokens == sum(len(e.input_ids) for e in encoded) == 32 + 5
    assert stats.n_trained == 9 + 4 and stats.trained_fraction == pytest.approx(13 / 37)
    assert stats.length_histogram == [(0, 64, 2)]
    assert stats.padding_waste_naive == pytest.approx(1 - 37 / 64)
    d = stats.to_dict()
    assert d["length_histogram"] == [[0, 64, 2]] and d["examples_dropped"] == ["d:2: fully masked"]


def test_padding_waste():
    assert padding_waste([1, 9, 1, 9], 2) == pytest.approx(1 - 20 / 36)
    assert padding_waste(sorted([1, 9, 1, 9]), 2) == 0.0
    assert padding_waste([], 4) == 0.0
