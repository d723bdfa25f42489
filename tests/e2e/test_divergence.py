"""A diverging run stops with exit 2 and one line, for every fine-tune type; the last good
checkpoint and best/ are untouched and no adapter of the destroyed weights is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlxsft.cli import main

TEXTS = [
    "Once upon a time there was a little girl named Lily. She loved to play outside.",
    "The cat sat on the mat. It was a sunny day and the dog ran to the park.",
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text")
    rows = "".join(json.dumps({"text": t}) + "\n" for t in TEXTS * 4)
    (path / "train.jsonl").write_text(rows)
    (path / "valid.jsonl").write_text(rows[: len(rows) // 4])
    return path


def _train(model: Path, data: Path, out: Path, *args: str):
    args = ["train", "-m", str(model), "-d", str(data), "-o", str(out), "--batch-size", "2",
            "--max-seq-len", "32", "--iters", "40", "--steps-per-report", "1", *args]  # fmt: skip
    return CliRunner().invoke(main, args)


@pytest.mark.parametrize("kind", ["lora", "dora", "full"])
def test_huge_learning_rate_stops_with_exit_2(kind, shared_fixtures, data_dir, tmp_path):
    """stories260K (a trained model: loss ~2.2) at lr 1e6 jumps to ln(512) and stays there."""
    model = shared_fixtures / "models" / "stories260K-hf"
    out = tmp_path / kind
    result = _train(model, data_dir, out, "--fine-tune-type", kind, "--lr", "1e6",
                    "--eval-every", "1", "--save-every", "1")  # fmt: skip
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "stayed at or above ln(vocab) = 6.24" in errors[0]
    assert "lower --learning-rate" in errors[0]
    # step 1's loss was computed from the base weights; step 2's loss is the first bad one, so
    # only the weights after step 1 and later were destroyed: no good checkpoint is left.
    assert "no good checkpoint was saved" in errors[0]
    assert list((out / "checkpoints").iterdir()) == []
    assert not (out / "adapters.safetensors").exists()
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if r["type"] == "eval"]
    assert evals[0]["step"] == 0 and min(r["val_loss"] for r in evals[1:]) > evals[0]["val_loss"]
    assert (out / "best" / "adapters.safetensors").is_file()  # the starting point's, untouched


def test_dead_model_stops_and_keeps_the_last_good_checkpoint(tiny_llama, data_dir, tmp_path):
    """A random tiny model starts above ln(vocab); at lr 1e2 it goes dead (uniform logits, zero
    gradient) at step 3: checkpoints up to step 1 stay, later ones go."""
    out = tmp_path / "o"
    result = _train(tiny_llama, data_dir, out, "--lr", "1e2", "--save-every", "1",
                    "--eval-every", "0")  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "training diverged" in result.output and "since step 3" in result.output
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-0000001"]
    assert "the last good checkpoint is" in result.output
