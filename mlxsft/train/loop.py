"""The training loop: `train(cfg)` from a resolved TrainConfig to an adapter directory.

Order matters for exact resume and reproducibility: seed MLX once, load the model, add adapters
(their init draws from the seeded MLX RNG), build the optimizer, and only then restore a
checkpoint (weights, optimizer state, RNG key, data cursor) and compile the step. Batches are a
pure function of (seed, epoch, batch index), so a resumed run sees exactly the batches an
uninterrupted one would. Every rank builds the same global batch and trains its rows.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from mlxsft.config import TrainConfig, save_config
from mlxsft.data.batching import BatchPlan, make_batch, plan_epoch
from mlxsft.data.types import Encoded
from mlxsft.errors import DataError, UserError
from mlxsft.train import checkpoint as ckpt
from mlxsft.train.distributed import World, init_world
from mlxsft.train.progress import Progress, peak_memory_gb


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""


@dataclass
class TrainResult:
    output: Path
    steps: int
    trained_tokens: int
    final_loss: float | None
    val_loss: float | None
    best_val_loss: float | None
    best_step: int | None
    n_compilations: int
    elapsed_s: float
    resumed_from: Path | None = None


@dataclass
class Prepared:
    """A loaded model with adapters, its tokenizer and encoded data."""

    model: Any
    tokenizer: Any
    adapter_config: dict[str, Any]
    train: list[Encoded]
    valid: list[Encoded]
    pack: bool
    notes: list[str]


# ------------------------------------------------------------------------------------ data


def encode_split(cfg: TrainConfig, tokenizer: Any, path: str, split: str) -> tuple[list, str]:
    """Read and encode one split -> (encoded examples, a one-line note on drops/truncation).
    A bad row or nothing usable is a DataError: nothing is silently skipped."""
    from mlxsft.data.encode import encode_dataset
    from mlxsft.data.formats import read_examples
    from mlxsft.data.templates import resolve_template

    examples, errors = read_examples(path, cfg.format, split=split)
    if errors:
        more = f" (and {len(errors) - 1} more bad rows)" if len(errors) > 1 else ""
        raise DataError(
            f"{errors[0].one_line()}{more}",
            hint="fix the rows; `mlxsft data validate DATA` lists them all",
        )
    if not examples:
        raise DataError(f"no rows in {split} data", where=str(path))
    template = resolve_template(cfg.template, tokenizer)
    encoded, stats = encode_dataset(examples, tokenizer, template, cfg.train_on, cfg.max_seq_len)
    if not encoded:
        reasons = ", ".join(f"{k}: {v}" for k, v in stats.dropped.items())
        raise DataError(
            f"every {split} example was dropped ({reasons})",
            where=str(path),
            hint="check --template / --train-on with `mlxsft data inspect`",
        )
    dropped = ", ".join(f"{n} {reason}" for reason, n in stats.dropped.items())
    note = (
        f"{split}: {len(encoded)} examples, {stats.n_trained} trained of {stats.n_tokens} tokens"
        f"; {stats.n_truncated} truncated to {cfg.max_seq_len}; {stats.n_dropped} dropped"
        + (f" ({dropped})" if dropped else "")
    )
    return encoded, note


def _valid_source(cfg: TrainConfig) -> tuple[str, str] | None:
    """(path, split) of the validation data: --valid, else DATA dir's valid split."""
    if cfg.valid:
        return cfg.valid, "train"
    data = Path(cfg.data or "")
    if data.is_dir():
        from mlxsft.data.formats import find_splits

        if "valid" in find_splits(data):
            return str(data), "valid"
    return None


# ------------------------------------------------------------------------------------ model


def prepare(cfg: TrainConfig, *, with_adapters: bool = True) -> Prepared:
    """Load the model (QLoRA when quantized), add or load adapters, encode train/valid data."""
    from mlxsft import _mlxlm
    from mlxsft.model import lora
    from mlxsft.model.loading import load

    if not cfg.model:
        raise UserError("no model given", hint="pass --model DIR_OR_HUB_ID")
    if not cfg.data:
        raise UserError("no training data given", hint="pass --data FILE_OR_DIR")
    loaded = load(cfg.model, quantize=cfg.quantize)
    model, notes = loaded.model, []
    if _mlxlm.is_quantized(model):
        notes.append("quantized base: training LoRA on a frozen quantized model (QLoRA)")
    if not with_adapters:
        adapter_config: dict[str, Any] = {}
    elif cfg.adapter:
        model = lora.load_adapters(model, cfg.adapter)
        adapter_config = lora.read_adapter_config(cfg.adapter)
        notes.append(f"starting from adapter {cfg.adapter} (its rank/targets apply)")
    else:
        adapter_config = lora.apply_adapters(
            model,
            fine_tune_type=cfg.fine_tune_type,
            rank=cfg.rank,
            alpha=cfg.alpha,
            dropout=cfg.dropout,
            target_modules=cfg.target_modules,
            num_layers=cfg.num_layers,
        )
    pack = _mlxlm.supports_mask(model) if cfg.pack is None else cfg.pack
    if pack and not _mlxlm.supports_mask(model):
        raise UserError(
            f"--pack is not supported for model_type {_mlxlm.model_type(model)!r}",
            hint="use --no-pack",
        )
    train, note = encode_split(cfg, loaded.tokenizer, cfg.data, "train")
    notes.append(note)
    valid: list[Encoded] = []
    source = _valid_source(cfg)
    if source is not None:
        valid, note = encode_split(cfg, loaded.tokenizer, *source)
        notes.append(note.replace("train:", "valid:", 1))
    return Prepared(model, loaded.tokenizer, adapter_config, train, valid, pack, notes)


# ------------------------------------------------------------------------------------ eval


def evaluate(
    eval_step: Any,
    encoded: Sequence[Encoded],
    *,
    batch_size: int,
    max_seq_len: int,
    pack: bool,
    world: World,
) -> tuple[float, int]:
    """(mean CE over trained tokens, trained tokens) over all of `encoded`, masked as in
    training; each rank evaluates its rows and the sums are all-reduced."""
    plans = plan_epoch(
        encoded,
        batch_size=batch_size,
        max_seq_len=max_seq_len,
        pack=pack,
        seed=0,
        epoch=0,
        shuffle=False,
    )
    total, count = mx.array(0.0), mx.array(0.0)
    for plan in plans:
        s, n = eval_step(world.shard(make_batch(encoded, plan)))
        total, count = total + s, count + n
        mx.eval(total, count)
    if world.size > 1:
        total = mx.distributed.all_sum(total, group=world.group)
        count = mx.distributed.all_sum(count, group=world.group)
    n_tokens = int(count.item())
    return float(total.item()) / max(n_tokens, 1), n_tokens


# ------------------------------------------------------------------------------------ train


class _StopFlag:
    """First Ctrl-C: finish the current step, save, stop. A second one interrupts at once."""

    def __init__(self) -> None:
        self.set = False
        self._old: Any = None

    def __enter__(self) -> _StopFlag:
        try:
            self._old = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread
            self._old = None
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.set:
            raise KeyboardInterrupt
        self.set = True

    def __exit__(self, *exc: Any) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def _total_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    return cfg.iters if cfg.iters is not None else (cfg.epochs or 1) * steps_per_epoch


def _start_fresh(out: Path, world: World, progress_log: Any) -> None:
    """A fresh run in a directory holding an earlier run's checkpoints replaces them."""
    old = ckpt.list_checkpoints(out)
    if old and world.is_main:
        progress_log(
            f"note: {out} holds {len(old)} checkpoint(s) of an earlier run; starting fresh "
            "and replacing them (pass --resume auto to continue that run instead)"
        )
        import shutil

        for path in old:
            shutil.rmtree(path, ignore_errors=True)


def _diverged(loss: float, step: int, out: Path, world: World) -> TrainingDiverged:
    """The loss of step s comes from the weights after step s - 1, so checkpoints from step
    s - 1 on hold bad weights: remove them, and point at the newest one left."""
    import shutil

    good = None
    for path in ckpt.list_checkpoints(out):
        if int(path.name.split("-")[1]) >= step - 1:
            if world.is_main:
                shutil.rmtree(path, ignore_errors=True)
        else:
            good = path
    where = f"the last good checkpoint is {good}" if good else "no good checkpoint was saved"
    return TrainingDiverged(
        f"the training loss became {loss} at step {step}; stopped ({where})",
        hint="lower --learning-rate, add --warmup, or set --max-grad-norm 1.0",
    )


def _wire_memory() -> None:
    """On Apple silicon, wire the model's memory like mlx-lm does; a no-op elsewhere."""
    try:
        if mx.metal.is_available():
            mx.set_wired_limit(mx.device_info()["max_recommended_working_set_size"])
    except (AttributeError, KeyError, RuntimeError):
        pass


def train(cfg: TrainConfig, *, stream: Any = None) -> TrainResult:
    """Run one training job described by `cfg` (already validated); see the module docstring."""
    from mlxsft.model.lora import n_parameters, save_adapters
    from mlxsft.train.schedule import build_optimizer, build_schedule
    from mlxsft.train.step import enable_grad_checkpoint, make_eval_step, make_train_step

    t_start = time.perf_counter()
    world = init_world()
    world.check_batch_size(cfg.batch_size, cfg.grad_accum)
    out = Path(cfg.output)
    resume_from = ckpt.find_resume(out, cfg.resume)
    mx.random.seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)  # the run's NumPy RNG (state saved in checkpoints)
    _wire_memory()

    prep = prepare(cfg)
    model = prep.model
    if cfg.grad_checkpoint:
        enable_grad_checkpoint(model)
    lengths = [e.n_tokens for e in prep.train]

    def plans_for(epoch: int) -> list[BatchPlan]:
        return plan_epoch(
            lengths,
            batch_size=cfg.batch_size,
            max_seq_len=cfg.max_seq_len,
            pack=prep.pack,
            seed=cfg.seed,
            epoch=epoch,
        )

    plans, plans_epoch = plans_for(0), 0
    total = _total_steps(cfg, len(plans))
    schedule = build_schedule(cfg, total)
    optimizer = build_optimizer(cfg, schedule)
    state = ckpt.TrainState()
    if resume_from is not None:
        state = ckpt.load_checkpoint(resume_from, model, optimizer)
        if state.np_rng:
            rng.bit_generator.state = state.np_rng
    if world.rank > 0:
        # Same adapter init on every rank (above), then different dropout draws per rank.
        # Checkpoints hold rank 0's key; other ranks re-derive theirs from it on resume.
        hi, lo = ckpt.rng_key()
        mx.random.seed((((hi << 32) | lo) + world.rank * 0x9E3779B97F4A7C15) % 2**64)
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
    progress = Progress(
        out / "metrics.jsonl" if world.is_main else None,
        total_steps=total,
        steps_per_epoch=len(plans),
        every=cfg.steps_per_report,
        resume_step=state.step,
        stream=stream,
        enabled=world.is_main,
    )
    if resume_from is None:
        _start_fresh(out, world, progress.log)
    if world.is_main:
        save_config(cfg, out / "config.yaml")
    n_train, n_total = n_parameters(model)
    for note in prep.notes:
        progress.log(note)
    progress.log(
        f"{cfg.fine_tune_type}: {n_train:,} trainable of {n_total:,} parameters "
        f"({100 * n_train / max(n_total, 1):.3f}%); {'packed' if prep.pack else 'padded'} rows "
        f"of {cfg.max_seq_len}; {len(plans)} steps per epoch; {total} steps; "
        f"{world.size} rank(s)"
    )
    if resume_from is not None:
        progress.log(f"resuming from {resume_from} at step {state.step}")
    # With several ranks the step runs uncompiled: the step reduces gradients leaf by leaf,
    # and in a compiled graph those collectives can run in a different order on each rank
    # (seen with the ring backend), which mixes up gradients. Lazy graphs evaluate in the same
    # order everywhere.
    step_fn = make_train_step(
        model,
        optimizer,
        max_grad_norm=cfg.max_grad_norm,
        all_reduce=world.all_reduce,
        compile=world.size == 1,
    )
    eval_fn = make_eval_step(model)
    last_loss: float | None = None
    val_loss: float | None = None

    def save() -> Path | None:
        last_saved = None
        state.np_rng = rng.bit_generator.state
        state.elapsed_s = time.perf_counter() - t_start + elapsed_before
        if world.is_main:
            last_saved = ckpt.save_checkpoint(out, model, optimizer, prep.adapter_config, state)
        world.barrier()
        return last_saved

    def run_eval() -> None:
        nonlocal val_loss
        if not prep.valid:
            return
        loss, n = evaluate(
            eval_fn,
            prep.valid,
            batch_size=cfg.batch_size,
            max_seq_len=cfg.max_seq_len,
            pack=prep.pack,
            world=world,
        )
        val_loss = loss
        best = state.best_val_loss is None or loss < state.best_val_loss
        if best:
            state.best_val_loss, state.best_step = loss, state.step
            if world.is_main:
                ckpt.save_best(out, model, prep.adapter_config)
        progress.eval(state.step, loss, n, best=best)

    elapsed_before = state.elapsed_s
    interrupted = False
    with _StopFlag() as stop:
        if state.step == 0 and prep.valid and cfg.eval_every:
            run_eval()  # the starting point, for the report
        while state.step < total:
            if state.epoch != plans_epoch:
                plans, plans_epoch = plans_for(state.epoch), state.epoch
            if state.batch_index >= len(plans):
                state.epoch, state.batch_index = state.epoch + 1, 0
                continue
            batch = make_batch(prep.train, plans[state.batch_index])
            lr = float(schedule(optimizer.step).item())
            t0 = time.perf_counter()
            loss, n_tokens = step_fn(world.shard(batch).split(cfg.grad_accum))
            seconds = time.perf_counter() - t0
            state.step += 1
            state.batch_index += 1
            if not math.isfinite(loss):
                progress.close()
                raise _diverged(loss, state.step, out, world)
            state.trained_tokens += n_tokens
            last_loss = loss
            if state.step == 1:
                progress.log(f"compiled the train step ({step_fn.n_compilations} compilations)")
            progress.train_step(
                {
                    "step": state.step,
                    "epoch": state.epoch + state.batch_index / len(plans),
                    "loss": loss,
                    "lr": lr,
                    "trained_tokens": state.trained_tokens,
                    "step_tokens": n_tokens,
                    "tokens_per_sec": n_tokens / max(seconds, 1e-9),
                    "peak_memory_gb": peak_memory_gb(),
                    "elapsed_s": time.perf_counter() - t_start + elapsed_before,
                    "grad_norm": step_fn.last_grad_norm,
                },
                seconds,
            )
            final = state.step == total
            if prep.valid and (final or (cfg.eval_every and state.step % cfg.eval_every == 0)):
                run_eval()
            if final or (cfg.save_every and state.step % cfg.save_every == 0):
                save()
            if stop.set and not final:
                interrupted = True
                break
    if interrupted:
        path = save()
        progress.log(f"interrupted at step {state.step}; saved {path}")
        progress.close()
        raise KeyboardInterrupt
    if world.is_main:
        save_adapters(model, out, prep.adapter_config)
    elapsed = time.perf_counter() - t_start + elapsed_before
    result = TrainResult(
        output=out,
        steps=state.step,
        trained_tokens=state.trained_tokens,
        final_loss=last_loss,
        val_loss=val_loss,
        best_val_loss=state.best_val_loss,
        best_step=state.best_step,
        n_compilations=step_fn.n_compilations,
        elapsed_s=elapsed,
        resumed_from=resume_from,
    )
    progress.log(summary(result))
    progress.close()
    return result


def summary(r: TrainResult) -> str:
    """A short end-of-run summary."""
    parts = [
        f"done: {r.steps} steps, {r.trained_tokens:,} trained tokens in {r.elapsed_s:.1f} s",
        f"final loss {r.final_loss:.4f}" if r.final_loss is not None else "no steps run",
    ]
    if r.best_val_loss is not None:
        parts.append(f"best val loss {r.best_val_loss:.4f} at step {r.best_step}")
    parts.append(f"{r.n_compilations} compilations; peak memory {peak_memory_gb():.2f} GB")
    parts.append(f"adapter: {r.output}")
    return "; ".join(parts)


def evaluate_model(cfg: TrainConfig, *, split: str | None = None) -> dict[str, Any]:
    """`mlxsft eval`: loss / perplexity / trained tokens of cfg.model (+ cfg.adapter) on cfg.data.

    A DATA directory is read at `split`, default test, else valid, else train.
    """
    from mlxsft import _mlxlm
    from mlxsft.model import lora
    from mlxsft.model.loading import load
    from mlxsft.train.step import make_eval_step

    if not cfg.model or not cfg.data:
        raise UserError("eval needs --model and --data")
    if split is None:
        split = "train"
        if Path(cfg.data).is_dir():
            from mlxsft.data.formats import find_splits

            found = find_splits(cfg.data)
            split = next(s for s in ("test", "valid", "train") if s in found)
    loaded = load(cfg.model, quantize=cfg.quantize)
    model = loaded.model
    if cfg.adapter:
        model = lora.load_adapters(model, cfg.adapter)
    pack = _mlxlm.supports_mask(model) if cfg.pack is None else cfg.pack
    encoded, note = encode_split(cfg, loaded.tokenizer, cfg.data, split)
    loss, n = evaluate(
        make_eval_step(model),
        encoded,
        batch_size=cfg.batch_size,
        max_seq_len=cfg.max_seq_len,
        pack=pack,
        world=init_world(),
    )
    return {
        "split": split,
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "tokens": n,
        "examples": len(encoded),
        "note": note,
    }
