"""Reading data files, which may be hostile, into raw rows: `(where, row)` pairs, where `where`
is `file:line` and a row that cannot be read is a `DataError` instead.

Inputs: .jsonl, .json (a list of rows, or one row), a directory with train/valid/test.jsonl, or a
Hugging Face `datasets` id when that package is installed. Limits and checks: invalid UTF-8, lone
surrogates (`"\\ud800"`), JSON nested deeper than MAX_DEPTH are bad rows; a UTF-8 BOM is accepted;
a `.json` file must hold exactly one JSON value; only regular files are read (a FIFO or device
never blocks a read); a file that is not JSON at all (CSV, Parquet, a model) is one clear error.
What the rows mean is `mlxsft.data.formats`'s concern.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mlxsft.errors import DataError, UserError

SPLITS = ("train", "valid", "test")
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


def first_row(path: str | Path) -> tuple[str, Any]:
    """(where, row) of a .json file's value or a .jsonl file's first line; a DataError instead
    of the row when it cannot be read."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    data = file.read_bytes().removeprefix(b"\xef\xbb\xbf").strip()
    where = f"{file}:1"
    text = _decode(data if file.suffix == ".json" else data.split(b"\n")[0], file)
    return where, text if isinstance(text, DataError) else _parse(text, where)
