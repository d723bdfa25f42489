"""Per-step overhead on a small real model: `mlxsft train` vs a plain uncompiled MLX LoRA loop.

The trained stories260K model (../shared/fixtures/models/stories260K-hf), the Alpaca demo data
(../shared/fixtures/data/alpaca/alpaca_en_demo.json) with the Alpaca template, `--no-pack`,
batch 8, LoRA rank 16 on all linears, AdamW at 1e-4. Both tools train on exactly the same
batches: this script encodes the data and plans the epoch as `mlxsft train` does, and hands the
rows of the first N steps to `plain_lora_loop.py`, which pads each batch to its longest row.
Runs alternate (mlxsft, plain, mlxsft, plain, ...) in one process tree, with the same BLAS
environment (the one `mlxsft` picks for itself). Prints seconds per step (steps 2..N, so the
first compilation is left out but every later one is counted), their ratio, and mlxsft's
compilation count.

    python benchmarks/bench_small.py            # 40 steps, 2 rounds
    python benchmarks/bench_small.py --quick    # 12 steps, 1 round
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mlxsft.blas import preload_env  # noqa: E402

FIXTURES = ROOT.parent / "shared" / "fixtures"
MODEL = FIXTURES / "models" / "stories260K-hf"
DATA = FIXTURES / "data" / "alpaca" / "alpaca_en_demo.json"
BATCH, RANK, ALPHA, LR = 8, 16, 16.0, 1e-4


def write_batches(path: Path, steps: int, max_seq_len: int) -> None:
    """The rows of mlxsft's first `steps` optimizer steps (same encoder, same epoch plan)."""
    from mlxsft.config import TrainConfig
    from mlxsft.data.batching import plan_epoch
    from mlxsft.model.loading import load_tokenizer
    from mlxsft.train.setup import encode_rows, read_split

    cfg = TrainConfig(model=str(MODEL), data=str(DATA), template="alpaca", pack=False,
                      batch_size=BATCH, max_seq_len=max_seq_len).validate()  # fmt: skip
    encoded, _ = encode_rows(cfg, load_tokenizer(MODEL), read_split(cfg, str(DATA), "train"), "t")
    plans = plan_epoch(encoded, batch_size=BATCH, max_seq_len=max_seq_len, pack=False,
                       seed=cfg.seed, epoch=0)  # fmt: skip
    batches = [
        [
            {"ids": encoded[i].input_ids.tolist(), "mask": encoded[i].loss_mask.tolist()}
            for i in plan.examples
        ]  # fmt: skip
        for plan in plans[:steps]
    ]
    path.write_text(json.dumps(batches))


def run_mlxsft(out: Path, steps: int, max_seq_len: int) -> dict:
    cmd = [sys.executable, "-m", "mlxsft", "train", "-m", str(MODEL), "-d", str(DATA),
           "-t", "alpaca", "--no-pack", "-b", str(BATCH), "--rank", str(RANK), "--alpha",
           str(ALPHA), "--lr", str(LR), "--iters", str(steps), "--max-seq-len", str(max_seq_len),
           "--eval-every", "0", "--save-every", "0", "-o", str(out)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("type") == "train"]
    compiles = re.search(r"(\d+) compilations", proc.stdout + proc.stderr)
    return {
        "per_step": (train[-1]["elapsed_s"] - train[0]["elapsed_s"]) / (len(train) - 1),
        "final_loss": train[-1]["loss"],
        "peak_gb": train[-1]["peak_memory_gb"],
        "compilations": int(compiles.group(1)) if compiles else None,
        "wall": wall,
    }


def run_plain(batches: Path) -> dict:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "plain_lora_loop.py"), str(MODEL),
           str(batches), "--rank", str(RANK), "--scale", str(ALPHA / RANK), "--lr", str(LR)]  # fmt: skip
    t = time.perf_counter()
    out = subprocess.run(cmd, env=preload_env(), capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t
    res = json.loads(out.stdout.strip().splitlines()[-1])
    times = res["step_times"]
    return {
        "per_step": sum(times[1:]) / (len(times) - 1),
        "final_loss": res["final_loss"],
        "peak_gb": res["peak_memory"] / 2**30,
        "wall": wall,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--max-seq-len", type=int, default=2048)
    args = ap.parse_args()
    if not MODEL.is_dir() or not DATA.is_file():
        print(f"skipped: {MODEL} or {DATA} not found")
        return 0
    steps = args.steps or (12 if args.quick else 40)
    rounds = args.rounds or (1 if args.quick else 2)
    res: dict[str, list[dict]] = {"mlxsft": [], "plain": []}
    with tempfile.TemporaryDirectory() as tmp:
        batches = Path(tmp) / "batches.json"
        write_batches(batches, steps, args.max_seq_len)
        for r in range(rounds):
            order = ("mlxsft", "plain") if r % 2 == 0 else ("plain", "mlxsft")
            for tool in order:
                if tool == "mlxsft":
                    got = run_mlxsft(Path(tmp) / f"run{r}", steps, args.max_seq_len)
                else:
                    got = run_plain(batches)
                res[tool].append(got)
                print(f"round {r + 1} {tool}: {got['per_step']:.3f} s/step", flush=True)
    med = {t: statistics.median(x["per_step"] for x in v) for t, v in res.items()}
    load = os.getloadavg()[0]
    print(f"\nstories260K, alpaca_en_demo, --no-pack, batch {BATCH}, LoRA rank {RANK} all "
          f"linears, max length {args.max_seq_len}, {steps} steps x {rounds} round(s); load "
          f"average {load:.1f} on {os.cpu_count()} cores at the end")  # fmt: skip
    print("\n| | plain MLX loop | mlxsft train | mlxsft / plain |\n|---|---|---|---|")
    print(f"| s per step (steps 2..{steps}, median of rounds) | {med['plain']:.3f} | "
          f"{med['mlxsft']:.3f} | {med['mlxsft'] / med['plain']:.2f}x |")  # fmt: skip
    last = {t: v[-1] for t, v in res.items()}
    print(f"| final train loss (last round) | {last['plain']['final_loss']:.4f} | "
          f"{last['mlxsft']['final_loss']:.4f} | |")  # fmt: skip
    print(f"| peak memory (GB) | {last['plain']['peak_gb']:.3f} | {last['mlxsft']['peak_gb']:.3f}"
          f" | {last['mlxsft']['peak_gb'] / last['plain']['peak_gb']:.2f}x |")  # fmt: skip
    print(f"| process wall time incl. start-up (s) | {last['plain']['wall']:.1f} | "
          f"{last['mlxsft']['wall']:.1f} | |")  # fmt: skip
    print(f"| compilations | 0 | {last['mlxsft']['compilations']} | |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
