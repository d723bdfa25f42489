"""Reading data files and normalising rows of every supported format into `Example`s.

Formats (auto-detected per file from the first row that has known keys, or forced):
  chat        {"messages": [{"role", "content", "tool_calls"?, "train"?}, ...], "tools"?}
              or ShareGPT {"conversations": [{"from", "value"}, ...], "system"?, "tools"?}
  alpaca      {"instruction", "input"?, "output"} or Dolly {"instruction", "context", "response"}
  completion  {"prompt", "completion"}
  text        {"text"}
Inputs: .jsonl, .json (a list of rows, or one row), a directory with train/valid/test.jsonl, or a
Hugging Face `datasets` id when that package is installed. Every bad row becomes a `DataError`
whose `where` is `file:line`: invalid UTF-8, lone surrogates (`"\\ud800"`), JSON nested deeper
than MAX_DEPTH included. A UTF-8 BOM is accepted; a `.json` file must hold exactly one JSON value;
only regular files are read (a FIFO or device never blocks a read).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mlxsft.config import DATA_FORMATS as FORMATS
from mlxsft.data.types import Example, Message
from mlxsft.errors import DataError, UserError

SPLITS = ("train", "valid", "test")
ROLE_ALIASES = {
    "system": "system", "developer": "system",
    "user": "user", "human": "user",
    "assistant": "assistant", "gpt": "assistant", "model": "assistant", "chatgpt": "assistant",
    "tool": "tool", "function": "tool", "ipython": "tool", "observation": "tool",
    "function_response": "tool", "tool_response": "tool",
}  # fmt: skip
TOOL_CALL_ROLES = ("function_call", "tool_call", "tool_calls")  # ShareGPT: assistant calling a tool
MAX_DEPTH = 64  # JSON nesting per row; real rows need < 10, deeper ones only exhaust the stack


def find_splits(path: str | Path) -> dict[str, Path]:
    """A directory's train/valid/test .jsonl (or .json) files, by split name."""
    path = Path(path)
    if not path.is_dir():
        raise NotADirectoryError(f"{path}: not a directory")
    found: dict[str, Path] = {}
    for split in SPLITS:
        for ext in (".jsonl", ".json"):
            if (path / f"{split}{ext}").is_file():
                found[split] = path / f"{split}{ext}"
                break
    if not found:
        model = (path / "config.json").is_file()  # a model directory given as DATA
        raise UserError(
            f"{path}: no train.jsonl, valid.jsonl or test.jsonl in this directory"
            + (" (it holds a model: config.json)" if model else ""),
            hint=("pass models with --model; " if model else "")
            + "point at a .jsonl/.json file or a directory holding train.jsonl",
        )
    return found


def data_files(path: str | Path, split: str = "train") -> list[Path]:
    """The file(s) to read for DATA: the file itself, or the directory's `split` file."""
    p = Path(path)
    if p.is_dir():
        splits = find_splits(p)
        if split not in splits:
            raise UserError(f"{p}: no {split}.jsonl", hint=f"found: {', '.join(splits)}")
        return [splits[split]]
    if p.is_file():
        check_data_file(p)
        return [p]
    if p.exists():
        raise UserError(
            "not a regular file (a FIFO, socket or device?)",
            where=str(p),
            hint="pass a .jsonl/.json file or a directory holding train.jsonl",
        )
    raise FileNotFoundError(f"{path}: no such file or directory")


_CSV_HINT = (
    "convert it to JSON lines with the columns as keys (instruction,input,output or "
    'prompt,completion or text): python -c "import csv,json,sys; [print(json.dumps(r)) for r '
    'in csv.DictReader(open(sys.argv[1]))]" FILE.csv > FILE.jsonl'
)
_TABLE_HINT = (
    "convert it to JSON lines, e.g. with pandas: "
    "pd.read_parquet(F).to_json('data.jsonl', orient='records', lines=True)"
)
_MODEL_HINT = "this is a model file: pass models with --model; DATA is a .jsonl/.json file or a dir"
NOT_DATA = {
    ".csv": ("a CSV file", _CSV_HINT),
    ".tsv": ("a TSV file", _CSV_HINT + " (with delimiter='\\t')"),
    ".parquet": ("a Parquet file", _TABLE_HINT),
    ".arrow": ("an Arrow file", _TABLE_HINT),
    ".xlsx": ("an Excel file", _TABLE_HINT.replace("read_parquet", "read_excel")),
    ".gguf": ("a GGUF model file", _MODEL_HINT),
    ".safetensors": ("model weights", _MODEL_HINT),
    ".bin": ("a binary file", _MODEL_HINT),
    ".pt": ("PyTorch weights", _MODEL_HINT),
}


def check_data_file(file: Path) -> None:
    """One clear error for a file that is not JSON at all (CSV, Parquet, a model, binary), instead
    of one "malformed JSON" line per row."""
    with file.open("rb") as f:
        head = f.read(4096)
    kind, hint = NOT_DATA.get(file.suffix.lower(), (None, None))
    if head.startswith(b"GGUF"):
        kind, hint = NOT_DATA[".gguf"]
    if kind is None and b"\0" in head:
        kind, hint = "a binary file", "DATA is a UTF-8 .jsonl/.json file or a directory"
    if kind is not None:
        raise DataError(f"{kind}, not JSON lines", where=str(file), hint=hint)


def iter_rows(path: str | Path, split: str = "train") -> Iterator[tuple[str, Any]]:
    """(where, row) for every row; a malformed row comes back as a DataError instead of a row."""
    p = Path(path)
    if not p.exists() and _looks_like_hub_id(str(path)):
        yield from _iter_hub_rows(str(path), split)
        return
    for file in data_files(p, split):
        data = file.read_bytes()
        if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 BOM (Windows editors write one)
            data = data[3:]
        if file.suffix == ".json":
            yield from _iter_json_rows(file, data)
        else:
            yield from _iter_jsonl_rows(file, data)


def _decode(data: bytes, file: Path, first_line: int = 1) -> str | DataError:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        newline = b"\n"
        line = first_line + data.count(newline, 0, exc.start)
        column = exc.start - data.rfind(newline, 0, exc.start)
        return DataError(
            f"not valid UTF-8: byte 0x{data[exc.start]:02x} at column {column}",
            where=f"{file}:{line}",
            hint="save the file as UTF-8",
        )


def _check_row(row: Any, where: str, escapes: bool) -> Any:
    """`row` itself, or a DataError when it nests deeper than MAX_DEPTH or (when the text had
    \\u escapes) holds a lone surrogate, which no tokenizer can encode."""
    stack = [(row, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > MAX_DEPTH:
                return DataError(f"JSON nested deeper than {MAX_DEPTH} levels", where=where)
            items = value.values() if isinstance(value, dict) else value
            stack.extend((v, depth + 1) for v in items)
            if isinstance(value, dict) and escapes:
                stack.extend((k, depth) for k in value)
        elif escapes and isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                bad = value[exc.start]
                return DataError(
                    f"lone surrogate \\u{ord(bad):04x} in a string: not valid Unicode",
                    where=where,
                    hint="fix the \\u escapes (a surrogate pair needs both halves)",
                )
    return row


def _parse(text: str, where: str) -> Any:
    """One JSON value, checked; a DataError instead when it is not acceptable."""
    try:
        row = json.loads(text)
    except json.JSONDecodeError as exc:
        return DataError(f"malformed JSON: {exc.msg} at column {exc.colno}", where=where,
                         hint="each line must be one JSON object")  # fmt: skip
    except RecursionError:
        return DataError(f"JSON nested deeper than {MAX_DEPTH} levels", where=where)
    return _check_row(row, where, "\\u" in text)


def _iter_jsonl_rows(file: Path, data: bytes) -> Iterator[tuple[str, Any]]:
    # split on "\n" only: str.splitlines would also split at U+2028 etc. inside JSON strings
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        where = f"{file}:{lineno}"
        line = _decode(raw, file, lineno)
        yield where, line if isinstance(line, DataError) else _parse(line, where)


def _iter_json_rows(file: Path, data: bytes) -> Iterator[tuple[str, Any]]:
    """A JSON list (each element reported at the line it starts on) or one object, and nothing
    after it."""
    text = _decode(data, file)
    if isinstance(text, DataError):
        yield text.where or str(file), text
        return
    decoder = json.JSONDecoder()
    start = _skip(text, 0)
    if text[start : start + 1] != "[":
        try:
            row, end = decoder.raw_decode(text, start)
        except json.JSONDecodeError as exc:
            where = f"{file}:{exc.lineno}"
            yield where, DataError(f"malformed JSON: {exc.msg}", where=where)
            return
        except RecursionError:
            where = f"{file}:{_line_of(text, start)}"
            yield where, DataError(f"JSON nested deeper than {MAX_DEPTH} levels", where=where)
            return
        where = f"{file}:{_line_of(text, start)}"
        yield where, _check_row(row, where, "\\u" in text)
        yield from _extra_data(file, text, end)
        return
    idx = start + 1
    while True:
        idx = _skip(text, idx)
        if idx >= len(text):
            where = f"{file}:{_line_of(text, idx)}"
            yield where, DataError("malformed JSON: the list is not closed with ]", where=where)
            return
        if text[idx] == "]":
            yield from _extra_data(file, text, idx + 1)
            return
        where = f"{file}:{_line_of(text, idx)}"
        try:
            row, end = decoder.raw_decode(text, idx)
        except json.JSONDecodeError as exc:
            where = f"{file}:{exc.lineno}"
            yield where, DataError(f"malformed JSON: {exc.msg} at column {exc.colno}", where=where,
                                   hint="the rest of the file is not read")  # fmt: skip
            return
        except RecursionError:
            yield where, DataError(f"JSON nested deeper than {MAX_DEPTH} levels", where=where,
                                   hint="the rest of the file is not read")  # fmt: skip
            return
        yield where, _check_row(row, where, "\\u" in text[idx:end])
        idx = _skip(text, end)
        if idx < len(text) and text[idx] == ",":
            idx += 1


def _extra_data(file: Path, text: str, end: int) -> Iterator[tuple[str, Any]]:
    """A DataError for anything but whitespace after the file's JSON value."""
    idx = _skip(text, end)
    if idx < len(text):
        where = f"{file}:{_line_of(text, idx)}"
        yield (
            where,
            DataError(
                "extra data after the JSON value",
                where=where,
                hint="a .json file holds one list or object; name a file of one object per line .jsonl",
            ),
        )


def _skip(text: str, idx: int) -> int:
    while idx < len(text) and text[idx] in " \t\r\n":
        idx += 1
    return idx


def _line_of(text: str, idx: int) -> int:
    return text.count("\n", 0, idx) + 1


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.endswith((".json", ".jsonl"))


def _iter_hub_rows(dataset_id: str, split: str) -> Iterator[tuple[str, Any]]:
    try:
        import datasets  # optional
    except ImportError:
        raise UserError(
            f"{dataset_id}: no such file, and Hugging Face `datasets` is not installed",
            hint="pip install datasets, or pass a local .jsonl/.json file or directory",
        ) from None
    ds = datasets.load_dataset(dataset_id, split=split)
    for i, row in enumerate(ds):
        yield f"{dataset_id}[{split}]:{i}", row


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


def _unknown_row(row: Any, where: str) -> DataError:
    if not isinstance(row, dict):
        return DataError(f"row must be a JSON object, got {_type(row)}", where=where)
    keys = ", ".join(sorted(row)) or "none"
    return DataError(
        f"no known format keys (has: {keys})",
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
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    data = file.read_bytes().removeprefix(b"\xef\xbb\xbf").strip()
    where = f"{file}:1"
    text = _decode(data if file.suffix == ".json" else data.split(b"\n")[0], file)
    row = text if isinstance(text, DataError) else _parse(text, where)
    if isinstance(row, DataError):
        raise row
    row = {"messages": row} if isinstance(row, list) else row
    if not isinstance(row, dict):
        raise _unknown_row(row, where)
    return _normalise_chat(row, where, prompt=True)


def _normalise_chat(row: dict, where: str, *, prompt: bool = False) -> Example:
    key = "conversations" if "conversations" in row and "messages" not in row else "messages"
    if key not in row:
        have = ", ".join(sorted(row)) or "none"
        raise DataError(f"missing key 'messages' (has: {have})", where=where)
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
            have = ", ".join(sorted(row)) or "none"
            raise DataError(f"missing key {key!r} (has: {have})", where=where)
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
