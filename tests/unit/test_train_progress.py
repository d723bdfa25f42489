"""Progress output (live line on a TTY, periodic lines otherwise, metrics.jsonl) and checkpoint
discovery (only complete `step-N` directories count)."""

from __future__ import annotations

import io
import json

import pytest

from mlxsft.errors import UserError
from mlxsft.rundir import CHECKPOINT_FILES, find_resume, list_checkpoints
from mlxsft.train.progress import Progress


class _Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def _record(step: int) -> dict:
    return {"step": step, "epoch": step / 4, "loss": 2.0 / step, "lr": 1e-3, "trained_tokens": 10 * step,
            "step_tokens": 10, "tokens_per_sec": 100.0, "peak_memory_gb": 0.5, "elapsed_s": 0.1 * step}  # fmt: skip


@pytest.mark.parametrize("tty", [False, True])
def test_progress_lines_and_metrics(tmp_path, tty):
    stream = _Stream(tty)
    metrics = tmp_path / "metrics.jsonl"
    progress = Progress(tmp_path, total_steps=4, steps_per_epoch=4, every=2, stream=stream)
    for step in range(1, 5):
        progress.train_step(_record(step), 0.1)
    progress.eval(4, 0.5, 30, best=True, seconds=1.25)
    progress.close()
    text = stream.getvalue()
    if tty:  # one live line rewritten in place for every step
        assert text.count("\r\x1b[2K") == 4
    else:  # a plain line every 2 steps
        assert "\r" not in text
        assert [line.split()[1] for line in text.splitlines() if line.startswith("step ")][:2] == [
            "2/4",
            "4/4",
        ]
    assert "val loss 0.5000  ppl 1.65  30 tokens  (best)" in text
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["type"] for r in records] == ["train"] * 4 + ["eval"]
    assert records[-1] == {"type": "eval", "step": 4, "val_loss": 0.5, "val_ppl": pytest.approx(1.6487, abs=1e-4), "val_tokens": 30, "eval_s": 1.25}  # fmt: skip


def test_resume_truncates_metrics_after_the_checkpoint(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(
        "".join(json.dumps({"type": "train", "step": s}) + "\n" for s in range(1, 6))
    )
    Progress(tmp_path, total_steps=9, steps_per_epoch=9, every=1, resume_step=3,
             stream=_Stream(False)).close()  # fmt: skip
    assert [json.loads(x)["step"] for x in metrics.read_text().splitlines()] == [1, 2, 3]


def test_only_complete_checkpoints_are_resumed(tmp_path):
    root = tmp_path / "checkpoints"
    for name, complete in [("step-0000002", True), ("step-0000010", True),
                           ("step-0000012", False), (".tmp-step-0000014-99", True)]:  # fmt: skip
        (root / name).mkdir(parents=True)
        for file in CHECKPOINT_FILES if complete else ("state.json",):
            (root / name / file).write_text("{}")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000002", "step-0000010"]
    assert find_resume(tmp_path, "auto") == root / "step-0000010"
    assert find_resume(tmp_path, str(root / "step-0000002")) == root / "step-0000002"
    assert find_resume(tmp_path / "empty", "auto") is None
    with pytest.raises(UserError, match="not a checkpoint directory"):
        find_resume(tmp_path, str(tmp_path / "nowhere"))
