"""Every GGUF type mlxsft exports, run by llama.cpp itself (through llama-cpp-python).

NOT part of CI: llama-cpp-python has no prebuilt wheel for Linux x86-64 on PyPI, and building it
from source takes ~50 minutes on 2 cores. With `--install` the script runs
`pip install llama-cpp-python` (the build) first; otherwise it needs `import llama_cpp` to work.

For a model (default: SmolLM2-135M-Instruct float32 converted from the shared 4-bit fixture with
`mlx_lm convert --dequantize`; any llama/qwen2/qwen3 HF dir works) and each `--dtype` in f32, f16,
q8_0, q6_k, q5_k_m, q4_k_m, q4_0, the script exports a GGUF with `mlxsft export`, loads it in
llama.cpp and reports:
- the file's tensor types as llama.cpp reads them (from the `gguf` package) and its size;
- tokenization: llama.cpp's token ids == the training tokenizer's on probe texts;
- greedy generation: llama.cpp's first 32 tokens for a chat prompt vs mlxsft's greedy tokens on
  the float model (f32/f16 are expected to agree token for token; quantized files are reported
  as the number of leading tokens that agree);
- logits of the prompt: llama.cpp's vs a float64 NumPy forward pass over the same file
  (max |diff|), i.e. whether llama.cpp reads the tensors as mlxsft wrote them.

    python benchmarks/verify_llama_cpp.py [--install] [--model HF_DIR] [--out /work/cache/llama-cpp-check]
"""

from __future__ import annotations

import argparse
import multiprocessing
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "e2e"))  # test_gguf_forward.gguf_forward: NumPy reading
sys.path.insert(0, str(ROOT / "tests"))  # _export_utils, which test_gguf_forward imports
from mlxsft.config import GGUF_DTYPES as DTYPES  # noqa: E402  (every --dtype the exporter offers)

PROMPT = "What is the capital of France?"
FIXTURE = ROOT.parent / "shared" / "fixtures" / "models" / "smollm2-135m-instruct-mlx-q4"


def float_model(out: Path) -> Path:
    dst = out / "smollm2-f32"
    if not (dst / "config.json").is_file():
        cmd = [sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(FIXTURE)]
        subprocess.run([*cmd, "--mlx-path", str(dst), "--dequantize"], check=True)
    return dst


def mlxsft_greedy(model_dir: Path, ids: list[int], n: int) -> list[int]:
    import mlx.core as mx
    from mlx_lm.generate import generate_step  # greedy (argmax) with a KV cache

    from mlxsft.model.loading import load

    model = load(str(model_dir)).model
    out = [int(t) for t, _ in generate_step(mx.array(ids), model, max_tokens=n)]
    return out


def check(path: Path, model_dir: Path, ids: list[int], ref: list[int], n: int):
    """One exported file: (tokenization ok, leading tokens equal to mlxsft's, logit max diff).
    Runs in a child process (see `main`), so a crash inside llama.cpp loses one row only."""
    import llama_cpp
    from test_gguf_forward import gguf_forward

    from mlxsft.export.gguf_vocab import PRE_PROBES
    from mlxsft.model.loading import load_tokenizer

    tokenizer = load_tokenizer(str(model_dir))

    llm = llama_cpp.Llama(str(path), n_ctx=512, logits_all=True, verbose=False, seed=0)
    tok_ok = all(
        llm.tokenize(t.encode(), add_bos=False, special=False)
        == list(tokenizer(t, add_special_tokens=False)["input_ids"])
        for t in PRE_PROBES
    )
    out: list[int] = []
    for token in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
        out.append(int(token))
        if len(out) == n:
            break
    same = next((i for i, (a, b) in enumerate(zip(out, ref, strict=False)) if a != b), len(out))
    llm.reset()
    llm.eval(ids)
    cpp = np.array(llm.scores[: len(ids)], dtype=np.float64)  # (L, V) logits of the prompt
    diff = float(np.abs(cpp - gguf_forward(path, ids)).max())
    return tok_ok, same, diff


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--install", action="store_true", help="pip install llama-cpp-python first")
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=Path("/work/cache/llama-cpp-check"))
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--dtypes", nargs="*", default=list(DTYPES), choices=DTYPES)
    args = ap.parse_args()
    if args.install:
        subprocess.run([sys.executable, "-m", "pip", "install", "llama-cpp-python"], check=True)
    try:
        import llama_cpp  # noqa: F401  (used in the child processes)
    except ImportError:
        print("llama-cpp-python is not installed: rerun with --install (a ~50 minute build)")
        return 2
    from click.testing import CliRunner

    from mlxsft.cli import main as cli
    from mlxsft.model import gguf
    from mlxsft.model.loading import load_tokenizer

    args.out.mkdir(parents=True, exist_ok=True)
    model_dir = args.model or float_model(args.out)
    tokenizer = load_tokenizer(str(model_dir))
    msgs = [{"role": "user", "content": PROMPT}]
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    else:
        text = PROMPT
    ids = list(tokenizer(text)["input_ids"])
    ref = mlxsft_greedy(model_dir, ids, args.tokens)
    print(f"model {model_dir}; mlxsft greedy: {tokenizer.decode(ref)!r}")
    print(
        "| dtype | MiB | tensor types | tokenization | greedy tokens = mlxsft's | max logit diff |"
    )
    print("|---|---|---|---|---|---|")
    ok = True
    for dtype in args.dtypes:
        path = args.out / f"model-{dtype}.gguf"
        argv = ["export", "--model", str(model_dir), "--format", "gguf", "--output", str(path)]
        result = CliRunner().invoke(cli, [*argv, "--dtype", dtype])
        if result.exit_code != 0:
            print(f"| {dtype} | export failed: {result.output.strip()} |")
            ok = False
            continue
        _, tensors = gguf.read_gguf(path, dequantize_all=False)
        kinds = sorted({gguf.TYPE_NAMES[t.ggml_type] for t in tensors.values()})
        try:
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                job = pool.submit(check, path, model_dir, ids, ref, args.tokens)
                tok_ok, same, diff = job.result()
        except Exception as exc:  # a file llama.cpp refuses, or a crash in it: report, go on
            print(f"| {dtype} | llama.cpp failed: {type(exc).__name__}: {exc} |")
            ok = False
            continue
        mib = path.stat().st_size / 2**20
        print(
            f"| {dtype} | {mib:.1f} | {', '.join(kinds)} | {'same' if tok_ok else 'DIFFERS'} "
            f"| {same}/{args.tokens} | {diff:.2e} |"
        )
        ok &= tok_ok and (same == args.tokens or dtype not in ("f32", "f16"))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
