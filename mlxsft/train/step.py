"""The compiled optimizer step with exact token-weighted accumulation, the eval step, and
per-instance gradient checkpointing.

One optimizer step over micro-batches m_1..m_K (on every rank) minimises
    sum_k ce_sum(m_k) / N,   N = trained targets of all micro-batches on all ranks,
known up front from the masks. Each compiled micro-step adds grad(ce_sum / N) to an accumulator;
the compiled update all-reduces (sums) it across ranks, clips it by global norm and applies it.
Model, optimizer and RNG state are compiled state (`inputs=state, outputs=state`), so dropout
draws fresh randomness every call. Shapes are fixed by batching, so traces stay few: at most one
per (batch shape, packed, first/later micro-batch); `n_compilations` counts them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_map

from mlxsft.data.batching import Batch
from mlxsft.train.loss import CEFn, ce_sum

AllReduce = Callable[[mx.array], mx.array]


def _arrays(batch: Batch) -> tuple[mx.array, mx.array, mx.array, mx.array | None]:
    seg = mx.array(batch.segment_ids) if batch.packed else None
    return mx.array(batch.inputs), mx.array(batch.targets), mx.array(batch.target_mask), seg


class TrainStep:
    """`step(micro_batches) -> (mean loss over trained tokens, trained tokens)`, all ranks."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: optim.Optimizer,
        *,
        max_grad_norm: float | None,
        compile: bool = True,
        all_reduce: AllReduce | None = None,
        ce_fn: CEFn | None = None,
    ):
        self.model, self.optimizer = model, optimizer
        self.max_grad_norm, self.compile, self.all_reduce = max_grad_norm, compile, all_reduce
        self.ce_fn = ce_fn
        self.n_compilations = 0
        self.last_grad_norm: float | None = None
        self._state: list[Any] = []
        self._refresh_state()
        self._micro: dict[tuple[bool, bool], Callable] = {}
        self._update = self._maybe_compile(self._update_fn)

    def _refresh_state(self) -> None:
        # Optimizer state must exist before tracing (its tree may not change inside a trace);
        # `init` keeps existing entries. Same list object (captured by mx.compile), current
        # containers: survives a resume that assigns `optimizer.state = ...`.
        self.optimizer.init(self.model.trainable_parameters())
        self._state[:] = [self.model.state, self.optimizer.state, mx.random.state]

    def _maybe_compile(self, fn: Callable) -> Callable:
        return mx.compile(fn, inputs=self._state, outputs=self._state) if self.compile else fn

    def _traced(self) -> None:
        if self.compile:  # runs only while mx.compile traces
            self.n_compilations += 1

    def _loss(self, inputs, targets, target_mask, seg, inv_n):
        total, _ = ce_sum(self.model, inputs, targets, target_mask, seg, ce_fn=self.ce_fn)
        return total * inv_n, total

    def _micro_fn(self, accumulate: bool, inputs, targets, target_mask, seg, inv_n, *acc):
        self._traced()
        grad_fn = nn.value_and_grad(self.model, self._loss)
        (_, total), grads = grad_fn(inputs, targets, target_mask, seg, inv_n)
        if accumulate:
            grads = tree_map(mx.add, acc[0], grads)
        return total, grads

    def _micro_step(self, accumulate: bool, packed: bool) -> Callable:
        key = (accumulate, packed)
        if key not in self._micro:
            fn = partial(self._micro_fn, accumulate)
            if not packed:
                fn = partial(self._unpacked, fn)
            self._micro[key] = self._maybe_compile(fn)
        return self._micro[key]

    @staticmethod
    def _unpacked(fn, inputs, targets, target_mask, inv_n, *acc):
        return fn(inputs, targets, target_mask, None, inv_n, *acc)

    def _update_fn(self, grads):
        self._traced()
        if self.all_reduce is not None:
            grads = tree_map(self.all_reduce, grads)
        if self.max_grad_norm is not None and self.max_grad_norm > 0:
            grads, norm = optim.clip_grad_norm(grads, self.max_grad_norm)
        else:
            norm = optim.clip_grad_norm(grads, float("inf"))[1]
        self.optimizer.update(self.model, grads)
        return norm

    def __call__(self, micro_batches: Sequence[Batch]) -> tuple[float, int]:
        assert micro_batches, "an optimizer step needs at least one micro-batch"
        self.model.train()
        self._refresh_state()
        n_local = sum(b.n_trained for b in micro_batches)
        n_total = mx.array(float(n_local))
        if self.all_reduce is not None:
            n_total = self.all_reduce(n_total)
        n = int(n_total.item())
        if n == 0:  # nothing trained anywhere: no update (same decision on every rank)
            return 0.0, 0
        inv_n = mx.array(1.0 / n, mx.float32)
        loss_sum, grads = mx.array(0.0), None
        for k, batch in enumerate(micro_batches):
            inputs, targets, target_mask, seg = _arrays(batch)
            args = (inputs, targets, target_mask) + ((seg,) if batch.packed else ())
            acc = () if k == 0 else (grads,)
            total, grads = self._micro_step(k > 0, batch.packed)(*args, inv_n, *acc)
            loss_sum = loss_sum + total
            mx.eval(total, grads)  # bound memory: one micro-batch graph at a time
        norm = self._update(grads)
        if self.all_reduce is not None:
            loss_sum = self.all_reduce(loss_sum)
        mx.eval(self._state, loss_sum, norm)
        self.last_grad_norm = float(norm.item())
        return float(loss_sum.item()) / n, n


def make_train_step(
    model: nn.Module,
    optimizer: optim.Optimizer,
    *,
    max_grad_norm: float | None,
    compile: bool = True,
    all_reduce: AllReduce | None = None,
    ce_fn: CEFn | None = None,
) -> TrainStep:
    """A (compiled) optimizer step; see `TrainStep`."""
    return TrainStep(
        model,
        optimizer,
        max_grad_norm=max_grad_norm,
        compile=compile,
        all_reduce=all_reduce,
        ce_fn=ce_fn,
    )


def make_eval_step(
    model: nn.Module, *, compile: bool = True, ce_fn: CEFn | None = None
) -> Callable[[Batch], tuple[mx.array, mx.array]]:
    """`eval_step(batch) -> (ce_sum, n_trained)` as lazy float32 scalars, masked as in training."""

    def packed(inputs, targets, target_mask, seg):
        return ce_sum(model, inputs, targets, target_mask, seg, ce_fn=ce_fn)

    def unpacked(inputs, targets, target_mask):
        return ce_sum(model, inputs, targets, target_mask, None, ce_fn=ce_fn)

    if compile:
        packed = mx.compile(packed, inputs=[model.state])
        unpacked = mx.compile(unpacked, inputs=[model.state])

    def eval_step(batch: Batch) -> tuple[mx.array, mx.array]:
        was_training = model.training
        model.eval()
        inputs, targets, target_mask, seg = _arrays(batch)
        out = (
            packed(inputs, targets, target_mask, seg)
            if batch.packed
            else unpacked(inputs, targets, target_mask)
        )
        model.train(was_training)
        return out

    return eval_step


def enable_grad_checkpoint(model: nn.Module) -> nn.Module:
    """Recompute each transformer block in the backward pass (`mx.checkpoint`), for THIS model
    only: every block instance gets a per-instance subclass; other instances are untouched."""
    for layer in model.layers:
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
