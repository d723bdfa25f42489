"""`mlxsft train` and `mlxsft eval`. Imports only Click and `mlxsft.config` (plain dataclasses,
no mlx) at import time.

Every option defaults to None here so that only the flags the user typed override the config
file; the defaults shown in `--help` are read from `mlxsft.config.TrainConfig`, where they live.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from mlxsft import config as C
from mlxsft.commands import options as opt

_d = opt.default_of


def _data_options(f):
    """Options shared by train and eval (how data is read, rendered, masked and batched)."""
    options = [
        opt.model(),
        opt.data(),
        opt.template(help=f"Chat template: {C.TEMPLATE_HELP}." + _d("template")),
        opt.data_format(help=C.FORMAT_HELP + _d("format"), dest="format"),
        opt.train_on(help=C.TRAIN_ON_HELP + _d("train_on")),
        opt.max_seq_len(type=int, help="Tokens per example/row." + _d("max_seq_len")),
        click.option("--batch-size", "-b", type=int, help="Rows per step." + _d("batch_size")),
        click.option("--pack/--no-pack", default=None, help="Pack rows. [on for RoPE models]"),
    ]
    for option in reversed(options):
        f = option(f)
    return f


@click.command()
@_data_options
@click.option("--config", "-c", "config_path", type=click.Path(), help="YAML run config.")
@click.option("--valid", help="Validation file. [DATA dir's valid.jsonl]")
@opt.output("Output directory (mlx-lm's --adapter-path)." + _d("output"), "--adapter-path")
@click.option("--fine-tune-type", type=click.Choice(C.FINE_TUNE_TYPES), help=_d("fine_tune_type"))
@click.option("--rank", "--lora-rank", "rank", type=int, help="LoRA rank." + _d("rank"))
@click.option(
    "--alpha", "--lora-alpha", "alpha", type=float, help="scale = alpha/rank." + _d("alpha")
)
@click.option(
    "--dropout", "--lora-dropout", "dropout", type=float, help="LoRA dropout." + _d("dropout")
)
@click.option("--target-modules", help="q_proj,v_proj or all-linear." + _d("target_modules"))
@click.option(
    "--num-layers", type=int, help="Adapt the last N blocks, -1 = all." + _d("num_layers")
)
@opt.quantize("Quantize the base on load (QLoRA).")
@click.option("--adapter", "-a", help="Start from an existing adapter directory.")
@click.option(
    "--train-tokens",
    help="Embedding/LM-head rows to train: auto (untrained special tokens of the data), none, "
    "or tokens like '</s>,<|im_end|>'." + _d("train_tokens"),
)
@click.option(
    "--add-chat-tokens/--no-add-chat-tokens",
    default=None,
    help="Base model without a chat template: add ChatML's <|im_start|>/<|im_end|> tokens, train "
    "their rows, use the chatml template; the tokenizer is saved with the adapter.",
)
@click.option("--grad-accum", type=int, help="Micro-batches per step." + _d("grad_accum"))
@click.option("--learning-rate", "--lr", "learning_rate", type=float, help=_d("learning_rate"))
@click.option("--optimizer", type=click.Choice(C.OPTIMIZERS), help=_d("optimizer"))
@click.option("--weight-decay", type=float, help=_d("weight_decay"))
@click.option("--lr-schedule", type=click.Choice(C.LR_SCHEDULES), help=_d("lr_schedule"))
@click.option("--warmup", type=float, help="Steps (>= 1) or fraction (< 1)." + _d("warmup"))
@click.option("--epochs", type=int, help="Epochs, shuffled by --seed. [1 unless --iters]")
@click.option("--iters", type=int, help="Optimizer steps (instead of --epochs).")
@click.option("--seed", type=int, help=_d("seed"))
@click.option(
    "--max-grad-norm", type=float, help="Clip the global grad norm." + _d("max_grad_norm")
)
@click.option("--grad-checkpoint/--no-grad-checkpoint", default=None, help=_d("grad_checkpoint"))
@click.option(
    "--loss",
    type=click.Choice(C.LOSS_HEADS),
    help="selective: LM head only at trained positions, chunked (less memory); full: plain logits."
    + _d("loss"),
)
@opt.eval_every(type=int, help="Validate every N steps, 0: at the end." + _d("eval_every"))
@click.option(
    "--save-every", type=int, help="Save every N steps, 0: at the end." + _d("save_every")
)
@click.option("--steps-per-report", type=int, help="Report every N steps." + _d("steps_per_report"))
@click.option(
    "--eval-prompts",
    help="At every evaluation, greedy-generate for held-out prompts (a data FILE, or `valid`) and "
    "report exact/contains match and the share of replies that stop.",
)
@click.option(
    "--eval-num-prompts", type=int, help="Prompts per evaluation." + _d("eval_num_prompts")
)
@click.option(
    "--eval-max-tokens",
    type=int,
    help="Reply length limit (no stop = not stopped)." + _d("eval_max_tokens"),
)
@click.option("--resume", help="auto (newest checkpoint in --output) or a checkpoint dir.")
@click.option(
    "--report-to",
    help=f"Also log metrics.jsonl's records to {' and/or '.join(C.REPORT_TO)} (comma list; "
    "pip install 'mlxsft[tensorboard]' / 'mlxsft[wandb]').",
)
def train(config_path, **flags) -> None:  # fmt: skip
    """Fine-tune MODEL on DATA (LoRA, DoRA, full; QLoRA on quantized models).

    Writes adapters.safetensors + adapter_config.json (loadable by mlx_lm.load(..,
    adapter_path=OUT)), checkpoints/, metrics.jsonl and config.yaml to --output. Flags override
    --config. Distributed: `mlx.launch -n 2 --backend ring -- mlxsft train ...`.
    """
    from mlxsft.train.loop import train as run

    cfg = C.resolve(flags, config_path)
    result = run(cfg)
    from mlxsft import rundir

    metrics = Path(result.output) / rundir.METRICS
    if metrics.is_file():  # rank 0 only writes it
        from mlxsft.report import render_terminal_chart

        click.echo(render_terminal_chart(rundir.read_metrics(metrics)), err=True)
        click.echo(next_steps(cfg.model, str(result.output)), err=True)


def next_steps(model: str | None, out: str) -> str:
    """What to run after training: talk to it, fuse it, plot it."""
    from shlex import quote

    m, o = quote(model or "MODEL"), quote(out)
    fused = quote(str(Path(out).with_name(Path(out).name + "-fused")))
    return "\n".join(
        [
            f"next: mlxsft chat -m {m} -a {o}",
            f"next: mlxsft fuse -m {m} -a {o} -o {fused}",
            f"next: mlxsft report {o}",
        ]
    )


@click.command("eval")
@_data_options
@opt.adapter(help="Adapter directory (e.g. the output of `mlxsft train`).")
@click.option("--split", default=None, help="Split of a DATA directory. [test, else valid]")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def eval_cmd(split, as_json, **flags) -> None:
    """Loss, perplexity and token count of MODEL [+ ADAPTER] on DATA, masked as in training."""
    import signal

    from mlxsft.train.evaluate import evaluate_model

    # eval writes nothing, so Ctrl-C ends it at once (the default action, exit status 130)
    # instead of after the batch in flight: Python's own handler only runs between MLX calls.
    old = signal.signal(signal.SIGINT, signal.SIG_DFL)
    click.echo("eval: loading the model and encoding the data (Ctrl-C stops) ...", err=True)
    try:
        result = evaluate_model(C.resolve(flags), split=split, on_batch=_eval_progress())
    finally:
        signal.signal(signal.SIGINT, old)
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(
        f"{result['split']}: loss {result['loss']:.4f}  perplexity {result['perplexity']:.3f}  "
        f"{result['tokens']} trained tokens in {result['examples']} examples"
    )


def _eval_progress():
    """`on_batch` for `evaluate`: a live `eval: batch i/n  ETA` line on a terminal, else a line
    at about every 10%."""
    import sys
    import time

    start = time.perf_counter()
    live = sys.stderr.isatty()

    def on_batch(done: int, total: int) -> None:
        elapsed = time.perf_counter() - start
        eta = elapsed / done * (total - done)
        line = f"eval: batch {done}/{total}  {elapsed:.0f} s  ETA {eta:.0f} s"
        if live:
            click.echo("\r" + line + ("\n" if done == total else ""), nl=False, err=True)
        elif done == total or done % max(1, total // 10) == 0:
            click.echo(line, err=True)

    return on_batch
