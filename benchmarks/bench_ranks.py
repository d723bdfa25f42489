"""Data parallel at real size: 1 rank vs 2 ranks (`mlx.launch --backend ring`, loopback) on
SmolLM2-135M-Instruct (float32, converted into --cache by bench_real.f32_model).

Both runs train the same steps on the same data with the same examples per optimizer step
(`--batch-size` counts rows per step over all ranks: 2 ranks take 2 rows each). SGD, so equal
weights mean equal gradient sums (Adam's normalisation magnifies the rounding of near-zero
gradients). Reports wall time, trained tokens/s in all and per rank, the compiled-step count of
each run, and the largest difference between the two runs' adapter weights.

    python benchmarks/bench_ranks.py [--steps 6] [--batch-size 4] [--max-seq-len 512]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_real  # noqa: E402
import make_instruct_data  # noqa: E402

from mlxsft.blas import preload_env  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str]) -> tuple[float, str]:
    env = {**preload_env(), "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}")
    return wall, proc.stdout + proc.stderr


def _train_records(out: Path) -> list[dict]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["type"] == "train"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default="/work/cache")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-seq-len", type=int, default=512)
    args = ap.parse_args()
    cache = Path(args.cache)
    model = bench_real.f32_model(cache)
    data = make_instruct_data.write(cache / "bench-data-short-48-16", "short", 48, 16)
    work = cache / "bench-out" / "ranks"
    shutil.rmtree(work, ignore_errors=True)
    flags = [
        "--model", str(model), "--data", str(data), "--iters", str(args.steps),
        "--batch-size", str(args.batch_size), "--max-seq-len", str(args.max_seq_len),
        "--optimizer", "sgd", "--learning-rate", "0.05", "--rank", "8", "--no-pack",
        "--eval-every", "0", "--save-every", "0", "--steps-per-report", "1", "--seed", "0",
    ]  # fmt: skip
    launcher = Path(sys.executable).parent / "mlx.launch"
    runs = {
        "1 rank": [sys.executable, "-m", "mlxsft", "train", "-o", str(work / "one"), *flags],
        "2 ranks": [
            str(launcher), "-n", "2", "--backend", "ring", "--starting-port", str(_free_port()),
            "--env", "HF_HUB_OFFLINE=1", "--", sys.executable, "-m", "mlxsft", "train",
            "-o", str(work / "two"), *flags,
        ],
    }  # fmt: skip
    result = {}
    for name, cmd in runs.items():
        print(f"[{name}] ...", flush=True)
        wall, log = _run(cmd)
        out = work / ("one" if name == "1 rank" else "two")
        rec = _train_records(out)
        span = rec[-1]["elapsed_s"] - rec[0]["elapsed_s"]  # steps 2..N: after the compilation
        tokens = rec[-1]["trained_tokens"] - rec[0]["trained_tokens"]
        compiled = next((ln for ln in log.splitlines() if "compil" in ln), "")
        result[name] = {"wall": wall, "tok_s": tokens / span, "compiled": compiled.strip()}
    import mlx.core as mx

    a = mx.load(str(work / "one" / "adapters.safetensors"))
    b = mx.load(str(work / "two" / "adapters.safetensors"))
    diff = max(mx.abs(a[k] - b[k]).max().item() for k in a)
    one, two = result["1 rank"], result["2 ranks"]
    print(f"\nSmolLM2-135M f32, LoRA rank 8, batch {args.batch_size} x max {args.max_seq_len}, "
          f"{args.steps} SGD steps; load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    print("| | wall (s) | trained tok/s (steps 2..N) | per rank | vs 1 rank |")
    print("|---|---|---|---|---|")
    print(f"| 1 rank | {one['wall']:.0f} | {one['tok_s']:.0f} | {one['tok_s']:.0f} | 1.00x |")
    print(f"| 2 ranks | {two['wall']:.0f} | {two['tok_s']:.0f} | {two['tok_s'] / 2:.0f} | "
          f"{two['tok_s'] / one['tok_s']:.2f}x |")  # fmt: skip
    print(f"max |adapter weight difference| 2 ranks vs 1 rank: {diff:.2e}")
    for name, r in result.items():
        print(f"{name}: {r['compiled']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
