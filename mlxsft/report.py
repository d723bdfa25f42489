"""Training reports: `metrics.jsonl` -> a PNG (matplotlib, optional) or a compact terminal chart.

`metrics.jsonl` (written by `mlxsft.train.loop`) holds one JSON object per line:
  {"type": "train", "step", "epoch", "loss", "lr", "trained_tokens", "tokens_per_sec",
   "peak_memory_gb", "elapsed_s"}  and
  {"type": "eval", "step", "val_loss", "val_ppl", "val_tokens", "eval_s"}
and, with `train --eval-prompts`, {"type": "gen_eval", "step", "exact_match", "contains_match",
"stop_rate", "n_prompts", "mean_reply_tokens"} (drawn as two more panels).
The terminal chart is pure Python, so `train` can print it at the end of every run; the PNG needs
the optional `plot` extra (`pip install 'mlxsft[plot]'`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from mlxsft.errors import UserError

# (title, record type, key): the four panels, in order.
PANELS: tuple[tuple[str, str, str], ...] = (
    ("train loss", "train", "loss"),
    ("val loss", "eval", "val_loss"),
    ("learning rate", "train", "lr"),
    ("tokens/s", "train", "tokens_per_sec"),
)
# Drawn when the run has generation-eval records (train --eval-prompts): rates in [0, 1].
GEN_PANELS: tuple[tuple[str, str, str], ...] = (
    ("replies stopped", "gen_eval", "stop_rate"),
    ("exact match", "gen_eval", "exact_match"),
)
LOG_PANELS = ("train loss", "val loss")  # log scale when positive and spanning > LOG_RATIO
LOG_RATIO = 20.0
_BLOCKS = " ▁▂▃▄▅▆▇█"  # 0..8 eighths of a cell
_LABEL = 9  # width of the y-axis label column


def series(metrics: list[dict[str, Any]], kind: str, key: str) -> list[tuple[float, float]]:
    """(step, value) pairs of `key` in records of `type == kind`, finite values only."""
    out = []
    for r in metrics:
        value = r.get(key)
        numeric = isinstance(value, (int, float)) and math.isfinite(value)
        if r.get("type", "train") == kind and numeric:
            out.append((float(r["step"]), float(value)))
    return out


def _columns(points: list[tuple[float, float]], lo: float, hi: float, width: int) -> list:
    """Resample points onto `width` step buckets over [lo, hi]: bucket means, gaps interpolated."""
    sums, counts = [0.0] * width, [0] * width
    span = max(hi - lo, 1e-12)
    for step, value in points:
        c = min(width - 1, int((step - lo) / span * width))
        sums[c] += value
        counts[c] += 1
    cols: list[float | None] = [s / n if n else None for s, n in zip(sums, counts, strict=True)]
    known = [i for i, v in enumerate(cols) if v is not None]
    for a, b in zip(known, known[1:], strict=False):  # linear fill between measured buckets
        for i in range(a + 1, b):
            cols[i] = cols[a] + (cols[b] - cols[a]) * (i - a) / (b - a)
    return cols


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def _panel(title: str, points, lo: float, hi: float, width: int, height: int) -> list[str]:
    """One filled area chart: a title line, `height` plot rows and an axis line."""
    values = [v for _, v in points]
    if not values:
        return [f"{title}: no data"]
    first, last, vmin, vmax = values[0], values[-1], min(values), max(values)
    head = f"{title}: first {_fmt(first)}  last {_fmt(last)}  min {_fmt(vmin)}  max {_fmt(vmax)}"
    log = title in LOG_PANELS and vmin > 0 and vmax / vmin > LOG_RATIO
    if log:  # a falling loss spans decades: a linear axis would flatten everything after step 50
        head += "  (log scale)"
        points = [(step, math.log10(v)) for step, v in points]
    cols = _columns(points, lo, hi, width)
    lo_v, hi_v = (math.log10(vmin), math.log10(vmax)) if log else (vmin, vmax)
    levels = height * 8
    rows = []
    for r in range(height):
        bottom = (height - 1 - r) * 8
        cells = []
        for v in cols:
            if v is None:
                cells.append(" ")
                continue
            # At least one eighth, so the minimum is still visible.
            level = 1 + round((v - lo_v) / (hi_v - lo_v) * (levels - 1)) if hi_v > lo_v else 1
            cells.append(_BLOCKS[max(0, min(8, level - bottom))])
        label = _fmt(vmax) if r == 0 else _fmt(vmin) if r == height - 1 else ""
        rows.append(f"{label:>{_LABEL - 1}} │{''.join(cells)}")
    return [head, *rows]


def render_terminal_chart(
    metrics: list[dict[str, Any]], *, width: int = 60, height: int = 5
) -> str:
    """A compact text chart of train loss, val loss, lr and tokens/s on a shared step axis."""
    if width < 2 or height < 1:
        raise UserError(f"chart too small: width={width}, height={height}", hint="width >= 2")
    steps = [float(r["step"]) for r in metrics if isinstance(r.get("step"), (int, float))]
    if not steps:
        return "no metrics recorded yet"
    lo, hi = min(steps), max(steps)
    lines = [_summary(metrics)]
    gen = [p for p in GEN_PANELS if series(metrics, p[1], p[2])]
    for title, kind, key in PANELS + tuple(gen):
        lines += _panel(title, series(metrics, kind, key), lo, hi, width, height)
    axis_label = f"step {int(lo)}"
    end_label = f"{int(hi)}"
    gap = max(1, width - len(axis_label) - len(end_label))
    lines.append(" " * _LABEL + "└" + "─" * width)
    lines.append(" " * (_LABEL + 1) + axis_label + " " * gap + end_label)
    return "\n".join(lines)


def _summary(metrics: list[dict[str, Any]]) -> str:
    """One line: steps, tokens, time, peak memory (from the last train record)."""
    train = [r for r in metrics if r.get("type", "train") == "train"]
    if not train:
        return f"{len(metrics)} eval records, no train records"
    last = train[-1]
    parts = [f"step {last['step']}"]
    if "trained_tokens" in last:
        parts.append(f"{last['trained_tokens']:,} trained tokens")
    if "elapsed_s" in last:
        parts.append(f"{last['elapsed_s']:.1f} s")
    peak = max((r.get("peak_memory_gb") or 0.0) for r in train)
    if peak:
        parts.append(f"peak memory {peak:.2f} GB")
    return "run: " + ", ".join(parts)


def have_matplotlib() -> bool:
    """Whether the optional `plot` extra is installed."""
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def render_png(
    metrics: list[dict[str, Any]], output: str | Path, *, size: tuple[int, int] = (1200, 800)
) -> Path:
    """Write a 2x2 PNG (train/val loss, lr, tokens/s) of exactly `size` pixels; needs matplotlib."""
    if not have_matplotlib():
        raise UserError(
            "writing a PNG needs matplotlib", hint="pip install 'mlxsft[plot]' (or matplotlib)"
        )
    # Figure + Agg canvas directly: no pyplot, so no global backend state is touched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    dpi = 100
    fig = Figure(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2).ravel()
    loss_ax = axes[0]
    for (title, kind, key), ax in zip(PANELS, [loss_ax, loss_ax, axes[2], axes[3]], strict=True):
        points = series(metrics, kind, key)
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, label=title, marker="o" if kind == "eval" else None, markersize=3)
    losses = [v for _, v in series(metrics, "train", "loss") + series(metrics, "eval", "val_loss")]
    if losses and min(losses) > 0 and max(losses) / min(losses) > LOG_RATIO:
        loss_ax.set_yscale("log")
    loss_ax.set_title("loss")
    loss_ax.legend()
    val = series(metrics, "eval", "val_ppl")
    if val:
        xs, ys = zip(*val, strict=True)
        axes[1].plot(xs, ys, marker="o", markersize=3, color="tab:orange")
        if min(ys) > 0 and max(ys) / min(ys) > LOG_RATIO:
            axes[1].set_yscale("log")
    axes[1].set_title("validation perplexity")
    gen = [(title, series(metrics, kind, key)) for title, kind, key in GEN_PANELS]
    if any(points for _, points in gen):
        rates = axes[1].twinx()
        for title, points in gen:
            if points:
                xs, ys = zip(*points, strict=True)
                rates.plot(xs, ys, marker="s", markersize=3, linestyle="--", label=title)
        rates.set_ylim(-0.05, 1.05)
        rates.legend(loc="upper right")
        axes[1].set_title("validation perplexity; generation eval (dashed)")
    axes[2].set_title("learning rate")
    axes[3].set_title("tokens/s")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(_summary(metrics))
    fig.tight_layout()
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)  # no bbox="tight": the pixel size must stay exactly `size`
    return out
