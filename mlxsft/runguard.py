"""Guards of a run directory: the lock that keeps two `mlxsft train` out of one OUT, and the
resume fingerprint that keeps `--resume` from continuing with other settings or data.

    OUT/.lock                               RunLock: fcntl.flock held for the whole run, its pid
    OUT/checkpoints/step-N/fingerprint.json the settings + data hash a resume must match

Pure Python (no mlx). File names and atomic writes come from `mlxsft.rundir`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
import time
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

from mlxsft.errors import UserError
from mlxsft.rundir import CONFIG, FINGERPRINT, LOCK, run_of, writing

# ---------------------------------------------------------------- lock


class RunLock:
    """An advisory lock on OUT (fcntl.flock on OUT/.lock) held for the whole run.

    The kernel drops a flock when its process dies, so a lock left by `kill -9` is free again;
    the pid it still names tells us a run ended without cleaning up.
    """

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.path = self.out / LOCK
        self._file: IO[str] | None = None
        self._created_out = False
        self.stale: str | None = None  # what an earlier, killed run left in the lock file

    def acquire(self) -> RunLock:
        import fcntl

        with writing(self.path):
            if not self.out.exists():
                self.out.mkdir(parents=True)
                self._created_out = True
            f = self.path.open("a+", encoding="utf-8")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            raise UserError(
                f"{self.out} is in use by {holder}",
                hint="wait for that run to finish, or pass another --output",
            ) from None
        f.seek(0)
        self.stale = f.read().strip() or None
        f.seek(0)
        f.truncate()
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        f.write(f"mlxsft train (pid {os.getpid()} on {socket.gethostname()}, since {started})\n")
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        """Unlock; an empty lock file means 'ended cleanly'. A directory this lock created and
        nothing else used is removed again (a run that failed before writing anything)."""
        import fcntl

        if self._file is None:
            return
        self._file.seek(0)
        self._file.truncate()
        fcntl.flock(self._file, fcntl.LOCK_UN)
        self._file.close()
        self._file = None
        if self._created_out and [p.name for p in self.out.iterdir()] == [LOCK]:
            shutil.rmtree(self.out, ignore_errors=True)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


# ---------------------------------------------------------------- fingerprint

# TrainConfig fields that change what the optimizer does (not logging, eval or checkpointing).
FINGERPRINT_KEYS = (
    "model", "adapter", "fine_tune_type", "rank", "alpha", "dropout", "target_modules",
    "num_layers", "quantize", "template", "format", "train_on", "max_seq_len", "batch_size",
    "grad_accum", "learning_rate", "optimizer", "weight_decay", "lr_schedule", "warmup",
    "epochs", "iters", "seed", "max_grad_norm",
)  # fmt: skip


def hash_files(files: Iterable[Path]) -> str:
    """sha256 over the contents of `files` (in order)."""
    h = hashlib.sha256()
    for file in files:
        with open(file, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def fingerprint(settings: dict[str, Any], *, pack: bool, data_sha256: str) -> dict[str, Any]:
    """What must match for a resumed run to continue the same optimisation."""
    out = {k: settings.get(k) for k in FINGERPRINT_KEYS}
    for key in ("model", "adapter"):  # compare local paths, not how they were spelled
        if out[key] and Path(str(out[key])).exists():
            out[key] = str(Path(str(out[key])).resolve())
    return {**out, "pack": pack, "data_sha256": data_sha256}


def write_fingerprint(checkpoint: Path, fp: dict[str, Any]) -> None:
    (checkpoint / FINGERPRINT).write_text(json.dumps(fp, indent=1) + "\n", encoding="utf-8")


def check_fingerprint(checkpoint: Path, fp: dict[str, Any]) -> str | None:
    """Raise UserError with one line per setting that differs from the checkpoint's run; a
    checkpoint without a fingerprint (older mlxsft) returns a note instead."""
    path = checkpoint / FINGERPRINT
    if not path.is_file():
        return f"note: {checkpoint} has no {FINGERPRINT}; settings not checked against it"
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError("corrupt fingerprint", where=str(path)) from None
    diff = [k for k in fp if k in saved and saved[k] != fp[k]]
    if not diff:
        return None
    lines = [f"  {k}: {_show(k, saved[k])} in the checkpoint, {_show(k, fp[k])} now" for k in diff]
    raise UserError(
        f"cannot resume from {checkpoint}: {len(diff)} setting(s) differ from that run\n"
        + "\n".join(lines)
        + "\n  (resume with the checkpoint's settings, e.g. `mlxsft train -c "
        f"{run_of(checkpoint) or 'OUT'}/{CONFIG} --resume auto`, or start fresh in another "
        "--output)"
    )


def _show(key: str, value: Any) -> str:
    if key == "data_sha256":
        return f"data sha256 {str(value)[:12]}"
    return repr(value)
