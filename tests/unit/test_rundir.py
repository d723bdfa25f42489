"""The run directory: lock, fingerprint, leftovers of killed writes, config/metrics/adapters."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlxsft import rundir, runguard
from mlxsft.errors import UserError

_HOLD = textwrap.dedent(
    """
    import sys, time
    from mlxsft.runguard import RunLock
    lock = RunLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    time.sleep(60)
    """
)


def _holder(out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(out)], stdout=subprocess.PIPE, text=True, env=env
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_busy_output_is_refused_naming_the_other_process(tmp_path):
    out = tmp_path / "run"
    proc = _holder(out)
    try:
        with pytest.raises(UserError, match=rf"in use by mlxsft train \(pid {proc.pid} "):
            runguard.RunLock(out).acquire()
        from mlxsft.cli import main

        args = ["train", "-m", "nowhere", "-d", "nothing.jsonl", "-o", str(out)]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and f"pid {proc.pid}" in lines[0], result.output
    finally:
        proc.kill()
        proc.wait()


def test_lock_left_by_kill_9_is_detected_and_taken_over(tmp_path):
    out = tmp_path / "run"
    proc = _holder(out)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with runguard.RunLock(out) as lock:
        assert f"pid {proc.pid}" in lock.stale
    with runguard.RunLock(out) as lock:  # released cleanly last time: nothing stale
        assert lock.stale is None


def test_lock_of_a_run_that_wrote_nothing_leaves_no_directory(tmp_path):
    with runguard.RunLock(tmp_path / "new"):
        pass
    assert not (tmp_path / "new").exists()
    (tmp_path / "kept").mkdir()
    with runguard.RunLock(tmp_path / "kept"):
        pass
    assert (tmp_path / "kept").is_dir()


def _checkpoint(out: Path, step: int) -> Path:
    path = rundir.checkpoint_dir(out, step)
    path.mkdir(parents=True)
    for name in rundir.CHECKPOINT_FILES:
        (path / name).write_text(str(step))
    return path


def test_leftovers_of_killed_writes_are_finished_or_removed(tmp_path):
    out = tmp_path
    _checkpoint(out, 2)
    half_pruned = _checkpoint(out, 1)
    (half_pruned / rundir.ADAPTER_WEIGHTS).unlink()  # a kill during an old-style prune
    (out / "checkpoints" / ".tmp-step-0000003-77").mkdir()
    (out / "checkpoints" / ".del-step-0000000-77").mkdir()
    (out / ".old-best-77").mkdir()  # replacing best/ was killed between the two renames
    (out / ".old-best-77" / rundir.ADAPTER_WEIGHTS).write_text("best")
    (out / ".tmp-best-77").mkdir()
    (out / ".config.yaml.tmp").write_text("x")
    (out / rundir.ADAPTER_WEIGHTS).write_text("new")  # final write killed before its config
    done = rundir.clean_leftovers(out)
    assert len(done) == 6
    assert sorted(p.name for p in out.iterdir()) == ["best", "checkpoints"]
    assert (out / "best" / rundir.ADAPTER_WEIGHTS).read_text() == "best"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step-0000001",
        "step-0000002",
    ]
    assert [p.name for p in rundir.list_checkpoints(out)] == ["step-0000002"]  # 1 is incomplete


def test_prune_and_replace_are_single_renames(tmp_path):
    for step in range(1, 6):
        _checkpoint(tmp_path, step)
    rundir.prune(tmp_path, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step-0000004",
        "step-0000005",
    ]
    tmp = rundir.temp_dir(tmp_path, "best")
    (tmp / "a").write_text("1")
    rundir.replace_dir(tmp, tmp_path / "best")
    tmp = rundir.temp_dir(tmp_path, "best")
    (tmp / "a").write_text("2")
    rundir.replace_dir(tmp, tmp_path / "best")
    assert (tmp_path / "best" / "a").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "checkpoints"]


def test_publish_adapter_never_pairs_new_weights_with_an_old_config(tmp_path, monkeypatch):
    (tmp_path / rundir.ADAPTER_WEIGHTS).write_text("rank 4")
    (tmp_path / rundir.ADAPTER_CONFIG).write_text("rank 4")
    tmp = rundir.temp_dir(tmp_path, "adapter")
    (tmp / rundir.ADAPTER_WEIGHTS).write_text("rank 8")
    (tmp / rundir.ADAPTER_CONFIG).write_text("rank 8")
    real = os.replace

    def killed_after_weights(src, dst):
        real(src, dst)
        if Path(dst).name == rundir.ADAPTER_WEIGHTS:
            raise KeyboardInterrupt  # stands in for kill -9 between the two renames

    monkeypatch.setattr(rundir.os, "replace", killed_after_weights)
    with pytest.raises(KeyboardInterrupt):
        rundir.publish_adapter(tmp, tmp_path)
    monkeypatch.setattr(rundir.os, "replace", real)
    assert not (tmp_path / rundir.ADAPTER_CONFIG).exists()  # never rank 8 beside rank 4
    rundir.clean_leftovers(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def _fp(**kw) -> dict:
    settings = {"model": "m", "batch_size": 4, "iters": 10, "rank": 8, **kw}
    return runguard.fingerprint(settings, pack=True, data_sha256=kw.get("data", "aa" * 32))


def test_fingerprint_mismatch_lists_every_differing_setting(tmp_path):
    ckpt = _checkpoint(tmp_path, 3)
    runguard.write_fingerprint(ckpt, _fp())
    assert runguard.check_fingerprint(ckpt, _fp()) is None
    with pytest.raises(UserError) as info:
        runguard.check_fingerprint(ckpt, _fp(batch_size=8, iters=20, data="bb" * 32))
    lines = str(info.value).splitlines()
    assert "3 setting(s) differ" in lines[0]
    assert lines[1:4] == [
        "  batch_size: 4 in the checkpoint, 8 now",
        "  iters: 10 in the checkpoint, 20 now",
        "  data_sha256: data sha256 aaaaaaaaaaaa in the checkpoint, data sha256 bbbbbbbbbbbb now",
    ]
    (ckpt / rundir.FINGERPRINT).unlink()  # an older mlxsft's checkpoint: a note, not an error
    assert "not checked" in runguard.check_fingerprint(ckpt, _fp(batch_size=8))


def test_config_never_records_resume_and_is_found_from_any_adapter(tmp_path):
    rundir.write_config(tmp_path, {"model": "m", "template": "chatml", "resume": "auto"})
    assert "resume" not in (tmp_path / rundir.CONFIG).read_text()
    ckpt = _checkpoint(tmp_path, 5)
    (tmp_path / "best").mkdir()
    for where in (tmp_path, ckpt, tmp_path / "best"):
        assert rundir.read_config(where) == {"model": "m", "template": "chatml"}
    assert rundir.read_config(tmp_path / "elsewhere") == {}


def test_adapter_of_a_run_dir_is_its_final_one_else_its_newest_checkpoint(tmp_path):
    _checkpoint(tmp_path, 2)
    newest = _checkpoint(tmp_path, 4)
    path, note = rundir.resolve_adapter(tmp_path)
    assert path == newest and note.count("\n") == 0 and str(newest) in note
    (tmp_path / rundir.ADAPTER_CONFIG).write_text("{}")
    assert rundir.resolve_adapter(tmp_path) == (tmp_path, None)
    assert rundir.resolve_adapter(newest) == (newest, None)


def test_metrics_are_reopened_at_the_resumed_step(tmp_path):
    rows = [{"type": "train", "step": s} for s in range(1, 6)]
    (tmp_path / rundir.METRICS).write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"ty')
    rundir.open_metrics(tmp_path, 3).close()
    assert [r["step"] for r in rundir.read_metrics(tmp_path)] == [1, 2, 3]
