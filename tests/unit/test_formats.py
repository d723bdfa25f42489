"""Reading and normalising every data format; every bad row reported at its file:line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlxsft.data.formats import detect_format, normalise, read_examples
from mlxsft.data.reading import find_splits, iter_rows
from mlxsft.data.types import Message
from mlxsft.errors import DataError, UserError

FIXTURES = Path(__file__).resolve().parents[2] / ".." / "shared" / "fixtures" / "data"


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_alpaca_with_and_without_input_and_dolly():
    ex = normalise({"instruction": "Add", "input": "1 2", "output": "3"}, "alpaca", "f:1")
    assert ex.kind == "alpaca" and ex.context == "1 2" and ex.source == "f:1"
    assert ex.messages == [Message("user", "Add"), Message("assistant", "3")]
    ex = normalise({"instruction": "Hi", "input": "", "output": "Hello"}, "alpaca", "f:2")
    assert ex.context == ""
    dolly = {"instruction": "Sum", "context": "1 2", "response": "3", "category": "qa"}
    assert detect_format(dolly) == "alpaca"
    ex = normalise(dolly, "alpaca", "f:3")
    assert (ex.messages[0].content, ex.context, ex.messages[1].content) == ("Sum", "1 2", "3")
    ex = normalise({"instruction": "a", "output": "b", "system": "S"}, "alpaca", "f:4")
    assert [m.role for m in ex.messages] == ["system", "user", "assistant"]


def test_completion_and_text():
    ex = normalise({"prompt": "2+2=", "completion": "4"}, "completion", "f:1")
    assert ex.kind == "completion"
    assert ex.messages == [Message("user", "2+2="), Message("assistant", "4")]
    ex = normalise({"text": "hello"}, "text", "f:1")
    assert ex.kind == "text" and ex.messages == [Message("assistant", "hello")]


def test_openai_messages_with_tools_and_train_flags():
    row = {
        "messages": [
            {"role": "system", "content": "S"},
            {"role": "user", "content": [{"type": "text", "text": "Weather"}, {"type": "text", "text": "?"}]},
            {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {"name": "w", "arguments": "{}"}}]},
            {"role": "tool", "content": "sunny", "tool_call_id": "c1", "name": "w"},
            {"role": "assistant", "content": "Sunny.", "train": False},
            {"role": "assistant", "content": "Really sunny.", "weight": 1},
        ],
        "tools": [{"type": "function", "function": {"name": "w"}}],
    }  # fmt: skip
    ex = normalise(row, "chat", "f:1")
    assert [m.role for m in ex.messages] == [
        "system",
        "user",
        "assistant",
        "tool",
        "assistant",
        "assistant",
    ]
    assert ex.messages[1].content == "Weather?"
    assert ex.messages[2].content == "" and ex.messages[2].tool_calls[0]["function"]["name"] == "w"
    assert ex.messages[3].tool_call_id == "c1" and ex.messages[3].name == "w"
    assert [m.train for m in ex.messages[4:]] == [False, True]
    assert ex.tools == row["tools"]


def test_sharegpt_roles_are_mapped():
    row = {
        "system": "Be kind.",
        "conversations": [
            {"from": "human", "value": "Find a recipe"},
            {"from": "function_call", "value": '{"name": "search", "arguments": {"q": "rice"}}'},
            {"from": "observation", "value": "[]"},
            {"from": "gpt", "value": "None found."},
        ],
        "tools": '[{"name": "search"}]',
    }
    ex = normalise(row, "chat", "f:1")
    assert [(m.role, m.content) for m in ex.messages] == [
        ("system", "Be kind."), ("user", "Find a recipe"), ("assistant", ""), ("tool", "[]"),
        ("assistant", "None found."),
    ]  # fmt: skip
    assert ex.messages[2].tool_calls == [
        {"type": "function", "function": {"name": "search", "arguments": {"q": "rice"}}}
    ]
    assert ex.tools == [{"type": "function", "function": {"name": "search"}}]  # HF/OpenAI form


@pytest.mark.parametrize(
    "row, problem",
    [
        ({"messages": "hi"}, "'messages' must be an array, got string"),
        ({"messages": []}, "'messages' is empty"),
        ({"messages": [{"role": "user", "content": "a"}]}, "no assistant turn"),
        ({"messages": [{"role": "bot", "content": "a"}]}, "messages[0]: unknown role 'bot'"),
        ({"messages": [{"content": "a"}]}, "messages[0]: missing key 'role'"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages[0]: 'content' must be a string, got int"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": " "}]},
         "messages[1]: empty assistant content"),
        ({"conversations": [{"from": "gpt"}]}, "conversations[0]: missing key 'value'"),
        ({"instruction": "a", "output": 5}, "'output' must be a string, got int"),
        ({"instruction": "a", "output": ""}, "'output' is empty"),
        ({"output": "a", "instruction": None}, "missing key 'instruction'"),
    ],
)  # fmt: skip
def test_bad_rows(row, problem):
    fmt = detect_format(row)
    with pytest.raises(DataError) as err:
        normalise(row, fmt, "data.jsonl:7")
    assert err.value.where == "data.jsonl:7"
    assert err.value.problem.startswith(problem), err.value.problem


def test_jsonl_errors_are_reported_at_their_lines(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"prompt": "a", "completion": "b"},
            "{not json",
            {"prompt": "a"},
            "",
            {"prompt": 1, "completion": "b"},
            [1, 2],
            {"prompt": "x", "completion": "y"},
        ],
    )
    examples, errors = read_examples(path)
    assert [e.source for e in examples] == [f"{path}:1", f"{path}:7"]
    assert [e.where for e in errors] == [f"{path}:{n}" for n in (2, 3, 5, 6)]
    assert "malformed JSON" in errors[0].problem
    assert errors[1].problem.startswith("missing key 'completion'")
    assert errors[2].problem == "'prompt' must be a string, got int"
    assert errors[3].problem == "row must be a JSON object, got array"


def test_format_detected_from_first_known_row_and_overridable(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"x": 1}, {"text": "a"}, {"text": "b"}])
    examples, errors = read_examples(path)
    assert [e.kind for e in examples] == ["text", "text"]
    assert len(errors) == 1 and errors[0].where.endswith(":1")
    examples, errors = read_examples(path, "completion")
    assert not examples and len(errors) == 3
    with pytest.raises(UserError, match="unknown format"):
        read_examples(path, "yaml")


def test_json_list_reports_element_lines(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": 3},\n\n  {"text": "c"}\n]\n')
    examples, errors = read_examples(path)
    assert [e.source for e in examples] == [f"{path}:2", f"{path}:5"]
    assert [e.where for e in errors] == [f"{path}:3"]
    path.write_text('{"text": "one row"}')
    assert read_examples(path)[0][0].messages[0].content == "one row"
    path.write_text('[{"text": "a"},\n {"text": ')
    rows = list(iter_rows(path))
    assert isinstance(rows[-1][1], DataError) and rows[-1][0] == f"{path}:2"


def test_directory_splits(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"text": "t"}])
    write_jsonl(tmp_path / "valid.jsonl", [{"text": "v"}])
    assert find_splits(tmp_path) == {
        "train": tmp_path / "train.jsonl",
        "valid": tmp_path / "valid.jsonl",
    }
    assert read_examples(tmp_path, split="valid")[0][0].messages[0].content == "v"
    with pytest.raises(UserError, match="no test.jsonl"):
        read_examples(tmp_path, split="test")
    with pytest.raises(UserError, match="no train.jsonl"):
        find_splits(tmp_path / "..")


def test_missing_path_and_hub_id_without_datasets(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_examples(tmp_path / "nope.jsonl")
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match="`datasets` is not installed"):
            read_examples("someone/some-dataset")


@pytest.mark.skipif(not FIXTURES.is_dir(), reason="shared fixtures absent")
@pytest.mark.parametrize(
    "rel, kind, n",
    [
        ("alpaca/alpaca_en_demo.json", "alpaca", 999),
        ("sharegpt/fastchat_dummy_conversation.json", "chat", 500),
        ("tool-calling/glaive_toolcall_en_demo.json", "chat", 300),
        ("openai-chat/toy_chat_fine_tuning.jsonl", "chat", 5),
        ("mlx-lm/wwdc25_completions", "completion", 1800),
        ("mlx-lm/wikisql_text", "text", 1000),
    ],
)
def test_real_datasets_read_cleanly(rel, kind, n):
    examples, errors = read_examples(FIXTURES / rel)
    assert not errors and len(examples) == n and {e.kind for e in examples} == {kind}


def test_forced_format_reports_its_missing_keys():
    with pytest.raises(DataError, match=r"missing key 'messages' \(has: prompt\)"):
        normalise({"prompt": "a"}, "chat", "f:1")
    with pytest.raises(DataError, match=r"missing key 'output' \(has: instruction\)"):
        normalise({"instruction": "a"}, "alpaca", "f:1")


def test_line_separators_inside_strings_do_not_split_rows(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a\u2028b\x85c"}\r\n{"text": "d"}\n', encoding="utf-8")
    examples, errors = read_examples(path)
    assert not errors and [e.messages[0].content for e in examples] == ["a\u2028b\x85c", "d"]
    assert examples[1].source == f"{path}:2"


def test_hub_dataset_ids_go_through_datasets(monkeypatch):
    import sys
    import types

    calls = []

    def load_dataset(name, split):
        calls.append((name, split))
        return [{"text": "hub row"}, {"text": 3}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    examples, errors = read_examples("someone/some-dataset", split="valid")
    assert calls == [("someone/some-dataset", "valid")]
    assert [e.source for e in examples] == ["someone/some-dataset[valid]:0"]
    assert [e.where for e in errors] == ["someone/some-dataset[valid]:1"]


def test_turns_may_mix_role_and_from_keys():
    row = {"messages": [{"from": "human", "value": "Q"}, {"role": "assistant", "content": "A"}]}
    ex = normalise(row, "chat", "d:1")
    assert [(m.role, m.content) for m in ex.messages] == [("user", "Q"), ("assistant", "A")]


@pytest.mark.parametrize(
    ("name", "content", "problem", "hint"),
    [
        (
            "d.csv",
            b"instruction,output\nhi,there\n",
            "a CSV file, not JSON lines",
            "csv.DictReader",
        ),
        ("d.parquet", b"PAR1\0\0", "a Parquet file", "read_parquet"),
        ("model.bin", b"GGUF\x03\0\0\0", "a GGUF model file", "--model"),  # magic wins
        ("d.jsonl", b"\x89PNG\r\n\x1a\n\0\0", "a binary file", "UTF-8"),
    ],
)
def test_not_json_files_are_one_error_with_a_hint(tmp_path, name, content, problem, hint):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as err:
        read_examples(path)
    assert err.value.where == str(path) and problem in err.value.problem
    assert hint in err.value.hint


def test_a_model_directory_as_data_says_so(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match=r"it holds a model: config.json.*pass models with --model"):
        read_examples(tmp_path)


def test_unprintable_keys_stay_on_one_line(tmp_path):
    """A key with a newline (found by the fuzz test) is shown as repr: one line per error."""
    path = tmp_path / "train.jsonl"
    path.write_text('{"\\n": null}\n{"a\\tb": 1, "instruction": "x"}\n')
    _, errors = read_examples(path)
    messages = [str(e) for e in errors]
    assert len(messages) == 2 and all("\n" not in m for m in messages)
    assert "'\\n'" in messages[0] and "'a\\tb'" in messages[1] + messages[0]
