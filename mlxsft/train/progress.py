"""Training progress: `metrics.jsonl` (one JSON line per step and per eval), a live status line
on a terminal (plain periodic lines otherwise), and the end-of-run summary.

metrics.jsonl records (keys are a contract with `mlxsft report`):
  {"type": "train", "step", "epoch", "loss", "lr", "trained_tokens", "tokens_per_sec",
   "peak_memory_gb", "elapsed_s", "grad_norm"}
  {"type": "eval", "step", "val_loss", "val_ppl", "val_tokens", "eval_s"}
  {"type": "gen_eval", "step", "exact_match", ...}   (train/gen_eval.py, with --eval-prompts)
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import mlx.core as mx

from mlxsft import rundir


def peak_memory_gb() -> float:
    """MLX's peak memory in GB of 2^30 bytes, the unit of `mlxsft plan` and of memory as sold."""
    return mx.get_peak_memory() / 2**30


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """Writes metrics and status lines; a no-op on ranks other than 0 (`enabled=False`)."""

    def __init__(
        self,
        out_dir: Path | None,
        *,
        total_steps: int,
        steps_per_epoch: int,
        every: int,
        resume_step: int = 0,
        stream: TextIO | None = None,
        enabled: bool = True,
        trackers: list[Any] | None = None,
    ):
        self.enabled = enabled
        self.trackers = list(trackers or [])  # train.trackers: get every record too
        self.stream = stream or sys.stderr
        self.live = enabled and self.stream.isatty()
        self.total, self.per_epoch, self.every = total_steps, steps_per_epoch, every
        self.file = None
        if enabled and out_dir is not None:
            self.file = rundir.open_metrics(out_dir, resume_step)
        self.window: list[tuple[float, int, float]] = []  # (loss, tokens, seconds) since report
        self.start_step = resume_step
        self.t0 = time.perf_counter()
        self._line_open = False

    def log(self, text: str) -> None:
        """A permanent line (ends the live line first)."""
        if not self.enabled:
            return
        if self._line_open:
            self.stream.write("\n")
            self._line_open = False
        self.stream.write(text + "\n")
        self.stream.flush()

    def _write(self, record: dict[str, Any]) -> None:
        if self.file is not None:
            with rundir.writing(self.file.name):
                self.file.write(json.dumps(record) + "\n")
                self.file.flush()
        for tracker in self.trackers:
            tracker.log(record)

    def train_step(self, record: dict[str, Any], seconds: float) -> None:
        if not self.enabled:
            return
        self._write({"type": "train", **record})
        self.window.append((record["loss"], record["step_tokens"], seconds))
        step = record["step"]
        if self.live:
            self._status(record, final=False)
        if step % self.every == 0 or step == self.total:
            if not self.live:
                self._status(record, final=True)
            self.window = []

    def _status(self, record: dict[str, Any], *, final: bool) -> None:
        step = record["step"]
        tokens = sum(w[1] for w in self.window)
        secs = sum(w[2] for w in self.window) or 1e-9
        loss = sum(w[0] * w[1] for w in self.window) / max(tokens, 1)
        done = step - self.start_step
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / max(done, 1) * (self.total - step)
        epoch = record.get("epoch", step / max(self.per_epoch, 1))
        text = (
            f"step {step}/{self.total}  epoch {epoch:.2f}  loss {loss:.4f}  "
            f"lr {record['lr']:.2e}  {tokens / secs:,.0f} tok/s  "
            f"peak {record['peak_memory_gb']:.2f} GB  ETA {_duration(eta)}"
        )
        if final:
            self.log(text)
        else:
            self.stream.write("\r\x1b[2K" + text)
            self.stream.flush()
            self._line_open = True

    def eval(
        self, step: int, val_loss: float, val_tokens: int, *, best: bool, seconds: float = 0.0
    ) -> None:
        """An evaluation record; `seconds`: the time it took (`eval_s`, so a reader can take
        evaluation out of `elapsed_s`)."""
        if not self.enabled:
            return
        ppl = math.exp(min(val_loss, 700.0))
        self._write(
            {
                "type": "eval",
                "step": step,
                "val_loss": val_loss,
                "val_ppl": ppl,
                "val_tokens": val_tokens,
                "eval_s": seconds,
            }
        )
        mark = "  (best)" if best else ""
        self.log(f"step {step}: val loss {val_loss:.4f}  ppl {ppl:.2f}  {val_tokens} tokens{mark}")

    def record(self, record: dict[str, Any], lines: list[str]) -> None:
        """Another kind of record (e.g. the generation eval's) and its printed lines."""
        if not self.enabled:
            return
        self._write(record)
        for line in lines:
            self.log(line)

    def close(self) -> None:
        if self._line_open:
            self.stream.write("\n")
            self._line_open = False
        if self.file is not None:
            self.file.close()
            self.file = None
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []
