"""Checkpoints: everything needed to continue a run exactly, written atomically.

A checkpoint is a directory `OUT/checkpoints/step-0000123/` holding
  adapters.safetensors + adapter_config.json   trainable weights (loadable as an adapter dir)
  optimizer.safetensors                        tree_flatten(optimizer.state), incl. its step
  state.json                                   step, data cursor (epoch, batch index), token
                                               count, best val loss, MLX RNG state
  fingerprint.json                             the settings + data hash resume must match
It is built in a hidden temp directory and renamed into place (`mlxsft.rundir` names the files
and owns the atomic moves), so a directory named `step-*` is always complete.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten

from mlxsft import rundir, runguard
from mlxsft.errors import UserError


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
    fingerprint: dict[str, Any] | None = None,
    *,
    prune: bool = True,
) -> Path:
    """Write `OUT/checkpoints/step-N/` atomically (temp dir + rename); prune old ones."""
    from mlxsft.model.lora import save_adapters

    final = rundir.checkpoint_dir(out_dir, state.step)
    opt_state = dict(tree_flatten(optimizer.state))
    n_bytes = _nbytes(model.trainable_parameters()) + _nbytes(opt_state)
    with rundir.writing(final, n_bytes):
        tmp = rundir.temp_dir(final.parent, final.name)
    with rundir.writing(final, n_bytes, cleanup=tmp):
        save_adapters(model, tmp, adapter_config)
        with open(tmp / rundir.OPTIMIZER, "wb") as f:
            mx.save_safetensors(f, opt_state)
        state.mx_key = rng_key()
        if fingerprint is not None:
            runguard.write_fingerprint(tmp, fingerprint)
        (tmp / rundir.STATE).write_text(json.dumps(asdict(state), indent=1) + "\n")
    rundir.replace_dir(tmp, final)  # the same step saved twice: e.g. Ctrl-C right after a save
    if prune:
        rundir.prune(out_dir)
    return final


def load_checkpoint(path: str | Path, model: nn.Module, optimizer: optim.Optimizer) -> TrainState:
    """Load weights + optimizer state into `model`/`optimizer` and restore the MLX RNG key.

    Call before compiling the train step: the optimizer state is updated in place so any
    compiled function that captured `optimizer.state` sees it too.
    """
    from mlxsft.model.files import check_safetensors

    path = Path(path)
    from mlxsft.model.lora import read_adapter_weights

    check_safetensors(path / rundir.OPTIMIZER)
    weights = read_adapter_weights(path)  # checks its files too
    expected = dict(tree_flatten(model.trainable_parameters()))
    if set(weights) != set(expected) or any(weights[k].shape != expected[k].shape for k in weights):
        raise UserError(
            "checkpoint does not match this model and adapter settings",
            where=str(path),
            hint="resume with the same --model, --fine-tune-type, --rank, --target-modules",
        )
    model.load_weights(list(weights.items()), strict=False)
    optimizer.init(model.trainable_parameters())
    opt_state = tree_unflatten(list(mx.load(str(path / rundir.OPTIMIZER)).items()))
    optimizer.state.update(opt_state)
    mx.eval(model.parameters(), optimizer.state)
    raw = json.loads((path / rundir.STATE).read_text())
    raw.pop("np_rng", None)  # older checkpoints saved an (unused) NumPy RNG state
    state = TrainState(**raw)
    if state.mx_key:
        set_rng_key(state.mx_key)
    return state


def all_finite(model: nn.Module) -> bool:
    """Whether every trainable weight is finite (checked before anything is saved)."""
    leaves = [v for _, v in tree_flatten(model.trainable_parameters())]
    ok = [mx.all(mx.isfinite(v)) for v in leaves if mx.issubdtype(v.dtype, mx.floating)]
    return bool(mx.all(mx.stack(ok)).item()) if ok else True


def save_best(out_dir: str | Path, model: nn.Module, adapter_config: dict[str, Any]) -> Path:
    """Replace OUT/best/ (adapter of the lowest validation loss so far) atomically."""
    from mlxsft.model.lora import save_adapters

    out = Path(out_dir)
    with rundir.writing(out / rundir.BEST, _nbytes(model.trainable_parameters())):
        tmp = rundir.temp_dir(out, rundir.BEST)
    with rundir.writing(out / rundir.BEST, _nbytes(model.trainable_parameters()), cleanup=tmp):
        save_adapters(model, tmp, adapter_config)
    return rundir.replace_dir(tmp, out / rundir.BEST)


def save_final(out_dir: str | Path, model: nn.Module, adapter_config: dict[str, Any]) -> Path:
    """Write OUT's top-level adapter; weights and config never disagree (see rundir)."""
    from mlxsft.model.lora import save_adapters

    out = Path(out_dir)
    n_bytes = _nbytes(model.trainable_parameters())
    with rundir.writing(out / rundir.ADAPTER_WEIGHTS, n_bytes):
        tmp = rundir.temp_dir(out, "adapter")
    with rundir.writing(out / rundir.ADAPTER_WEIGHTS, n_bytes, cleanup=tmp):
        save_adapters(model, tmp, adapter_config)
    rundir.publish_adapter(tmp, out)
    return out


def _nbytes(tree: Any) -> int:
    return sum(v.nbytes for _, v in tree_flatten(tree) if isinstance(v, mx.array))
