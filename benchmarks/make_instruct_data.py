"""Instruction data of realistic lengths for the benchmarks, written outside the repository.

Source: the real Alpaca rows in ../shared/fixtures/data/alpaca/alpaca_en_demo.json (999 rows,
instruction + optional input -> output). Two shapes, as chat `messages` rows (rendered later
with the model's own ChatML template):
- `short`: one exchange per row (about 30-700 tokens with SmolLM2's tokenizer);
- `long`: 2-8 consecutive rows chained into one multi-turn conversation (about 500-3000 tokens),
  for max lengths 2048/4096.
Deterministic (seeded shuffle); the first `--n-valid` conversations are the validation split.

    python benchmarks/make_instruct_data.py OUT_DIR [--shape short|long] [--n-train N --n-valid M]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

ALPACA = Path(__file__).resolve().parents[2] / "shared/fixtures/data/alpaca/alpaca_en_demo.json"


def exchanges(seed: int = 0) -> list[list[dict]]:
    rows = json.loads(ALPACA.read_text(encoding="utf-8"))
    out = []
    for r in rows:
        prompt = r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else "")
        out.append([
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": r["output"]},
        ])  # fmt: skip
    order = np.random.default_rng(seed).permutation(len(out))
    return [out[i] for i in order]


def conversations(shape: str, n: int, seed: int = 0) -> list[dict]:
    pool = exchanges(seed)
    rng = np.random.default_rng(seed + 1)
    convs, i = [], 0
    while len(convs) < n and i < len(pool):
        k = 1 if shape == "short" else int(rng.integers(2, 9))
        convs.append({"messages": [m for ex in pool[i : i + k] for m in ex]})
        i += k
    if len(convs) < n:
        raise SystemExit(f"only {len(convs)} {shape} conversations available (asked for {n})")
    return convs


def write(out: Path, shape: str, n_train: int, n_valid: int) -> Path:
    """OUT/{train,valid}.jsonl (skipped when already written with the same sizes)."""
    out.mkdir(parents=True, exist_ok=True)
    stamp = out / "sizes.json"
    sizes = {"shape": shape, "n_train": n_train, "n_valid": n_valid}
    if stamp.exists() and json.loads(stamp.read_text()) == sizes:
        return out
    convs = conversations(shape, n_train + n_valid)
    for name, part in (("valid", convs[:n_valid]), ("train", convs[n_valid:])):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(c) + "\n" for c in part))
    stamp.write_text(json.dumps(sizes))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--shape", choices=["short", "long"], default="short")
    ap.add_argument("--n-train", type=int, default=200)
    ap.add_argument("--n-valid", type=int, default=40)
    args = ap.parse_args()
    print(write(Path(args.out), args.shape, args.n_train, args.n_valid))


if __name__ == "__main__":
    main()
