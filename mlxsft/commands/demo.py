"""`mlxsft demo`: an offline fine-tune end to end (tiny model, checkable tasks, before/after)."""

from __future__ import annotations

import click

from mlxsft.commands import options as opt


@click.command()
@click.option("--quick", is_flag=True, help="A short run (< 1 min on the tiny model) for CI.")
@opt.model(
    default=None,
    metavar="HUB_ID",
    help="Run the same flow on a real model (local dir or hub id; the hub needs the network).",
)
@opt.output(
    "Where the adapter, its metrics.jsonl and the fused model go.",
    default="mlxsft-demo",
    show_default=True,
    type=click.Path(file_okay=False),
)
def demo(quick: bool, model: str | None, output: str) -> None:
    """Fine-tune a tiny model offline and watch it learn held-out tasks (about 3 minutes on 2
    CPU cores).

    Builds a tiny model (cached under $MLXSFT_CACHE or ~/.cache/mlxsft), shows trained tokens,
    scores held-out prompts, trains, scores again, fuses and answers a prompt. The tiny model
    starts from random weights, so all of its weights are trained; with --model (quick or not)
    the demo trains a LoRA adapter on that model.
    """
    from mlxsft.demo import run_demo

    run_demo(quick=quick, model=model, output=output, echo=click.echo)
