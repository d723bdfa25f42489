"""Normalising rows of every supported format into `Example`s (the files are read by
`mlxsft.data.reading`, which turns every unreadable row into a `DataError` at `file:line`).

Formats (auto-detected per file from the first row that has known keys, or forced):
  chat        {"messages": [{"role", "content", "tool_calls"?, "train"?}, ...], "tools"?}
              or ShareGPT {"conversations": [{"from", "value"}, ...], "system"?, "tools"?}
  alpaca      {"instruction", "input"?, "output"} or Dolly {"instruction", "context", "response"}
  completion  {"prompt", "completion"}
  text        {"text"}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mlxsft.config import DATA_FORMATS as FORMATS
from mlxsft.data.reading import first_row, iter_rows
from mlxsft.data.types import Example, Message
from mlxsft.errors import DataError, UserError

ROLE_ALIASES = {
    "system": "system", "developer": "system",
    "user": "user", "human": "user",
    "assistant": "assistant", "gpt": "assistant", "model": "assistant", "chatgpt": "assistant",
    "tool": "tool", "function": "tool", "ipython": "tool", "observation": "tool",
    "function_response": "tool", "tool_response": "tool",
}  # fmt: skip
TOOL_CALL_ROLES = ("function_call", "tool_call", "tool_calls")  # ShareGPT: assistant calling a tool


def detect_format(row: Any) -> str | None:
    """The format a row's keys indicate, or None."""
    if not isinstance(row, dict):
        return None
    if "messages" in row or "conversations" in row:
        return "chat"
    if "instruction" in row and ("output" in row or "response" in row):
        return "alpaca"
    if "prompt" in row and "completion" in row:
        return "completion"
    if "text" in row:
        return "text"
    return None


def read_examples(
    path: str | Path, fmt: str = "auto", split: str = "train"
) -> tuple[list[Example], list[DataError]]:
    """Every good row as an Example and every bad one as a DataError, in file order."""
    if fmt not in FORMATS:
        raise UserError(f"unknown format {fmt!r}", hint=f"use one of {', '.join(FORMATS)}")
    examples: list[Example] = []
    errors: list[DataError] = []
    pending: list[tuple[str, Any]] = []  # rows seen before the format is known
    for where, row in iter_rows(path, split):
        if isinstance(row, DataError):
            errors.append(row)
            continue
        if fmt == "auto":
            fmt = detect_format(row) or "auto"
            if fmt == "auto":
                pending.append((where, row))
                continue
            for w, r in pending:
                _normalise_into(r, fmt, w, examples, errors)
            pending = []
        _normalise_into(row, fmt, where, examples, errors)
    for where, row in pending:  # no row had known keys
        errors.append(_unknown_row(row, where))
    if not examples and not errors:
        errors.append(DataError("no rows: the data is empty", where=str(path)))
    errors.sort(key=_where_key)
    return examples, errors


def _where_key(err: DataError) -> tuple[str, int]:
    file, _, line = (err.where or "").rpartition(":")
    return (file, int(line)) if line.isdigit() else (err.where or "", 0)


def _normalise_into(row, fmt, where, examples: list[Example], errors: list[DataError]) -> None:
    try:
        examples.append(normalise(row, fmt, where))
    except DataError as exc:
        errors.append(exc)


def _keys(row: dict, limit: int = 12) -> str:
    """A row's keys for a one-line message: unprintable ones (newlines...) as repr, at most
    `limit` of them."""
    keys = [k if k.isprintable() else repr(k) for k in sorted(row)]
    more = f", ... ({len(keys)} keys)" if len(keys) > limit else ""
    return (", ".join(keys[:limit]) or "none") + more


def _unknown_row(row: Any, where: str) -> DataError:
    if not isinstance(row, dict):
        return DataError(f"row must be a JSON object, got {_type(row)}", where=where)
    return DataError(
        f"no known format keys (has: {_keys(row)})",
        where=where,
        hint="expected messages, conversations, instruction+output, prompt+completion or text",
    )


def normalise(row: Any, fmt: str, where: str) -> Example:
    """One row of format `fmt` -> Example; raises DataError saying what is wrong."""
    if not isinstance(row, dict):
        raise _unknown_row(row, where)
    if fmt == "chat":
        return _normalise_chat(row, where)
    if fmt == "alpaca":
        instruction = _str_field(row, "instruction", where)
        out_key = "response" if "response" in row and "output" not in row else "output"
        output = _str_field(row, out_key, where, nonempty=True)
        in_key = "input" if "input" in row else "context"
        context = _str_field(row, in_key, where, required=False)
        messages = []
        if row.get("system"):
            messages.append(Message("system", _str_field(row, "system", where)))
        messages += [Message("user", instruction), Message("assistant", output)]
        return Example(messages, "alpaca", where, context=context)
    if fmt == "completion":
        prompt = _str_field(row, "prompt", where)
        completion = _str_field(row, "completion", where, nonempty=True)
        return Example(
            [Message("user", prompt), Message("assistant", completion)], "completion", where
        )
    if fmt == "text":
        text = _str_field(row, "text", where, nonempty=True)
        return Example([Message("assistant", text)], "text", where)
    raise UserError(f"unknown format {fmt!r}", hint=f"use one of {', '.join(FORMATS)}")


def read_conversation(path: str | Path) -> Example:
    """The conversation to prompt with, from a .json/.jsonl file: its first row
    (`{"messages": [...]}`, ShareGPT, or a bare list of messages), normalised like a chat row
    but without needing an assistant turn."""
    where, row = first_row(path)
    if isinstance(row, DataError):
        raise row
    row = {"messages": row} if isinstance(row, list) else row
    if not isinstance(row, dict):
        raise _unknown_row(row, where)
    return _normalise_chat(row, where, prompt=True)


def _normalise_chat(row: dict, where: str, *, prompt: bool = False) -> Example:
    key = "conversations" if "conversations" in row and "messages" not in row else "messages"
    if key not in row:
        raise DataError(f"missing key 'messages' (has: {_keys(row)})", where=where)
    turns = row[key]
    if not isinstance(turns, list):
        raise DataError(f"{key!r} must be an array, got {_type(turns)}", where=where)
    if not turns:
        raise DataError(f"{key!r} is empty", where=where)
    messages = []
    if key == "conversations" and isinstance(row.get("system"), str) and row["system"]:
        messages.append(Message("system", row["system"]))
    for i, turn in enumerate(turns):
        at = f"{key}[{i}]"
        if not isinstance(turn, dict):
            raise DataError(f"{at} must be an object, got {_type(turn)}", where=where)
        # each turn's own keys say its style (role/content or from/value), else the list's name
        sharegpt = "from" in turn if ("from" in turn) != ("role" in turn) else key != "messages"
        messages.append(_message(turn, at, where, sharegpt=sharegpt))
    if not prompt and not any(m.role == "assistant" for m in messages):
        raise DataError("no assistant turn", where=where, hint="nothing to train on in this row")
    return Example(messages, "chat", where, tools=_tools(row, where))


def _message(turn: dict, at: str, where: str, *, sharegpt: bool) -> Message:
    role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
    if role_key not in turn:
        raise DataError(f"{at}: missing key {role_key!r}", where=where)
    raw_role = turn[role_key]
    if not isinstance(raw_role, str):
        raise DataError(f"{at}: {role_key!r} must be a string, got {_type(raw_role)}", where=where)
    content = turn.get(content_key)
    if isinstance(content, list):  # OpenAI content parts: keep the text ones
        if not all(isinstance(p, dict) and isinstance(p.get("text", ""), str) for p in content):
            raise DataError(f"{at}: content parts must be objects with a 'text'", where=where)
        content = "".join(p.get("text", "") for p in content if p.get("type", "text") == "text")
    tool_calls = turn.get("tool_calls")
    if raw_role in TOOL_CALL_ROLES:  # ShareGPT function_call: the value is the call as JSON
        role, tool_calls, content = "assistant", _parse_call(content), ""
    elif raw_role.lower() in ROLE_ALIASES:
        role = ROLE_ALIASES[raw_role.lower()]
    else:
        raise DataError(
            f"{at}: unknown role {raw_role!r}",
            where=where,
            hint="use system, user, assistant or tool (ShareGPT: human, gpt, system, "
            "function_call, observation)",
        )
    if content is None and tool_calls is not None:
        content = ""
    if content is None and content_key not in turn:
        raise DataError(f"{at}: missing key {content_key!r}", where=where)
    if not isinstance(content, str):
        raise DataError(
            f"{at}: {content_key!r} must be a string, got {_type(content)}", where=where
        )
    if tool_calls is not None and not (
        isinstance(tool_calls, list) and all(isinstance(c, dict) for c in tool_calls)
    ):
        raise DataError(f"{at}: 'tool_calls' must be an array of objects", where=where)
    if role == "assistant" and not content.strip() and not tool_calls:
        raise DataError(
            f"{at}: empty assistant content", where=where, hint="drop the turn or the row"
        )
    train = turn.get("train", turn.get("weight"))  # axolotl/LLaMA-Factory spell it `weight`
    if train is not None:
        if not isinstance(train, bool | int) or train not in (0, 1):
            raise DataError(f"{at}: 'train' must be true or false, got {train!r}", where=where)
        train = bool(train)
    name, call_id = turn.get("name"), turn.get("tool_call_id")
    return Message(role, content, train, tool_calls, name if isinstance(name, str) else None,
                   call_id if isinstance(call_id, str) else None)  # fmt: skip


def _parse_call(value: Any) -> list[dict]:
    call = value
    if isinstance(value, str):
        try:
            call = json.loads(value)
        except json.JSONDecodeError:
            call = {"name": "unknown", "arguments": value}
    calls = call if isinstance(call, list) else [call]
    return [{"type": "function", "function": c} for c in calls if isinstance(c, dict)]


def _tools(row: dict, where: str) -> list[dict] | None:
    tools = row.get("tools")
    if tools is None or tools == "":
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as exc:
            raise DataError(f"'tools' is not valid JSON: {exc.msg}", where=where) from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise DataError(f"'tools' must be an array of objects, got {_type(tools)}", where=where)
    # bare schemas ({"name", "parameters"}) -> the OpenAI/HF form templates expect
    return [t if "function" in t or "name" not in t else {"type": "function", "function": t}
            for t in tools]  # fmt: skip


def _str_field(row: dict, key: str, where: str, *, required: bool = True, nonempty=False) -> str:
    if key not in row or row[key] is None:
        if required:
            raise DataError(f"missing key {key!r} (has: {_keys(row)})", where=where)
        return ""
    value = row[key]
    if not isinstance(value, str):
        raise DataError(f"{key!r} must be a string, got {_type(value)}", where=where)
    if nonempty and not value.strip():
        raise DataError(f"{key!r} is empty", where=where, hint="drop the row or fill it in")
    return value


def _type(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), type(value).__name__
    )
