"""Divergence detection: when training has gone wrong for good, say so and stop.

Three signs, checked on values the loop already has on the host (no extra device sync):
- a non-finite loss or gradient norm;
- a loss stuck at or above ln(vocab) (no better than guessing uniformly) for `patience`
  observations after it had been clearly lower, or stuck exactly at ln(vocab) with a zero
  gradient (uniform predictions that no update can change): the weights were destroyed (e.g. a
  huge learning rate), even though every number is finite;
- a gradient norm `explode` times larger than its recent median.
The loss of step s is computed from the weights after step s - 1, so `first_bad_step - 1` is the
first step whose weights are suspect: checkpoints from there on are not "good".
"""

from __future__ import annotations

import math
import statistics
from collections import deque

HINT = "lower --learning-rate, add --warmup, or set --max-grad-norm 1.0"


class DivergenceWatch:
    def __init__(
        self,
        vocab_size: int,
        *,
        patience: int = 5,
        explode: float = 1e3,
        min_history: int = 5,
        margin: float = 0.1,
    ):
        self.ln_vocab = math.log(max(vocab_size, 2))
        self.patience, self.explode, self.min_history = patience, explode, min_history
        # "clearly lower": by 10% of ln(vocab) (at least 0.5 nats), so that a random model
        # hovering around ln(vocab) never counts as having learned and then diverged
        self.margin = max(margin * self.ln_vocab, 0.5)
        self.best_loss = math.inf
        self.high_since: int | None = None  # first step of the current run of losses >= ln V
        self.n_high = 0
        self.norms: deque[float] = deque(maxlen=50)
        self.first_bad_step: int | None = None

    @property
    def suspect(self) -> bool:
        """The loss is at or above ln(vocab) after having been lower (not yet for long)."""
        return self.high_since is not None

    def observe(self, step: int, loss: float, grad_norm: float | None) -> str | None:
        """Record step `step`'s loss and pre-clip gradient norm; the reason to stop, or None."""
        if not math.isfinite(loss):
            return self._bad(step, f"the training loss became {loss} at step {step}")
        if grad_norm is not None and not math.isfinite(grad_norm):
            return self._bad(step, f"the gradient norm became {grad_norm} at step {step}")
        dead = abs(loss - self.ln_vocab) < 1e-3 and grad_norm is not None and grad_norm < 1e-8
        if loss >= self.ln_vocab - 1e-3 and (self.best_loss < self.ln_vocab - self.margin or dead):
            if self.high_since is None:
                self.high_since, self.n_high = step, 0
            self.n_high += 1
            if self.n_high >= self.patience:
                return self._bad(
                    self.high_since,
                    f"the training loss has stayed at or above ln(vocab) = {self.ln_vocab:.2f} "
                    f"(no better than guessing) since step {self.high_since}"
                    + ("" if dead else f", after reaching {self.best_loss:.4f}"),
                )
        else:
            self.high_since = None
        self.best_loss = min(self.best_loss, loss)
        if grad_norm is not None and len(self.norms) >= self.min_history:
            median = statistics.median(self.norms)
            if median > 0 and grad_norm > self.explode * median:
                return self._bad(
                    step,
                    f"the gradient norm exploded to {grad_norm:.3g} at step {step} "
                    f"({grad_norm / median:.0f}x its recent median {median:.3g})",
                )
        if grad_norm is not None:
            self.norms.append(grad_norm)
        return None

    def finish(self) -> str | None:
        """At the end of the run: a loss still stuck at ln(vocab) is a divergence too."""
        if self.high_since is None or self.n_high < 2:
            return None
        return self._bad(
            self.high_since,
            f"the training loss ended at or above ln(vocab) = {self.ln_vocab:.2f} (no better "
            f"than guessing) since step {self.high_since}",
        )

    def _bad(self, step: int, reason: str) -> str:
        self.first_bad_step = step
        return reason
