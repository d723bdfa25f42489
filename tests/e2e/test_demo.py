"""The demo dataset (checkable, disjoint, one source of truth) and `mlxsft demo --quick`."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlxsft import demo

REPO = Path(__file__).resolve().parents[2]
SPLITS = ("train", "valid", "test")


def _generator():
    spec = importlib.util.spec_from_file_location(
        "make_demo_data", REPO / "examples/data/make_demo_data.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _answer(prompt: str) -> str:
    """The right answer, recomputed from the prompt alone (independent of the generator)."""
    task, _, args = re.split(r"([:?]) ", prompt, maxsplit=1)
    xs = args.split()
    return {
        "Reverse the letters": lambda: " ".join(xs[::-1]),
        "Sort the numbers": lambda: " ".join(sorted(xs)),
        "Uppercase": lambda: " ".join(xs).upper(),
        "How many letters": lambda: str(len(xs)),
        "Largest number": lambda: max(xs),
        "Add one to each": lambda: " ".join(str(int(x) + 1) for x in xs),
    }[task]()


def test_packaged_data_regenerates():
    splits = _generator().make_splits()
    for split in SPLITS:
        packaged = (demo.DEMO_DATA / f"{split}.jsonl").read_bytes()
        expected = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in splits[split])
        assert packaged.decode() == expected


def test_answers_are_right_and_splits_disjoint():
    prompts: dict[str, set[str]] = {}
    for split in SPLITS:
        rows = demo.read_split(split)
        assert len(rows) == {"train": 2000, "valid": 100, "test": 100}[split]
        for row in rows:
            user, assistant = row["messages"]
            assert (user["role"], assistant["role"]) == ("user", "assistant")
            assert assistant["content"] == _answer(user["content"]), user["content"]
        prompts[split] = {r["messages"][0]["content"] for r in rows}
        assert len(prompts[split]) == len(rows)
    assert not prompts["train"] & prompts["test"]
    assert not prompts["train"] & prompts["valid"]
    assert not prompts["valid"] & prompts["test"]
    tasks = {demo.task_of(p) for p in prompts["test"]}
    assert len(tasks) == 6


def test_demo_model_offline_is_one_line_error(tmp_path: Path):
    from mlxsft.cli import main

    result = CliRunner().invoke(
        main, ["demo", "--model", "nobody-here/no-such-model", "--output", str(tmp_path)]
    )
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "nobody-here/no-such-model" in lines[0]


@pytest.mark.slow
def test_demo_quick_learns(tmp_path: Path):
    """`python -m mlxsft demo --quick` as a user runs it (a subprocess, so the OpenBLAS preload
    of `mlxsft.blas` applies as it does on the command line)."""
    from mlxsft.blas import preload_env

    env = preload_env()
    env.update(MLXSFT_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1")
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "mlxsft", "demo", "--quick", "--output", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text
    assert "tiny model: built" in text and "[[" in text  # inspected rows, trained tokens marked
    assert "demo: a full fine-tune (all weights) of a tiny 2-layer model" in text.splitlines()[0]
    assert "under a minute on 2 idle CPU cores" in text.splitlines()[0]
    m = re.search(r"val loss\s+([\d.]+)\s+->\s+([\d.]+)", text)
    before, after = float(m.group(1)), float(m.group(2))
    assert after < before / 3  # measured: 6.46 -> 1.33 after 300 steps
    acc = re.search(r"exact match\s+([\d.]+)%\s+->\s+([\d.]+)%", text)
    assert float(acc.group(1)) == 0.0 and float(acc.group(2)) >= 20.0  # measured: 0% -> 43.3%
    assert (out / "adapters" / "metrics.jsonl").is_file()
    assert (out / "fused" / "config.json").is_file()
    assert "fused model:" in text
    model_dirs = list((tmp_path / "cache" / "demo").iterdir())  # built once, then reused
    assert len(model_dirs) == 1 and (model_dirs[0] / "tokenizer.json").is_file()


def test_demo_on_given_model_trains_lora(tiny_llama: Path, tmp_path: Path):
    """`--model` path (a local dir standing in for a hub id): same flow, LoRA, short plan."""
    plan = demo.DemoPlan("lora", iters=3, batch_size=4, max_seq_len=128, learning_rate=1e-3,
                         n_test=3, eval_every=0, rank=4)  # fmt: skip
    lines: list[str] = []
    result = demo.run_demo(
        model=str(tiny_llama), output=tmp_path / "d", echo=lines.append, plan=plan
    )
    text = "\n".join(lines)
    assert lines[0].startswith(f"demo: a LoRA fine-tune (rank-4 adapter) of {tiny_llama}, 3 steps")
    assert "training LoRA rank 4: 3 steps" in text
    assert (
        json.loads((result.adapter / "adapter_config.json").read_text())["fine_tune_type"] == "lora"
    )
    assert (result.fused / "model.safetensors").is_file() or list(
        result.fused.glob("*.safetensors")
    )
    assert len(result.after.samples) == 3 and result.answer[0] == result.after.samples[0][0]
    assert "exact match" in text.splitlines()[-5]


@pytest.mark.parametrize("quick", [False, True])
def test_a_real_model_always_trains_lora(quick: bool):
    """`demo --model M [--quick]` trains a LoRA adapter; only the random-init tiny model trains all
    weights."""
    plan = demo.pick_plan(quick=quick, tiny=False)
    assert plan.fine_tune_type == "lora" and plan.learning_rate <= 2e-4
    assert demo.pick_plan(quick=quick, tiny=True).fine_tune_type == "full"
    assert demo.pick_plan(quick=True, tiny=False).iters < demo.HUB.iters


def test_expected_time_is_the_measured_one():
    assert demo.expected_time(demo.FULL, slow_blas=False) == "about 3 minutes on 2 idle CPU cores"
    assert demo.expected_time(demo.QUICK, slow_blas=False) == "under a minute on 2 idle CPU cores"
    assert "reference BLAS" in demo.expected_time(demo.FULL, slow_blas=True)
    assert demo.expected_time(demo.HUB, slow_blas=False) == "time depends on the model's size"
