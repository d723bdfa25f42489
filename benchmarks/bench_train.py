"""mlxsft train vs mlx_lm.lora, side by side, on the same model, data and LoRA settings.

Builds a small llama (vocab >= 32k; `--vocab` adds a larger-vocab variant) with a ChatML template
and Alpaca-like chat data whose lengths are long-tailed between 30 and 700 tokens, then runs one
epoch of each tool as a subprocess (OpenBLAS preloaded for both when installed): batch 4 (4
examples per optimizer step for both: mlxsft uses padded length buckets, `--no-pack`), max
length 1024, LoRA rank 8 / scale 2 on all linears of all layers, Adam at the same learning rate,
loss on responses only. Reports wall time per epoch, trained tokens/s, peak memory, final
validation loss (both adapters scored by the same `mlxsft eval`), MFU against this machine's
measured matmul peak; plus `mlxsft generate` vs `mlx_lm.generate` tokens/s, the BLAS on/off
difference and `mlxsft plan`'s estimate vs measured peaks. Exits 1 when a target is missed.

    python benchmarks/bench_train.py                 # the full run (< 10 min on 2 cores)
    python benchmarks/bench_train.py --quick         # a smoke test on a small setting
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from mlxsft.blas import blas_status, preload_env  # noqa: E402

TARGETS = {"time": 0.5, "memory": 0.5, "val_loss": 1.02, "generate": 0.95, "plan": 0.25}
KEYS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# mlx_lm.lora as is, printing mx.get_peak_memory() at exit (its new UI no longer shows it).
MLX_LM_LORA = """
import atexit, sys
import mlx.core as mx
atexit.register(lambda: print("PEAK_MEMORY", mx.get_peak_memory(), flush=True))
sys.argv = ["mlx_lm.lora", "-c", sys.argv[1]]
from mlx_lm import lora
lora.main()
"""
MATMUL_PROBE = """
import json, sys, time
import mlx.core as mx
n = int(sys.argv[1])
a = mx.random.normal((n, n), key=mx.random.key(0)); b = mx.random.normal((n, n), key=mx.random.key(1))
mx.eval(a @ b)
best = 0.0
for _ in range(5):
    t = time.perf_counter(); c = a @ b; mx.eval(c); dt = time.perf_counter() - t
    best = max(best, 2 * n**3 / dt / 1e9)
print(json.dumps({"gflops": best, "checksum": float(c[:8, :8].sum())}))
"""


@dataclass
class Setting:
    vocab: int = 32768
    hidden: int = 128
    inter: int = 344
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    n_train: int = 160
    n_valid: int = 24
    batch_size: int = 4
    max_seq_len: int = 1024
    lr: float = 2e-4
    rank: int = 8


# ------------------------------------------------------------------------------------ build

_SYLL = ["ka", "lo", "mi", "ra", "te", "su", "no", "vi", "da", "pe", "zu", "ho", "ne", "bi", "fo"]


def _words(rng: np.random.Generator, n: int = 3000) -> list[str]:
    return sorted({"".join(rng.choice(_SYLL, rng.integers(1, 4))) for _ in range(n)})


def _soup(rng: np.random.Generator, words: list[str], n_words: int) -> str:
    p = 1 / np.arange(1, len(words) + 1)  # Zipfian: there is something to learn
    idx = rng.choice(len(words), n_words, p=p / p.sum())
    text = " ".join(words[i] for i in idx)
    return ". ".join(s.capitalize() for s in re.split(r"(?<=\w{4}) (?=\w{6,})", text)[:]) + "."


def build(work: Path, s: Setting) -> tuple[Path, Path]:
    """(model dir, data dir with train.jsonl / valid.jsonl), cached in `work`."""
    from mlxsft.demo_model import build_tiny_checkpoint

    model = work / f"llama-v{s.vocab}-d{s.hidden}-l{s.layers}"
    data = work / f"data-{s.n_train}-{s.n_valid}"
    rng = np.random.default_rng(0)
    words = _words(rng)
    if not (model / "config.json").exists():
        corpus = [_soup(rng, words, 30) for _ in range(3000)]
        build_tiny_checkpoint(
            model, "llama", vocab_size=s.vocab, hidden_size=s.hidden, n_layers=s.layers,
            n_heads=s.heads, n_kv_heads=s.kv_heads, intermediate_size=s.inter,
            chat_template="chatml", corpus=corpus, seed=0,
        )  # fmt: skip
    if not (data / "train.jsonl").exists():
        data.mkdir(parents=True, exist_ok=True)
        # Alpaca-like: total length long-tailed in [30, 700] tokens, ~45% prompt.
        rng = np.random.default_rng(1)  # independent of whether the model was built now
        for split, n in (("train", s.n_train), ("valid", s.n_valid)):
            rows = []
            for total in np.clip(rng.lognormal(np.log(160), 0.75, n), 30, 700).astype(int):
                n_words = max(4, int(total / 1.6))  # ~1.6 tokens per pseudo-word
                n_prompt = max(2, int(n_words * rng.uniform(0.2, 0.6)))
                rows.append({"messages": [
                    {"role": "user", "content": _soup(rng, words, n_prompt)},
                    {"role": "assistant", "content": _soup(rng, words, n_words - n_prompt)},
                ]})  # fmt: skip
            (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model, data


# ------------------------------------------------------------------------------------ run


def _run(cmd: list[str], env: dict | None = None, timeout: int = 3600) -> tuple[float, str]:
    t = time.perf_counter()
    out = subprocess.run(
        cmd, capture_output=True, text=True, env=env or preload_env(), timeout=timeout
    )
    dt = time.perf_counter() - t
    if out.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd[:4])} failed:\n{out.stdout[-1500:]}\n{out.stderr[-3000:]}"
        )
    return dt, out.stdout + out.stderr


def run_mlx_lm(model: Path, data: Path, out: Path, s: Setting, n_steps: int) -> dict:
    import yaml

    cfg = {
        "model": str(model), "train": True, "data": str(data), "fine_tune_type": "lora",
        "optimizer": "adam", "num_layers": s.layers, "batch_size": s.batch_size,
        "iters": n_steps, "val_batches": 1, "learning_rate": s.lr, "steps_per_report": 10,
        "steps_per_eval": 10**6, "save_every": 10**6, "adapter_path": str(out),
        "max_seq_length": s.max_seq_len, "mask_prompt": True, "seed": 0,
        "lora_parameters": {"rank": s.rank, "scale": 2.0, "dropout": 0.0,
                            "keys": [f"self_attn.{k}" for k in KEYS[:4]] + [f"mlp.{k}" for k in KEYS[4:]]},
    }  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.yaml").write_text(yaml.safe_dump(cfg))
    wall, log = _run([sys.executable, "-c", MLX_LM_LORA, str(out / "bench.yaml")])
    peak = re.findall(r"PEAK_MEMORY (\d+)", log)
    plain = re.sub(r"\x1b\[[0-9;]*m", "", log)  # its report lines: "  12    val 1.591    4.10s"
    val_s = sum(float(x) for x in re.findall(r"^\s*\d+\s+val\s+[0-9.]+\s+([0-9.]+)s", plain, re.M))
    return {
        "wall": wall,
        "val_s": val_s,
        "peak_gb": int(peak[-1]) / 2**30 if peak else float("nan"),
    }


def run_mlxsft(
    model: Path, data: Path, out: Path, s: Setting, loss: str = "selective", extra: tuple = ()
) -> dict:
    cmd = [
        sys.executable, "-m", "mlxsft", "train", "--loss", loss, "--model", str(model), "--data", str(data),
        "--output", str(out), "--no-pack", "--batch-size", str(s.batch_size),
        "--max-seq-len", str(s.max_seq_len), "--epochs", "1", "--learning-rate", str(s.lr),
        "--optimizer", "adam", "--rank", str(s.rank), "--alpha", str(2.0 * s.rank),
        "--target-modules", "all-linear", "--num-layers", "-1", "--eval-every", "0",
        "--save-every", "0", "--steps-per-report", "10", "--seed", "0", *extra,
    ]  # fmt: skip
    wall, log = _run(cmd)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["type"] == "train"]
    return {
        "wall": wall,
        "val_s": sum(r.get("eval_s", 0.0) for r in rows if r["type"] == "eval"),
        "peak_gb": max(r["peak_memory_gb"] for r in train),
        "trained": train[-1]["trained_tokens"],
        "steps": train[-1]["step"],
    }


def val_loss(model: Path, data: Path, adapter: Path, s: Setting) -> float:
    """Both tools' adapters scored by the same code on the same validation split."""
    _, log = _run([
        sys.executable, "-m", "mlxsft", "eval", "--model", str(model), "--data", str(data),
        "--adapter", str(adapter), "--split", "valid", "--max-seq-len", str(s.max_seq_len),
        "--json",
    ])  # fmt: skip
    obj = json.loads(log[log.index("{") : log.rindex("}") + 1])
    return float(obj.get("val_loss", obj.get("loss")))


def plan_estimate(model: Path, data: Path, s: Setting, selective: bool) -> int:
    """`mlxsft plan`'s estimate (bytes) for the benchmark's mlxsft run, from its data."""
    from mlxsft.config import TrainConfig
    from mlxsft.model.loading import load_tokenizer
    from mlxsft.plan import estimate_peak_memory, profile_data, run_shape
    from mlxsft.train.setup import encode_split

    cfg = TrainConfig(
        model=str(model), data=str(data), batch_size=s.batch_size, max_seq_len=s.max_seq_len,
        pack=False, rank=s.rank, optimizer="adam", loss="selective",
    ).validate()  # fmt: skip
    encoded, _ = encode_split(cfg, load_tokenizer(str(model)), str(data), "train")
    shape = run_shape(cfg, profile_data(encoded, run_shape(cfg), pack=False))
    config = json.loads((model / "config.json").read_text())
    return estimate_peak_memory(config, shape, selective_loss=selective).total


def n_steps_mlx_lm(data: Path, s: Setting) -> int:
    n = sum(1 for _ in (data / "train.jsonl").open())
    return n // s.batch_size  # mlx-lm drops the last partial batch


def matmul_gflops(fast: bool, n: int = 1024) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    if fast:
        env = preload_env(env)
    _, log = _run([sys.executable, "-c", MATMUL_PROBE, str(n)], env=env)
    return json.loads(log.strip().splitlines()[-1])


def blas_step_seconds(fast: bool) -> float:
    """Seconds for 2 compiled mlxsft optimizer steps (V=32k, D=256, 2 x 128 tokens)."""
    import bench_plan

    spec = {
        "model": bench_plan.llama_config(),
        "run": {"batch_size": 2, "max_seq_len": 128},
    }
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    env = preload_env(env) if fast else env
    _, log = _run([sys.executable, bench_plan.__file__, "--one", json.dumps(spec)], env=env)
    return float(json.loads(log.strip().splitlines()[-1])["seconds"])


def generate_tps(model: Path, n_tokens: int, rounds: int = 5) -> tuple[float, float]:
    """(mlxsft generate, mlx_lm.generate) generation tokens/s, greedy, same prompt, base model;
    the median of `rounds` alternating runs (on a tiny model single runs vary by +-25%)."""
    prompt = "Kalo mira tesu no vida pe zuho ne bifo."
    ours, theirs = [], []
    for _ in range(rounds):
        _, a = _run([
            sys.executable, "-m", "mlxsft", "generate", "--model", str(model), "--prompt", prompt,
            "--max-tokens", str(n_tokens), "--verbose",
        ])  # fmt: skip
        _, b = _run([
            sys.executable, "-m", "mlx_lm", "generate", "--model", str(model), "--prompt", prompt,
            "--max-tokens", str(n_tokens), "--temp", "0",
        ])  # fmt: skip
        ours += [float(x) for x in re.findall(r"generation: \d+ tokens, ([0-9.]+) tokens/s", a)]
        theirs += [
            float(x) for x in re.findall(r"Generation: \d+ tokens, ([0-9.]+) tokens-per-sec", b)
        ]
    return statistics.median(ours or [math.nan]), statistics.median(theirs or [math.nan])


def useful_flops(model: Path, data: Path, s: Setting) -> tuple[float, int]:
    """(model FLOPs of one epoch's useful work, real tokens): 4 x matmul params x tokens for a
    frozen-base LoRA step (forward 2N + input-gradient 2N), plus attention (3 x 4 x L x D/2 per
    token per layer for causal fwd + bwd), counted on real (unpadded) tokens for both tools."""
    from mlxsft.plan import ModelShape

    cfg = json.loads((model / "config.json").read_text())
    shape = ModelShape.from_config(cfg)
    block, _ = shape.n_params()
    n_matmul = block + shape.vocab * shape.hidden  # blocks + LM head (the lookup is free)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model))
    lengths = []
    for line in (data / "train.jsonl").open():
        msgs = json.loads(line)["messages"]
        text = tok.apply_chat_template(msgs, tokenize=False)
        lengths.append(len(tok(text, add_special_tokens=False)["input_ids"]))
    lengths = np.minimum(np.array(lengths), s.max_seq_len)
    tokens = int(lengths.sum())
    attn = float((lengths**2).sum()) / 2 * 4 * shape.hidden * 3 * shape.n_layers
    return 4.0 * n_matmul * tokens + attn, tokens


# ------------------------------------------------------------------------------------ report


def _row(name, theirs, ours, ratio, target, ok) -> str:
    flag = "" if ok is None else ("ok" if ok else "MISSED")
    return f"| {name} | {theirs} | {ours} | {ratio} | {target} | {flag} |"


def compare(
    work: Path, s: Setting, label: str, ablation: bool = False
) -> tuple[list[str], bool, dict]:
    model, data = build(work, s)
    steps = n_steps_mlx_lm(data, s)
    print(f"[{label}] mlx_lm.lora: {steps} steps ...", flush=True)
    theirs = run_mlx_lm(model, data, work / f"out-mlxlm-{label}", s, steps)
    print(f"[{label}] mlxsft train ...", flush=True)
    ours = run_mlxsft(model, data, work / f"out-mlxsft-{label}", s)
    full = None
    if ablation:
        print(f"[{label}] mlxsft train --loss full (ablation) ...", flush=True)
        full = run_mlxsft(model, data, work / f"out-mlxsft-full-{label}", s, "full")
    print(f"[{label}] validation ...", flush=True)
    v_theirs = val_loss(model, data, work / f"out-mlxlm-{label}", s)
    v_ours = val_loss(model, data, work / f"out-mlxsft-{label}", s)
    flops, tokens = useful_flops(model, data, s)
    seen = steps * s.batch_size / s.n_train  # mlx-lm drops the last partial batch
    t_ratio = ours["wall"] / theirs["wall"]
    m_ratio = ours["peak_gb"] / theirs["peak_gb"]
    v_ratio = v_ours / v_theirs
    oks = [t_ratio <= TARGETS["time"], m_ratio <= TARGETS["memory"], v_ratio <= TARGETS["val_loss"]]
    rows = [
        f"**{label}**: llama V={s.vocab} D={s.hidden} L={s.layers}, {s.n_train} train examples "
        f"({tokens} tokens), batch {s.batch_size}, max length {s.max_seq_len}, 1 epoch",
        "",
        "| metric | mlx_lm.lora | mlxsft | mlxsft / mlx_lm | target | |",
        "|---|---|---|---|---|---|",
        _row("wall time per epoch (s)", f"{theirs['wall']:.1f}", f"{ours['wall']:.1f}",
             f"{t_ratio:.2f}x", "<= 0.5x", oks[0]),
        _row("trained tokens/s", f"{ours['trained'] * seen / theirs['wall']:.0f}",
             f"{ours['trained'] / ours['wall']:.0f}", "", "", None),
        _row("peak memory (GB)", f"{theirs['peak_gb']:.3f}", f"{ours['peak_gb']:.3f}",
             f"{m_ratio:.2f}x", "<= 0.5x", oks[1]),
        _row("final validation loss", f"{v_theirs:.4f}", f"{v_ours:.4f}", f"{v_ratio:.3f}x",
             "<= 1.02x", oks[2]),
    ]  # fmt: skip
    if full is not None:
        f_t, f_m = full["wall"] / theirs["wall"], full["peak_gb"] / theirs["peak_gb"]
        rows += [
            _row("ablation: mlxsft --loss full, wall (s)", "", f"{full['wall']:.1f}",
                 f"{f_t:.2f}x", "", None),
            _row("ablation: mlxsft --loss full, peak (GB)", "", f"{full['peak_gb']:.3f}",
                 f"{f_m:.2f}x", "", None),
        ]  # fmt: skip
    est = plan_estimate(model, data, s, selective=True)
    extra = {"plan": (f"the mlxsft train run above ({label})", est, ours)}
    extra.update(
        {"flops": flops, "walls": (theirs["wall"], ours["wall"]), "ours": ours, "model": model}
    )
    return rows, all(oks), extra


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small smoke-test setting")
    ap.add_argument("--work", default="/tmp/mlxsft-bench", help="model/data/output directory")
    ap.add_argument("--vocab", type=int, nargs="*", default=[32768, 131072], help="vocab sizes")
    ap.add_argument("--no-plan", action="store_true", help="skip the plan-vs-measured check")
    args = ap.parse_args()
    t_start = time.perf_counter()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    base = (
        Setting(n_train=40, n_valid=8, hidden=64, inter=128, layers=2) if args.quick else Setting()
    )
    status = blas_status()
    fast, slow = matmul_gflops(True), matmul_gflops(False)
    lines = [
        f"machine: {platform.machine()} {os.cpu_count()} cores, {platform.system()}; "
        f"date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"BLAS: {'OpenBLAS preloaded' if status.openblas else 'reference (no OpenBLAS found)'}",
        f"matmul peak (1024^2 float32): {fast['gflops']:.1f} GFLOP/s with OpenBLAS, "
        f"{slow['gflops']:.1f} with the wheel's reference BLAS "
        f"({fast['gflops'] / slow['gflops']:.1f}x; checksums {fast['checksum']:.4f} / "
        f"{slow['checksum']:.4f})",
    ]
    if status.openblas:
        t_fast, t_slow = blas_step_seconds(True), blas_step_seconds(False)
        lines.append(
            f"2 training steps (V=32k D=256, 2x128 tokens): {t_fast:.1f} s with OpenBLAS, "
            f"{t_slow:.1f} s with the reference BLAS ({t_slow / t_fast:.1f}x)"
        )
    lines.append("")
    all_ok = True
    model0 = None
    plan_rows = []
    for i, vocab in enumerate(args.vocab):
        s = Setting(**{**base.__dict__, "vocab": vocab})
        if i > 0:  # the larger-vocab variant on an eighth of the data keeps the run short
            s.n_train, s.n_valid = max(8, s.n_train // 8), max(4, s.n_valid // 3)
        rows, ok, extra = compare(work, s, f"V{vocab // 1024}k", ablation=i == 0)
        model0 = model0 or extra["model"]
        plan_rows.append(extra["plan"])
        mfu = [extra["flops"] / w / (fast["gflops"] * 1e9) for w in extra["walls"]]
        rows.append(_row("MFU (vs measured matmul peak)", f"{mfu[0]:.1%}", f"{mfu[1]:.1%}",
                         "", "", None))  # fmt: skip
        lines += [*rows, ""]
        all_ok &= ok
    ours_tps, theirs_tps = generate_tps(model0, 64 if args.quick else 256)
    g_ok = ours_tps >= TARGETS["generate"] * theirs_tps
    lines.append(
        f"generate (base model, greedy): mlxsft {ours_tps:.1f} tok/s, mlx_lm.generate "
        f"{theirs_tps:.1f} tok/s = {ours_tps / theirs_tps:.2f}x (target >= 0.95x) "
        f"{'ok' if g_ok else 'MISSED'}"
    )
    all_ok &= g_ok
    if not args.no_plan:
        import bench_plan

        configs = bench_plan.CONFIGS[:3] if not args.quick else bench_plan.CONFIGS[:1]
        prow = bench_plan.check(configs)
        for name, est, run in plan_rows:
            measured = run["peak_gb"] * 1e9
            prow.append(
                {"config": name, "estimate": est, "measured": measured, "ratio": est / measured}
            )
        good = sum(abs(r["ratio"] - 1) <= TARGETS["plan"] for r in prow)
        lines += ["", "| plan configuration | estimate | measured | ratio |", "|---|---|---|---|"]
        lines += [
            f"| {r['config']} | {r['estimate'] / 2**20:.0f} MB | {r['measured'] / 2**20:.0f} MB "
            f"| {r['ratio']:.2f} |"
            for r in prow
        ]
        p_ok = good >= min(3, len(prow))
        lines.append(f"plan within +-25%: {good}/{len(prow)} {'ok' if p_ok else 'MISSED'}")
        all_ok &= p_ok
    lines.append(f"benchmark wall time: {time.perf_counter() - t_start:.0f} s")
    print("\n".join(lines))
    print("ALL TARGETS MET" if all_ok else "SOME TARGETS MISSED")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
