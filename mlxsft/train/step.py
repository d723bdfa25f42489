"""The compiled optimizer step with exact token-weighted accumulation, the eval step, and
per-instance gradient checkpointing.

One optimizer step over micro-batches m_1..m_K (on every rank) minimises
    sum_k ce_sum(m_k) / N,   N = trained targets of all micro-batches on all ranks,
known up front from the masks. Each compiled micro-step adds grad(ce_sum / N) to an accumulator;
the compiled update all-reduces (sums) it across ranks, clips it by global norm and applies it.
Model, optimizer and RNG state are compiled state (`inputs=state, outputs=state`), so dropout
draws fresh randomness every call. Shapes are fixed by batching, so traces stay few: at most one
per (batch shape, packed, first/later micro-batch, selective-loss bucket); `n_compilations`
counts them. Any number of gradient messages is all-reduced inside the compiled update: they
are chained, so every rank runs its collectives in the same order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from mlxsft import _mlxlm
from mlxsft.data.batching import Batch
from mlxsft.train.loss import ce_sum, n_select_for

AllReduce = Callable[[mx.array], mx.array]
REDUCE_GROUP = 1 << 23  # elements per all-reduce call (32 MB of float32): few, large messages


def _arrays(batch: Batch) -> tuple[mx.array, mx.array, mx.array, mx.array | None]:
    seg = mx.array(batch.segment_ids) if batch.packed else None
    return mx.array(batch.inputs), mx.array(batch.targets), mx.array(batch.target_mask), seg


def _n_select(loss: str, batch: Batch) -> int | None:
    """The loss's static gather size for this batch (a compile-cache key), if it has one."""
    return n_select_for(loss, batch.n_trained, batch.inputs.size)


class TrainStep:
    """`step(micro_batches) -> (mean loss over trained tokens, trained tokens)`, all ranks.

    Enable grad checkpointing and restore checkpoints before the first call (tracing bakes in
    the layer code; state containers are re-read every call). `last_grad_norm` is the global
    gradient norm before clipping; `n_compilations` counts traces (0 with compile=False).
    A NaN/inf loss is returned as is (the update already ran):
    the caller stops the run.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: optim.Optimizer,
        *,
        max_grad_norm: float | None,
        compile: bool = True,
        all_reduce: AllReduce | None = None,
        loss: str = "full",
        chunk_size: int | None = None,
    ):
        self.model, self.optimizer = model, optimizer
        self.max_grad_norm, self.compile, self.all_reduce = max_grad_norm, compile, all_reduce
        self.loss, self.chunk_size = loss, chunk_size
        self.n_compilations = 0
        self.last_grad_norm: float | None = None
        self._state: list[Any] = []
        self._refresh_state()
        self._micro = self._maybe_compile(self._micro_fn)
        self._update = self._maybe_compile(self._update_fn)

    def _refresh_state(self) -> None:
        # Optimizer state must exist before tracing (its tree may not change inside a trace);
        # `init` keeps existing entries. Same list object (captured by mx.compile), current
        # containers: survives a resume that assigns `optimizer.state = ...`. Cheap after the
        # first call: only a replaced state container needs it.
        if self._state and self._state[1] is self.optimizer.state:
            return
        self.optimizer.init(self.model.trainable_parameters())
        self._state[:] = [self.model.state, self.optimizer.state, mx.random.state]

    def _maybe_compile(self, fn: Callable) -> Callable:
        return mx.compile(fn, inputs=self._state, outputs=self._state) if self.compile else fn

    def _traced(self) -> None:
        if self.compile:  # runs only while mx.compile traces
            self.n_compilations += 1

    def _loss(self, inputs, targets, target_mask, seg, inv_n, n_select):
        total, _ = ce_sum(
            self.model,
            inputs,
            targets,
            target_mask,
            seg,
            loss=self.loss,
            n_select=n_select,
            chunk_size=self.chunk_size,
        )
        return total * inv_n, total

    def _micro_fn(self, inputs, targets, target_mask, seg, inv_n, n_select, *acc):
        """Forward + backward of one micro-batch, grads of ce_sum / N added to `acc` if given.
        `seg` None (padded batch) and `n_select` are static: part of the compile-cache key."""
        self._traced()
        grad_fn = nn.value_and_grad(self.model, self._loss)
        (_, total), grads = grad_fn(inputs, targets, target_mask, seg, inv_n, n_select)
        if acc:
            grads = tree_map(mx.add, acc[0], grads)
        return total, grads

    def _update_fn(self, grads):
        self._traced()
        if self.all_reduce is not None:
            grads = _reduce_grouped(self.all_reduce, grads)
        if self.max_grad_norm is not None and self.max_grad_norm > 0:
            grads, norm = optim.clip_grad_norm(grads, self.max_grad_norm)
        else:
            norm = optim.clip_grad_norm(grads, float("inf"))[1]
        self.optimizer.update(self.model, grads)
        return norm

    def __call__(self, micro_batches: Sequence[Batch]) -> tuple[float, int]:
        assert micro_batches, "an optimizer step needs at least one micro-batch"
        if not self.model.training:
            self.model.train()
        self._refresh_state()
        n = sum(b.n_trained for b in micro_batches)
        if self.all_reduce is not None:
            n = int(self.all_reduce(mx.array(float(n))).item())
        if n == 0:  # nothing trained anywhere: no update (same decision on every rank)
            return 0.0, 0
        inv_n = mx.array(1.0 / n, mx.float32)
        loss_sum, grads = mx.array(0.0), None
        for k, batch in enumerate(micro_batches):
            acc = () if k == 0 else (grads,)
            total, grads = self._micro(*_arrays(batch), inv_n, _n_select(self.loss, batch), *acc)
            loss_sum = loss_sum + total
            if k + 1 < len(micro_batches):
                mx.eval(loss_sum, grads)  # bound memory: one micro-batch graph at a time
        norm = self._update(grads)
        if self.all_reduce is not None:
            loss_sum = self.all_reduce(loss_sum)
        mx.eval(self._state, loss_sum, norm)
        self.last_grad_norm = float(norm.item())
        return float(loss_sum.item()) / n, n


def _reduce_grouped(all_reduce: AllReduce, tree: Any) -> Any:
    """`all_reduce` every leaf, concatenating same-dtype leaves into messages of at most
    REDUCE_GROUP elements (one collective per group instead of one per LoRA matrix). Each message
    depends on the previous one's result: inside one compiled graph, independent collectives could
    otherwise run in a different order on each rank and mix up the sums."""
    leaves, out = tree_flatten(tree), []
    group: list[tuple[str, mx.array]] = []
    previous: list[mx.array] = []  # the last collective's output

    def flush() -> None:
        if not group:
            return
        message = mx.concatenate([g.reshape(-1) for _, g in group])
        if previous:  # chain the collectives: every rank runs them in the same order
            message = mx.depends(message, previous[-1])
        flat = all_reduce(message)
        previous[:] = [flat]
        bounds = np.cumsum([g.size for _, g in group])[:-1].tolist()
        for (name, g), part in zip(group, mx.split(flat, bounds), strict=True):
            out.append((name, part.reshape(g.shape)))
        group.clear()

    size = 0
    for name, g in leaves:
        if group and (g.dtype != group[0][1].dtype or size + g.size > REDUCE_GROUP):
            flush()
            size = 0
        group.append((name, g))
        size += g.size
    flush()
    return tree_unflatten(out)


def make_train_step(
    model: nn.Module,
    optimizer: optim.Optimizer,
    *,
    max_grad_norm: float | None,
    compile: bool = True,
    all_reduce: AllReduce | None = None,
    loss: str = "full",
    chunk_size: int | None = None,
) -> TrainStep:
    """A (compiled) optimizer step; see `TrainStep`."""
    return TrainStep(
        model,
        optimizer,
        max_grad_norm=max_grad_norm,
        compile=compile,
        all_reduce=all_reduce,
        loss=loss,
        chunk_size=chunk_size,
    )


class EvalStep:
    """`eval_step(batch) -> (ce_sum, n_trained)` as lazy float32 scalars, masked as in training
    (dropout off during the call); `n_compilations` counts traces as `TrainStep` does."""

    def __init__(
        self, model: nn.Module, *, compile: bool, loss: str, chunk_size: int | None
    ) -> None:
        self.model, self.compile, self.loss = model, compile, loss
        self.n_compilations = 0

        def fn(inputs, targets, target_mask, seg, n_select):
            if compile:  # runs only while mx.compile traces
                self.n_compilations += 1
            return ce_sum(
                model,
                inputs,
                targets,
                target_mask,
                seg,
                loss=loss,
                n_select=n_select,
                chunk_size=chunk_size,
            )

        self._fn = mx.compile(fn, inputs=[model.state]) if compile else fn

    def __call__(self, batch: Batch) -> tuple[mx.array, mx.array]:
        was_training = self.model.training
        self.model.eval()
        out = self._fn(*_arrays(batch), _n_select(self.loss, batch))
        self.model.train(was_training)
        return out


def make_eval_step(
    model: nn.Module, *, compile: bool = True, loss: str = "full", chunk_size: int | None = None
) -> EvalStep:
    """The (compiled) evaluation step; see `EvalStep`."""
    return EvalStep(model, compile=compile, loss=loss, chunk_size=chunk_size)


def enable_grad_checkpoint(model: nn.Module) -> nn.Module:
    """Recompute each transformer block in the backward pass (`mx.checkpoint`), for THIS model
    only: each block instance's `__class__` becomes a checkpointing subclass of its class (one
    cached subclass per class); the class itself and every other instance are untouched.
    Call before the first train step (tracing bakes in the layer code)."""
    for layer in _mlxlm.transformer_blocks(model):
        base = type(layer)
        if getattr(base, "_mlxsft_checkpointed", False):
            continue
        layer.__class__ = _checkpointed_class(base)
    return model


_CHECKPOINTED: dict[type, type] = {}


def _checkpointed_class(base: type) -> type:
    if base not in _CHECKPOINTED:

        def __call__(self, *args, **kwargs):
            def inner(params, *args, **kwargs):
                self.update(params)
                return base.__call__(self, *args, **kwargs)

            return mx.checkpoint(inner)(self.trainable_parameters(), *args, **kwargs)

        _CHECKPOINTED[base] = type(
            f"Checkpointed{base.__name__}",
            (base,),
            {"__call__": __call__, "_mlxsft_checkpointed": True, "__module__": base.__module__},
        )
    return _CHECKPOINTED[base]
