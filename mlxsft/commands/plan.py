"""`mlxsft plan`: estimate a run's peak memory and recommend settings that fit. Imports only
Click at import time; the flags are `mlxsft train`'s (same names, same config file)."""

from __future__ import annotations

import click

from mlxsft import config as C
from mlxsft.commands import options as opt

_d = opt.default_of


@click.command()
@opt.model(help="Model directory or hub id (only config.json is read).")
@opt.data(help="Training data: measure lengths and trained tokens.")
@click.option("--config", "-c", "config_path", type=click.Path(), help="YAML run config.")
@opt.template(help="Chat template (as for train)." + _d("template"))
@opt.data_format(help="Data format (as for train)." + _d("format"), dest="format")
@opt.train_on(help=C.TRAIN_ON_HELP + _d("train_on"))
@opt.max_seq_len(type=int, help="Max tokens per example / row." + _d("max_seq_len"))
@click.option("--batch-size", "-b", type=int, help="Rows per step." + _d("batch_size"))
@click.option("--grad-accum", type=int, help="Micro-batches per step." + _d("grad_accum"))
@click.option("--pack/--no-pack", default=None, help="Pack rows. [on for RoPE models]")
@click.option("--fine-tune-type", type=click.Choice(C.FINE_TUNE_TYPES), help=_d("fine_tune_type"))
@click.option("--rank", "--lora-rank", "rank", type=int, help="LoRA rank." + _d("rank"))
@click.option("--target-modules", help="Comma list or all-linear." + _d("target_modules"))
@click.option(
    "--num-layers", type=int, help="Adapt the last N blocks, -1 = all." + _d("num_layers")
)
@opt.quantize("Quantize the base on load.")
@click.option("--grad-checkpoint/--no-grad-checkpoint", default=None, help=_d("grad_checkpoint"))
@click.option("--loss", type=click.Choice(C.LOSS_HEADS), help="LM-head loss." + _d("loss"))
@click.option(
    "--memory-budget",
    help="e.g. 16GB. [Apple silicon: Metal's recommended working set; else physical memory]",
)
def plan(config_path, memory_budget, **flags) -> None:
    """Estimate peak memory of a training run and recommend settings that fit the budget."""
    from mlxsft.errors import UserError
    from mlxsft.model.loading import read_config, resolve_model_path
    from mlxsft.plan import default_budget, parse_size, profile_data, report, run_shape

    cfg = C.resolve(flags, config_path)
    if not cfg.model:
        raise UserError("no model given", hint="pass --model DIR_OR_HUB_ID")
    path = resolve_model_path(cfg.model)
    config = read_config(path)
    budget, source = (
        (parse_size(memory_budget), "--memory-budget") if memory_budget else default_budget()
    )
    profile = None
    if cfg.data:
        from mlxsft.model.loading import load_tokenizer
        from mlxsft.train.setup import encode_split

        encoded, _ = encode_split(cfg, load_tokenizer(str(path)), cfg.data, "train")
        profile = profile_data(encoded, run_shape(cfg), pack=cfg.pack is not False)
    text, _ = report(config, run_shape(cfg, profile), budget, source, profile)
    click.echo(text)
