"""The yardstick for per-step overhead: a plain, uncompiled MLX LoRA loop (~30 lines of logic).

Reads batches that `bench_small.py` wrote (token ids and loss masks per row, the rows of each
optimizer step), pads each batch to its longest row, and trains LoRA on all 7 linears of every
block with AdamW. Prints one JSON line: seconds per step, final loss, peak memory.

    python benchmarks/plain_lora_loop.py MODEL_DIR BATCHES.json --rank 16 --scale 1.0 --lr 1e-4
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx_lm.tuner.utils import linear_to_lora_layers
from mlx_lm.utils import load_model

KEYS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
KEYS += ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("batches")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=1e-4)
    args = ap.parse_args()
    batches = json.loads(Path(args.batches).read_text())  # [[{"ids": [...], "mask": [...]}]]

    mx.random.seed(0)
    model, _ = load_model(Path(args.model))
    model.freeze()
    lora = {"rank": args.rank, "scale": args.scale, "dropout": 0.0, "keys": KEYS}
    linear_to_lora_layers(model, len(model.layers), lora)
    opt = optim.AdamW(args.lr, weight_decay=0.0)

    def loss_fn(model, x, y, w):
        ce = nn.losses.cross_entropy(model(x).astype(mx.float32), y)  # (B, L)
        return (ce * w).sum() / w.sum()

    loss_and_grad = nn.value_and_grad(model, loss_fn)
    times, loss = [], float("nan")
    for rows in batches:
        t = time.perf_counter()
        L = max(len(r["ids"]) for r in rows) - 1
        x, y, w = (np.zeros((len(rows), L), dtype) for dtype in (np.int32, np.int32, np.float32))
        for i, r in enumerate(rows):
            n = len(r["ids"]) - 1
            x[i, :n], y[i, :n], w[i, :n] = r["ids"][:-1], r["ids"][1:], r["mask"][1:]
        value, grads = loss_and_grad(model, mx.array(x), mx.array(y), mx.array(w))
        opt.update(model, grads)
        mx.eval(model.state, opt.state, value)
        loss = value.item()
        times.append(time.perf_counter() - t)
    print(
        json.dumps(
            {
                "steps": len(times),
                "seconds": sum(times),
                "step_times": times,
                "final_loss": loss,
                "peak_memory": mx.get_peak_memory(),
            }
        )
    )


if __name__ == "__main__":
    main()
