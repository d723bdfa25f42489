"""`mlxsft train` / `mlxsft eval` end to end through the Click CLI on tiny checkpoints.

Each architecture trains 20 steps with a high learning rate so the loss visibly falls, then
mlx-lm's own loader applies the adapter and must give mlxsft's base+adapter logits.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from mlxsft.cli import main

TASKS = [
    ("Reverse the letters: a b c", "c b a"), ("Sort the numbers: 3 1 2", "1 2 3"),
    ("Uppercase: x y", "X Y"), ("How many letters? a b c d", "4"),
    ("Largest number: 7 2 9", "9"), ("Reverse the letters: q r", "r q"),
    ("Sort the numbers: 5 4", "4 5"), ("Uppercase: m n o", "M N O"),
]  # fmt: skip
FAST = ["--iters", "20", "--lr", "1e-2", "--batch-size", "4", "--max-seq-len", "64",
        "--rank", "8", "--alpha", "16", "--eval-every", "10", "--save-every", "10",
        "--steps-per-report", "5", "--seed", "1"]  # fmt: skip


def _row(q: str, a: str) -> str:
    msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return json.dumps({"messages": msgs})


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data")
    (path / "train.jsonl").write_text("\n".join(_row(q, a) for q, a in TASKS * 4) + "\n")
    (path / "valid.jsonl").write_text("\n".join(_row(q, a) for q, a in TASKS[:4]) + "\n")
    return path


def _invoke(args: list[str]):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _records(out: Path, kind: str) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == kind]


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_qwen2", "tiny_gemma", "tiny_phi3"])
def test_train_loss_falls_and_mlx_lm_loads_adapter(arch, request, data_dir, tmp_path):
    import mlx_lm

    from mlxsft.model import lora
    from mlxsft.model.loading import load

    model_dir = request.getfixturevalue(arch)
    out = tmp_path / "out"
    result = _invoke(["train", "--model", model_dir, "--data", data_dir, "-o", out, *FAST])
    assert result.exit_code == 0, result.output
    assert "done: 20 steps" in result.output
    for name in ("adapters.safetensors", "adapter_config.json", "config.yaml", "best"):
        assert (out / name).exists(), name
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["iters"], saved["learning_rate"], saved["rank"]) == (20, 0.01, 8)
    assert saved["model"] == str(model_dir) and saved["optimizer"] == "adamw"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step-0000010",
        "step-0000020",
    ]
    train = _records(out, "train")
    assert [r["step"] for r in train] == list(range(1, 21))
    keys = {"step", "epoch", "loss", "lr", "trained_tokens", "tokens_per_sec", "peak_memory_gb",
            "elapsed_s"}  # fmt: skip
    assert keys <= set(train[0])
    first, last = np.mean([r["loss"] for r in train[:5]]), np.mean([r["loss"] for r in train[-5:]])
    assert last < first - 0.5, (first, last)
    evals = _records(out, "eval")
    assert [r["step"] for r in evals] == [0, 10, 20]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]

    # mlx-lm's loader applies our adapter: same logits as mlxsft's base + adapter.
    ours = lora.load_adapters(load(model_dir).model, out)
    ours.eval()
    theirs, _ = mlx_lm.load(str(model_dir), adapter_path=str(out))
    ids = mx.array([[1, 5, 9, 33, 70, 101, 7, 250]])
    diff = mx.abs(ours(ids) - theirs(ids)).max().item()
    assert diff < 1e-5, diff

    # `mlxsft eval` reproduces the run's final validation loss (same masks, same batches).
    result = _invoke(["eval", "--model", model_dir, "--adapter", out, "--data", data_dir,
                      "--max-seq-len", "64", "--batch-size", "4", "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert re.search(r"eval: batch (\d+)/\1 ", result.output)  # progress (stderr)
    report = json.loads(result.output.strip().splitlines()[-1])
    assert report["split"] == "valid" and report["tokens"] == evals[-1]["val_tokens"]
    assert report["loss"] == pytest.approx(evals[-1]["val_loss"], abs=1e-5)


def test_bad_data_file_is_one_line_error(tiny_llama, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(_row("a", "b") + '\n{"messages": [\n')
    result = CliRunner().invoke(
        main, ["train", "--model", str(tiny_llama), "--data", str(bad), "-o", str(tmp_path / "o")]
    )
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and f"{bad}:2" in lines[0]
    assert not (tmp_path / "o").exists()


def test_unknown_config_key_is_one_line_error(tiny_llama, data_dir, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("lora_rnk: 4\n")
    result = CliRunner().invoke(
        main, ["train", "--config", str(cfg), "--model", str(tiny_llama), "--data", str(data_dir)]
    )
    assert result.exit_code == 2
    assert result.output.startswith("error: ") and "unknown config key 'lora_rnk'" in result.output


@pytest.mark.parametrize(
    ("fixture", "flags"),
    [
        ("tiny_llama_q4", []),  # QLoRA: quantized checkpoint
        ("tiny_llama", ["--quantize", "8"]),  # QLoRA: quantize on load
        ("tiny_llama", ["--fine-tune-type", "dora", "--target-modules", "q_proj,v_proj"]),
        ("tiny_llama", ["--fine-tune-type", "full", "--num-layers", "1", "--lr", "1e-3"]),
        ("tiny_qwen2", ["--no-pack", "--grad-accum", "2", "--grad-checkpoint"]),
        ("tiny_gemma", ["--epochs", "1", "--optimizer", "sgd", "--lr-schedule", "linear"]),
    ],
)
def test_training_variants_save_loadable_adapters(fixture, flags, request, data_dir, tmp_path):
    from mlxsft.model import lora
    from mlxsft.model.loading import load

    model_dir = request.getfixturevalue(fixture)
    out = tmp_path / "out"
    steps = [] if "--epochs" in flags else ["--iters", "3"]
    args = ["train", "--model", model_dir, "--data", data_dir / "train.jsonl", "-o", out,
            "--batch-size", "4", "--max-seq-len", "64", *steps, *flags]  # fmt: skip
    result = _invoke(args)
    assert result.exit_code == 0, result.output
    train = _records(out, "train")
    assert train and all(np.isfinite(r["loss"]) for r in train)
    config = json.loads((out / "adapter_config.json").read_text())
    kind = flags[flags.index("--fine-tune-type") + 1] if "--fine-tune-type" in flags else "lora"
    assert config["fine_tune_type"] == kind
    if "--quantize" in flags:
        assert "quantized base" in result.output
    # the saved weights are exactly what training left in the model: reload them and compare
    quantize = 8 if "--quantize" in flags else None
    reloaded = lora.load_adapters(load(model_dir, quantize=quantize).model, out)
    saved = mx.load(str(out / "adapters.safetensors"))
    from mlx.utils import tree_flatten

    params = dict(tree_flatten(reloaded.trainable_parameters()))
    assert set(saved) == set(params)
    assert all(mx.array_equal(saved[k], params[k]) for k in saved)


def test_peft_adapter_works_in_eval_and_as_a_starting_point(tiny_llama, data_dir, tmp_path):
    """`--adapter` takes a PEFT directory: eval gives the mlx adapter's loss, and train continues
    from it."""
    out = tmp_path / "run"
    assert (
        _invoke(["train", "--model", tiny_llama, "--data", data_dir, "-o", out, *FAST]).exit_code
        == 0
    )
    peft = tmp_path / "peft"
    result = _invoke(["export", "--adapter", out, "--format", "peft", "--output", peft])
    assert result.exit_code == 0 and (peft / "adapter_model.safetensors").is_file()

    def eval_loss(adapter: Path) -> float:
        args = ["eval", "--model", tiny_llama, "--data", data_dir, "--adapter", adapter, "--json"]
        result = _invoke(args)
        assert result.exit_code == 0, result.output
        return json.loads(result.output.strip().splitlines()[-1])["loss"]

    base = json.loads(
        _invoke(["eval", "--model", tiny_llama, "--data", data_dir, "--json"]).output.splitlines()[
            -1
        ]
    )["loss"]
    mlx_loss, peft_loss = eval_loss(out), eval_loss(peft)
    assert peft_loss == pytest.approx(mlx_loss, abs=1e-5) and abs(mlx_loss - base) > 1e-3

    more = tmp_path / "more"
    args = ["train", "--model", tiny_llama, "--data", data_dir, "-o", more, "--adapter", peft]
    result = _invoke([*args, "--iters", "2", *FAST[2:]])
    assert result.exit_code == 0, result.output
    assert (more / "adapters.safetensors").is_file()


def test_train_says_what_it_uses_and_warns(tiny_llama_base, tmp_path):
    """The resolved template, split sizes, one-line warnings (no validation data, batch larger than
    the data, every example cut, tool turns the template drops), config.yaml's template, next."""
    tool_row = {"messages": [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"c": "Oslo"}}}]},
        {"role": "tool", "content": "sunny 21C"},
        {"role": "assistant", "content": "Sunny, 21 degrees."},
    ]}  # fmt: skip
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join([_row(q, a) for q, a in TASKS[:2]] + [json.dumps(tool_row)]) + "\n")
    template = tmp_path / "plain.jinja"  # user and assistant text only: tool turns vanish
    template.write_text(
        "{% for m in messages %}{% if m['role'] in ['user', 'assistant'] %}"
        "{{ m['role'] }}: {{ m['content'] }}\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    out = tmp_path / "out"
    args = ["train", "-m", tiny_llama_base, "-d", data, "-o", out, "--iters", "1",
            "--batch-size", "8", "--max-seq-len", "8", "--template", template]  # fmt: skip
    result = _invoke(args)
    assert result.exit_code == 0, result.output
    text = result.output
    assert f"template: {template} (template file)" in text
    assert "train: 3 examples" in text
    assert "warning: no validation data" in text
    assert "warning: --batch-size 8 is more than the" in text
    assert "warning: every train example is longer than --max-seq-len 8" in text
    assert (
        f"warning: template '{template}' leaves out the tool calls/results of 1 train rows" in text
    )
    assert f"next: mlxsft chat -m {tiny_llama_base} -a {out}" in text
    assert f"next: mlxsft report {out}" in text
    assert yaml.safe_load((out / "config.yaml").read_text())["template"] == str(template)

    # auto on a base model without a chat template: alpaca, recorded as such
    result = _invoke(["train", "-m", tiny_llama_base, "-d", data, "-o", out, "--iters", "1"])
    assert result.exit_code == 0, result.output
    assert "template: alpaca (built-in; the model has no chat template)" in result.output
    assert "leaves out the tool" not in result.output  # alpaca renders tool turns
    assert yaml.safe_load((out / "config.yaml").read_text())["template"] == "alpaca"


def test_eval_ctrl_c_stops_at_once(tiny_llama, tmp_path):
    """Ctrl-C during `mlxsft eval` ends the process by the signal's default action, not after the
    batch in flight (a Python handler would only run once the MLX call returns)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    data = tmp_path / "big.jsonl"
    data.write_text("\n".join(_row(q, a) for q, a in TASKS * 400) + "\n")  # 3,200 batches of 1
    cmd = [sys.executable, "-m", "mlxsft", "eval", "-m", str(tiny_llama), "-d", str(data),
           "--batch-size", "1", "--max-seq-len", "64"]  # fmt: skip
    env = {**os.environ, "MLXSFT_NO_BLAS_PRELOAD": "1"}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stderr is not None
    for line in proc.stderr:  # wait until batches are running (a line at about every 10%)
        if line.startswith("eval: batch"):
            break
    sent = time.perf_counter()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == -signal.SIGINT, "eval finished or caught Ctrl-C itself"
    assert time.perf_counter() - sent < 10
