"""`mlxsft report`: metrics.jsonl reading, terminal chart shape, PNG size."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlxsft import report as rep
from mlxsft import rundir
from mlxsft.errors import DataError, UserError

REPO = Path(__file__).resolve().parents[2]
# A real metrics.jsonl written by `mlxsft train` during the demo (see docs/demo.md).
REAL_RUN = REPO / "examples" / "sample-run"


def _train(step: int, loss: float, lr: float = 1e-3, tps: float = 1000.0) -> dict:
    return {
        "type": "train", "step": step, "epoch": 0.0, "loss": loss, "lr": lr,
        "trained_tokens": 100 * step, "tokens_per_sec": tps, "peak_memory_gb": 0.5,
        "elapsed_s": 0.5 * step,
    }  # fmt: skip


def _eval(step: int, val_loss: float) -> dict:
    return {"type": "eval", "step": step, "val_loss": val_loss, "val_ppl": 2.0, "val_tokens": 10}


def _write(path: Path, records: list[dict], tail: str = "") -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return path


def _plot_rows(chart: str) -> list[str]:
    return [line.split("│", 1)[1] for line in chart.splitlines() if "│" in line]


def test_chart_shape_and_levels():
    metrics = [_train(s, loss=float(10 - s)) for s in range(1, 11)]  # 9 .. 0, falling
    metrics += [_eval(5, 2.0), _eval(10, 1.0)]
    chart = rep.render_terminal_chart(metrics, width=10, height=3)
    rows = _plot_rows(chart)
    assert len(rows) == 4 * 3  # four panels, three rows each
    assert all(len(r) == 10 for r in rows)
    loss = rows[0:3]
    # Falling loss: the first column is full in every row, the last has only the bottom eighth.
    assert [r[0] for r in loss] == ["█", "█", "█"]
    assert [r[-1] for r in loss] == [" ", " ", "▁"]
    val = rows[3:6]
    # Val loss measured at steps 5 and 10 only: blank before the first measurement.
    assert val[2][:4] == "    " and val[2][4] != " " and val[0][4] == "█"
    lr = rows[6:9]  # constant: one eighth everywhere
    assert lr[2] == "▁" * 10 and lr[0] == " " * 10
    lines = chart.splitlines()
    assert lines[0] == "run: step 10, 1,000 trained tokens, 5.0 s, peak memory 0.50 GB"
    assert lines[1].startswith("train loss: first 9  last 0  min 0  max 9")
    assert lines[-1].split() == ["step", "1", "10"]


def test_loss_spanning_decades_is_log_scaled():
    metrics = [_train(s, loss=10.0 ** (1 - s)) for s in range(1, 5)]  # 1, 0.1, 0.01, 0.001
    chart = rep.render_terminal_chart(metrics, width=4, height=1)
    assert "train loss: first 1  last 0.001  min 0.001  max 1  (log scale)" in chart
    assert _plot_rows(chart)[0] == "█▆▃▁"  # even steps on a log axis (levels 8, 6, 3, 1)


def test_chart_without_eval_and_empty():
    chart = rep.render_terminal_chart([_train(1, 2.0), _train(2, 1.0)], width=4, height=2)
    assert "val loss: no data" in chart
    assert len(_plot_rows(chart)) == 3 * 2
    assert rep.render_terminal_chart([]) == "no metrics recorded yet"
    with pytest.raises(UserError):
        rep.render_terminal_chart([_train(1, 1.0)], width=1)


def test_read_metrics_errors(tmp_path: Path):
    path = _write(tmp_path / "metrics.jsonl", [_train(1, 1.0)], tail='{"type": "tr')
    assert len(rundir.read_metrics(tmp_path)) == 1  # partial last line of a live run: skipped
    _write(path, [_train(1, 1.0)], tail='{"bad\n' + json.dumps(_train(2, 1.0)) + "\n")
    with pytest.raises(DataError, match=r"metrics.jsonl:2: not valid JSON"):
        rundir.read_metrics(path)
    with pytest.raises(UserError, match="no metrics.jsonl"):
        rundir.read_metrics(tmp_path / "..")
    with pytest.raises(FileNotFoundError):
        rundir.read_metrics(tmp_path / "missing")


def test_cli_terminal_only_and_error(tmp_path: Path, monkeypatch):
    _write(tmp_path / "metrics.jsonl", [_train(1, 2.0), _train(2, 1.0), _eval(2, 1.5)])
    monkeypatch.setattr(rep, "have_matplotlib", lambda: False)
    from mlxsft.cli import main

    result = CliRunner().invoke(main, ["report", str(tmp_path), "--width", "8"])
    assert result.exit_code == 0, result.output
    assert "train loss: first 2" in result.output and "wrote" not in result.output
    result = CliRunner().invoke(main, ["report", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "no such file" in result.output


def test_png_from_real_metrics(tmp_path: Path):
    pytest.importorskip("matplotlib")
    if not (REAL_RUN / "metrics.jsonl").is_file():
        pytest.skip("no recorded run in examples/sample-run")
    metrics = rundir.read_metrics(REAL_RUN)
    assert {r["type"] for r in metrics} == {"train", "eval"}
    out = rep.render_png(metrics, tmp_path / "r.png", size=(900, 600))
    head = out.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", head[16:24]) == (900, 600)
