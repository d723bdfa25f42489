"""Learning-rate schedules (constant / linear / cosine, each with linear warmup) and optimizers.

The schedule is a function of the optimizer's own step counter (kept in `optimizer.state`), so a
resumed run that restores the optimizer state continues the schedule exactly.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import mlx.optimizers as optim

from mlxsft.config import TrainConfig

Schedule = Callable[[mx.array], mx.array]


def warmup_steps(warmup: float, total_steps: int) -> int:
    """`--warmup`: >= 1 is a step count, a value in (0, 1) a fraction of the total steps."""
    if warmup <= 0:
        return 0
    n = round(warmup * total_steps) if warmup < 1 else int(warmup)
    return min(n, max(total_steps - 1, 0))


def build_schedule(cfg: TrainConfig, total_steps: int) -> Schedule:
    """lr(step) for step = 0, 1, ... (the update about to be applied)."""
    lr = cfg.learning_rate
    n_warm = warmup_steps(cfg.warmup, total_steps)
    n_decay = max(total_steps - n_warm, 1)
    if cfg.lr_schedule == "constant":
        main: Schedule = lambda step: mx.array(lr, mx.float32)  # noqa: E731
    elif cfg.lr_schedule == "linear":
        main = optim.linear_schedule(lr, 0.0, n_decay)
    else:
        main = optim.cosine_decay(lr, n_decay, 0.0)
    if n_warm == 0:
        return main
    # Warmup from lr / (n_warm + 1): the first update is not wasted at lr = 0.
    warm = optim.linear_schedule(lr / (n_warm + 1), lr, n_warm)
    return optim.join_schedules([warm, main], [n_warm])


def build_optimizer(cfg: TrainConfig, schedule: Schedule) -> optim.Optimizer:
    if cfg.optimizer == "adamw":
        return optim.AdamW(learning_rate=schedule, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return optim.Adam(learning_rate=schedule)
    return optim.SGD(learning_rate=schedule, weight_decay=cfg.weight_decay)
