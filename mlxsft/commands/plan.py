"""`mlxsft plan`: estimate a run's peak memory and recommend settings that fit. Imports only
Click at import time; the flags are `mlxsft train`'s (same names, same config file)."""

from __future__ import annotations

import click


@click.command()
@click.option("--model", "-m", help="Model directory or hub id (only config.json is read).")
@click.option("--data", "-d", help="Training data: measure lengths and trained tokens.")
@click.option("--config", "-c", "config_path", type=click.Path(), help="YAML run config.")
@click.option("--template", "-t", help="Chat template (as for train). [auto]")
@click.option("--format", "format", help="Data format (as for train). [auto]")
@click.option("--train-on", help="responses, last or all. [responses]")
@click.option("--max-seq-len", type=int, help="Max tokens per example / row. [2048]")
@click.option("--batch-size", "-b", type=int, help="Rows per step. [4]")
@click.option("--grad-accum", type=int, help="Micro-batches per step. [1]")
@click.option("--pack/--no-pack", default=None, help="Pack rows. [on]")
@click.option("--fine-tune-type", type=click.Choice(["lora", "dora", "full"]), help="[lora]")
@click.option("--rank", "--lora-rank", "rank", type=int, help="LoRA rank. [8]")
@click.option("--target-modules", help="Comma list or all-linear. [all-linear]")
@click.option("--num-layers", type=int, help="Adapt the last N blocks, -1 = all. [-1]")
@click.option("--quantize", type=click.Choice(["4", "8"]), help="Quantize the base on load.")
@click.option("--grad-checkpoint/--no-grad-checkpoint", default=None, help="[off]")
@click.option("--loss", type=click.Choice(["selective", "full"]), help="LM-head loss. [selective]")
@click.option(
    "--memory-budget",
    help="e.g. 16GB. [Apple silicon: Metal's recommended working set; else physical memory]",
)
def plan(config_path, memory_budget, **flags) -> None:
    """Estimate peak memory of a training run and recommend settings that fit the budget."""
    from mlxsft.config import resolve
    from mlxsft.errors import UserError
    from mlxsft.model.loading import read_config, resolve_model_path
    from mlxsft.plan import default_budget, parse_size, profile_data, report, run_shape

    if flags.get("quantize") is not None:
        flags["quantize"] = int(flags["quantize"])
    cfg = resolve(flags, config_path)
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
