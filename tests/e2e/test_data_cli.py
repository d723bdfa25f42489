"""`mlxsft data inspect` / `mlxsft data validate` end to end through the Click CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers_tokenizer import build_tokenizer

from mlxsft.cli import main

GOOD = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi."},
                  {"role": "assistant", "content": "Hey"}]},
    {"messages": [{"role": "user", "content": "Thanks!"},
                  {"role": "assistant", "content": "You are welcome."}]},
]  # fmt: skip
BAD_LINES = [
    json.dumps(GOOD[0]),
    '{"messages": [',  # 2: malformed JSON
    json.dumps({"messages": [{"role": "user"}]}),  # 3: missing content
    json.dumps({"messages": [{"role": "user", "content": 5}]}),  # 4: wrong type
    json.dumps(
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]}
    ),
    json.dumps({"messages": [{"role": "robot", "content": "a"}]}),  # 6: unknown role
    json.dumps({"messages": [{"role": "user", "content": "a"}]}),  # 7: no assistant turn
    json.dumps({"prompt": "a", "completion": "b"}),  # 8: keys of another format
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tokenizer-only model directory (what `--model` needs for data commands)."""
    path = tmp_path_factory.mktemp("tok")
    build_tokenizer(["Be brief. Hi. Hey Thanks! You are welcome. a b"]).save_pretrained(path)
    (path / "config.json").write_text('{"model_type": "llama"}')
    return path


def write(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def test_validate_reports_every_bad_row_at_its_line(tmp_path):
    data = write(tmp_path / "bad.jsonl", BAD_LINES)
    result = run("data", "validate", str(data))
    assert result.exit_code == 1, result.output
    lines = result.stdout.strip().splitlines()
    assert [line.split(": ", 1)[0] for line in lines] == [f"{data}:{n}" for n in range(2, 9)]
    problems = [line.split(": ", 1)[1] for line in lines]
    assert problems[0].startswith("malformed JSON")
    assert problems[1].startswith("messages[0]: missing key 'content'")
    assert problems[2].startswith("messages[0]: 'content' must be a string, got int")
    assert problems[3].startswith("messages[1]: empty assistant content")
    assert problems[4].startswith("messages[0]: unknown role 'robot'")
    assert problems[5].startswith("no assistant turn")
    assert problems[6].startswith("missing key 'messages'")
    assert "7 problem(s) in 8 rows" in result.stderr
    assert "Traceback" not in result.output


def test_validate_ok_and_directory(tmp_path):
    write(tmp_path / "train.jsonl", GOOD)
    write(tmp_path / "valid.jsonl", GOOD[:1])
    result = run("data", "validate", str(tmp_path))
    assert result.exit_code == 0 and "ok: 3 rows" in result.stderr
    write(tmp_path / "valid.jsonl", ['{"text": 1}'])
    result = run("data", "validate", str(tmp_path))
    assert (
        result.exit_code == 1
        and f"{tmp_path / 'valid.jsonl'}:1: 'text' must be a string" in result.stdout
    )


def test_validate_with_a_template_that_raises(tmp_path, model_dir):
    data = write(tmp_path / "d.jsonl", GOOD)
    strict = tmp_path / "strict.jinja"
    strict.write_text(
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}{{ m['content'] }}{% endfor %}"
    )
    result = run(
        "data", "validate", str(data), "--model", str(model_dir), "--template", str(strict)
    )
    assert result.exit_code == 1
    assert result.stdout.strip().splitlines() == [
        f"{data}:1: template {str(strict)!r} raised: System role not supported"
    ]
    assert "Traceback" not in result.output


def test_inspect_marks_trained_tokens_and_prints_stats(tmp_path, model_dir):
    data = write(tmp_path / "d.jsonl", GOOD)
    result = run(
        "data", "inspect", str(data), "--model", str(model_dir), "--template", "chatml", "-n", "1"
    )
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "<|im_start|>assistant\n[[Hey<|im_end|>]]\n" in out
    assert "[[" not in out.split("--- ")[1].split("<|im_start|>assistant")[0]  # prompt untrained
    assert "examples        2 (2 kept, 0 dropped)" in out and "padding waste at batch size 4" in out
    assert f"{data}:2" not in out  # -n 1


def test_inspect_truncates_as_train_does_and_says_so(tmp_path, model_dir):
    data = write(tmp_path / "d.jsonl", GOOD)
    args = ["data", "inspect", str(data), "--model", str(model_dir), "-t", "chatml", "-n", "0"]
    out = run(*args).stdout
    assert "   max seq len: 2048\n" in out and "truncated to" not in out  # train's default
    out = run(*args, "--max-seq-len", "14").stdout
    assert "   max seq len: 14\n" in out
    assert f"--- {data}:1  (14 tokens, 2 trained, truncated to 14)\n" in out


def test_inspect_json_contract(tmp_path, model_dir):
    data = write(tmp_path / "d.jsonl", GOOD)
    args = [
        "data",
        "inspect",
        str(data),
        "--model",
        str(model_dir),
        "-t",
        "chatml",
        "--json",
        "-n",
        "0",
    ]
    result = run(*args, "--max-seq-len", "14")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.strip().splitlines()]
    examples, stats = rows[:-1], rows[-1]["stats"]
    assert [r["source"] for r in examples] == [f"{data}:1", f"{data}:2"]
    for r in examples:
        assert len(r["input_ids"]) == len(r["loss_mask"]) <= 14 and r["loss_mask"][0] == 0
        assert set(r["loss_mask"]) <= {0, 1} and sum(r["loss_mask"]) == r["n_trained"] > 0
        assert all(isinstance(i, int) for i in r["input_ids"])
    assert stats["n_examples"] == 2 and stats["n_truncated"] == sum(
        r["truncated"] for r in examples
    )
    assert stats["n_trained"] == sum(r["n_trained"] for r in examples)


def test_user_errors_are_one_line_exit_2(tmp_path, model_dir):
    result = run("data", "inspect", str(tmp_path / "nope.jsonl"), "--model", str(model_dir))
    assert result.exit_code == 2 and result.stderr.startswith("error: ")
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
    data = write(tmp_path / "d.jsonl", GOOD)
    result = run("data", "inspect", str(data), "--model", str(model_dir), "-t", "tokenizer")
    assert result.exit_code == 2 and "the tokenizer has no chat template" in result.stderr
    bad = write(tmp_path / "bad.jsonl", BAD_LINES[1:])
    result = run("data", "inspect", str(bad), "--model", str(model_dir))
    assert result.exit_code == 2 and "no usable rows" in result.stderr


def test_data_command_imports_only_click():
    code = (
        "import sys, mlxsft.commands.data; "
        "bad = [m for m in ('transformers', 'mlx', 'mlx_lm', 'numpy', 'jinja2') if m in sys.modules]; "
        "print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_third_party_warnings_hidden_unless_verbose(model_dir, tmp_path):
    """transformers' "Token indices sequence length is longer than ..." (mlxsft truncates by
    itself) is not shown by default; `mlxsft -v` shows it."""
    import shutil

    tok = tmp_path / "tok"
    shutil.copytree(model_dir, tok)
    config = json.loads((tok / "tokenizer_config.json").read_text())
    (tok / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 4}))
    data = write(tmp_path / "d.jsonl", GOOD)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRANSFORMERS_")}
    cmd = ["data", "inspect", str(data), "-m", str(tok), "-n", "1"]
    outs = [
        subprocess.run([sys.executable, "-m", "mlxsft", *flags, *cmd], capture_output=True,
                       text=True, env=env, check=True).stderr
        for flags in ([], ["-v"])
    ]  # fmt: skip
    assert "Token indices sequence length" not in outs[0], outs[0]
    assert "Token indices sequence length" in outs[1]


def test_inspect_says_completion_rows_use_no_template(tmp_path, model_dir):
    data = write(tmp_path / "c.jsonl", [{"prompt": "Hi.", "completion": " Hey"}])
    result = run("data", "inspect", "-d", str(data), "-m", str(model_dir), "-t", "chatml")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("template: none (completion/text rows are raw text)")
    assert "Hi.[[ Hey" in result.stdout  # raw concatenation, no chat markers
    assert run("data", "inspect", str(data), "-d", "other.jsonl", "-m", "m").exit_code == 2
