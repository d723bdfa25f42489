"""Data parallel == one process: `mlx.launch -n 2 --backend ring` (loopback) training with 2
ranks x 2 rows (and --grad-accum 2) gives the weights and losses of 1 rank x 4 rows."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from mlxsft.config import resolve
from mlxsft.train.loop import train

ROWS = [(f"Add {i} and {j}", str(i + j)) for i in range(3) for j in range(4)]
# SGD: the update is linear in the gradient, so equal weights mean equal gradient sums (Adam's
# normalisation magnifies float-rounding differences of near-zero gradients past 1e-5).
COMMON = dict(iters=2, batch_size=4, max_seq_len=64, optimizer="sgd", learning_rate=0.5,
              eval_every=0, save_every=0, steps_per_report=1, seed=5)  # fmt: skip


def _launcher() -> str | None:
    here = Path(sys.executable).parent / "mlx.launch"
    return str(here) if here.is_file() else shutil.which("mlx.launch")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(out: Path) -> list[float]:
    """Train losses of every step, then the final validation loss."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r["loss"] for r in records if r["type"] == "train"]
    return train + [r["val_loss"] for r in records if r["type"] == "eval"]


@pytest.mark.slow  # two launched processes: ~40 s on a busy 2-core machine
def test_two_ranks_equal_one_rank(tiny_llama, tmp_path):
    launcher = _launcher()
    if launcher is None:
        pytest.skip("mlx.launch is not installed")
    data = tmp_path / "data"
    data.mkdir()
    rows = [
        json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
        for q, a in ROWS
    ]  # fmt: skip
    (data / "train.jsonl").write_text("\n".join(rows) + "\n")
    (data / "valid.jsonl").write_text("\n".join(rows[::2]) + "\n")  # evaluated at the end
    one = tmp_path / "one"
    train(resolve({"model": str(tiny_llama), "data": str(data), "output": str(one), **COMMON}))

    two = tmp_path / "two"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in COMMON.items()]
    cmd = [
        launcher, "-n", "2", "--backend", "ring", "--starting-port", str(_free_port()),
        "--env", "HF_HUB_OFFLINE=1", "--",
        sys.executable, "-m", "mlxsft", "train", "--model", str(tiny_llama), "--data", str(data),
        "-o", str(two), "--grad-accum", "2", *flags,
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    output = proc.stdout + proc.stderr
    if proc.returncode != 0 and any(
        s in output for s in ("[ring]", "Address already in use", "Connection refused")
    ):
        pytest.skip(f"the ring backend cannot start here: {output.strip().splitlines()[-1]}")
    assert proc.returncode == 0, output
    assert "2 rank(s)" in output
    assert "compiled the train step (0 times)" not in output  # one reduce message: compiled

    a = mx.load(str(one / "adapters.safetensors"))
    b = mx.load(str(two / "adapters.safetensors"))
    assert set(a) == set(b)
    assert max(mx.abs(a[k] - b[k]).max().item() for k in a) <= 1e-5
    assert max(mx.abs(a[k]).max().item() for k in a if "lora_b" in k) > 1e-4  # it did train
    assert len(_losses(one)) == 3  # 2 steps + the final evaluation
    assert _losses(two) == pytest.approx(_losses(one), abs=1e-5)
    assert not (two / "checkpoints" / ".tmp").exists()
