"""Checkpoints: everything needed to continue a run exactly, written atomically.

A checkpoint is a directory `OUT/checkpoints/step-0000123/` holding
  adapters.safetensors + adapter_config.json   trainable weights (loadable as an adapter dir)
  optimizer.safetensors                        tree_flatten(optimizer.state), incl. its step
  state.json                                   step, data cursor (epoch, batch index), token
                                               count, best val loss, MLX RNG state
It is built in a hidden temp directory and renamed into place, so a directory named `step-*` is
always complete; a crash mid-write leaves only a `.tmp-*` directory that resume ignores.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten

from mlxsft.errors import UserError

CHECKPOINTS = "checkpoints"
KEEP_LAST = 3  # older regular checkpoints are pruned (full fine-tunes make big ones)
_NAME = re.compile(r"^step-(\d+)$")


@dataclass
class TrainState:
    """Where a run is: `step` optimizer updates done; the next batch is (epoch, batch_index)."""

    step: int = 0
    epoch: int = 0
    batch_index: int = 0
    trained_tokens: int = 0
    elapsed_s: float = 0.0
    best_val_loss: float | None = None
    best_step: int | None = None
    mx_key: list[int] = field(default_factory=list)  # mx.random.state[0] as two uint32 words


def rng_key() -> list[int]:
    """The current MLX global PRNG key."""
    return [int(x) for x in mx.random.state[0].tolist()]


def set_rng_key(key: list[int]) -> None:
    """Restore the MLX global PRNG key: `mx.random.seed(s)` sets the key to s's two 32-bit words."""
    hi, lo = key
    mx.random.seed((hi << 32) | lo)


def save_checkpoint(
    out_dir: str | Path,
    model: nn.Module,
    optimizer: optim.Optimizer,
    adapter_config: dict[str, Any],
    state: TrainState,
) -> Path:
    """Write `OUT/checkpoints/step-N/` atomically (temp dir + rename); prune old ones."""
    from mlxsft.model.lora import save_adapters

    root = Path(out_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state.step:07d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_adapters(model, tmp, adapter_config)
    opt_state = dict(tree_flatten(optimizer.state))
    mx.save_safetensors(str(tmp / "optimizer.safetensors"), opt_state)
    state.mx_key = rng_key()
    (tmp / "state.json").write_text(json.dumps(asdict(state), indent=1) + "\n")
    if final.exists():  # the same step saved twice (e.g. Ctrl-C right after a save)
        old = root / f".old-{final.name}-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)
    _prune(root)
    return final


def _prune(root: Path) -> None:
    for path in list_checkpoints(root.parent)[:-KEEP_LAST]:
        shutil.rmtree(path, ignore_errors=True)


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints under OUT/checkpoints, oldest first."""
    root = Path(out_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in root.iterdir()
        if (m := _NAME.match(p.name)) and (p / "state.json").is_file()
    ]
    return [p for _, p in sorted(found)]


def find_resume(out_dir: str | Path, spec: str | None) -> Path | None:
    """The checkpoint to resume from: `auto` = newest in OUT (None if there is none), or a given
    checkpoint directory (or a run directory, whose newest checkpoint is taken)."""
    if not spec:
        return None
    if spec == "auto":
        found = list_checkpoints(out_dir)
        return found[-1] if found else None
    path = Path(spec)
    if (path / "state.json").is_file():
        return path
    found = list_checkpoints(path)
    if found:
        return found[-1]
    raise UserError(
        "not a checkpoint directory (no state.json) and no checkpoints inside it",
        where=str(path),
        hint="pass --resume auto, or OUT/checkpoints/step-N from an earlier run",
    )


def load_checkpoint(path: str | Path, model: nn.Module, optimizer: optim.Optimizer) -> TrainState:
    """Load weights + optimizer state into `model`/`optimizer` and restore the MLX RNG key.

    Call before compiling the train step: the optimizer state is updated in place so any
    compiled function that captured `optimizer.state` sees it too.
    """
    path = Path(path)
    from mlxsft.model.lora import read_adapter_weights

    weights = read_adapter_weights(path)
    expected = dict(tree_flatten(model.trainable_parameters()))
    if set(weights) != set(expected) or any(weights[k].shape != expected[k].shape for k in weights):
        raise UserError(
            "checkpoint does not match this model and adapter settings",
            where=str(path),
            hint="resume with the same --model, --fine-tune-type, --rank, --target-modules",
        )
    model.load_weights(list(weights.items()), strict=False)
    optimizer.init(model.trainable_parameters())
    opt_state = tree_unflatten(list(mx.load(str(path / "optimizer.safetensors")).items()))
    optimizer.state.update(opt_state)
    mx.eval(model.parameters(), optimizer.state)
    raw = json.loads((path / "state.json").read_text())
    raw.pop("np_rng", None)  # older checkpoints saved an (unused) NumPy RNG state
    state = TrainState(**raw)
    if state.mx_key:
        set_rng_key(state.mx_key)
    return state


def save_best(out_dir: str | Path, model: nn.Module, adapter_config: dict[str, Any]) -> Path:
    """Replace OUT/best/ (adapter of the lowest validation loss so far) atomically."""
    from mlxsft.model.lora import save_adapters

    out = Path(out_dir)
    tmp = out / f".tmp-best-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    save_adapters(model, tmp, adapter_config)
    best = out / "best"
    if best.exists():
        old = out / f".old-best-{os.getpid()}"
        os.rename(best, old)
        os.rename(tmp, best)
        shutil.rmtree(old)
    else:
        os.rename(tmp, best)
    return best
