"""Real shapes: `mlxsft train` vs `mlx_lm.lora` on SmolLM2-135M-Instruct, and long-context memory.

Models (built or converted into --cache, never into the repository):
- SmolLM2-135M-Instruct dequantized to float32 from the 4-bit fixture (`mlx_lm convert
  --dequantize`), and the 4-bit fixture itself for QLoRA;
- a Qwen2.5-0.5B-shaped random model (vocab 151,936, D=896, I=4864, 14/2 heads, tied) cut to
  4 layers so a CPU run stays short; it uses SmolLM2's tokenizer (its ids fit the vocabulary).
Data: benchmarks/make_instruct_data.py (real Alpaca rows as ChatML chats; multi-turn for 2048).

`train` part, per setting: both tools run one epoch on the same data with the same LoRA (rank 8,
scale 2, all 7 linears, all layers), Adam at the same learning rate, batch 4 = 4 examples per
optimizer step for both (mlxsft `--no-pack`), loss on responses only. Both adapters are scored by
the same `mlxsft eval` on the validation split. Reports wall time per epoch (start-up included),
peak memory, trained tokens/s, final validation loss, MFU against the measured matmul peak.

`packed` part: `mlxsft --pack` (more examples per step) against mlx_lm.lora's padded epoch of
the first setting, on the time to reach mlx_lm.lora's final validation loss.

`ablation` part: mlxsft with `--loss full` against the same mlx_lm.lora epoch (where the time
goes).

`memory` part: mlxsft's peak memory on the 135M model with one packed row of 2048 and 4096
tokens, with and without --grad-checkpoint, against `mlxsft plan`'s estimate.

    python benchmarks/bench_real.py                    # both parts (~1 h on 2 busy cores)
    python benchmarks/bench_real.py --quick            # fewer examples, 135M at 512 only
    python benchmarks/bench_real.py --parts memory
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_train as bt  # noqa: E402
import make_instruct_data  # noqa: E402

from mlxsft.blas import preload_env  # noqa: E402

Q4 = ROOT.parent / "shared/fixtures/models/smollm2-135m-instruct-mlx-q4"
QWEN_SHAPE = {
    "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
    "num_hidden_layers": 4, "num_attention_heads": 14, "num_key_value_heads": 2,
    "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": True,
    "max_position_embeddings": 32768,
}  # fmt: skip


@dataclass
class Real:
    label: str
    model: str  # "f32", "q4" or "qwen"
    data: str  # "short" or "long"
    n_train: int
    n_valid: int
    max_seq_len: int = 512
    batch_size: int = 4
    lr: float = 1e-4
    rank: int = 8
    grad_checkpoint_too: bool = False  # also run mlxsft with --grad-checkpoint


SETTINGS = (
    Real("SmolLM2-135M f32, LoRA, max 512", "f32", "short", 48, 16, grad_checkpoint_too=True),
    Real("SmolLM2-135M 4-bit, QLoRA, max 512", "q4", "short", 48, 16),
    Real("SmolLM2-135M f32, LoRA, max 2048", "f32", "long", 8, 4, max_seq_len=2048),
    Real("Qwen2.5-0.5B-shaped (4 layers, V=151936), max 512", "qwen", "short", 24, 8),
)


def f32_model(cache: Path) -> Path:
    out = cache / "smollm2-135m-f32"
    if not (out / "config.json").exists():
        shutil.rmtree(out, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(Q4),
                        "--mlx-path", str(out), "--dequantize"], check=True, env=preload_env())  # fmt: skip
    return out


def qwen_model(cache: Path) -> Path:
    out = cache / "qwen2.5-0.5b-shape-l4"
    if (out / "config.json").exists():
        return out
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlxsft import _mlxlm

    out.mkdir(parents=True, exist_ok=True)
    mx.random.seed(0)
    model = _mlxlm.build_model(QWEN_SHAPE)
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (out / "config.json").write_text(
        json.dumps({**QWEN_SHAPE, "architectures": ["Qwen2ForCausalLM"]})
    )
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(Q4 / name, out / name)
    return out


def model_dir(kind: str, cache: Path) -> Path:
    return {"f32": f32_model, "q4": lambda _: Q4, "qwen": qwen_model}[kind](cache)


def data_dir(r: Real, cache: Path) -> Path:
    out = cache / f"bench-data-{r.data}-{r.n_train}-{r.n_valid}"
    return make_instruct_data.write(out, r.data, r.n_train, r.n_valid)


def as_setting(r: Real, model: Path) -> bt.Setting:
    layers = json.loads((model / "config.json").read_text())["num_hidden_layers"]
    return bt.Setting(n_train=r.n_train, n_valid=r.n_valid, batch_size=r.batch_size,
                      max_seq_len=r.max_seq_len, lr=r.lr, rank=r.rank, layers=layers)  # fmt: skip


def compare(r: Real, cache: Path, peak_gflops: float) -> list[str]:
    model, data = model_dir(r.model, cache), data_dir(r, cache)
    s = as_setting(r, model)
    work = cache / "bench-out" / r.label.replace(" ", "_")
    shutil.rmtree(work, ignore_errors=True)
    steps = bt.n_steps_mlx_lm(data, s)
    print(f"[{r.label}] mlx_lm.lora ({steps} steps) ...", flush=True)
    theirs = bt.run_mlx_lm(model, data, work / "mlxlm", s, steps)
    (work / "mlxlm.json").write_text(json.dumps(theirs))  # reused by the `packed` part
    print(f"[{r.label}] mlxsft train ...", flush=True)
    ours = bt.run_mlxsft(model, data, work / "mlxsft", s)
    print(f"[{r.label}] validation (mlxsft eval on both adapters) ...", flush=True)
    v_theirs = bt.val_loss(model, data, work / "mlxlm", s)
    v_ours = bt.val_loss(model, data, work / "mlxsft", s)
    flops, tokens = bt.useful_flops(model, data, s)
    seen = steps * s.batch_size / s.n_train  # mlx-lm drops the last partial batch
    # training time: wall time with each tool's validation passes taken out (mlx_lm.lora always
    # scores one batch at its first and last step; mlxsft scores the split at the end)
    train_s = [x["wall"] - x.get("val_s", 0.0) for x in (theirs, ours)]
    mfu = [flops * f / w / (peak_gflops * 1e9) for f, w in zip((seen, 1), train_s, strict=True)]
    t, m, v = ours["wall"] / theirs["wall"], ours["peak_gb"] / theirs["peak_gb"], v_ours / v_theirs
    t_train = train_s[1] / train_s[0]
    ck_rows = []
    if r.grad_checkpoint_too:
        print(f"[{r.label}] mlxsft train --grad-checkpoint ...", flush=True)
        ck = bt.run_mlxsft(model, data, work / "mlxsft-ck", s, extra=("--grad-checkpoint",))
        v_ck = bt.val_loss(model, data, work / "mlxsft-ck", s)
        ck_rows = [
            f"| mlxsft `--grad-checkpoint`: wall time (s) / peak memory (GB) / validation loss | "
            f"| {ck['wall']:.0f} / {ck['peak_gb']:.2f} / {v_ck:.4f} | "
            f"{ck['wall'] / theirs['wall']:.2f}x / {ck['peak_gb'] / theirs['peak_gb']:.2f}x / "
            f"{v_ck / v_theirs:.3f}x |"
        ]
    return [
        f"**{r.label}**: {r.n_train} train / {r.n_valid} valid conversations ({tokens} tokens), "
        f"batch {r.batch_size} (examples per step, both), max length {r.max_seq_len}, 1 epoch "
        f"({steps} mlx-lm steps, {ours['steps']} mlxsft steps)",
        "",
        "| metric | mlx_lm.lora | mlxsft | mlxsft / mlx_lm |",
        "|---|---|---|---|",
        f"| wall time per epoch (s) | {theirs['wall']:.0f} | {ours['wall']:.0f} | {t:.2f}x |",
        f"| training time, validation taken out (s) | {train_s[0]:.0f} | {train_s[1]:.0f} | "
        f"{t_train:.2f}x |",
        f"| trained tokens/s (training time) | {ours['trained'] * seen / train_s[0]:.0f} | "
        f"{ours['trained'] / train_s[1]:.0f} | |",
        f"| peak memory (GB) | {theirs['peak_gb']:.2f} | {ours['peak_gb']:.2f} | {m:.2f}x |",
        f"| final validation loss (mlxsft eval) | {v_theirs:.4f} | {v_ours:.4f} | {v:.3f}x |",
        f"| MFU (training time, vs measured matmul peak) | {mfu[0]:.1%} | {mfu[1]:.1%} | |",
        *ck_rows,
        "",
    ]


def _mlx_lm_epoch(r: Real, cache: Path) -> tuple[dict, float]:
    """mlx_lm.lora's one-epoch result for `r` (from the `train` part, else run now) and its
    validation loss through `mlxsft eval`."""
    model, data = model_dir(r.model, cache), data_dir(r, cache)
    s = as_setting(r, model)
    work = cache / "bench-out" / r.label.replace(" ", "_")
    saved = work / "mlxlm.json"
    if not saved.is_file() or not (work / "mlxlm" / "adapters.safetensors").is_file():
        print(f"[{r.label}] mlx_lm.lora ...", flush=True)
        theirs = bt.run_mlx_lm(model, data, work / "mlxlm", s, bt.n_steps_mlx_lm(data, s))
        saved.write_text(json.dumps(theirs))
    return json.loads(saved.read_text()), bt.val_loss(model, data, work / "mlxlm", s)


def ablation_rows(r: Real, cache: Path) -> list[str]:
    """Where the time goes: mlxsft with the plain full-logits loss (`--loss full`, everything
    else as in the `train` part) against mlx_lm.lora's epoch."""
    theirs, v_theirs = _mlx_lm_epoch(r, cache)
    model, data = model_dir(r.model, cache), data_dir(r, cache)
    s = as_setting(r, model)
    out = cache / "bench-out" / r.label.replace(" ", "_") / "mlxsft-full-loss"
    shutil.rmtree(out, ignore_errors=True)
    print(f"[{r.label}] mlxsft train --loss full ...", flush=True)
    ours = bt.run_mlxsft(model, data, out, s, loss="full")
    v = bt.val_loss(model, data, out, s)
    return [
        f"**{r.label}, ablation**: mlxsft with `--loss full` (the logits of every position, as "
        "mlx_lm.lora computes them)",
        "",
        "| | mlx_lm.lora | mlxsft `--loss full` | ratio |",
        "|---|---|---|---|",
        f"| wall time per epoch (s) | {theirs['wall']:.0f} | {ours['wall']:.0f} | "
        f"{ours['wall'] / theirs['wall']:.2f}x |",
        f"| peak memory (GB) | {theirs['peak_gb']:.2f} | {ours['peak_gb']:.2f} | "
        f"{ours['peak_gb'] / theirs['peak_gb']:.2f}x |",
        f"| validation loss | {v_theirs:.4f} | {v:.4f} | {v / v_theirs:.3f}x |",
        "",
    ]


def packed_rows(r: Real, cache: Path, epochs: int = 3) -> list[str]:
    """Packing changes the examples per optimizer step, so a packed run is compared with
    mlx_lm.lora's one-epoch run (padded, from the `train` part, else run here) on the time it
    takes to reach mlx_lm.lora's final validation loss (both scored by the same evaluator)."""
    theirs, target = _mlx_lm_epoch(r, cache)
    model, data = model_dir(r.model, cache), data_dir(r, cache)
    s = as_setting(r, model)
    out = cache / "bench-out" / r.label.replace(" ", "_") / "mlxsft-packed"
    shutil.rmtree(out, ignore_errors=True)
    print(f"[{r.label}] mlxsft train --pack, up to {epochs} epochs, evaluated every step ...")
    extra = ("--pack", "--epochs", str(epochs), "--eval-every", "1")
    ours = bt.run_mlxsft(model, data, out, s, extra=extra)
    rec = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = {x["step"]: x for x in rec if x["type"] == "train"}
    evals = [x for x in rec if x["type"] == "eval"]
    startup = ours["wall"] - max(x["elapsed_s"] for x in train.values())
    hit = next((e for e in evals if e["step"] > 0 and e["val_loss"] <= target), None)
    rows = [
        f"**{r.label}, packed**: time for `mlxsft --pack` (batch 4 packed rows of up to "
        f"{r.max_seq_len} tokens) to reach mlx_lm.lora's final validation loss {target:.4f} "
        f"(its one padded epoch, {theirs['wall']:.0f} s with start-up); evaluation time taken out",
        "",
    ]
    if hit is None:
        best = min(e["val_loss"] for e in evals)
        return [
            *rows,
            f"not reached in {epochs} epochs ({ours['steps']} steps; best {best:.4f})",
            "",
        ]
    step = hit["step"]
    evals_before = sum(e.get("eval_s", 0.0) for e in evals if e["step"] < step)
    t = startup + train[step]["elapsed_s"] - evals_before
    epoch = train[step]["epoch"]
    return [
        *rows,
        "| | mlx_lm.lora (padded, 1 epoch) | mlxsft --pack | mlxsft / mlx_lm |",
        "|---|---|---|---|",
        f"| time to validation loss <= {target:.4f} (s) | {theirs['wall']:.0f} | {t:.0f} "
        f"(step {step}, epoch {epoch:.2f}, val {hit['val_loss']:.4f}) | {t / theirs['wall']:.2f}x |",
        "",
    ]


def memory_rows(cache: Path, lengths: list[int]) -> list[str]:
    """Peak memory of one packed row of L tokens on the 135M model, +-grad checkpointing, and
    `mlxsft plan`'s estimate for the same run."""
    model = f32_model(cache)
    data = make_instruct_data.write(cache / "bench-data-long-120-8", "long", 120, 8)
    rows = ["| max length | grad checkpoint | measured peak | plan estimate | estimate / measured |",
            "|---|---|---|---|---|"]  # fmt: skip
    for L in lengths:
        for ckpt in (False, True):
            out = cache / "bench-out" / f"mem-{L}-{int(ckpt)}"
            shutil.rmtree(out, ignore_errors=True)
            flags = ["--batch-size", "1", "--max-seq-len", str(L), "--pack", "--rank", "8"]
            flags += ["--grad-checkpoint"] if ckpt else []
            base = [sys.executable, "-m", "mlxsft"]
            plan = subprocess.run([*base, "plan", "-m", str(model), "-d", str(data), *flags],
                                  check=True, capture_output=True, text=True, env=_env()).stdout  # fmt: skip
            est = _plan_total_gb(plan)
            yes = "yes" if ckpt else "no"
            if "does not fit" in plan or est > 0.75 * _available_gb():  # a shared machine
                rows.append(f"| {L} | {yes} | not run (would not fit) | {est:.2f} GB | |")
                continue
            print(f"[memory] {L} tokens, grad checkpoint {ckpt} ...", flush=True)
            once = ["--iters", "1", "--eval-every", "0", "--save-every", "0"]
            subprocess.run([*base, "train", "-m", str(model), "-d", str(data), "-o", str(out),
                            *flags, *once], check=True, capture_output=True, env=_env())  # fmt: skip
            rec = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
            peak = max(x["peak_memory_gb"] for x in rec if x.get("type") == "train")
            rows.append(f"| {L} | {yes} | {peak:.2f} GB | {est:.2f} GB | {est / peak:.2f} |")
    return rows


def _available_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1e6
    return float("inf")


def _plan_total_gb(text: str) -> float:
    m = re.search(r"total[^0-9]*([0-9.]+) ?(GB|MB)", text, re.IGNORECASE)
    if not m:
        raise RuntimeError(f"no total in `mlxsft plan` output:\n{text}")
    return float(m.group(1)) / (1000 if m.group(2).upper() == "MB" else 1)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--cache", default="/work/cache", help="models, data and outputs go here")
    ap.add_argument("--parts", nargs="*", default=["train", "packed", "memory"])
    ap.add_argument("--only", nargs="*", help="setting labels to run (default: all)")
    ap.add_argument("--lengths", nargs="*", type=int, help="memory part: row lengths")
    args = ap.parse_args()
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    settings = list(SETTINGS)
    if args.quick:  # 4 optimizer steps per setting; only the first setting unless --only
        settings = [replace(r, n_train=4 * r.batch_size, n_valid=8) for r in settings]
        settings = settings if args.only else settings[:1]
    if args.only:
        settings = [r for r in settings if any(o in r.label for o in args.only)]
    peak = bt.matmul_gflops(True)["gflops"]
    lines = [
        f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the start"
        f"; date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"matmul peak (1024^2 float32, the BLAS mlxsft picks): {peak:.1f} GFLOP/s",
        "",
    ]
    if "train" in args.parts:
        for r in settings:
            rows = compare(r, cache, peak)
            print("\n".join(rows), flush=True)
            lines += rows
    for part, fn in (("packed", packed_rows), ("ablation", ablation_rows)):
        if part in args.parts:
            rows = fn(settings[0], cache)
            print("\n".join(rows), flush=True)
            lines += rows
    if "memory" in args.parts:
        rows = memory_rows(cache, args.lengths or ([2048] if args.quick else [2048, 4096]))
        print("\n".join(rows), flush=True)
        lines += rows
    lines.append(f"\nload average at the end {os.getloadavg()[0]:.1f}; "
                 f"benchmark wall time {time.perf_counter() - t0:.0f} s")  # fmt: skip
    print("\n" + "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
