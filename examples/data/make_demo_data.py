"""Generate the demo dataset: small instruction tasks whose answers can be checked exactly.

Every row is a chat `messages` pair (user task -> assistant answer). Tasks work on letters and
digits written with spaces between them, so a tiny byte-level BPE tokenizer sees one token per
symbol and a 2-4 layer model can learn the rule (not the rows) in a few CPU minutes. The splits
are disjoint by prompt: no test or validation prompt appears in training, so accuracy on the
test split measures a learned rule.

    python examples/data/make_demo_data.py          # rewrites mlxsft/demo_data/

Writes mlxsft/demo_data/{train,valid,test}.jsonl, the only copy (packaged with mlxsft; a test
checks that it regenerates exactly).
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Callable
from pathlib import Path

SEED = 1234
SIZES = {"train": 2000, "valid": 100, "test": 100}
LETTERS = string.ascii_lowercase
DIGITS = string.digits


def _letters(rng: random.Random, lo: int, hi: int) -> list[str]:
    return [rng.choice(LETTERS) for _ in range(rng.randint(lo, hi))]


def _digits(rng: random.Random, lo: int, hi: int) -> list[str]:
    return [rng.choice(DIGITS) for _ in range(rng.randint(lo, hi))]


def reverse(rng: random.Random) -> tuple[str, str]:
    xs = _letters(rng, 3, 5)
    return f"Reverse the letters: {' '.join(xs)}", " ".join(reversed(xs))


def sort_numbers(rng: random.Random) -> tuple[str, str]:
    xs = _digits(rng, 3, 6)
    return f"Sort the numbers: {' '.join(xs)}", " ".join(sorted(xs))


def uppercase(rng: random.Random) -> tuple[str, str]:
    xs = _letters(rng, 3, 5)
    return f"Uppercase: {' '.join(xs)}", " ".join(x.upper() for x in xs)


def count_letters(rng: random.Random) -> tuple[str, str]:
    xs = _letters(rng, 1, 9)
    return f"How many letters? {' '.join(xs)}", str(len(xs))


def largest(rng: random.Random) -> tuple[str, str]:
    xs = _digits(rng, 3, 6)
    return f"Largest number: {' '.join(xs)}", max(xs)


def add_one(rng: random.Random) -> tuple[str, str]:
    xs = [rng.choice(DIGITS[:-1]) for _ in range(rng.randint(3, 6))]
    return f"Add one to each: {' '.join(xs)}", " ".join(str(int(x) + 1) for x in xs)


TASKS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "reverse": reverse,
    "sort": sort_numbers,
    "uppercase": uppercase,
    "count": count_letters,
    "largest": largest,
    "add_one": add_one,
}


def make_splits(seed: int = SEED, sizes: dict[str, int] = SIZES) -> dict[str, list[dict]]:
    """Rows per split, tasks interleaved round-robin; a prompt appears in at most one split."""
    rng = random.Random(seed)
    seen: set[str] = set()
    splits: dict[str, list[dict]] = {}
    names = list(TASKS)
    for split, n in sizes.items():
        rows: list[dict] = []
        while len(rows) < n:
            prompt, answer = TASKS[names[len(rows) % len(names)]](rng)
            if prompt in seen:
                continue
            seen.add(prompt)
            messages = [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": answer},
            ]
            rows.append({"messages": messages})
        splits[split] = rows
    return splits


def write(out: Path, seed: int = SEED) -> None:
    """Write train/valid/test.jsonl into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    for split, rows in make_splits(seed).items():
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        (out / f"{split}.jsonl").write_text(text, encoding="utf-8")


if __name__ == "__main__":
    root = Path(__file__).resolve().parents[2]
    write(root / "mlxsft" / "demo_data")
    print("wrote", {k: len(v) for k, v in make_splits().items()})
