"""How much each GGUF `--dtype` changes a model: export, load the file back (`--model x.gguf`),
and compare its next-token distributions with the float model's.

    python benchmarks/gguf_quality.py [--model HF_DIR] [--out /work/cache/gguf-quality]

Default model: SmolLM2-135M-Instruct in float32 (`mlx_lm convert --dequantize` of the shared
4-bit fixture, so its weights sit on a 4-bit grid, which flatters the k-quants' sub-block scales).
Prints, per dtype: file size, export seconds, mean KL(float || gguf) over the tokens of a fixed
English paragraph, and the greedy answer to one chat prompt.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
FIXTURE = ROOT.parent / "shared" / "fixtures" / "models" / "smollm2-135m-instruct-mlx-q4"
DTYPES = ["f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0"]
TEXT = (
    "The capital of France is Paris. It is known for the Eiffel Tower, museums such as the "
    "Louvre, and its cafes. Many tourists visit every year to see the city and enjoy French food."
)
PROMPT = "What is the capital of France?"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=Path("/work/cache/gguf-quality"))
    args = ap.parse_args()
    import mlx.core as mx
    from click.testing import CliRunner
    from mlx_lm.generate import generate_step

    from mlxsft import _mlxlm
    from mlxsft.cli import main as cli
    from mlxsft.export.fuse import mean_kl
    from mlxsft.model.loading import load

    args.out.mkdir(parents=True, exist_ok=True)
    model_dir = args.model or args.out / "smollm2-f32"
    if args.model is None and not (model_dir / "config.json").is_file():
        cmd = [sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(FIXTURE)]
        subprocess.run([*cmd, "--mlx-path", str(model_dir), "--dequantize"], check=True)
    ref = load(str(model_dir))
    ids = list(ref.tokenizer(TEXT)["input_ids"])
    msgs = [{"role": "user", "content": PROMPT}]
    chat = ref.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    chat_ids = list(ref.tokenizer(chat, add_special_tokens=False)["input_ids"])

    def logits(model) -> list[np.ndarray]:
        return [np.array(_mlxlm.forward(model, mx.array([ids]))[0].astype(mx.float32))]

    def answer(loaded) -> str:
        out = []
        for tok, _ in generate_step(mx.array(chat_ids), loaded.model, max_tokens=24):
            if int(tok) == loaded.tokenizer.eos_token_id:
                break
            out.append(int(tok))
        return loaded.tokenizer.decode(out)

    base = logits(ref.model)
    print(f"model {model_dir}; float answer: {answer(ref)!r}")
    print("| dtype | MiB | export s | mean KL(float ‖ gguf) | greedy answer |")
    print("|---|---|---|---|---|")
    for dtype in DTYPES:
        path = args.out / f"model-{dtype}.gguf"
        argv = ["export", "--model", str(model_dir), "--format", "gguf", "--output", str(path)]
        tic = time.perf_counter()
        result = CliRunner().invoke(cli, [*argv, "--dtype", dtype])
        seconds = time.perf_counter() - tic
        if result.exit_code != 0:
            print(f"| {dtype} | export failed: {result.output.strip()} |")
            continue
        got = load(str(path))
        kl = mean_kl(base, logits(got.model))
        mib = path.stat().st_size / 2**20
        print(f"| {dtype} | {mib:.1f} | {seconds:.0f} | {kl:.4f} | {answer(got)!r} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
