"""`mlxsft report RUN_DIR`: a picture of a training run from its metrics.jsonl."""

from __future__ import annotations

import click


@click.command()
@click.argument("run_dir", type=click.Path(path_type=str))
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, path_type=str),
    default=None,
    help="PNG to write (needs matplotlib: pip install 'mlxsft[plot]'). "
    "Default: RUN_DIR/report.png when matplotlib is installed.",
)
@click.option("--width", default=60, show_default=True, help="Terminal chart width (columns).")
@click.option("--height", default=5, show_default=True, help="Rows per terminal chart panel.")
def report(run_dir: str, output: str | None, width: int, height: int) -> None:
    """Plot training loss, validation loss, learning rate and tokens/s of a run.

    Always prints a compact terminal chart; also writes a PNG when matplotlib is installed.
    """
    from pathlib import Path

    from mlxsft import report as rep
    from mlxsft import rundir

    metrics = rundir.read_metrics(run_dir)
    click.echo(rep.render_terminal_chart(metrics, width=width, height=height))
    if output is None and rep.have_matplotlib():
        output = str(rundir.metrics_path(run_dir).parent / "report.png")
    if output is not None:
        path = rep.render_png(metrics, Path(output))
        click.echo(f"wrote {path}")
