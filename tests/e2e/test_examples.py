"""Every examples/*.yaml trains for a few steps on a tiny model (model/iters/output overridden)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlxsft.config import TrainConfig, load_config

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
# config -> the session fixture (tests/conftest.py) standing in for its hub model
TINY_FOR = {
    "alpaca-lora.yaml": "tiny_llama_base",
    "chat-lora.yaml": "tiny_llama",
    "qlora.yaml": "tiny_llama_q4",
    "full.yaml": "tiny_llama",
    "dora.yaml": "tiny_llama",
    "distributed.yaml": "tiny_llama",
}
OVERRIDES = [
    "--iters",
    "2",
    "--max-seq-len",
    "128",
    "--eval-every",
    "0",
    "--save-every",
    "0",
    "--steps-per-report",
    "1",
]


def test_every_example_is_covered_and_valid():
    assert sorted(p.name for p in EXAMPLES.glob("*.yaml")) == sorted(TINY_FOR)
    for name in TINY_FOR:
        cfg = TrainConfig(**load_config(EXAMPLES / name)).validate()
        assert cfg.model and not Path(cfg.model).exists()  # a hub id, replaced in the tests
        assert (REPO / cfg.data / "train.jsonl").is_file()
        assert (REPO / cfg.data / "valid.jsonl").is_file()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_records(out: Path) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == "train"]


@pytest.mark.parametrize("name", [n for n in TINY_FOR if n != "distributed.yaml"])
def test_example_trains(name: str, request, tmp_path: Path, monkeypatch):
    from mlxsft.cli import main

    model = request.getfixturevalue(TINY_FOR[name])
    monkeypatch.chdir(REPO)  # configs name their data relative to the repo root
    out = tmp_path / "run"
    args = ["train", "-c", str(EXAMPLES / name), "--model", str(model), "--output", str(out)]
    result = CliRunner().invoke(main, args + OVERRIDES)
    assert result.exit_code == 0, result.output
    assert (out / "adapters.safetensors").is_file()
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == load_config(EXAMPLES / name).get("fine_tune_type", "lora")
    records = _train_records(out)
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["loss"] > 0 for r in records)


def test_distributed_example_two_processes(tiny_llama: Path, tmp_path: Path):
    launcher = Path(sys.executable).parent / "mlx.launch"
    if not launcher.exists() and shutil.which("mlx.launch") is None:
        pytest.skip("mlx.launch not installed")
    launcher_cmd = str(launcher) if launcher.exists() else "mlx.launch"
    out = tmp_path / "run"
    port = str(_free_port())  # other runs on this machine may hold the default ports
    cmd = [launcher_cmd, "-n", "2", "--backend", "ring", "--starting-port", port]
    cmd += ["--env", "HF_HUB_OFFLINE=1", "--", sys.executable, "-m", "mlxsft"]
    cmd += ["train", "-c", str(EXAMPLES / "distributed.yaml"), "--model", str(tiny_llama)]
    cmd += ["--output", str(out), *OVERRIDES]
    from mlxsft.blas import preload_env

    env = dict(preload_env(), HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "2 rank(s)" in output
    assert [r["step"] for r in _train_records(out)] == [1, 2]
