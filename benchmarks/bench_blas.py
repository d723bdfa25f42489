"""Which BLAS (and thread policy) should `mlxsft` preload on Linux? Measured side by side.

Runs the same workloads in fresh subprocesses, interleaved round by round, under each BLAS
variant: the wheel's bundled reference BLAS, and Debian's OpenBLAS builds (pthread with its
default thread count, pthread with OPENBLAS_NUM_THREADS=1, openmp, serial) where installed.
Each round runs once on the machine as it is and once with one busy-loop process per core
competing (started here, same process tree, same niceness). Prints seconds per workload and
the ratio to the reference BLAS under the same load.

    python benchmarks/bench_blas.py            # all workloads, 2 rounds (~10 min on 2 cores)
    python benchmarks/bench_blas.py --quick    # the matmul and the tiny-model step, 1 round
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIB = Path("/usr/lib/x86_64-linux-gnu")
STORIES = ROOT.parent / "shared/fixtures/models/stories260K-hf"
TIMEOUT = 240  # seconds per measurement; a collapsed thread pool can take far longer

# name -> extra environment (LD_PRELOAD path relative to LIB, thread settings)
VARIANTS: dict[str, dict[str, str]] = {
    "reference": {},
    "pthread": {"LD_PRELOAD": "openblas-pthread/libblas.so.3"},
    "pthread-1": {"LD_PRELOAD": "openblas-pthread/libblas.so.3", "OPENBLAS_NUM_THREADS": "1"},
    "openmp": {"LD_PRELOAD": "openblas-openmp/libblas.so.3"},
    "serial": {"LD_PRELOAD": "openblas-serial/libblas.so.3"},
}

WORKLOAD = r"""
import json, sys, time
import mlx.core as mx, mlx.nn as nn, mlx.optimizers as optim
kind = sys.argv[1]
if kind == "matmul":  # 1024^2 float32, the shape of a mid-size model's projections
    a = mx.random.normal((1024, 1024), key=mx.random.key(0))
    b = mx.random.normal((1024, 1024), key=mx.random.key(1))
    mx.eval(a @ b)
    t = time.perf_counter()
    for _ in range(10):
        mx.eval(a @ b)
    print(json.dumps({"s": time.perf_counter() - t}))
    raise SystemExit
from mlx_lm.tuner.utils import linear_to_lora_layers
if kind == "tiny":  # the trained stories260K model (D=64), batch 8 x 128
    from mlx_lm.utils import load_model
    model, _ = load_model(__import__("pathlib").Path(sys.argv[2]))
    B, L, V, steps = 8, 128, 512, 10
else:  # "135m": SmolLM2-135M's block and head shapes (D=576, I=1536, V=49152), 2 layers, 2 x 128
    from mlx_lm.models import llama
    args = llama.ModelArgs(model_type="llama", hidden_size=576, num_hidden_layers=2,
        intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5,
        vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0)
    model = llama.Model(args)
    B, L, V, steps = 2, 128, 49152, 2
model.freeze()
keys = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
linear_to_lora_layers(model, len(model.layers), {"rank": 16, "scale": 2.0, "dropout": 0.0,
                                                  "keys": keys})
opt = optim.Adam(1e-4)
x = mx.random.randint(0, V, (B, L + 1), key=mx.random.key(2))
def loss(m):
    return nn.losses.cross_entropy(m(x[:, :-1]).astype(mx.float32), x[:, 1:]).mean()
grad = nn.value_and_grad(model, loss)
def step():
    v, g = grad(model)
    opt.update(model, g)
    mx.eval(model.state, opt.state, v)
step()
t = time.perf_counter()
for _ in range(steps):
    step()
print(json.dumps({"s": (time.perf_counter() - t) / steps}))
"""


def available() -> dict[str, dict[str, str]]:
    out = {}
    for name, extra in VARIANTS.items():
        env = dict(extra)
        if "LD_PRELOAD" in env:
            path = LIB / env["LD_PRELOAD"]
            if not path.exists():
                continue
            env["LD_PRELOAD"] = str(path)
        out[name] = env
    return out


def run(kind: str, env_extra: dict[str, str]) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "OPENBLAS_NUM_THREADS")}
    env.update(env_extra)
    env["MLXSFT_NO_BLAS_PRELOAD"] = "1"
    try:
        out = subprocess.run(
            [sys.executable, "-c", WORKLOAD, kind, str(STORIES)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=TIMEOUT,
        ).stdout
    except subprocess.TimeoutExpired:
        return float("inf")  # collapsed: reported as "> TIMEOUT s"
    return json.loads(out.strip().splitlines()[-1])["s"]


def busy_loops(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=None)
    args = ap.parse_args()
    kinds = ["matmul", "tiny"] if args.quick else ["matmul", "tiny", "135m"]
    if not STORIES.is_dir():
        kinds.remove("tiny")
    rounds = args.rounds or (1 if args.quick else 2)
    variants = available()
    n_cores = os.cpu_count() or 1
    times: dict[tuple[str, str, str], list[float]] = {}
    t0 = time.perf_counter()
    for r in range(rounds):
        for load in ("as is", f"+{n_cores} busy"):
            procs = busy_loops(n_cores) if load != "as is" else []
            try:
                for kind in kinds:
                    for name, extra in variants.items():
                        s = run(kind, extra)
                        times.setdefault((kind, load, name), []).append(s)
                        print(f"round {r + 1} {load:>8} {kind:>6} {name:>9}: {s:.3f} s", flush=True)
            finally:
                for p in procs:
                    p.kill()
                    p.wait()
    load1 = os.getloadavg()[0]
    print(f"\nmachine: {n_cores} cores, load average {load1:.1f} at the end (other jobs included);"
          f" {rounds} round(s), medians; {time.perf_counter() - t0:.0f} s")  # fmt: skip
    print("\n| workload | load | " + " | ".join(variants) + " |")
    print("|---|---|" + "---|" * len(variants))
    for kind in kinds:
        for load in ("as is", f"+{n_cores} busy"):
            med = {n: statistics.median(times[(kind, load, n)]) for n in variants}
            ref = med["reference"]
            cells = [
                f"{med[n]:.3f} s ({med[n] / ref:.2f}x)" if med[n] < float("inf") else
                f"> {TIMEOUT} s (whole run)"
                for n in variants
            ]  # fmt: skip
            print(f"| {kind} | {load} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
