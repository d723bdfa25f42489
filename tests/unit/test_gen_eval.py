"""Generation-based evaluation (`train --eval-prompts`): scoring, greedy parity with `generate`,
records in metrics.jsonl and the report panels."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlxsft.config import resolve
from mlxsft.data.types import Example, Message
from mlxsft.errors import UserError
from mlxsft.train.gen_eval import EvalPrompt, GenEvalResult, Reply, prompts_from_examples

ROWS = [
    ("Reverse the letters: a b c", "c b a"),
    ("Sort the numbers: 3 1 2", "1 2 3"),
    ("Uppercase: x y", "X Y"),
    ("Largest number: 7 2 9", "9"),
]


def _chat(q: str, a: str) -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps(_chat(q, a)) + "\n" for q, a in ROWS))
    return path


def test_scores_are_exact_rates():
    def reply(ref: str, text: str, stopped: bool) -> Reply:
        return Reply(EvalPrompt([{"role": "user", "content": "q"}], ref, "f:1"), text, 3, stopped)

    result = GenEvalResult(
        [
            reply("c b a", " c  b a\n", True),  # exact after whitespace normalisation
            reply("9", "It is 9.", True),  # contains only
            reply("X Y", "x y", False),  # neither, no stop
            reply("1 2 3", "1 2 3 4 5", False),  # contains
        ],
        max_tokens=8,
    )
    rec = result.record(7)
    assert rec == {
        "type": "gen_eval",
        "step": 7,
        "exact_match": 0.25,
        "contains_match": 0.75,
        "stop_rate": 0.5,
        "n_prompts": 4,
        "mean_reply_tokens": 3.0,
    }
    lines = result.lines(7)
    assert lines[0].startswith("gen eval at step 7: exact 25%, contains 75%, stopped 50% of 4")
    assert len(lines) == 3 and "[stop]" in lines[1] and "(reference '9')" in lines[2]


def test_prompts_take_the_last_assistant_turn_as_reference():
    ex = Example(
        [
            Message("system", "s"),
            Message("user", "u1"),
            Message("assistant", "a1"),
            Message("user", "u2"),
            Message("assistant", "a2"),
        ],
        "chat",
        "f:3",
    )
    text_only = Example([Message("assistant", "all text")], "text", "f:4")
    [p] = prompts_from_examples([text_only, ex, ex], limit=1)
    assert [m["content"] for m in p.messages] == ["s", "u1", "a1", "u2"]
    assert (p.reference, p.source) == ("a2", "f:3")
    alpaca = Example([Message("user", "Name it."), Message("assistant", "cat")], "alpaca", "f:5")
    alpaca.context = "A cat sat."
    [p] = prompts_from_examples([alpaca], limit=5)  # the input is part of the prompt
    assert p.messages == [
        {"role": "user", "content": "Name it.\n\nA cat sat.", "instruction": "Name it.",
         "input": "A cat sat."}
    ]  # fmt: skip


def test_greedy_reply_matches_generate(tiny_llama):
    """The eval's greedy loop gives the tokens and stop decision of `mlxsft generate`."""
    from mlxsft.generate import Generator, SamplingParams
    from mlxsft.train.gen_eval import greedy_reply

    gen = Generator.load(str(tiny_llama))
    messages = [{"role": "user", "content": "Sort the numbers: 3 1 2"}]
    ids = gen.prompt_ids(messages)
    for max_tokens in (3, 40):
        ref = gen.generate(ids, SamplingParams(temp=0.0, max_tokens=max_tokens))
        tokens, stopped = greedy_reply(gen.model, ids, gen.stop_ids, max_tokens)
        assert tokens == ref.tokens
        assert stopped == (ref.finish_reason == "stop")


def test_train_logs_generation_eval(tiny_llama, data_file, tmp_path):
    from mlxsft.report import render_terminal_chart
    from mlxsft.rundir import read_metrics
    from mlxsft.train.loop import train

    lines: list[str] = []

    class Stream:
        def write(self, text):
            lines.append(text)

        def flush(self):
            pass

        def isatty(self):
            return False

    out = tmp_path / "run"
    cfg = resolve(
        dict(
            model=str(tiny_llama), data=str(data_file), output=str(out), iters=2, batch_size=2,
            max_seq_len=64, eval_every=2, steps_per_report=1, eval_prompts=str(data_file),
            eval_num_prompts=3, eval_max_tokens=5,
        )
    )  # fmt: skip
    train(cfg, stream=Stream())
    records = [r for r in read_metrics(out) if r["type"] == "gen_eval"]
    assert [r["step"] for r in records] == [0, 2]  # before training and at the end
    assert all(r["n_prompts"] == 3 and 0 <= r["stop_rate"] <= 1 for r in records)
    assert all(r["mean_reply_tokens"] <= 5 for r in records)
    text = "".join(lines)
    assert text.count("gen eval at step") == 2 and "within 5 tokens" in text
    chart = render_terminal_chart(read_metrics(out))
    assert "replies stopped:" in chart and "exact match:" in chart


def test_eval_prompts_valid_needs_validation_data(tiny_llama, data_file, tmp_path):
    from mlxsft.train.loop import train

    cfg = resolve(
        dict(model=str(tiny_llama), data=str(data_file), output=str(tmp_path / "x"), iters=1,
             eval_prompts="valid")
    )  # fmt: skip
    with pytest.raises(UserError, match="no validation data"):
        train(cfg)
