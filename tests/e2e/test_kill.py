"""kill -9 in the middle of a run: the next `train --resume auto` in the same OUT notices the
dead run's lock, cleans its half-written leftovers and continues from its newest checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from click.testing import CliRunner

from mlxsft.cli import main

REPO = Path(__file__).resolve().parents[2]


def test_resume_after_kill_9(tiny_llama, tmp_path):
    data = tmp_path / "train.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"q{i}"},
                          {"role": "assistant", "content": f"a{i}"}]} for i in range(8)]  # fmt: skip
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    args = ["train", "-m", str(tiny_llama), "-d", str(data), "-o", str(out), "--iters", "200",
            "--batch-size", "2", "--max-seq-len", "32", "--save-every", "1"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLXSFT_NO_BLAS_PRELOAD": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mlxsft", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 120
    # 200 steps, each saved: long enough on an idle machine that the kill lands mid-run (a run of
    # 12 steps could finish, and prune step 2, between two polls).
    ckpts = out / "checkpoints"
    while not (ckpts.is_dir() and list(ckpts.glob("step-*"))) and proc.poll() is None:
        assert time.time() < deadline
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    (out / "checkpoints" / ".tmp-step-0000099-1").mkdir()  # as if killed while saving
    result = CliRunner().invoke(main, ["train", "-c", str(out / "config.yaml"), "--resume", "auto"])
    assert result.exit_code == 0, result.output
    assert f"the earlier mlxsft train (pid {proc.pid} " in result.output
    assert "ended without cleaning up" in result.output
    assert "removed" in result.output and ".tmp-step-0000099-1" in result.output
    assert "resuming from" in result.output
    assert sorted(p.name for p in (out / "checkpoints").iterdir())[-1] == "step-0000200"
    assert (out / "adapters.safetensors").is_file() and not list(out.glob(".tmp-*"))
