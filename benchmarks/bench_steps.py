"""Where the time goes: one process, the SAME batches, mlx_lm's training step against mlxsft's.

`bench_real.py` compares the two command-line tools end to end (start-up, batching, compilation
and validation included). This benchmark takes those out: it builds mlxsft's padded batches of
one epoch (SmolLM2-135M f32, bench_real's 512-token data, batch 4, LoRA rank 8 on all linears of
all layers) and runs every batch through
- `mlx_lm`: `mlx_lm.tuner.trainer.default_loss` under `nn.value_and_grad` plus Adam, compiled
  with the model and optimizer state as mlx_lm.lora does (its batch layout: tokens + lengths);
- `mlxsft`: mlxsft's `TrainStep` (selective loss, block attention on the CPU, fused LoRA add,
  lean SwiGLU);
- `mlxsft, MLX attention`: the same with `MLXSFT_BLOCK_ATTENTION=0` (MLX's own attention);
- `mlxsft, --loss full`: the same with the full-logits loss;
- `mlxsft, mlx-lm MLP`: the same with `MLXSFT_LEAN_MLP=0` (mlx-lm's SwiGLU).
Each variant loads its own model, runs the epoch once to compile every shape, then once more
timed. Reports seconds per epoch (compiled), the ratio to mlx_lm and peak memory, and how many
positions mlx_lm.lora's own batching (file order) would process instead.

    python benchmarks/bench_steps.py                 # ~15 min on 2 idle cores
    python benchmarks/bench_steps.py --variants mlx_lm mlxsft
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

VARIANTS = {  # name -> (tool, environment, loss)
    "mlx_lm": ("mlx_lm", {}, "full"),
    "mlxsft": ("mlxsft", {}, "selective"),
    "mlxsft, MLX attention": ("mlxsft", {"MLXSFT_BLOCK_ATTENTION": "0"}, "selective"),
    "mlxsft, --loss full": ("mlxsft", {}, "full"),
    "mlxsft, mlx-lm MLP": ("mlxsft", {"MLXSFT_LEAN_MLP": "0"}, "selective"),
}


def run_variant(tool: str, loss: str, model: str, data: str) -> dict:
    """In a child process: per-step seconds of the timed epoch and the peak memory."""
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    import numpy as np

    from mlxsft.config import TrainConfig
    from mlxsft.data.batching import epoch_batches
    from mlxsft.model.attention import use_block_attention
    from mlxsft.model.mlp import use_lean_mlp
    from mlxsft.train.setup import prepare
    from mlxsft.train.step import make_train_step

    cfg = TrainConfig(
        model=model, data=data, batch_size=4, max_seq_len=512, pack=False, rank=8, alpha=16.0,
        optimizer="adam", loss=loss, target_modules="all-linear", num_layers=-1,
    ).validate()  # fmt: skip
    prep = prepare(cfg)
    batches = epoch_batches(prep.train, batch_size=4, max_seq_len=512, pack=False, seed=0, epoch=0)
    opt = optim.Adam(learning_rate=1e-4)
    if tool == "mlxsft":
        use_block_attention(prep.model)  # as `mlxsft train` does (MLXSFT_BLOCK_ATTENTION=0: off)
        use_lean_mlp(prep.model)  # as `mlxsft train` does (MLXSFT_LEAN_MLP=0: off)
        step = make_train_step(prep.model, opt, max_grad_norm=None, loss=loss)

        def run(b) -> None:
            step([b])

    else:
        from functools import partial

        from mlx_lm.tuner.trainer import default_loss

        model = prep.model
        state = [model.state, opt.state, mx.random.state]
        loss_and_grad = nn.value_and_grad(model, default_loss)

        @partial(mx.compile, inputs=state, outputs=state)
        def compiled(tokens, lengths):
            (value, n), grads = loss_and_grad(model, tokens, lengths)
            opt.update(model, grads)
            return value, n

        def run(b) -> None:
            # mlx_lm's layout: the full token rows and (first trained position, length) per row
            n = (b.segment_ids > 0).sum(1)
            rows = np.arange(len(n))
            tokens = np.concatenate([b.inputs, b.targets[:, -1:]], 1)
            tokens[rows, n] = b.targets[rows, n - 1]
            lengths = np.stack([np.argmax(b.target_mask > 0, 1), n + 1], 1)
            value, count = compiled(mx.array(tokens), mx.array(lengths))
            mx.eval(state, value, count)

    for b in batches:  # compile every shape
        run(b)
    seconds = []
    for b in batches:
        t = time.perf_counter()
        run(b)
        seconds.append(time.perf_counter() - t)
    real = int(sum(int((b.segment_ids > 0).sum()) for b in batches))
    return {"seconds": seconds, "peak_gb": mx.get_peak_memory() / 2**30, "tokens": real,
            "lengths": [int(b.shape[1]) for b in batches],
            "positions": int(sum(b.inputs.size for b in batches)),
            "mlx_lm_lora": mlx_lm_lora_positions([e.n_tokens for e in prep.train], 4, 512)}  # fmt: skip


def mlx_lm_lora_positions(n_tokens: list[int], batch: int, max_len: int) -> dict:
    """Positions (and sum of squared row lengths, for attention) of the batches mlx_lm.lora
    0.32 builds from rows of `n_tokens` in file order: its length sort keys on the raw row
    dict, so a batch is `batch` consecutive rows, padded to 1 + a multiple of 32 (at most
    max_len) and shifted by one; a last partial batch is dropped."""
    positions = squares = 0
    for k in range(0, len(n_tokens) - batch + 1, batch):
        longest = max(n_tokens[k : k + batch])
        width = min(1 + 32 * -(-longest // 32), max_len) - 1
        positions += batch * width
        squares += batch * width**2
    return {"positions": positions, "squares": squares}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", type=Path, default=ROOT.parent / "cache")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT", json.dumps(run_variant(*args.child)), flush=True)
        return
    import bench_real

    from mlxsft.blas import preload_env

    model = bench_real.f32_model(args.cache)
    data = bench_real.data_dir(bench_real.SETTINGS[0], args.cache)
    results = {}
    for name in args.variants:
        tool, env, loss = VARIANTS[name]
        print(f"[{name}] ...", flush=True)
        out = subprocess.run(
            [sys.executable, __file__, "--child", tool, loss, str(model), str(data)],
            capture_output=True, text=True, env={**preload_env(), **env}, check=False,
        )  # fmt: skip
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{name} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
        results[name] = json.loads(line[len("RESULT ") :])
    base = sum(results["mlx_lm"]["seconds"]) if "mlx_lm" in results else None
    first = next(iter(results.values()))
    print(f"\nSmolLM2-135M f32, {len(first['seconds'])} padded batches of 4 (lengths "
          f"{first['lengths']}), {first['tokens']} real tokens; compiled, second pass timed\n")  # fmt: skip
    theirs, ours = first["mlx_lm_lora"], first["positions"]
    squares = sum(4 * n**2 for n in first["lengths"])
    print(f"mlx_lm.lora itself batches the file in order: {theirs['positions']} positions "
          f"({theirs['positions'] / ours:.2f}x these batches' {ours}) and "
          f"{theirs['squares'] / squares:.2f}x their attention work (sum of L^2)\n")  # fmt: skip
    print("| step | seconds per epoch | vs mlx_lm | tokens/s | peak memory (GiB) |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        total = sum(r["seconds"])
        ratio = f"{total / base:.2f}x" if base else "-"
        print(
            f"| {name} | {total:.1f} | {ratio} | {r['tokens'] / total:.0f} | {r['peak_gb']:.2f} |"
        )
    os.makedirs(args.cache, exist_ok=True)
    (args.cache / "bench_steps.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
