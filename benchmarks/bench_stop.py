"""Does a fine-tuned model stop? Train with and without `--train-tokens`, score held-out replies.

Runs `mlxsft train` with the generation-based evaluation on (`--eval-prompts valid`) and prints,
per run, the last evaluation: exact match, contains match, the share of replies that stopped
(end-of-turn / EOS before --eval-max-tokens), and the first evaluation (before training).

    # stories260K (a base model that never learned `</s>`), Alpaca template
    python benchmarks/bench_stop.py story --model ../shared/fixtures/models/stories260K-hf
    # SmolLM2-135M-Instruct 4-bit (QLoRA), a new reply format
    python benchmarks/bench_stop.py format \\
        --model ../shared/fixtures/models/smollm2-135m-instruct-mlx-q4

Data is written by benchmarks/stop_data.py under --work (default /tmp/mlxsft-bench-stop).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

SETTINGS = {  # task -> (train flags, --train-tokens variants)
    "story": (
        ["--template", "alpaca", "--iters", "600", "--batch-size", "8", "--learning-rate", "3e-3",
         "--max-seq-len", "256", "--eval-max-tokens", "32"],
        ["none", "auto"],
    ),
    "format": (
        ["--iters", "30", "--batch-size", "4", "--learning-rate", "1e-3", "--max-seq-len", "96",
         "--eval-max-tokens", "10", "--rank", "8"],
        ["none"],
    ),
}  # fmt: skip


def run(task: str, model: str, work: Path, n_prompts: int, extra: list[str]) -> list[dict]:
    data = work / task / "data"
    subprocess.run(
        [sys.executable, str(HERE / "stop_data.py"), str(data), "--task", task], check=True
    )
    flags, variants = SETTINGS[task]
    rows = []
    for variant in variants:
        out = work / task / f"run-{variant}"
        cmd = [
            sys.executable, "-m", "mlxsft", "train", "--model", model, "--data", str(data),
            "--output", str(out), "--train-tokens", variant, "--eval-prompts", "valid",
            "--eval-num-prompts", str(n_prompts), "--save-every", "0", *flags, *extra,
        ]  # fmt: skip
        iters = int(flags[flags.index("--iters") + 1])
        cmd += ["--eval-every", str(min(iters, 150))]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        gen = [r for r in records if r.get("type") == "gen_eval"]
        val = [r for r in records if r.get("type") == "eval"]
        rows.append(
            {
                "train_tokens": variant,
                "before": gen[0] if len(gen) > 1 else None,
                "after": gen[-1],
                "val_loss": val[-1]["val_loss"] if val else None,
            }
        )
    return rows


def _fmt(r: dict | None) -> str:
    if r is None:
        return "-"
    return (
        f"exact {r['exact_match']:.0%}, contains {r['contains_match']:.0%}, "
        f"stop {r['stop_rate']:.0%} (n={r['n_prompts']}, {r['mean_reply_tokens']:.1f} tok)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("task", choices=sorted(SETTINGS))
    ap.add_argument("--model", required=True)
    ap.add_argument("--work", default="/tmp/mlxsft-bench-stop")
    ap.add_argument("--n-prompts", type=int, default=40)
    args, extra = ap.parse_known_args()
    rows = run(args.task, args.model, Path(args.work), args.n_prompts, extra)
    print(f"\n{args.task} on {args.model}")
    for r in rows:
        print(f"--train-tokens {r['train_tokens']}:")
        print(f"  before training: {_fmt(r['before'])}")
        print(f"  after training:  {_fmt(r['after'])}; val loss {r['val_loss']:.4f}")


if __name__ == "__main__":
    main()
