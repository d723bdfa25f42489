"""`mlxsft train` and `mlxsft eval`. Imports only Click at import time.

Every option defaults to None here so that only the flags the user typed override the config
file; the real defaults live in `mlxsft.config.TrainConfig`.
"""

from __future__ import annotations

import json
import sys

import click

TEMPLATE_HELP = "auto, alpaca, chatml, llama3, mistral, gemma, phi3, tokenizer, or a .jinja file"
FORMATS = ("auto", "chat", "alpaca", "completion", "text")
TRAIN_ON = click.Choice(["responses", "last", "all"])


def _data_options(f):
    """Options shared by train and eval (how data is read, rendered, masked and batched)."""
    options = [
        click.option("--model", "-m", help="Model directory or hub id."),
        click.option("--data", "-d", help=".jsonl/.json file or a dir with train/valid.jsonl."),
        click.option("--template", "-t", help=f"Chat template: {TEMPLATE_HELP}. [auto]"),
        click.option("--format", "format", type=click.Choice(FORMATS), help="Data format. [auto]"),
        click.option("--train-on", type=TRAIN_ON, help="Trained tokens. [responses]"),
        click.option("--max-seq-len", type=int, help="Max tokens per example / row. [2048]"),
        click.option("--batch-size", "-b", type=int, help="Rows per step. [4]"),
        click.option("--pack/--no-pack", default=None, help="Pack rows. [on for RoPE models]"),
    ]
    for option in reversed(options):
        f = option(f)
    return f


@click.command()
@_data_options
@click.option("--config", "-c", "config_path", type=click.Path(), help="YAML run config.")
@click.option("--valid", help="Validation file. [DATA dir's valid.jsonl]")
@click.option("--output", "-o", help="Output directory. [adapters]")
@click.option("--fine-tune-type", type=click.Choice(["lora", "dora", "full"]), help="[lora]")
@click.option("--rank", "--lora-rank", "rank", type=int, help="LoRA rank. [8]")
@click.option("--alpha", "--lora-alpha", "alpha", type=float, help="scale = alpha/rank. [16]")
@click.option("--dropout", "--lora-dropout", "dropout", type=float, help="LoRA dropout. [0]")
@click.option("--target-modules", help="Comma list (q_proj,v_proj) or all-linear. [all-linear]")
@click.option("--num-layers", type=int, help="Adapt the last N blocks, -1 = all. [-1]")
@click.option("--quantize", type=click.Choice(["4", "8"]), help="Quantize the base on load.")
@click.option("--adapter", help="Start from an existing adapter directory.")
@click.option("--grad-accum", type=int, help="Micro-batches per step. [1]")
@click.option("--learning-rate", "--lr", "learning_rate", type=float, help="[1e-4]")
@click.option("--optimizer", type=click.Choice(["adamw", "adam", "sgd"]), help="[adamw]")
@click.option("--weight-decay", type=float, help="[0]")
@click.option(
    "--lr-schedule", type=click.Choice(["constant", "linear", "cosine"]), help="[constant]"
)
@click.option("--warmup", type=float, help="Warmup steps (>= 1) or fraction (< 1). [0]")
@click.option("--epochs", type=int, help="Epochs (shuffled by --seed). [1]")
@click.option("--iters", type=int, help="Optimizer steps (instead of --epochs).")
@click.option("--seed", type=int, help="[0]")
@click.option("--max-grad-norm", type=float, help="Clip the global gradient norm. [off]")
@click.option("--grad-checkpoint/--no-grad-checkpoint", default=None, help="[off]")
@click.option("--eval-every", type=int, help="Validate every N steps (0: at the end). [200]")
@click.option("--save-every", type=int, help="Checkpoint every N steps (0: at the end). [100]")
@click.option("--steps-per-report", type=int, help="Report every N steps. [10]")
@click.option("--resume", help="auto (newest checkpoint in --output) or a checkpoint dir.")
def train(config_path, **flags) -> None:
    """Fine-tune MODEL on DATA (LoRA, DoRA, full; QLoRA on quantized models).

    Writes adapters.safetensors + adapter_config.json (loadable by mlx_lm.load(..,
    adapter_path=OUT)), checkpoints/, metrics.jsonl and config.yaml to --output. Flags override
    --config. Distributed: `mlx.launch -n 2 --backend ring -- mlxsft train ...`.
    """
    from mlxsft.config import resolve
    from mlxsft.train.loop import train as run

    if flags.get("quantize") is not None:
        flags["quantize"] = int(flags["quantize"])
    cfg = resolve(flags, config_path)
    run(cfg)


@click.command("eval")
@_data_options
@click.option("--adapter", "-a", help="Adapter directory (e.g. the output of `mlxsft train`).")
@click.option("--split", default=None, help="Split of a DATA directory. [test if present]")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def eval_cmd(split, as_json, **flags) -> None:
    """Loss, perplexity and token count of MODEL [+ ADAPTER] on DATA, masked as in training."""
    from mlxsft.config import resolve
    from mlxsft.train.evaluate import evaluate_model

    cfg = resolve(flags)
    result = evaluate_model(cfg, split=split)
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(
        f"{result['split']}: loss {result['loss']:.4f}  perplexity {result['perplexity']:.3f}  "
        f"{result['tokens']} trained tokens in {result['examples']} examples",
        file=sys.stdout,
    )
