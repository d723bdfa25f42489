"""The run directory of `mlxsft train --output OUT`: the one module that names its files and
reads or writes them (but for the lock and the resume fingerprint: `mlxsft.runguard`). Pure
Python (no mlx), so `report`, `export` and `generate` read runs cheaply.

    OUT/.lock                     advisory lock (fcntl.flock) of the running `train`: its pid
    OUT/config.yaml               the resolved run config (never `resume`)
    OUT/metrics.jsonl             one JSON object per train step and per evaluation
    OUT/adapters.safetensors      the final adapter (also written on Ctrl-C) ...
    OUT/adapter_config.json       ... loadable by `mlx_lm.load(..., adapter_path=OUT)`
    OUT/best/                     the adapter of the lowest validation loss
    OUT/checkpoints/step-0000123/ adapters.safetensors, adapter_config.json,
                                  optimizer.safetensors, state.json, fingerprint.json

Every write is atomic: a hidden `.tmp-*` sibling is renamed into place, a replaced directory
is first moved to `.old-*`, a pruned one to `.del-*`. `clean_leftovers` finishes or undoes
what a killed run left behind, so a directory named `step-*` is always complete.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, TextIO

from mlxsft.errors import DataError, UserError

LOCK = ".lock"
CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
ADAPTER_WEIGHTS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
TOKEN_ROWS = "token_rows.safetensors"  # trained rows of added tokens (--add-chat-tokens), if any
# the tokenizer saved beside the adapter when --add-chat-tokens grew it
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "added_tokens.json")  # fmt: skip
BEST = "best"
CHECKPOINTS = "checkpoints"
OPTIMIZER = "optimizer.safetensors"
STATE = "state.json"
FINGERPRINT = "fingerprint.json"
CHECKPOINT_FILES = (ADAPTER_WEIGHTS, ADAPTER_CONFIG, OPTIMIZER, STATE)
KEEP_LAST = 3  # older regular checkpoints are pruned (full fine-tunes make big ones)

_STEP = re.compile(r"^step-(\d+)$")
_LEFTOVER = re.compile(r"^\.(tmp|old|del)-|\.tmp(\.|$)")
_OLD = re.compile(r"^\.old-(.+)-\d+$")


# ---------------------------------------------------------------- checkpoints


def checkpoint_dir(out: str | Path, step: int) -> Path:
    return Path(out) / CHECKPOINTS / f"step-{step:07d}"


def checkpoint_step(path: str | Path) -> int | None:
    """N of a `step-N` directory, else None."""
    m = _STEP.match(Path(path).name)
    return int(m.group(1)) if m else None


def is_checkpoint(path: str | Path) -> bool:
    return all((Path(path) / name).is_file() for name in CHECKPOINT_FILES)


def list_checkpoints(out: str | Path) -> list[Path]:
    """Complete checkpoints under OUT/checkpoints, oldest first."""
    root = Path(out) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(checkpoint_step(p), p) for p in root.iterdir() if checkpoint_step(p) is not None]
    return [p for _, p in sorted(found) if is_checkpoint(p)]


def find_resume(out: str | Path, spec: str | None) -> Path | None:
    """The checkpoint to resume from: `auto` = newest in OUT (None if there is none), or a given
    checkpoint directory (or a run directory, whose newest checkpoint is taken)."""
    if not spec:
        return None
    if spec == "auto":
        found = list_checkpoints(out)
        return found[-1] if found else None
    path = Path(spec)
    if is_checkpoint(path):
        return path
    found = list_checkpoints(path)
    if found:
        return found[-1]
    raise UserError(
        "not a checkpoint directory (no state.json) and no checkpoints inside it",
        where=str(path),
        hint="pass --resume auto, or OUT/checkpoints/step-N from an earlier run",
    )


def prune(out: str | Path, keep: int = KEEP_LAST) -> None:
    """Delete all but the newest `keep` checkpoints; each leaves `step-*` in one rename."""
    for path in list_checkpoints(out)[:-keep] if keep else list_checkpoints(out):
        remove_dir(path)


def remove_dir(path: Path) -> None:
    """Delete a directory so that it is gone at once (renamed to `.del-*` first)."""
    doomed = path.with_name(f".del-{path.name}-{os.getpid()}")
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def replace_dir(tmp: Path, final: Path) -> Path:
    """Move the complete directory `tmp` to `final`, replacing it; `final` is always either the
    old or the new one (a kill in between leaves `.old-*`, which `clean_leftovers` restores)."""
    if final.exists():
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    return final


def temp_dir(parent: Path, name: str) -> Path:
    """A fresh hidden `.tmp-NAME-PID` directory under `parent`."""
    tmp = parent / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def publish_adapter(tmp: Path, out: Path) -> None:
    """Install the adapter files written to `tmp` as OUT's top-level adapter.

    Two files cannot be renamed at once, so the old config goes first: a kill in between leaves
    weights without a config (refused, and removed by `clean_leftovers`), never new weights
    beside an old config of another rank or type.
    """
    (out / ADAPTER_CONFIG).unlink(missing_ok=True)
    if not (tmp / TOKEN_ROWS).is_file():
        (out / TOKEN_ROWS).unlink(missing_ok=True)  # an earlier adapter's
    for path in tmp.iterdir():
        if path.name != ADAPTER_CONFIG:
            os.replace(path, out / path.name)
    os.replace(tmp / ADAPTER_CONFIG, out / ADAPTER_CONFIG)
    shutil.rmtree(tmp, ignore_errors=True)


def clean_leftovers(out: str | Path) -> list[str]:
    """Finish or undo the writes of a killed run: restore a `.old-X` whose X is missing, delete
    other `.tmp-*`/`.old-*`/`.del-*` entries, and weights without their adapter config.
    Returns what was done, one line each."""
    out, done = Path(out), []
    for parent in (out, out / CHECKPOINTS):
        if not parent.is_dir():
            continue
        for path in sorted(parent.iterdir()):
            if not _LEFTOVER.search(path.name):
                continue
            m = _OLD.match(path.name)
            if m and path.is_dir() and not (parent / m.group(1)).exists():
                os.rename(path, parent / m.group(1))
                done.append(f"restored {parent / m.group(1)} (a replacement was interrupted)")
                continue
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            done.append(f"removed {path} (left by an interrupted write)")
    if (out / ADAPTER_WEIGHTS).is_file() and not (out / ADAPTER_CONFIG).is_file():
        (out / ADAPTER_WEIGHTS).unlink()
        done.append(f"removed {out / ADAPTER_WEIGHTS} (its adapter_config.json was never written)")
    return done


# ---------------------------------------------------------------- write errors

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_NO_PERMISSION = (errno.EACCES, errno.EPERM, errno.EROFS)


def write_error(
    exc: OSError, path: str | Path, n_bytes: int | None = None, *, run: bool = True
) -> UserError | None:
    """A full disk or a permission problem as one line naming the path (and the bytes needed);
    None for other errors (they are bugs, not the user's). `run`: writing a run directory."""
    where = str(exc.filename or path)
    if exc.errno in _NO_SPACE:
        try:
            free = shutil.disk_usage(Path(path).parent if Path(path).parent.exists() else ".")
            have = f"; {_size(free.free)} free"
        except OSError:
            have = ""
        need = f" (needs about {_size(n_bytes)}{have})" if n_bytes else ""
        if not run:
            return UserError(f"no space left on the device{need}", where=where,
                             hint="free some space or write somewhere else")  # fmt: skip
        return UserError(
            f"no space left on the device{need}; the files written before are intact",
            where=where,
            hint="free some space (or pass another --output), then resume with --resume auto",
        )
    if exc.errno in _NO_PERMISSION:
        return UserError(
            f"cannot write here: {os.strerror(exc.errno or 0).lower()}"
            if run
            else os.strerror(exc.errno or 0).lower(),
            where=where,
            hint="pass a writable --output" if run else "check the path and its permissions",
        )
    return None


def _size(n: int | None) -> str:
    n = n or 0
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n} bytes"


class writing:  # noqa: N801  (used like a function: `with writing(path, n_bytes):`)
    """Turn a full disk or a permission error inside the block into `write_error`'s one line;
    `cleanup` (a half-written temp path) is removed first, so nothing half-written remains."""

    def __init__(self, path: str | Path, n_bytes: int | None = None, cleanup: Path | None = None):
        self.path, self.n_bytes, self.cleanup = path, n_bytes, cleanup

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> bool:
        if exc is None:
            return False
        if self.cleanup is not None:
            shutil.rmtree(self.cleanup, ignore_errors=True)
        if isinstance(exc, OSError) and (error := write_error(exc, self.path, self.n_bytes)):
            raise error from None
        return False


# ---------------------------------------------------------------- config.yaml


def write_config(out: str | Path, values: dict[str, Any]) -> Path:
    """OUT/config.yaml from a config dict, atomically. `resume` is a way of starting a run,
    not a setting of it, so it is never recorded (re-running the file must not resume)."""
    import yaml

    path = Path(out) / CONFIG
    values = {k: v for k, v in values.items() if k != "resume"}
    with writing(path):
        atomic_write_text(path, yaml.safe_dump(values, sort_keys=False))
    return path


def read_config(run: str | Path | None) -> dict[str, Any]:
    """The run's config.yaml as a dict ({} if RUN has none, or it is not a mapping)."""
    path = run_of(run) if run is not None else None
    if path is None:
        return {}
    import yaml

    try:
        data = yaml.safe_load((path / CONFIG).read_text(encoding="utf-8"))
    except (yaml.YAMLError, OSError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def run_of(path: str | Path) -> Path | None:
    """The run directory a path belongs to (OUT itself, OUT/best, OUT/checkpoints/step-N), if
    it has a config.yaml."""
    path = Path(path)
    for d in (path, path.parent, path.parent.parent):
        if (d / CONFIG).is_file():
            return d
        if d.name not in (BEST, CHECKPOINTS) and checkpoint_step(d) is None:
            break
    return None


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ---------------------------------------------------------------- metrics.jsonl


def metrics_path(run: str | Path) -> Path:
    """The metrics file of RUN (a run directory or the metrics.jsonl file itself)."""
    path = Path(run)
    if path.is_dir():
        path = path / METRICS
        if not path.is_file():
            raise UserError(
                f"{run}: no {METRICS} in this directory",
                hint="pass the output directory of `mlxsft train` (its --output/adapter_path)",
            )
    elif not path.exists():
        raise FileNotFoundError(f"{run}: no such file or directory")
    return path


def read_metrics(run: str | Path, *, strict: bool = True) -> list[dict[str, Any]]:
    """All records of RUN's metrics.jsonl in file order. A bad line raises DataError(file:line)
    (`strict`) or is skipped; a partial last line (a live or killed run) is always skipped."""
    path = metrics_path(run)
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    records = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if n == len(lines) or not strict:
                continue
            raise DataError(f"not valid JSON ({exc.msg})", where=f"{path}:{n}") from None
        if not isinstance(record, dict) or "step" not in record:
            if not strict:
                continue
            raise DataError("expected an object with a 'step'", where=f"{path}:{n}")
        records.append(record)
    return records


def open_metrics(out: str | Path, resume_step: int) -> TextIO:
    """Open OUT/metrics.jsonl for appending; on resume drop lines past the resumed step (they
    are about to be trained again), on a fresh run start empty."""
    path = Path(out) / METRICS
    keep: list[str] = []
    if resume_step > 0 and path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= resume_step:
                    keep.append(line)
            except (json.JSONDecodeError, AttributeError):
                continue
    with writing(path):
        atomic_write_text(path, "".join(f"{line}\n" for line in keep))
        return path.open("a", encoding="utf-8")


# ---------------------------------------------------------------- adapters


def resolve_adapter(path: str | Path) -> tuple[Path, str | None]:
    """An adapter directory for `--adapter PATH`: PATH itself when it holds an adapter (a run's
    top-level adapter, best/, a checkpoint), else the newest checkpoint of the run dir PATH
    (with a one-line note saying so)."""
    path = Path(path)
    if (path / ADAPTER_CONFIG).is_file() or not path.is_dir():
        return path, None
    found = list_checkpoints(path)
    if not found:
        return path, None
    note = (
        f"note: {path} has no final adapter (interrupted run?); "
        f"using its latest checkpoint {found[-1]}"
    )
    return found[-1], note
