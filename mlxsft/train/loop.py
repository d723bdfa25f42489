"""The training loop: `train(cfg)` from a resolved TrainConfig to an adapter directory.

Order matters for exact resume: seed MLX once, load the model, add adapters (their init draws
from the seeded MLX RNG), build the optimizer, then restore a checkpoint (weights, optimizer
state, RNG key, data cursor) and build the step. Batches are a pure function of (seed, epoch,
batch index), so a resumed run sees exactly the batches an uninterrupted one would. Every rank
builds the same global batch and trains its own rows of it.
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import mlx.core as mx

from mlxsft import rundir, runguard
from mlxsft.config import TrainConfig
from mlxsft.data.batching import BatchPlan, make_batch, plan_epoch
from mlxsft.errors import UserError
from mlxsft.train import checkpoint as ckpt
from mlxsft.train.distributed import World, init_world
from mlxsft.train.divergence import HINT, DivergenceWatch
from mlxsft.train.evaluate import evaluate
from mlxsft.train.progress import Progress, peak_memory_gb


class TrainingDiverged(UserError):
    """Training diverged (non-finite loss or grad norm, loss stuck at ln(vocab), exploding
    gradients); exits 2 like every user error."""


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
    n_eval_compilations: int
    elapsed_s: float
    resumed_from: Path | None = None


class _StopFlag:
    """First Ctrl-C: finish the current step, save, stop. A second one interrupts at once."""

    def __init__(self) -> None:
        self.set = False
        self._old: Any = None

    def __enter__(self) -> _StopFlag:
        try:
            self._old = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: Ctrl-C stays a plain KeyboardInterrupt
            self._old = None
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.set:
            raise KeyboardInterrupt
        self.set = True

    def __exit__(self, *exc: Any) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def _wire_memory() -> None:
    """On Apple silicon, wire the model's memory like mlx-lm does; a no-op elsewhere."""
    try:
        if mx.metal.is_available():
            mx.set_wired_limit(mx.device_info()["max_recommended_working_set_size"])
    except (AttributeError, KeyError, RuntimeError):
        pass


def _decorrelate_ranks(world: World) -> None:
    """Same adapter init on every rank, then different dropout draws per rank. Checkpoints hold
    rank 0's key; other ranks re-derive theirs from it on resume."""
    if world.rank > 0:
        hi, lo = ckpt.rng_key()
        mx.random.seed((((hi << 32) | lo) + world.rank * 0x9E3779B97F4A7C15) % 2**64)


class _Run:
    """One training run: set up in __init__, then `run()`."""

    def __init__(self, cfg: TrainConfig, world: World, stream: Any = None):
        from mlxsft.model.attention import use_block_attention
        from mlxsft.model.mlp import use_lean_mlp
        from mlxsft.train.loss import choose_loss
        from mlxsft.train.schedule import build_optimizer, build_schedule
        from mlxsft.train.setup import prepare
        from mlxsft.train.step import enable_grad_checkpoint, make_eval_step, make_train_step
        from mlxsft.train.trackers import check_available, open_trackers

        self.t_start = time.perf_counter()
        self.cfg = cfg
        check_available(cfg.report_to)  # before the model loads
        self.world = world
        world.check_batch_size(cfg.batch_size, cfg.grad_accum)
        self.out = Path(cfg.output)
        self.cleaned = rundir.clean_leftovers(self.out) if world.is_main else []
        self.resume_from = rundir.find_resume(self.out, cfg.resume)
        mx.random.seed(cfg.seed)
        _wire_memory()
        self.prep = prepare(cfg)
        self.model = self.prep.model
        # the template it resolved to, not "auto": the config.yaml re-run resumes identically
        self.resolved_cfg = replace(cfg, template=_template_spec(self.prep.template, cfg.template))
        self.fingerprint = runguard.fingerprint(
            self.resolved_cfg.to_dict(), pack=self.prep.pack, data_sha256=self.prep.data_sha256
        )
        if self.resume_from is not None:
            note = runguard.check_fingerprint(self.resume_from, self.fingerprint)
            if note:
                self.prep.notes.append(note)
        if cfg.grad_checkpoint:
            enable_grad_checkpoint(self.model)
        # the CPU: causal attention by blocks; --grad-checkpoint recomputes them for long rows
        self.block_attention = use_block_attention(self.model, recompute=cfg.grad_checkpoint)
        self.lean_mlp = use_lean_mlp(self.model)  # SwiGLU keeps 4 intermediate arrays, not 5
        self.lengths = [e.n_tokens for e in self.prep.train]
        self.plans, self.plans_epoch = self._plans_for(0), 0
        total = cfg.iters if cfg.iters is not None else (cfg.epochs or 1) * len(self.plans)
        self.total = total
        self.schedule = build_schedule(cfg, total)
        self.optimizer = build_optimizer(cfg, self.schedule)
        self.state = ckpt.TrainState()
        if self.resume_from is not None:
            self.state = ckpt.load_checkpoint(self.resume_from, self.model, self.optimizer)
            n_batches = len(self._plans_for(self.state.epoch))
            if self.state.batch_index >= n_batches:  # only without a fingerprint (older mlxsft)
                raise UserError(
                    f"the checkpoint continues at batch {self.state.batch_index} of epoch "
                    f"{self.state.epoch}, but this data has {n_batches} batches per epoch",
                    where=str(self.resume_from),
                    hint="resume with the data and settings of that run",
                )
        _decorrelate_ranks(world)
        self.elapsed_before = self.state.elapsed_s
        if world.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.progress = Progress(
            self.out if world.is_main else None,
            total_steps=total,
            steps_per_epoch=len(self.plans),
            every=cfg.steps_per_report,
            resume_step=self.state.step,
            stream=stream,
            enabled=world.is_main,
            trackers=open_trackers(cfg.report_to, self.out, cfg.to_dict()) if world.is_main else [],
        )
        self.loss = choose_loss(cfg.loss, self.model)
        self.step_fn = make_train_step(
            self.model,
            self.optimizer,
            max_grad_norm=cfg.max_grad_norm,
            all_reduce=world.all_reduce,
            loss=self.loss,
        )
        self.eval_fn = make_eval_step(self.model, loss=self.loss)
        self.last_loss: float | None = None
        self.val_loss: float | None = None
        self.logged_compile = False
        vocab = self.prep.config.get("vocab_size") or len(self.prep.tokenizer)
        self.watch = DivergenceWatch(int(vocab))

    def _plans_for(self, epoch: int) -> list[BatchPlan]:
        return plan_epoch(
            self.lengths,
            batch_size=self.cfg.batch_size,
            max_seq_len=self.cfg.max_seq_len,
            pack=self.prep.pack,
            seed=self.cfg.seed,
            epoch=epoch,
        )

    def _elapsed(self) -> float:
        return time.perf_counter() - self.t_start + self.elapsed_before

    def _announce(self) -> None:
        """Start-of-run lines; replaces an earlier run's checkpoints on a fresh start."""
        from mlxsft.model.lora import n_parameters

        cfg, log = self.cfg, self.progress.log
        for line in self.cleaned:
            log(f"note: {line}")
        if self.resume_from is None and self.world.is_main:
            self._replace_earlier_run()
            if cfg.resume == "auto":
                log(f"no checkpoint in {self.out}; starting fresh")
        if self.world.is_main:  # the template it resolved to, not "auto"
            rundir.write_config(self.out, self.resolved_cfg.to_dict())
            if self.prep.tokenizer_changed:  # --add-chat-tokens: loaders take it from here
                self.prep.tokenizer.save_pretrained(str(self.out))
        for note in self.prep.notes:
            log(note)
        if self.loss != cfg.loss:
            log(f"loss: {self.loss} logits (a vocabulary this small gains nothing from {cfg.loss})")
        if self.block_attention:
            log(f"attention: causal blocks on the CPU ({self.block_attention} layers; "
                "MLXSFT_BLOCK_ATTENTION=0 uses MLX's own)")  # fmt: skip
        if self.lean_mlp:
            log(f"MLP: SwiGLU keeps no silu(gate) for the backward pass ({self.lean_mlp} layers; "
                "MLXSFT_LEAN_MLP=0 uses mlx-lm's)")  # fmt: skip
        warning = self._memory_warning()
        if warning:
            log(warning)
        n_rows = sum(1 for plan in self.plans for row in plan.rows if row)
        if n_rows < cfg.batch_size:
            rows = "packed rows" if self.prep.pack else "examples"
            log(f"warning: --batch-size {cfg.batch_size} is more than the {n_rows} {rows} of the "
                "training data: every step pads with empty rows; lower --batch-size")  # fmt: skip
        n_train, n_total = n_parameters(self.model)
        kind = self.prep.adapter_config.get("fine_tune_type", cfg.fine_tune_type)
        log(
            f"{kind}: {n_train:,} trainable of {n_total:,} parameters "
            f"({100 * n_train / max(n_total, 1):.3f}%); "
            f"{'packed' if self.prep.pack else 'padded'} rows of {cfg.max_seq_len}; "
            f"{len(self.plans)} steps per epoch; {self.total} steps; {self.world.size} rank(s)"
        )
        if self.resume_from is not None:
            log(f"resuming from {self.resume_from} at step {self.state.step}")

    def _replace_earlier_run(self) -> None:
        """A fresh start: an earlier run's checkpoints, best/ and adapter go (one run per OUT)."""
        old = rundir.list_checkpoints(self.out)
        if old:
            self.progress.log(
                f"note: replacing {len(old)} checkpoint(s) of an earlier run in {self.out} "
                "(pass --resume auto to continue it instead)"
            )
        rundir.prune(self.out, keep=0)
        if (self.out / rundir.BEST).is_dir():
            rundir.remove_dir(self.out / rundir.BEST)
        for name in (rundir.ADAPTER_CONFIG, rundir.ADAPTER_WEIGHTS, rundir.TOKEN_ROWS,
                     *rundir.TOKENIZER_FILES):  # fmt: skip
            (self.out / name).unlink(missing_ok=True)

    def _memory_warning(self) -> str | None:
        """`mlxsft plan`'s one-line warning when the estimated peak exceeds the memory budget."""
        from mlxsft.plan import memory_warning, profile_data, run_shape

        try:
            shape = run_shape(self.cfg)
            profile = profile_data(self.prep.train, shape, pack=self.prep.pack)
            return memory_warning(self.prep.config, run_shape(self.cfg, profile))
        except (KeyError, ValueError, TypeError, ZeroDivisionError):  # an estimate, never fatal
            return None

    def save(self, *, final_adapter: bool = False) -> Path | None:
        """A checkpoint of the current state (rank 0 writes; every rank waits); with
        `final_adapter` also OUT's top-level adapter. Never saves non-finite weights; while the
        loss looks diverged older checkpoints are not pruned (one of them is the good one)."""
        self._check_finite_weights()
        self.state.elapsed_s = self._elapsed()
        path = None
        if self.world.is_main:
            path = ckpt.save_checkpoint(
                self.out,
                self.model,
                self.optimizer,
                self.prep.adapter_config,
                self.state,
                self.fingerprint,
                prune=not self.watch.suspect,
            )
            if final_adapter:
                ckpt.save_final(self.out, self.model, self.prep.adapter_config)
        self.world.barrier()
        return path

    def _check_finite_weights(self) -> None:
        if not ckpt.all_finite(self.model):
            self.progress.close()
            self.watch.first_bad_step = self.state.step
            raise self._diverged(f"the weights became non-finite by step {self.state.step}")

    def run_eval(self) -> None:
        if self.prep.valid:
            self.run_loss_eval()
        if self.prep.eval_prompts:
            from mlxsft.train.gen_eval import generation_eval

            cfg, step = self.cfg, self.state.step
            result = generation_eval(
                self.model, self.prep.renderer, self.prep.eval_prompts, cfg.eval_max_tokens
            )
            self.progress.record(result.record(step), result.lines(step))

    def run_loss_eval(self) -> None:
        cfg, state = self.cfg, self.state
        t0 = time.perf_counter()
        loss, n = evaluate(
            self.eval_fn,
            self.prep.valid,
            batch_size=cfg.batch_size,
            max_seq_len=cfg.max_seq_len,
            pack=self.prep.pack,
            world=self.world,
        )
        self.val_loss, seconds = loss, time.perf_counter() - t0
        best = state.best_val_loss is None or loss < state.best_val_loss
        if best and not self.watch.suspect:
            self._check_finite_weights()
            state.best_val_loss, state.best_step = loss, state.step
            if self.world.is_main:
                ckpt.save_best(self.out, self.model, self.prep.adapter_config)
        self.progress.eval(state.step, loss, n, best=best, seconds=seconds)

    def train_step(self) -> None:
        """One optimizer step on the batch at the data cursor; advances the cursor."""
        state = self.state
        if state.epoch != self.plans_epoch:
            self.plans, self.plans_epoch = self._plans_for(state.epoch), state.epoch
        batch = make_batch(self.prep.train, self.plans[state.batch_index])
        lr = float(self.schedule(self.optimizer.step).item())
        t0 = time.perf_counter()
        loss, n_tokens = self.step_fn(self.world.shard(batch).split(self.cfg.grad_accum))
        seconds = time.perf_counter() - t0
        state.step += 1
        state.batch_index += 1
        if state.batch_index == len(self.plans):
            state.epoch, state.batch_index = state.epoch + 1, 0
        # Host values only (no extra sync): if steps stop syncing every step, observe each step's
        # values when they are fetched (log interval) and before any save().
        reason = self.watch.observe(state.step, loss, self.step_fn.last_grad_norm)
        if reason:
            self.progress.close()
            raise self._diverged(reason)
        state.trained_tokens += n_tokens
        self.last_loss = loss
        if not self.logged_compile:
            self.logged_compile = True
            self.progress.log(f"compiled the train step ({self.step_fn.n_compilations} times)")
        record = {
            "step": state.step,
            "epoch": state.epoch + state.batch_index / len(self.plans),
            "loss": loss,
            "lr": lr,
            "trained_tokens": state.trained_tokens,
            "step_tokens": n_tokens,
            "tokens_per_sec": n_tokens / max(seconds, 1e-9),
            "peak_memory_gb": peak_memory_gb(),
            "elapsed_s": self._elapsed(),
            "grad_norm": self.step_fn.last_grad_norm,
        }
        self.progress.train_step(record, seconds)

    def _diverged(self, reason: str) -> TrainingDiverged:
        """The loss of step s comes from the weights after step s - 1, so checkpoints from step
        s - 1 on hold bad weights: remove them and point at the newest one left (best/ is only
        written from healthy states, so it stays)."""
        bad_from, good = (self.watch.first_bad_step or self.state.step) - 1, None
        for path in rundir.list_checkpoints(self.out):
            if (rundir.checkpoint_step(path) or 0) < bad_from:
                good = path
            elif self.world.is_main:
                rundir.remove_dir(path)
        where = f"the last good checkpoint is {good}" if good else "no good checkpoint was saved"
        return TrainingDiverged(f"training diverged: {reason}; stopped ({where})", hint=HINT)

    def run(self) -> TrainResult:
        cfg, state = self.cfg, self.state
        valid = bool(self.prep.valid) or bool(self.prep.eval_prompts)
        self._announce()
        with _StopFlag() as stop:
            if state.step == 0 and valid and cfg.eval_every:
                self.run_eval()  # the starting point
            while state.step < self.total:
                self.train_step()
                final = state.step == self.total
                if valid and (final or (cfg.eval_every and state.step % cfg.eval_every == 0)):
                    self.run_eval()
                if final and (reason := self.watch.finish()):
                    self.progress.close()
                    raise self._diverged(reason)
                if final or (cfg.save_every and state.step % cfg.save_every == 0):
                    self.save(final_adapter=final)
                if stop.set and not final:
                    self.save(final_adapter=True)
                    self.progress.log(
                        f"interrupted at step {state.step}: saved the adapter to {self.out} and "
                        f"a checkpoint; resume with: {resume_command(self.out)}"
                    )
                    self.progress.close()
                    raise KeyboardInterrupt
        if self.world.is_main and not (self.out / rundir.ADAPTER_CONFIG).is_file():
            ckpt.save_final(self.out, self.model, self.prep.adapter_config)  # resumed a done run
        result = TrainResult(
            output=self.out,
            steps=state.step,
            trained_tokens=state.trained_tokens,
            final_loss=self.last_loss,
            val_loss=self.val_loss,
            best_val_loss=state.best_val_loss,
            best_step=state.best_step,
            n_compilations=self.step_fn.n_compilations,
            n_eval_compilations=self.eval_fn.n_compilations,
            elapsed_s=self._elapsed(),
            resumed_from=self.resume_from,
        )
        self.progress.log(summary(result))
        self.progress.close()
        return result


def _template_spec(template: Any, spec: str) -> str:
    """What --template resolved to, as a --template value ("tokenizer", "alpaca", a path)."""
    return spec if template is None else template.name


def train(cfg: TrainConfig, *, stream: Any = None) -> TrainResult:
    """Run one training job described by `cfg` (validated); progress goes to `stream` (stderr).

    Ctrl-C saves a checkpoint and the adapter, then re-raises KeyboardInterrupt; divergence
    raises TrainingDiverged. Only rank 0 writes files or prints, holding OUT's lock.
    """
    world = init_world()
    with _locked(cfg.output, world) as stale:
        run = _Run(cfg, world, stream)
        if stale:
            run.cleaned.insert(0, f"{cfg.output}: the earlier {stale} ended without cleaning up")
        return run.run()


@contextlib.contextmanager
def _locked(out: str, world: World) -> Iterator[str | None]:
    """Rank 0 holds OUT's lock for the run; yields what a killed earlier run left in it."""
    if not world.is_main:
        yield None
        return
    with runguard.RunLock(out) as lock:
        yield lock.stale


def resume_command(out: Path) -> str:
    """The command that continues the run in OUT exactly (its config.yaml has every setting)."""
    import shlex

    return f"mlxsft train -c {shlex.quote(str(out / rundir.CONFIG))} --resume auto"


def summary(r: TrainResult) -> str:
    """A short end-of-run summary."""
    parts = [
        f"done: {r.steps} steps, {r.trained_tokens:,} trained tokens in {r.elapsed_s:.1f} s",
        f"final loss {r.final_loss:.4f}" if r.final_loss is not None else "no steps run",
    ]
    if r.best_val_loss is not None:
        parts.append(f"best val loss {r.best_val_loss:.4f} at step {r.best_step}")
    compiled = f"{r.n_compilations} compilations"
    if r.n_eval_compilations:
        compiled += f" (+{r.n_eval_compilations} for evaluation)"
    parts.append(f"{compiled}; peak memory {peak_memory_gb():.2f} GB")
    parts.append(f"adapter: {r.output}")
    return "; ".join(parts)
