"""The chat REPL: a conversation rendered with the training template, one KV cache reused across
turns, and the slash commands (/reset, /system, /save, /load, /undo, /params, /help, /exit).

`ChatSession` owns the conversation and the cache. Each turn renders the whole conversation with the
generation prompt, keeps the cached tokens that are a prefix of that rendering (trimming the cache
where they differ, e.g. when a reply re-tokenizes differently or a template re-renders old turns)
and feeds only the rest, so the model always sees exactly what training would encode and time to
first token does not grow with the history. `run_repl` reads lines from a TTY or a pipe.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from mlxsft.config import SamplingParams
from mlxsft.errors import UserError
from mlxsft.generate import Generation, Generator

HELP = """commands:
  /reset          start a new conversation (keeps the system prompt)
  /system TEXT    set the system prompt (empty TEXT removes it)
  /save FILE      write the conversation as one {"messages": [...]} JSON row (ready to train on;
                  replies cut by max_tokens or Ctrl-C are marked "train": false)
  /load FILE      continue the conversation saved in FILE
  /undo           remove the last user message and reply
  /params [k=v]   show or set sampling parameters, e.g. /params temp=0.7 top_p=0.9
  /help           this text
  /exit           quit (also Ctrl-D); Ctrl-C stops the current reply"""


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class ChatSession:
    """A conversation plus the KV cache holding the tokens of its latest rendering."""

    def __init__(
        self,
        generator: Generator,
        *,
        system: str | None = None,
        params: SamplingParams | None = None,
        max_context: int | None = None,
    ):
        if generator.template is None:
            raise UserError("chat needs a chat template", hint="drop --raw")
        self.gen = generator
        self.system = system or None
        self.params = params or SamplingParams()
        self.max_context = max_context or generator.max_context
        self.turns: list[dict[str, Any]] = []  # user/assistant messages, system kept apart
        self.cache: list[Any] | None = None
        self.context: list[int] = []  # token ids whose keys/values are in `cache`, in order
        self.fed: list[list[int]] = []  # the ids fed to the model at each turn (a record)
        self.prompts: list[list[int]] = []  # the full prompt ids the model saw at each turn

    @property
    def messages(self) -> list[dict[str, Any]]:
        """The conversation as a chat template (and a training row) sees it."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + [{k: v for k, v in m.items() if k != "cut"} for m in self.turns]

    def reset(self) -> None:
        self.turns = []

    def undo(self) -> bool:
        """Drop the last user message and its reply; False when there is nothing to undo."""
        for i in range(len(self.turns) - 1, -1, -1):
            if self.turns[i]["role"] == "user":
                del self.turns[i:]
                return True
        return False

    def save(self, path: str) -> int:
        """Write the conversation as a training row; replies cut by max_tokens or Ctrl-C are
        marked `"train": false` (kept as context, never learned). Returns how many were."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        turns = [
            {
                **{k: v for k, v in m.items() if k != "cut"},
                **({"train": False} if m.get("cut") else {}),
            }
            for m in self.turns
        ]
        row = json.dumps({"messages": head + turns}, ensure_ascii=False)
        Path(path).write_text(row + "\n", encoding="utf-8")
        return sum(1 for m in self.turns if m.get("cut"))

    def load(self, path: str) -> None:
        from mlxsft.data.formats import read_conversation

        messages = read_conversation(path).messages
        system = [m.content for m in messages if m.role == "system"]
        self.system = system[0] if system else self.system
        self.turns = [
            {**m.to_template_dict(), **({"cut": True} if m.train is False else {})}
            for m in messages
            if m.role != "system"
        ]

    def _fit(self, on_notice: Callable[[str], None]) -> list[int]:
        """Prompt ids for the conversation, dropping the oldest turns while it overflows (the
        history is left untouched when even the newest message alone does not fit)."""
        ids = self.gen.prompt_ids(self.messages)
        turns, dropped = self.turns, 0
        while len(ids) + self.params.max_tokens > self.max_context:
            users = [i for i, m in enumerate(turns) if m["role"] == "user"]
            if len(users) < 2:
                raise UserError(
                    f"the message needs {len(ids)} + max_tokens {self.params.max_tokens} tokens, "
                    f"more than the context window ({self.max_context})",
                    hint="send a shorter message or lower max_tokens with /params",
                )
            turns, dropped = turns[users[1] :], dropped + 1
            head = [{"role": "system", "content": self.system}] if self.system else []
            ids = self.gen.prompt_ids(head + turns)
        if dropped:
            self.turns = turns
            kept = " and the system prompt" if self.system else ""
            on_notice(
                f"context window full: dropped the {dropped} oldest turn(s); "
                f"kept {(len(turns) - 1) // 2} earlier turn(s){kept}"
            )
        return ids

    def send(
        self,
        text: str,
        *,
        on_text: Callable[[str], None] | None = None,
        on_notice: Callable[[str], None] | None = None,
    ) -> Generation:
        """Add a user message, generate the reply (streamed to `on_text`) and keep it."""
        from mlxsft import _mlxlm

        self.turns.append({"role": "user", "content": text})
        try:
            ids = self._fit(on_notice or (lambda _: None))
        except BaseException:
            if self.turns and self.turns[-1]["role"] == "user":
                self.turns.pop()
            raise
        if self.cache is None:
            self.cache, self.context = _mlxlm.make_cache(self.gen.model), []
        keep = min(_common_prefix(self.context, ids), len(ids) - 1)  # feed at least one token
        # A fresh cache when nothing is reused or this cache cannot be trimmed (rotating/SSM).
        if keep == 0 or not _mlxlm.trim_cache_to(self.cache, keep):
            self.cache, keep = _mlxlm.make_cache(self.gen.model), 0
        suffix = ids[keep:]
        self.fed.append(suffix)
        self.prompts.append(ids)
        result = self.gen.generate(suffix, self.params, cache=self.cache, on_text=on_text)
        # Every yielded token was fed (mlx-lm steps one ahead); Ctrl-C may leave layers uneven.
        fed = ids + result.tokens + ([result.stop_token] if result.stop_token is not None else [])
        n_cached = min(min(_mlxlm.cache_lengths(self.cache)), len(fed))
        if _mlxlm.trim_cache_to(self.cache, n_cached):
            self.context = fed[:n_cached]
        else:  # an uneven cache that cannot be trimmed: start afresh next turn
            self.cache, self.context = None, []
        if result.finish_reason == "interrupted" and not result.tokens:
            self.turns.pop()  # stopped before any reply: forget the message too
            return result
        # The exact decoded ids (the streamed text may drop a leading space, as mlx-lm's does).
        reply = {"role": "assistant", "content": self.gen.decode(result.tokens)}
        if result.finish_reason != "stop":  # cut at max_tokens or by Ctrl-C: not a whole reply
            reply["cut"] = True
        self.turns.append(reply)
        return result


def _set_params(session: ChatSession, arg: str, out: TextIO) -> None:
    if arg:
        session.params = session.params.with_updates(arg.split())
    print(session.params.describe(), file=out)


def handle_command(session: ChatSession, line: str, out: TextIO, err: TextIO) -> bool:
    """Run one slash command; False means exit."""
    name, _, arg = line.strip().partition(" ")
    arg = arg.strip()
    if name in ("/exit", "/quit"):
        return False
    if name == "/reset":
        session.reset()
        print("[conversation reset]", file=err)
    elif name == "/system":
        session.system = arg or None
        print(f"[system prompt {'set' if arg else 'removed'}]", file=err)
    elif name in ("/save", "/load") and not arg:
        raise UserError(f"{name} needs a file name", hint=f"{name} chat.jsonl")
    elif name == "/save":
        n_cut = session.save(arg)
        cut = f'; {n_cut} cut replies marked "train": false' if n_cut else ""
        print(f"[saved {len(session.messages)} messages to {arg}{cut}]", file=err)
    elif name == "/load":
        session.load(arg)
        print(f"[loaded {len(session.messages)} messages from {arg}]", file=err)
    elif name == "/undo":
        print("[undone]" if session.undo() else "[nothing to undo]", file=err)
    elif name == "/params":
        _set_params(session, arg, out)
    elif name == "/help":
        print(HELP, file=out)
    else:
        raise UserError(f"unknown command {name}", hint="/help lists the commands")
    return True


def _read_line(stdin: TextIO, interactive: bool) -> str | None:
    """One input line (None at EOF); on a TTY shows a prompt, on a pipe echoes nothing."""
    if interactive:
        try:
            return input(">>> ")
        except EOFError:
            return None
    line = stdin.readline()
    return None if line == "" else line.rstrip("\n")


def run_repl(
    session: ChatSession,
    *,
    stdin: TextIO | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
    show_stats: bool = True,
    record: TextIO | None = None,
) -> None:
    """Read messages and commands until /exit or EOF; replies stream to `out`, notes to `err`.

    `record` gets one JSON line per reply: the prompt ids the model saw, how many of them were
    fed (the rest came from the KV cache) and the reply ids.
    """
    stdin, out, err = stdin or sys.stdin, out or sys.stdout, err or sys.stderr
    interactive = stdin is sys.stdin and stdin.isatty()
    if interactive:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (line editing and history for input())
        print("[chat: /help for commands, Ctrl-D or /exit to quit]", file=err)
    while True:
        try:
            line = _read_line(stdin, interactive)
        except KeyboardInterrupt:
            print("\n[Ctrl-C: /exit or Ctrl-D quits]", file=err)
            continue
        if line is None:
            break
        if not line.strip():
            continue
        try:
            if line.startswith("/"):
                if not handle_command(session, line, out, err):
                    break
                continue
            result = _reply(session, line, out, err, show_stats)
            if record is not None:
                row = {
                    "prompt_ids": session.prompts[-1],
                    "n_fed": len(session.fed[-1]),
                    "reply_ids": result.tokens,
                }
                record.write(json.dumps(row) + "\n")
                record.flush()
        except (ValueError, FileNotFoundError) as exc:
            print(f"error: {exc}", file=err)
        except KeyboardInterrupt:
            print("\n[interrupted]", file=err)


def _reply(
    session: ChatSession, line: str, out: TextIO, err: TextIO, show_stats: bool
) -> Generation:
    def write(segment: str) -> None:
        out.write(segment)
        out.flush()

    result = session.send(line, on_text=write, on_notice=lambda note: print(f"[{note}]", file=err))
    out.write("\n")
    out.flush()
    if result.finish_reason == "interrupted":
        print("[reply interrupted]", file=err)
    elif result.finish_reason == "length":
        print(f"[reply cut at max_tokens={session.params.max_tokens}]", file=err)
    if show_stats:
        cached = len(session.prompts[-1]) - len(session.fed[-1])
        print(f"[{cached} prompt tokens reused from the cache | {result.stats_line()}]", file=err)
    return result
