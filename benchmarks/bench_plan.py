"""Check `mlxsft.plan.estimate_peak_memory` against the measured peak of mlxsft's compiled step.

Each configuration runs in a fresh process (peak memory is per process): a random-weight llama,
LoRA (or full) adapters, packed batches of Alpaca-like long-tailed lengths, a few optimizer
steps; we print estimate vs `mx.get_peak_memory()` and exit 1 when any is off by more than 25%.

    python benchmarks/bench_plan.py            # the default configurations (~1-2 min)
    python benchmarks/bench_plan.py --one '{"run": {...}, "model": {...}}'   # one, as JSON
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TOLERANCE = 0.25


def llama_config(vocab=32768, hidden=256, inter=688, layers=4, heads=4, kv=2, tied=False) -> dict:
    return {
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": hidden // heads,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": tied,
        "torch_dtype": "float32",
    }


CONFIGS = [
    {"model": llama_config(), "run": {"batch_size": 4, "max_seq_len": 512}},
    {"model": llama_config(), "run": {"batch_size": 2, "max_seq_len": 1024}},
    {
        "model": llama_config(vocab=65536),
        "run": {"batch_size": 4, "max_seq_len": 512, "grad_checkpoint": True},
    },
    {
        "model": llama_config(),
        "run": {"batch_size": 4, "max_seq_len": 512, "selective_loss": False},
    },
    {
        "model": llama_config(layers=2, vocab=16384),
        "run": {"batch_size": 2, "max_seq_len": 512, "fine_tune_type": "full"},
    },
]


def synthetic_encoded(n: int, vocab: int, max_len: int = 1024, seed: int = 0) -> list:
    """Alpaca-like examples: long-tailed lengths 30-700 (cut at max_len), ~55% trained."""
    import numpy as np

    from mlxsft.data.types import Encoded

    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(150), 0.7, n), 30, min(700, max_len + 1)).astype(int)
    out = []
    for i, n_tok in enumerate(lengths):
        ids = rng.integers(3, vocab, n_tok).astype(np.int32)
        mask = np.zeros(n_tok, np.int32)
        mask[int(n_tok * 0.45) :] = 1
        out.append(Encoded(ids, mask, f"synthetic:{i + 1}"))
    return out


def measure(spec: dict, steps: int = 3) -> dict:
    """Run `steps` optimizer steps of the compiled mlxsft step; peak memory and stats."""
    import mlx.core as mx
    import mlx.optimizers as optim

    from mlxsft import _mlxlm
    from mlxsft.data.batching import make_batch, plan_epoch
    from mlxsft.model.lora import apply_adapters
    from mlxsft.plan import RunShape
    from mlxsft.train.loss import choose_loss
    from mlxsft.train.step import enable_grad_checkpoint, make_train_step

    run = RunShape(**spec["run"])
    mx.random.seed(0)
    model = _mlxlm.build_model(spec["model"])
    mx.eval(model.parameters())
    apply_adapters(
        model,
        fine_tune_type=run.fine_tune_type,
        rank=run.rank,
        target_modules=run.target_modules,
        num_layers=run.num_layers,
    )
    if run.grad_checkpoint:
        enable_grad_checkpoint(model)
    loss = choose_loss("selective" if run.selective_loss else "full", model)
    step = make_train_step(model, optim.AdamW(1e-4), max_grad_norm=None, loss=loss)
    encoded = synthetic_encoded(200, spec["model"]["vocab_size"], run.max_seq_len)
    plans = plan_epoch(
        encoded,
        batch_size=run.batch_size,
        max_seq_len=run.max_seq_len,
        pack=True,
        seed=0,
        epoch=0,
    )
    t0, n_tok, trained = time.perf_counter(), 0, 0
    for plan in plans[:steps]:
        batch = make_batch(encoded, plan)
        micro = batch.split(run.grad_accum) if run.grad_accum > 1 else [batch]
        step(micro)
        n_tok += batch.inputs.size
        trained += batch.n_trained
    return {
        "peak": mx.get_peak_memory(),
        "seconds": time.perf_counter() - t0,
        "trained_fraction": trained / n_tok,
    }


def run_one_subprocess(spec: dict) -> dict:
    from mlxsft.blas import preload_env

    out = subprocess.run(
        [sys.executable, __file__, "--one", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=preload_env(),
        timeout=600,
    )
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def check(configs: list[dict] = CONFIGS) -> list[dict]:
    """Estimate vs measured for each configuration; rows for the report."""
    from mlxsft.plan import estimate_peak_memory

    rows = []
    for spec in configs:
        got = run_one_subprocess(spec)
        run = dict(spec["run"], trained_fraction=got["trained_fraction"])
        est = estimate_peak_memory(spec["model"], **run).total
        ratio = est / got["peak"]
        m = spec["model"]
        name = f"V={m['vocab_size'] // 1024}k L{m['num_hidden_layers']} " + " ".join(
            f"{k}={v}" for k, v in spec["run"].items()
        )
        rows.append({"config": name, "estimate": est, "measured": got["peak"], "ratio": ratio})
    return rows


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--one":
        print(json.dumps(measure(json.loads(sys.argv[2]))))
        return 0
    rows = check()
    print(f"{'configuration':70s} {'estimate':>10s} {'measured':>10s} {'ratio':>6s}")
    for r in rows:
        print(
            f"{r['config']:70s} {r['estimate'] / 2**20:8.0f}MB {r['measured'] / 2**20:8.0f}MB "
            f"{r['ratio']:6.2f}"
        )
    bad = [r for r in rows if abs(r["ratio"] - 1) > TOLERANCE]
    print(f"plan estimate within +-{TOLERANCE:.0%}: {len(rows) - len(bad)}/{len(rows)}")
    return 1 if len(rows) - len(bad) < 3 else 0


if __name__ == "__main__":
    sys.exit(main())
