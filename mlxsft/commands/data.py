"""`mlxsft data inspect` and `mlxsft data validate`: see exactly which tokens are trained, and find
every bad row. Imports only Click at module import; the data path is imported inside commands."""

from __future__ import annotations

import json
import sys

import click

from mlxsft import config as C
from mlxsft.commands import options as opt


@click.group()
def data() -> None:
    """Inspect and validate training data."""


@data.command()
@opt.data_argument
@opt.model(required=True, help="Model directory or hub id (tokenizer only).")
@opt.template(default="auto", show_default=True)
@opt.data_format(default="auto")
@opt.train_on(default="responses", show_default=True)
@opt.max_seq_len(type=click.IntRange(min=2), default=C.TrainConfig.max_seq_len, show_default=True,
                 help="Truncate each example to N tokens, as `train` does.")  # fmt: skip
@click.option("-n", "num", type=click.IntRange(min=0), default=3, show_default=True,
              help="Examples to show (0: all).")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="One JSON object per example, then stats.")
@click.option("--batch-size", "-b", type=click.IntRange(min=1), default=C.TrainConfig.batch_size,
              show_default=True, help="Batch size for the padding-waste projection.")  # fmt: skip
@click.option("--split", default="train", show_default=True, help="Split of a DATA directory.")
@click.option("--color/--no-color", default=None, help="Colour trained tokens (default: on a TTY).")
def inspect(data_path, data_opt, model, template, fmt, train_on, max_seq_len, num, as_json,
            batch_size, split, color) -> None:  # fmt: skip
    """Show examples with their trained tokens marked, and dataset statistics.

    Trained tokens are green on a terminal and wrapped as [[...]] otherwise.
    """
    from mlxsft.data.encode import encode_dataset
    from mlxsft.data.formats import read_examples
    from mlxsft.data.stats import format_stats, marked_text
    from mlxsft.data.templates import resolve_template, template_label, template_warnings
    from mlxsft.errors import DataError
    from mlxsft.model.loading import load_tokenizer

    data_path = opt.one_data(data_path, data_opt)
    examples, errors = read_examples(data_path, fmt, split=split)
    if not examples:
        first = f"; first: {errors[0]}" if errors else ""
        raise DataError(f"{data_path}: no usable rows{first}", hint="run `mlxsft data validate`")
    for err in errors[:5]:
        click.echo(f"warning: skipping bad row: {err}", err=True)
    if len(errors) > 5:
        click.echo(f"warning: {len(errors) - 5} more bad rows skipped", err=True)
    tokenizer = load_tokenizer(model)
    chat_template = resolve_template(template, tokenizer)
    for warning in template_warnings(chat_template, tokenizer):
        click.echo(f"warning: {warning}", err=True)
    encoded, stats = encode_dataset(
        examples, tokenizer, chat_template, train_on, max_seq_len, batch_size=batch_size
    )
    shown = encoded if num == 0 else encoded[:num]
    if as_json:
        for enc in shown:
            click.echo(json.dumps(_example_json(enc), ensure_ascii=False))
        click.echo(json.dumps({"stats": stats.to_dict()}, ensure_ascii=False))
        return
    color = sys.stdout.isatty() if color is None else color
    click.echo(
        f"template: {template_label(chat_template.name, examples)}   format: {examples[0].kind}"
        f"   train on: {train_on}   max seq len: {max_seq_len}"
    )
    for enc in shown:
        cut = f", truncated to {max_seq_len}" if enc.truncated else ""
        click.echo(f"\n--- {enc.source}  ({enc.n_tokens} tokens, {enc.n_trained} trained{cut})")
        click.echo(marked_text(tokenizer, enc.input_ids, enc.loss_mask, color=color))
    click.echo("\n" + format_stats(stats))


def _example_json(enc) -> dict:
    return {
        "source": enc.source,
        "input_ids": [int(i) for i in enc.input_ids],
        "loss_mask": [int(m) for m in enc.loss_mask],
        "n_tokens": enc.n_tokens,
        "n_trained": enc.n_trained,
        "truncated": enc.truncated,
        "missing_eot": enc.missing_eot,
        "not_prefix_stable": enc.not_prefix_stable,
    }


def _drop_problem(out) -> str:
    if out.reason == "template raised":  # the detail already says which template and why
        return out.detail
    return f"{out.reason} ({out.detail})" if out.detail else out.reason


@data.command()
@opt.data_argument
@opt.data_format(default="auto")
@opt.model(default=None, help="Also render every row with this tokenizer.")
@opt.template(default="auto", show_default=True)
@opt.train_on(default="responses", show_default=True)
def validate(data_path, data_opt, fmt, model, template, train_on) -> None:
    """Check every row; print each bad one as `file:line: problem` and exit 1 if any.

    With --model, rows are also rendered with the chat template and encoded, so templates that
    raise and turns that cannot be located are reported too. A directory checks every split.
    """
    from pathlib import Path

    from mlxsft.data.formats import read_examples
    from mlxsft.data.reading import find_splits
    from mlxsft.data.render import Renderer
    from mlxsft.data.templates import resolve_template
    from mlxsft.data.types import Dropped
    from mlxsft.model.loading import load_tokenizer

    data_path = opt.one_data(data_path, data_opt)
    splits = list(find_splits(data_path)) if Path(data_path).is_dir() else ["train"]
    renderer = None
    if model is not None:
        tokenizer = load_tokenizer(model)
        renderer = Renderer(tokenizer, resolve_template(template, tokenizer))
    n_rows = n_bad = 0
    for split in splits:
        examples, errors = read_examples(data_path, fmt, split=split)
        problems = [str(e) for e in errors]
        if renderer is not None:
            for ex in examples:
                out = renderer.render(ex, train_on)
                if isinstance(out, Dropped):
                    problems.append(f"{out.source}: {_drop_problem(out)}")
        for line in problems:
            click.echo(line)
        n_rows += len(examples) + len(errors)
        n_bad += len(problems)
    if n_bad:
        click.echo(f"{n_bad} problem(s) in {n_rows} rows", err=True)
        sys.exit(1)
    click.echo(f"ok: {n_rows} rows", err=True)
