"""`mlxsft chat`: the model sees exactly the training rendering of the conversation, the KV cache is
reused across turns (only the new suffix is fed), slash commands, and piped stdin."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlxsft.chat import ChatSession, handle_command, run_repl
from mlxsft.config import SamplingParams
from mlxsft.generate import Generator

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
PARAMS = SamplingParams(max_tokens=12)


@pytest.fixture(scope="module")
def gen(tiny_llama: Path) -> Generator:
    return Generator.load(str(tiny_llama))


def _user_prefixes(messages: list[dict]) -> list[list[dict]]:
    """The conversation up to and including each user message."""
    return [messages[: i + 1] for i, m in enumerate(messages) if m["role"] == "user"]


def test_turns_reuse_the_cache_and_match_a_fresh_run(gen: Generator) -> None:
    s = ChatSession(gen, system="Be brief.", params=PARAMS)
    replies = [s.send(text) for text in ("Hello there.", "What is 2 + 3?", "Write a poem.")]
    for k, prefix in enumerate(_user_prefixes(s.messages)):
        assert s.prompts[k] == gen.prompt_ids(prefix)  # exactly the training rendering
        # The reply with a reused cache equals a fresh greedy run on the whole prompt.
        assert replies[k].tokens == gen.generate(s.prompts[k], PARAMS).tokens
    assert s.fed[0] == s.prompts[0]
    for k in (1, 2):  # only the new suffix was fed; the whole previous prompt came from the cache
        reused = len(s.prompts[k]) - len(s.fed[k])
        assert reused >= len(s.prompts[k - 1])
        assert s.prompts[k][reused:] == s.fed[k]
    assert [m["role"] for m in s.messages] == ["system"] + ["user", "assistant"] * 3
    assert s.messages[2]["content"] == gen.decode(replies[0].tokens)


def test_undo_trims_the_cache(gen: Generator) -> None:
    s = ChatSession(gen, params=PARAMS)
    s.send("First question.")
    s.send("Second question.")
    assert s.undo() and len(s.messages) == 2
    third = s.send("Another second question.")
    reused = len(s.prompts[2]) - len(s.fed[2])
    assert len(s.prompts[0]) <= reused < len(s.prompts[1])
    assert third.tokens == gen.generate(s.prompts[2], PARAMS).tokens
    s.reset()
    assert s.messages == [] and not s.undo()


def test_context_window_drops_oldest_turns_keeps_system(gen: Generator) -> None:
    s = ChatSession(gen, system="S.", params=PARAMS, max_context=90)
    notes: list[str] = []
    for text in ("One two three four five.", "Six seven eight.", "Nine ten eleven twelve."):
        s.send(text, on_notice=notes.append)
    assert notes and notes[0].startswith("context window full: dropped the 1 oldest turn(s)")
    assert s.messages[0] == {"role": "system", "content": "S."}
    assert len(s.prompts[-1]) + PARAMS.max_tokens <= 90
    with pytest.raises(ValueError, match="more than the context window"):
        s.send("word " * 200)
    assert s.messages[-1]["role"] == "assistant"  # the too-long message was not kept


def test_save_load_roundtrip_and_commands(gen: Generator, tmp_path: Path) -> None:
    s = ChatSession(gen, params=PARAMS)
    out, err = io.StringIO(), io.StringIO()
    handle_command(s, "/system Answer in French.", out, err)
    reply = s.send("Bonjour?")
    handle_command(s, f"/save {tmp_path / 'c.jsonl'}", out, err)
    row = json.loads((tmp_path / "c.jsonl").read_text())
    cut = reply.finish_reason == "length"  # a reply cut at max_tokens is saved as context only
    assert row["messages"][-1].pop("train", True) is not cut
    assert row == {"messages": s.messages} and row["messages"][0]["role"] == "system"
    t = ChatSession(gen, params=PARAMS)
    handle_command(t, f"/load {tmp_path / 'c.jsonl'}", out, err)
    assert t.messages == s.messages
    handle_command(t, "/params temp=0.5 top_k=3", out, err)
    assert (t.params.temp, t.params.top_k) == (0.5, 3)
    assert "temp=0.5" in out.getvalue()
    assert handle_command(t, "/exit", out, err) is False
    with pytest.raises(ValueError, match="unknown command /nope"):
        handle_command(t, "/nope", out, err)


def test_repl_in_process(gen: Generator, tmp_path: Path) -> None:
    s = ChatSession(gen, params=PARAMS)
    script = "hi\n\n/bogus\n/undo\n/help\nhello again\n/exit\nnever read\n"
    out, err, rec = io.StringIO(), io.StringIO(), io.StringIO()
    run_repl(s, stdin=io.StringIO(script), out=out, err=err, record=rec)
    assert "error: unknown command /bogus" in err.getvalue() and "[undone]" in err.getvalue()
    assert "/save FILE" in out.getvalue()
    assert [m["content"] for m in s.messages if m["role"] == "user"] == ["hello again"]
    rows = [json.loads(line) for line in rec.getvalue().splitlines()]
    assert len(rows) == 2 and rows[1]["prompt_ids"] == gen.prompt_ids(s.messages[:1])


def test_chat_through_piped_stdin(tiny_llama: Path, tmp_path: Path) -> None:
    """Two turns, /undo, a turn, /save, /reset, a turn, EOF: the saved transcript re-renders to
    exactly the prompt ids the REPL gave the model, and the cache was reused."""
    saved, record = tmp_path / "chat.jsonl", tmp_path / "record.jsonl"
    script = "\n".join(
        ["Hello there.", "What is 2 + 3?", "/undo", "Tell me a story.", f"/save {saved}",
         "/reset", "New topic.", ""]
    )  # fmt: skip
    cmd = [sys.executable, "-m", "mlxsft", "chat", "-m", str(tiny_llama), "--system", "Be brief."]
    cmd += ["--max-tokens", "12", "--record", str(record)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(cmd, input=script, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "[undone]" in res.stderr and "[conversation reset]" in res.stderr
    assert ">>>" not in res.stdout  # no prompt echo on a pipe
    messages = json.loads(saved.read_text())["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert [m["content"] for m in messages if m["role"] == "user"] == [
        "Hello there.",
        "Tell me a story.",
    ]
    rows = [json.loads(line) for line in record.read_text().splitlines()]
    assert len(rows) == 4
    gen = Generator.load(str(tiny_llama))
    prefixes = _user_prefixes(messages)
    # Turn 1 and the turn after /undo: the saved transcript renders to exactly what was fed.
    assert rows[0]["prompt_ids"] == gen.prompt_ids(prefixes[0])
    assert rows[2]["prompt_ids"] == gen.prompt_ids(prefixes[1])
    assert rows[0]["n_fed"] == len(rows[0]["prompt_ids"])
    assert rows[2]["n_fed"] <= len(rows[2]["prompt_ids"]) - len(rows[0]["prompt_ids"])
    assert gen.decode(rows[0]["reply_ids"]) == messages[2]["content"]
    assert gen.decode(rows[2]["reply_ids"]) == messages[4]["content"]
    # replies cut at --max-tokens 12 are saved as context only
    for row, reply in ((rows[0], messages[2]), (rows[2], messages[4])):
        assert (reply.get("train") is False) == (len(row["reply_ids"]) == 12), reply
    # The training encoding of the saved row starts with the last prompt + the last reply's text.
    full = gen.renderer.conversation_ids(messages)
    assert full[: len(rows[2]["prompt_ids"])] == rows[2]["prompt_ids"]
    after_reset = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "New topic."},
    ]
    assert rows[3]["prompt_ids"] == gen.prompt_ids(after_reset)


def test_ctrl_c_keeps_the_partial_reply_and_a_consistent_cache(
    gen: Generator, tmp_path: Path
) -> None:
    s = ChatSession(gen, params=PARAMS)
    calls: list[str] = []

    def interrupt(segment: str) -> None:
        calls.append(segment)
        if len(calls) == 2:
            raise KeyboardInterrupt

    first = s.send("Hello there.", on_text=interrupt)
    assert first.finish_reason == "interrupted"
    assert s.messages[-1] == {"role": "assistant", "content": gen.decode(first.tokens)}
    # /save keeps the cut reply as context, not as a training target; /load keeps that
    saved = tmp_path / "cut.jsonl"
    assert s.save(str(saved)) == 1
    row = json.loads(saved.read_text())["messages"]
    assert row[-1] == {"role": "assistant", "content": gen.decode(first.tokens), "train": False}
    again = ChatSession(gen, params=PARAMS)
    again.load(str(saved))
    assert again.save(str(saved)) == 1 and json.loads(saved.read_text())["messages"] == row
    # Every token the cache holds is known: the prompt, then the reply tokens fed so far.
    assert len(s.context) == len(s.prompts[0]) + len(first.tokens)
    assert s.context == s.prompts[0] + first.tokens
    second = s.send("Go on.")
    assert second.tokens == gen.generate(s.prompts[1], PARAMS).tokens


def test_ctrl_c_before_any_reply_forgets_the_message(
    gen: Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlxsft import _mlxlm

    s = ChatSession(gen, params=PARAMS)
    s.send("Hello there.")
    real_step = _mlxlm.generate_step

    def interrupted_step(*args, **kw):
        raise KeyboardInterrupt
        yield  # a generator, like mlx-lm's

    monkeypatch.setattr(_mlxlm, "generate_step", interrupted_step)
    out = s.send("Never mind.")
    assert (out.finish_reason, out.tokens) == ("interrupted", [])
    assert [m["role"] for m in s.messages] == ["user", "assistant"]
    monkeypatch.setattr(_mlxlm, "generate_step", real_step)
    assert s.send("Go on.").tokens == gen.generate(s.prompts[-1], PARAMS).tokens


@pytest.mark.parametrize("arch", ["tiny_gemma", "tiny_phi3", "tiny_llama_q4"])
def test_cache_reuse_other_architectures(arch: str, request: pytest.FixtureRequest) -> None:
    g = Generator.load(str(request.getfixturevalue(arch)))
    s = ChatSession(g, params=PARAMS)
    replies = [s.send(text) for text in ("Hello there.", "What is 2 + 3?")]
    assert len(s.fed[1]) < len(s.prompts[1]) - len(s.prompts[0]) + 1
    for k, prefix in enumerate(_user_prefixes(s.messages)):
        assert s.prompts[k] == g.prompt_ids(prefix)
        assert replies[k].tokens == g.generate(s.prompts[k], PARAMS).tokens
