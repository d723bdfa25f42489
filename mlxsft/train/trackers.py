"""Experiment tracking: every record written to `metrics.jsonl` is also sent, unchanged, to
TensorBoard and/or Weights & Biases (`--report-to tensorboard,wandb`). Both are optional extras
(`pip install 'mlxsft[tensorboard]'` / `'mlxsft[wandb]'`); only rank 0 reports.

TensorBoard event files go to OUT/tensorboard (tensorboardX writer). W&B follows its own
environment (WANDB_PROJECT, default "mlxsft"; WANDB_MODE=offline for no network) and keeps its
files under OUT. Scalars are named `train/loss`, `eval/val_loss`, ... at the record's step.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mlxsft.config import REPORT_TO
from mlxsft.errors import UserError

_PACKAGES = {"tensorboard": ("tensorboardX", "tensorboard"), "wandb": ("wandb", "wandb")}


def parse_report_to(value: str | None) -> list[str]:
    """`"tensorboard,wandb"` -> ["tensorboard", "wandb"]; "none" or empty -> []."""
    names = [n.strip() for n in (value or "").split(",") if n.strip() and n.strip() != "none"]
    for name in names:
        if name not in REPORT_TO:
            raise UserError(
                f"invalid report_to {name!r}",
                where="report_to",
                hint=f"one of {', '.join(REPORT_TO)}",
            )
    return names


def check_available(value: str | None) -> None:
    """Fail before the model loads when a requested tracker's package is missing."""
    import importlib.util

    for name in parse_report_to(value):
        module, extra = _PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise UserError(
                f"--report-to {name} needs the {module} package",
                hint=f"pip install 'mlxsft[{extra}]'",
            )


class TensorBoard:
    def __init__(self, out: Path, config: dict[str, Any]):
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(logdir=str(out / "tensorboard"), flush_secs=10)
        self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in config.items()))

    def log(self, record: dict[str, Any]) -> None:
        for key, value in _scalars(record).items():
            self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self.writer.close()


class WandB:
    def __init__(self, out: Path, config: dict[str, Any]):
        import wandb

        project = os.environ.get("WANDB_PROJECT", "mlxsft")
        self.run = wandb.init(project=project, dir=str(out), name=out.name, config=config)

    def log(self, record: dict[str, Any]) -> None:
        self.run.log(_scalars(record), step=record["step"])

    def close(self) -> None:
        self.run.finish()


def _scalars(record: dict[str, Any]) -> dict[str, float]:
    kind = record.get("type", "train")
    return {
        f"{kind}/{k}": float(v)
        for k, v in record.items()
        if k not in ("type", "step") and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def open_trackers(value: str | None, out: Path, config: dict[str, Any]) -> list[Any]:
    """The trackers named in `value` (a comma list), opened for run directory `out`."""
    kinds = {"tensorboard": TensorBoard, "wandb": WandB}
    return [kinds[name](out, config) for name in parse_report_to(value)]
