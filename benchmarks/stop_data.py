"""Write small instruction sets with checkable answers for the stop benchmark (bench_stop.py).

`--task story` (for stories260K): copy a short sentence, or name the animal in it. Held-out rows
use (name, animal, verb) combinations absent from training, so exact match measures
generalisation, and the reply must end with the template's end token.
`--task format` (for SmolLM2-Instruct): small sums answered in a new reply format,
`ANSWER[12]`, which the instruct model does not use; held-out rows are unseen number pairs.

    python benchmarks/stop_data.py OUT_DIR [--task story|format] [--n-train 300] [--n-valid 40]

writes OUT_DIR/train.jsonl, valid.jsonl (alpaca rows: instruction, input, output).
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
from pathlib import Path

NAMES = ["Lily", "Tom", "Sue", "Ben", "Mia", "Max", "Anna", "Sam"]
ANIMALS = ["cat", "dog", "bird", "fish", "frog", "duck", "bear", "bunny"]
VERBS = ["saw", "liked", "found", "helped", "hugged", "fed"]


def rows(combos: list[tuple[str, str, str]], rng: random.Random) -> list[dict[str, str]]:
    out = []
    for name, animal, verb in combos:
        sentence = f"{name} {verb} a {animal}."
        if rng.random() < 0.5:
            out.append(
                {"instruction": "Repeat the sentence.", "input": sentence, "output": sentence}
            )
        else:
            out.append(
                {
                    "instruction": "What animal is in the sentence?",
                    "input": sentence,
                    "output": animal,
                }
            )
    return out


def format_rows(pairs: list[tuple[int, int]], rng: random.Random) -> list[dict[str, str]]:
    asks = ["What is {a} plus {b}?", "Add {a} and {b}.", "Compute {a} + {b}."]
    return [
        {
            "instruction": rng.choice(asks).format(a=a, b=b),
            "input": "",
            "output": f"ANSWER[{a + b}]",
        }
        for a, b in pairs
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--task", choices=["story", "format"], default="story")
    ap.add_argument("--n-train", type=int, default=300)
    ap.add_argument("--n-valid", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    if args.task == "format":
        combos = list(itertools.product(range(1, 20), range(1, 20)))
        make = format_rows
    else:
        combos = list(itertools.product(NAMES, ANIMALS, VERBS))
        make = rows
    rng.shuffle(combos)
    valid, train = combos[: args.n_valid], combos[args.n_valid :]
    train = [rng.choice(train) for _ in range(args.n_train)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for split, combo in (("train", train), ("valid", valid)):
        with open(out / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for row in make(combo, rng):
                f.write(json.dumps(row) + "\n")
    print(f"wrote {len(train)} train and {len(valid)} held-out rows to {out}")


if __name__ == "__main__":
    main()
