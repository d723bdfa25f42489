"""The flags several commands share, spelled once, so every command uses one vocabulary:
`-m/--model`, `-a/--adapter` (alias `--adapter-path`), `-o/--output`, `-d/--data`,
`--max-seq-len` (alias `--max-seq-length`), `--eval-every` (alias `--steps-per-eval`), and the
choice lists of `mlxsft.config`. Imports only Click and `mlxsft.config` (keeps `--help` fast).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from mlxsft import config as C
from mlxsft.errors import UserError


def default_of(field: str) -> str:
    """` [default]` of a TrainConfig field, for help texts."""
    value = getattr(C.TrainConfig, field)
    return f" [{'off' if value is None or value is False else value}]"


def model(help: str = "Model directory or hub id.", **kw: Any) -> Callable:
    return click.option("--model", "-m", help=help, **kw)


def adapter(help: str = "Adapter directory (mlxsft / mlx-lm, or PEFT).", **kw: Any) -> Callable:
    return click.option("--adapter", "-a", "--adapter-path", "adapter", help=help, **kw)


def output(help: str, *aliases: str, **kw: Any) -> Callable:
    return click.option("--output", "-o", *aliases, "output", help=help, **kw)


def data(help: str = ".jsonl/.json file or a dir with train/valid.jsonl.", **kw: Any) -> Callable:
    return click.option("--data", "-d", help=help, **kw)


def max_seq_len(help: str, **kw: Any) -> Callable:
    return click.option("--max-seq-len", "--max-seq-length", "max_seq_len", help=help, **kw)


def eval_every(help: str, **kw: Any) -> Callable:
    return click.option("--eval-every", "--steps-per-eval", "eval_every", help=help, **kw)


def template(help: str = C.TEMPLATE_HELP, **kw: Any) -> Callable:
    return click.option("--template", "-t", help=help, **kw)


def data_format(help: str = C.FORMAT_HELP, dest: str = "fmt", **kw: Any) -> Callable:
    return click.option("--format", dest, type=click.Choice(C.DATA_FORMATS), help=help, **kw)


def train_on(help: str = C.TRAIN_ON_HELP, **kw: Any) -> Callable:
    return click.option("--train-on", type=click.Choice(C.TRAIN_ON), help=help, **kw)


def quantize(help: str, **kw: Any) -> Callable:
    """--quantize 4|8, passed on as an int (None when not given)."""

    def to_int(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
        return None if value is None else int(value)

    choices = click.Choice([str(b) for b in C.QUANTIZE_BITS])
    return click.option("--quantize", type=choices, callback=to_int, help=help, **kw)


def data_argument(f: Callable) -> Callable:
    """DATA as a positional argument or as `-d/--data` (the same flag as `train`)."""
    f = click.option("--data", "-d", "data_opt", default=None, help="DATA as a flag.")(f)
    return click.argument("data_path", metavar="DATA", required=False)(f)


def one_data(data_path: str | None, data_opt: str | None) -> str:
    """The DATA of `data_argument` (positional or -d; not two different ones)."""
    if data_path and data_opt and data_path != data_opt:
        raise UserError("DATA given twice", hint="pass it once, as an argument or with -d")
    if not (data_path or data_opt):
        raise UserError("no DATA given", hint="pass a .jsonl file or a directory (or -d DATA)")
    return data_path or data_opt  # type: ignore[return-value]
