"""mlxsft's NumPy quantizers vs ggml's own C reference quantizers, byte for byte.

Downloads the llama-cpp-python source distribution (it vendors llama.cpp) with pip, compiles only
`ggml/src/ggml-quants.c` (plus four stub functions) into a small shared library in a few seconds,
and compares `quantize_row_<type>_ref` and `dequantize_row_<type>` with
`mlxsft.export.gguf_quants` on: the fixed inputs whose SHA-256 digests tests/unit/test_gguf_quants.py
embeds, random and edge-case tensors, and every 2-D weight of a model (optional).

    python benchmarks/verify_ggml_quants.py [--model HF_DIR] [--cache /work/cache/ggml-ref]

The library is built like llama.cpp's release build of ggml-base on x86-64: `-O3 -std=gnu11`,
no `-march` (so no FMA contraction). ggml-base on arm64 may contract a*b+c into FMA, and its
k-quant bytes can then differ in rare blocks from these.
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import hashlib
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mlxsft.model import gguf_quants as Q  # noqa: E402

STUBS = r"""
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
void ggml_abort(const char *file, int line, const char *fmt, ...) { fprintf(stderr, "%s:%d\n", file, line); abort(); }
size_t ggml_row_size(int type, int64_t ne) { abort(); }
const char *ggml_type_name(int type) { return "?"; }
size_t ggml_type_size(int type) { abort(); }
"""
C_NAMES = {
    Q.GGML_Q4_0: "q4_0",
    Q.GGML_Q4_1: "q4_1",
    Q.GGML_Q5_0: "q5_0",
    Q.GGML_Q5_1: "q5_1",
    Q.GGML_Q8_0: "q8_0",
    Q.GGML_Q4_K: "q4_K",
    Q.GGML_Q5_K: "q5_K",
    Q.GGML_Q6_K: "q6_K",
}


def golden_inputs() -> np.ndarray:
    """The fixed (8, 512) input of the unit test's digests: normal rows at several scales, a
    heavy-tailed row, a sparse row (with -0.0), zeros, a constant and an integer row."""
    rng = np.random.default_rng(1234)
    x = rng.standard_normal((8, 512)) * np.array([[1.0], [0.02], [3.0], [1], [1], [1], [1], [1]])
    x[3] = rng.standard_t(2, 512)
    x[4] = rng.standard_normal(512) * (rng.random(512) < 0.1)
    x[5] = 0.0
    x[6, :256], x[6, 256:] = 0.25, -0.5
    x[7] = rng.integers(-8, 8, 512)
    return x.astype(np.float32)


def build(cache: Path) -> ctypes.CDLL:
    lib = cache / "libggmlquants.so"
    if lib.is_file():
        return ctypes.CDLL(str(lib))
    cache.mkdir(parents=True, exist_ok=True)
    sdists = glob.glob(str(cache / "llama_cpp_python-*.tar.gz"))
    if not sdists:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary=:all:"]
        subprocess.run([*cmd, "llama-cpp-python", "-d", str(cache)], check=True)
        sdists = glob.glob(str(cache / "llama_cpp_python-*.tar.gz"))
    src = cache / "src"
    with tarfile.open(sdists[0]) as tar:
        members = [m for m in tar.getmembers() if "/vendor/llama.cpp/ggml/" in m.name]
        tar.extractall(src, members=members, filter="data")
    ggml = next(src.glob("*/vendor/llama.cpp/ggml"))
    (cache / "stubs.c").write_text(STUBS)
    inc = [f"-I{ggml / d}" for d in ("include", "src", "src/ggml-cpu")]
    cmd = ["gcc", "-O3", "-DNDEBUG", "-std=gnu11", "-fPIC", "-shared", "-w", *inc]
    cmd += [str(ggml / "src" / "ggml-quants.c"), str(cache / "stubs.c"), "-o", str(lib), "-lm"]
    subprocess.run(cmd, check=True)
    print(f"built {lib} from {Path(sdists[0]).name}")
    return ctypes.CDLL(str(lib))


def reference(lib: ctypes.CDLL, x: np.ndarray, t: int) -> np.ndarray:
    qk, size = Q.BLOCKS[t]
    x = np.ascontiguousarray(x, np.float32).reshape(-1)
    out = np.zeros(x.size // qk * size, np.uint8)
    fn = getattr(lib, f"quantize_row_{C_NAMES[t]}_ref")
    fn(
        x.ctypes.data_as(ctypes.c_void_p),
        out.ctypes.data_as(ctypes.c_void_p),
        ctypes.c_int64(x.size),
    )
    return out


def reference_dequant(lib: ctypes.CDLL, raw: np.ndarray, t: int, n: int) -> np.ndarray:
    out = np.zeros(n, np.float32)
    fn = getattr(lib, f"dequantize_row_{C_NAMES[t]}")
    fn(raw.ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(n))
    return out


def check(lib: ctypes.CDLL, name: str, x: np.ndarray, t: int) -> bool:
    ours = Q.quantize(x.reshape(-1, x.shape[-1]), t).reshape(-1)
    ref = reference(lib, x, t)
    same = np.array_equal(ours, ref)
    back = Q.dequantize(ref, t, (x.size,))
    same_dq = np.array_equal(back, reference_dequant(lib, ref, t, x.size))
    rmse = float(np.sqrt(np.mean((back - x.reshape(-1)) ** 2)))
    status = "identical" if same else f"DIFFER in {(ours != ref).sum()} bytes"
    print(
        f"{C_NAMES[t]:5} {name:34} {status}, dequantize {'identical' if same_dq else 'DIFFERS'}, rmse {rmse:.3g}"
    )
    return same and same_dq


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", type=Path, default=Path("/work/cache/ggml-ref"))
    ap.add_argument("--model", type=Path, default=None, help="HF dir: check every 2-D weight")
    args = ap.parse_args()
    lib = build(args.cache)
    rng = np.random.default_rng(0)
    cases = {
        "golden (unit test digests)": golden_inputs(),
        "normal 64x1024": rng.standard_normal((64, 1024)).astype(np.float32),
        "f16-rounded 0.02 scale": (rng.standard_normal((64, 512)) * 0.02).astype(np.float16),
        "positive": np.abs(rng.standard_normal((16, 512))).astype(np.float32),
    }
    ok = True
    for t in C_NAMES:
        for name, x in cases.items():
            ok &= check(lib, name, x.astype(np.float32), t)
    print("digests of the golden input (ggml reference):")
    for t in C_NAMES:
        print(
            f"    {C_NAMES[t]!r}: {hashlib.sha256(reference(lib, golden_inputs(), t)).hexdigest()!r},"
        )
    if args.model is not None:
        from safetensors.numpy import load_file

        for f in sorted(args.model.glob("*.safetensors")):
            for k, w in load_file(f).items():
                for t in C_NAMES if w.ndim == 2 else ():
                    if w.shape[-1] % Q.BLOCKS[t][0] == 0:
                        ok &= check(lib, k[-34:], w.astype(np.float32), t)
    print("ALL IDENTICAL" if ok else "SOME DIFFER")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
