"""Hostile or unlucky data files: every problem is a one-line `file:line` DataError, nothing
hangs, nothing raises a traceback; a UTF-8 BOM is fine; empty data is an error."""

from __future__ import annotations

import json
import os
import threading

import pytest

from mlxsft.data.formats import read_examples
from mlxsft.data.reading import MAX_DEPTH
from mlxsft.errors import UserError

ROW = json.dumps({"text": "hello"})


def _errors(path):
    examples, errors = read_examples(path)
    return [e.text for e in examples], [(e.where, e.problem) for e in errors]


def test_bom_is_accepted(tmp_path):
    for name in ("d.jsonl", "d.json"):
        path = tmp_path / name
        path.write_bytes(b"\xef\xbb\xbf" + (ROW if name.endswith("l") else f"[{ROW}]").encode())
        examples, errors = read_examples(path)
        assert [e.messages[0].content for e in examples] == ["hello"] and errors == []


def test_invalid_utf8_is_reported_at_its_line_and_other_rows_survive(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(f"{ROW}\n".encode() + b'{"text": "caf\xe9"}\n' + f"{ROW}\n".encode())
    examples, errors = read_examples(path)
    assert len(examples) == 2
    assert [(e.where, e.problem) for e in errors] == [
        (f"{path}:2", "not valid UTF-8: byte 0xe9 at column 14")
    ]
    path = tmp_path / "d.json"
    path.write_bytes(b'[\n{"text": "a"},\n{"text": "\xff"}]')
    assert [e.where for e in read_examples(path)[1]] == [f"{path}:3"]


def test_lone_surrogates_are_reported_but_pairs_are_fine(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok \\ud83d\\ude00"}\n{"text": "bad \\ud800 x"}\n')
    examples, errors = read_examples(path)
    assert examples[0].messages[0].content == "ok \U0001f600"
    assert [(e.where, e.problem) for e in errors] == [
        (f"{path}:2", "lone surrogate \\ud800 in a string: not valid Unicode")
    ]


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 100_000])
def test_deep_nesting_is_refused(tmp_path, depth):
    path = tmp_path / "d.jsonl"
    path.write_text(ROW + "\n" + '{"text": ' + "[" * depth + "]" * depth + "}\n")
    examples, errors = read_examples(path)
    assert len(examples) == 1
    assert [(e.where, e.problem) for e in errors] == [
        (f"{path}:2", f"JSON nested deeper than {MAX_DEPTH} levels")
    ]


@pytest.mark.parametrize(
    "text, line",
    [
        (f"[{ROW}]\ngarbage", 2),  # trailing garbage after the list
        (f"{ROW}\n{ROW}\n", 2),  # JSON lines in a .json file
        (f"[{ROW},\n{ROW}", 2),  # an unclosed list
    ],
)
def test_json_files_are_parsed_strictly(tmp_path, text, line):
    path = tmp_path / "d.json"
    path.write_text(text)
    errors = read_examples(path)[1]
    assert len(errors) == 1 and errors[0].where == f"{path}:{line}", errors


@pytest.mark.parametrize("content", [b"", b"\n\n  \n", b"[]", b"\xef\xbb\xbf"])
def test_empty_data_is_an_error(tmp_path, content):
    path = tmp_path / ("d.json" if content == b"[]" else "d.jsonl")
    path.write_bytes(content)
    examples, errors = read_examples(path)
    assert examples == [] and [e.problem for e in errors] == ["no rows: the data is empty"]


def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "train.jsonl"
    os.mkfifo(fifo)
    result: list = []

    def read() -> None:
        try:
            read_examples(fifo)
        except UserError as exc:
            result.append(str(exc))

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    thread.join(5)
    assert result and "not a regular file" in result[0]
    (tmp_path / "dir").mkdir()
    os.mkfifo(tmp_path / "dir" / "train.jsonl")
    with pytest.raises(UserError):
        read_examples(tmp_path / "dir")
