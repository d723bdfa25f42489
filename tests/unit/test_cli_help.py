"""`mlxsft --help` stays fast: no mlx, mlx-lm or transformers import to list the commands."""

from __future__ import annotations

import os
import subprocess
import sys
import time

HEAVY = ("mlx", "mlx_lm", "transformers", "torch", "tokenizers", "huggingface_hub")


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1"}


def test_help_imports_nothing_heavy():
    code = (
        "import sys, mlxsft.cli\n"
        "try:\n"
        "    mlxsft.cli.main(['--help'], prog_name='mlxsft')\n"
        "except SystemExit:\n"
        "    pass\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=_env()
    )
    assert "Usage: mlxsft" in out.stdout
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_help_is_fast():
    """Best of three runs, so a busy machine does not make this flaky."""
    times = []
    for _ in range(3):
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "mlxsft", "--help"],
            capture_output=True,
            check=True,
            env=_env(),
        )
        times.append(time.perf_counter() - start)
    assert min(times) < 0.5, f"mlxsft --help took {min(times):.2f}s"
