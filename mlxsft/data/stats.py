"""Dataset statistics for `mlxsft data inspect`: sizes, trained fraction, drops and warnings,
the padding a batch size would waste (file order vs. sorted-length buckets), and examples shown
with their trained tokens marked."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np

from mlxsft.data.types import Dropped, Encoded

MAX_LISTED = 5  # sources listed per warning
GREEN, RESET = "\x1b[1;32m", "\x1b[0m"


@dataclass
class DatasetStats:
    n_examples: int = 0  # encoded + dropped
    n_encoded: int = 0
    n_dropped: int = 0
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> count
    n_truncated: int = 0
    n_tokens: int = 0
    n_trained: int = 0
    trained_fraction: float = 0.0
    min_len: int = 0
    mean_len: float = 0.0
    max_len: int = 0
    length_histogram: list[tuple[int, int, int]] = field(default_factory=list)  # (lo, hi, n)
    n_fully_masked: int = 0
    n_missing_eot: int = 0
    n_not_prefix_stable: int = 0
    n_generation_disagrees: int = 0  # {% generation %} spans differ from the offsets method
    examples_missing_eot: list[str] = field(default_factory=list)
    examples_not_prefix_stable: list[str] = field(default_factory=list)
    examples_dropped: list[str] = field(default_factory=list)  # "source: reason"
    batch_size: int = 0
    padding_waste_naive: float = 0.0  # fraction of padded tokens, batches in file order
    padding_waste_sorted: float = 0.0  # ... batches of sorted lengths

    def to_dict(self) -> dict:
        out = asdict(self)
        out["length_histogram"] = [list(b) for b in self.length_histogram]
        return out


def padding_waste(lengths: list[int], batch_size: int) -> float:
    """Fraction of a padded batch's tokens that are padding (each batch padded to its max)."""
    if not lengths or batch_size < 1:
        return 0.0
    padded = 0
    for i in range(0, len(lengths), batch_size):
        chunk = lengths[i : i + batch_size]
        padded += max(chunk) * len(chunk)
    return 1.0 - sum(lengths) / padded


def length_histogram(lengths: list[int]) -> list[tuple[int, int, int]]:
    """Counts in power-of-two bins [lo, hi) from 0 up to the longest example."""
    if not lengths:
        return []
    edges = [0, 64]
    while edges[-1] <= max(lengths):
        edges.append(edges[-1] * 2)
    counts = np.histogram(lengths, bins=edges)[0]
    return [(edges[k], edges[k + 1], int(c)) for k, c in enumerate(counts)]


def compute_stats(encoded: list[Encoded], dropped: list[Dropped], batch_size: int = 4):
    lengths = [e.n_tokens for e in encoded]
    n_tokens = sum(lengths)
    n_trained = sum(e.n_trained for e in encoded)
    reasons = Counter(d.reason for d in dropped)
    return DatasetStats(
        n_examples=len(encoded) + len(dropped),
        n_encoded=len(encoded),
        n_dropped=len(dropped),
        dropped=dict(reasons),
        n_truncated=sum(e.truncated for e in encoded),
        n_tokens=n_tokens,
        n_trained=n_trained,
        trained_fraction=n_trained / n_tokens if n_tokens else 0.0,
        min_len=min(lengths, default=0),
        mean_len=n_tokens / len(lengths) if lengths else 0.0,
        max_len=max(lengths, default=0),
        length_histogram=length_histogram(lengths),
        n_fully_masked=reasons.get("fully masked", 0),
        n_missing_eot=sum(e.missing_eot for e in encoded),
        n_not_prefix_stable=sum(e.not_prefix_stable for e in encoded),
        n_generation_disagrees=sum(e.generation_disagrees for e in encoded),
        examples_missing_eot=[e.source for e in encoded if e.missing_eot][:MAX_LISTED],
        examples_not_prefix_stable=[e.source for e in encoded if e.not_prefix_stable][:MAX_LISTED],
        examples_dropped=[f"{d.source}: {d.reason}" for d in dropped][:MAX_LISTED],
        batch_size=batch_size,
        padding_waste_naive=padding_waste(lengths, batch_size),
        padding_waste_sorted=padding_waste(sorted(lengths), batch_size),
    )


def format_stats(s: DatasetStats) -> str:
    """The human-readable stats block."""
    pct = f"{100 * s.trained_fraction:.1f}%"
    lines = [
        f"examples        {s.n_examples} ({s.n_encoded} kept, {s.n_dropped} dropped)",
        f"tokens          {s.n_tokens} ({s.n_trained} trained, {pct})",
        f"length          min {s.min_len}  mean {s.mean_len:.1f}  max {s.max_len}",
        f"truncated       {s.n_truncated}",
        f"fully masked    {s.n_fully_masked}",
        f"missing end-of-turn  {s.n_missing_eot}",
        f"not prefix-stable    {s.n_not_prefix_stable}",
        f"generation tags disagree  {s.n_generation_disagrees}",
        f"padding waste at batch size {s.batch_size}: "
        f"{100 * s.padding_waste_naive:.1f}% in file order, "
        f"{100 * s.padding_waste_sorted:.1f}% with sorted-length buckets",
    ]
    for reason, n in sorted(s.dropped.items()):
        lines.append(f"dropped: {reason}: {n}")
    if s.length_histogram:
        lines.append("length histogram:")
        peak = max(n for _, _, n in s.length_histogram) or 1
        for lo, hi, n in s.length_histogram:
            lines.append(f"  [{lo:>6}, {hi:>6})  {n:>6}  {'#' * round(30 * n / peak)}")
    for label, items in (
        ("warning: no end-of-turn marker in a trained turn", s.examples_missing_eot),
        (
            "warning: template not prefix-stable (spans located by search)",
            s.examples_not_prefix_stable,
        ),
        ("dropped", s.examples_dropped),
    ):
        for item in items:
            lines.append(f"{label}: {item}")
    return "\n".join(lines)


def marked_text(tokenizer, input_ids, loss_mask, *, color: bool) -> str:
    """Decode runs of equally-masked tokens; trained runs in green or inside [[...]]."""
    parts: list[str] = []
    start = 0
    n = len(input_ids)
    for i in range(1, n + 1):
        if i == n or loss_mask[i] != loss_mask[start]:
            text = tokenizer.decode([int(t) for t in input_ids[start:i]], skip_special_tokens=False)
            if loss_mask[start]:
                text = f"{GREEN}{text}{RESET}" if color else f"[[{text}]]"
            parts.append(text)
            start = i
    return "".join(parts)
