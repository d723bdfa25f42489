"""`--report-to tensorboard|wandb`: the same records as metrics.jsonl, read back from what each
library wrote (TensorBoard event files; W&B's offline run). Skipped when a library is absent."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlxsft.cli import main


def _data(tmp_path: Path) -> Path:
    rows = [
        {"messages": [{"role": "user", "content": f"q {i}"}, {"role": "assistant", "content": f"a {i}"}]}
        for i in range(8)
    ]  # fmt: skip
    data = tmp_path / "data"
    data.mkdir()
    for split, part in (("train", rows), ("valid", rows[:2])):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    return data


def _train(model: Path, tmp_path: Path, report_to: str) -> tuple[Path, list[dict]]:
    out = tmp_path / "run"
    args = ["train", "-m", model, "-d", _data(tmp_path), "-o", out, "--iters", "4",
            "--batch-size", "2", "--max-seq-len", "32", "--eval-every", "2",
            "--report-to", report_to]  # fmt: skip
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return out, records


def _tb_scalars(logdir: Path) -> dict[tuple[str, int], float]:
    """(tag, step) -> value from TFRecord event files (length, crc, Event proto, crc)."""
    from tensorboardX.proto.event_pb2 import Event

    values = {}
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data, i = path.read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i : i + 8])
            event = Event.FromString(data[i + 12 : i + 12 + n])
            i += 12 + n + 4
            for v in event.summary.value:
                if v.WhichOneof("value") == "simple_value":  # not the config text
                    values[(v.tag, event.step)] = v.simple_value
    return values


def test_tensorboard_gets_the_metrics_jsonl_records(tiny_llama, tmp_path):
    pytest.importorskip("tensorboardX")
    out, records = _train(tiny_llama, tmp_path, "tensorboard")
    scalars = _tb_scalars(out / "tensorboard")
    expected = {
        (f"{r['type']}/{k}", r["step"]): v
        for r in records
        for k, v in r.items()
        if k not in ("type", "step") and isinstance(v, (int, float))
    }
    assert [r["step"] for r in records if r["type"] == "eval"] == [0, 2, 4]
    assert set(scalars) == set(expected)
    for key, value in expected.items():
        assert scalars[key] == pytest.approx(value, rel=1e-6), key  # stored as float32


def _wandb_history(run_file: Path) -> dict[int, dict] | None:
    """step -> logged values, from the records of an offline `.wandb` file (LevelDB log format:
    a 7-byte file header, then records of crc32, length, type in 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2

    data, i, buf, history = run_file.read_bytes(), 7, b"", {}
    while i + 7 <= len(data):
        if 32768 - i % 32768 < 7:  # block trailer padding
            i += 32768 - i % 32768
            continue
        _, n, kind = struct.unpack("<IHB", data[i : i + 7])
        chunk, i = data[i + 7 : i + 7 + n], i + 7 + n
        buf = chunk if kind in (1, 2) else buf + chunk  # full/first, or middle/last
        if kind not in (1, 4):
            continue
        record = wandb_internal_pb2.Record.FromString(buf)
        if record.WhichOneof("record_type") == "history":
            items = {
                it.key or "/".join(it.nested_key): json.loads(it.value_json)
                for it in record.history.item
            }
            history.setdefault(record.history.step.num, {}).update(items)
        if record.WhichOneof("record_type") == "exit":
            return history
    return None  # not closed yet


def _wandb_history_when_closed(run_file: Path) -> dict[int, dict]:
    """wandb's service may still be writing after `finish()` returns: wait for its exit record."""
    import time

    for _ in range(120):
        history = _wandb_history(run_file)
        if history is not None:
            return history
        time.sleep(0.5)
    raise AssertionError(f"{run_file}: no exit record after 60 s")


def test_wandb_offline_run_gets_the_metrics_jsonl_records(tiny_llama, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out, records = _train(tiny_llama, tmp_path, "wandb")
    (run_file,) = (out / "wandb").glob("offline-run-*/*.wandb")
    history = _wandb_history_when_closed(run_file)
    assert sorted(history) == [0, 1, 2, 3, 4]
    for r in records:
        for key, value in r.items():
            if key not in ("type", "step") and isinstance(value, (int, float)):
                assert history[r["step"]][f"{r['type']}/{key}"] == pytest.approx(value, rel=1e-12)


def test_unknown_tracker_and_missing_package_are_one_line_errors(tiny_llama, tmp_path, monkeypatch):
    result = CliRunner().invoke(
        main, ["train", "-m", str(tiny_llama), "-d", "x", "--report-to", "mlflow"]
    )
    assert result.exit_code == 2 and "invalid report_to 'mlflow'" in result.output
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "wandb" else real(n, *a)
    )
    result = CliRunner().invoke(
        main, ["train", "-m", str(tiny_llama), "-d", str(_data(tmp_path)), "--report-to", "wandb"]
    )
    assert result.exit_code == 2 and "pip install 'mlxsft[wandb]'" in result.output
