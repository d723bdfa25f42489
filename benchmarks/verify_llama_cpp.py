"""Every GGUF type mlxsft exports, run by llama.cpp itself (through llama-cpp-python).

NOT part of CI: llama-cpp-python has no prebuilt wheel for Linux x86-64 on PyPI, and building it
from source takes 15-50 minutes on 2 cores. With `--install` the script runs
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
  (max |diff|); for quantized files llama.cpp also quantizes the activations (q8 dot products),
  so this grows with the type;
- llama.cpp's own quantizer (`llama-quantize`, through llama-cpp-python) run on mlxsft's f32
  file for the same type: how many tensors have the same type and bytes in both files, and
  whether llama.cpp's greedy tokens from its own file equal those from mlxsft's.

Build note: with `-march=native` on a CPU with AMX (Sapphire Rapids and later) ggml's AMX path
crashed inside a VM on q8_0 files, llama.cpp's own included; build without it:
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" pip install llama-cpp-python
(about 15 minutes on 2 cores with LLAMA_BUILD_TESTS/EXAMPLES/SERVER=OFF). Measured table:
docs/export.md.

    python benchmarks/verify_llama_cpp.py [--install] [--model HF_DIR] [--out /work/cache/llama-cpp-check]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
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
FTYPES = {  # --dtype -> llama.cpp's file type, for its own quantizer
    "f32": "LLAMA_FTYPE_ALL_F32", "f16": "LLAMA_FTYPE_MOSTLY_F16",
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
}  # fmt: skip
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


def check(path: Path, model_dir: Path, ids: list[int], n: int):
    """One GGUF file in llama.cpp: (tokenization ok, its first n greedy tokens, logit max diff).
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
    llm.reset()
    llm.eval(ids)
    cpp = np.array(llm.scores[: len(ids)], dtype=np.float64)  # (L, V) logits of the prompt
    diff = float(np.abs(cpp - gguf_forward(path, ids)).max())
    return tok_ok, out, diff


def llama_quantize(src: Path, dst: Path, dtype: str) -> int:
    """llama.cpp's own quantizer (`llama-quantize`, through llama-cpp-python) on `src`."""
    import ctypes

    import llama_cpp

    os.dup2(os.open(os.devnull, os.O_WRONLY), 2)  # its per-tensor log (this child only)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, FTYPES[dtype])
    return int(llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(),
                                              ctypes.byref(params)))  # fmt: skip


def leading_same(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), len(a))


def in_child(fn, *args):
    """`fn(*args)` in a fresh process: a crash inside llama.cpp raises here, not kills us."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def same_tensors(ours: Path, theirs: Path) -> str:
    """'n/N' tensors with the same ggml type and bytes in both files."""
    from mlxsft.model import gguf

    _, a = gguf.read_gguf(ours, dequantize_all=False)
    _, b = gguf.read_gguf(theirs, dequantize_all=False)
    same = 0
    for name, t in a.items():
        u = b.get(name)
        if u is None or u.ggml_type != t.ggml_type:
            continue
        x = t.raw if t.raw is not None else t.data
        y = u.raw if u.raw is not None else u.data
        same += bool(np.array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8)))
    return f"{same}/{len(a)}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--install", action="store_true", help="pip install llama-cpp-python first")
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=Path("/work/cache/llama-cpp-check"))
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--dtypes", nargs="*", default=list(DTYPES), choices=DTYPES)
    args = ap.parse_args()
    if args.install:  # the build of the docstring's note: no AMX, no tests/examples/server
        flags = "-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
        flags += " -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF"
        env = {**os.environ, "CMAKE_ARGS": os.environ.get("CMAKE_ARGS", flags)}
        pip = [sys.executable, "-m", "pip", "install", "llama-cpp-python==0.3.36"]
        subprocess.run(pip, check=True, env=env)
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
        "| dtype | MiB | tensor types | tokenization | greedy = mlxsft (float) "
        "| tensors = llama-quantize's | greedy = llama-quantize's file | max logit diff |"
    )
    print("|---|---|---|---|---|---|---|---|")
    ok = True

    def export(dtype: str) -> Path | None:
        path = args.out / f"model-{dtype}.gguf"
        argv = ["export", "--model", str(model_dir), "--format", "gguf", "--output", str(path)]
        result = CliRunner().invoke(cli, [*argv, "--dtype", dtype])
        if result.exit_code != 0:
            print(f"| {dtype} | export failed: {result.output.strip()} |")
            return None
        return path

    base = export("f32")  # llama.cpp's own quantizer starts from mlxsft's float file
    for dtype in args.dtypes:
        path = base if dtype == "f32" else export(dtype)
        if path is None:
            ok = False
            continue
        _, tensors = gguf.read_gguf(path, dequantize_all=False)
        kinds = sorted({gguf.TYPE_NAMES[t.ggml_type] for t in tensors.values()})
        try:
            tok_ok, out, diff = in_child(check, path, model_dir, ids, args.tokens)
        except Exception as exc:  # a file llama.cpp refuses, or a crash in it: report, go on
            print(f"| {dtype} | llama.cpp failed: {type(exc).__name__}: {exc} |")
            ok = False
            continue
        same_ref, same_cpp = "-", "-"
        if dtype != "f32" and base is not None:
            theirs = args.out / f"llama-quantize-{dtype}.gguf"
            if in_child(llama_quantize, base, theirs, dtype) == 0:
                same_ref = same_tensors(path, theirs)
                _, out_cpp, _ = in_child(check, theirs, model_dir, ids, args.tokens)
                same_cpp = f"{leading_same(out, out_cpp)}/{args.tokens}"
                ok &= same_cpp == f"{args.tokens}/{args.tokens}"
        mib = path.stat().st_size / 2**20
        same = leading_same(out, ref)
        print(
            f"| {dtype} | {mib:.1f} | {', '.join(kinds)} | {'same' if tok_ok else 'DIFFERS'} "
            f"| {same}/{args.tokens} | {same_ref} | {same_cpp} | {diff:.2e} |",
            flush=True,
        )
        ok &= tok_ok and (same == args.tokens or dtype not in ("f32", "f16"))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
