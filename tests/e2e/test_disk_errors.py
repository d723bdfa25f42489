"""A full disk or a permission error while saving: exit 2, one line naming the path and the
bytes needed, and nothing written before is lost or left half-written (simulated ENOSPC: mlx's
safetensors writer is made to fail half-way through a file, as a full disk would)."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import mlx.core as mx
import pytest
from click.testing import CliRunner

from mlxsft import rundir
from mlxsft.cli import main


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"q{i}"},
                          {"role": "assistant", "content": f"a{i}"}]} for i in range(8)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    "code, message",
    [(errno.ENOSPC, "no space left on the device (needs about "), (errno.EACCES, "cannot write")],
)
def test_write_error_in_a_checkpoint(code, message, tiny_llama, data_file, tmp_path, monkeypatch):
    real, calls = mx.save_safetensors, []

    def failing(file, arrays, metadata=None):
        calls.append(1)
        if len(calls) <= 2:  # checkpoint 1: adapters + optimizer; then the disk is full
            return real(file, arrays, **({"metadata": metadata} if metadata else {}))
        file.write(b"\0" * 100)
        raise OSError(code, "simulated", file.name)

    monkeypatch.setattr(mx, "save_safetensors", failing)
    out = tmp_path / "o"
    args = ["train", "-m", str(tiny_llama), "-d", str(data_file), "-o", str(out), "--iters", "4",
            "--batch-size", "2", "--max-seq-len", "32", "--save-every", "2"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0] and "checkpoints" in errors[0], errors
    assert [p.name for p in rundir.list_checkpoints(out)] == ["step-0000002"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000002"]
    ckpt = out / "checkpoints" / "step-0000002"
    assert mx.load(str(ckpt / "adapters.safetensors")) and mx.load(
        str(ckpt / "optimizer.safetensors")
    )
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_a_full_disk_in_any_command_is_one_line(tmp_path, monkeypatch):
    from mlxsft import report

    def full(metrics, output, **kw):
        raise OSError(errno.ENOSPC, "No space left on device", str(output))

    monkeypatch.setattr(report, "render_png", full)
    rows = [{"type": "train", "step": s, "loss": 1.0 / s, "lr": 1e-3} for s in (1, 2)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    png = tmp_path / "r.png"
    result = CliRunner().invoke(main, ["report", str(tmp_path), "-o", str(png)])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: {png}: no space left on the device (hint: free some space or write somewhere else)"
    ], result.output
