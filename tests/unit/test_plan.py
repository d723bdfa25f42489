"""Memory planning: exact parameter arithmetic, the estimate's structure, advice, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlxsft import plan
from mlxsft.cli import main
from mlxsft.errors import UserError
from mlxsft.plan import GB, ModelShape, RunShape, estimate_peak_memory, parse_size

QWEN05 = {  # Qwen2.5-0.5B's config.json (the fields plan reads)
    "model_type": "qwen2",
    "vocab_size": 151936,
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
}
SMALL = {
    "model_type": "llama",
    "vocab_size": 1000,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
}


def test_parameter_counts_by_hand():
    shape = ModelShape.from_config(QWEN05)
    assert (shape.head_dim, shape.dtype_bytes, shape.tied) == (64, 2, True)
    # per block: q,k,v,o = 896*(896+128+128) + 896*896; mlp 3*896*4864; two norms
    block = 896 * 1152 + 896 * 896 + 3 * 896 * 4864 + 2 * 896
    assert shape.n_params() == (24 * block + 896, 151936 * 896)
    # HF's count, 494_032_768, also has the q/k/v biases: 24 x (896 + 128 + 128)
    assert sum(shape.n_params()) == 494_032_768 - 24 * 1152


def test_small_estimate_parts_exactly():
    est = estimate_peak_memory(SMALL, batch_size=2, max_seq_len=128, rank=4)
    block = 64 * (64 + 32 + 32) + 64 * 64 + 3 * 64 * 128 + 2 * 64
    assert est.weights == (2 * block + 64 + 2 * 1000 * 64) * 4
    # rank 4 x (in + out) for q, k, v, o, gate, up, down in both blocks, float32
    lora = 2 * 4 * ((64 + 64) + 2 * (64 + 32) + (64 + 64) + 2 * (64 + 128) + (128 + 64))
    assert (est.adapters, est.gradients, est.optimizer) == (4 * lora, 4 * lora, 8 * lora)
    assert est.total == sum(n for name, n in est.rows() if name != "total")
    assert est.rows()[-1] == ("total", est.total)


def test_each_knob_moves_the_right_part():
    kw = {"batch_size": 4, "max_seq_len": 2048, "block_attention": False, "lean_mlp": False}
    base = estimate_peak_memory(QWEN05, **kw)
    ckpt = estimate_peak_memory(QWEN05, **kw, grad_checkpoint=True)
    plain = estimate_peak_memory(QWEN05, **kw, selective_loss=False)
    q4 = estimate_peak_memory(QWEN05, **kw, quantize=4)
    full = estimate_peak_memory(QWEN05, **kw, fine_tune_type="full")
    half = estimate_peak_memory(QWEN05, **kw, grad_accum=2)
    assert ckpt.activations < base.activations / 5 and ckpt.weights == base.weights
    # full logits: 4 x 2048 x 151936 float32 = 4.6 GiB, times the arrays alive at once
    assert plain.loss == int(4 * 2048 * 151936 * 4 * plan.C_LOGITS) and plain.loss > 5 * base.loss
    assert q4.weights < 0.35 * base.weights
    assert full.optimizer == 2 * sum(ModelShape.from_config(QWEN05).n_params()) * 2
    assert half.activations < 0.55 * base.activations and half.gradients == 2 * base.gradients


def test_parse_size():
    assert parse_size("16GB") == 16 * GB
    assert parse_size("1.5 GiB") == int(1.5 * GB)
    assert parse_size("800mb") == 800 * 1024**2
    with pytest.raises(UserError, match="cannot read memory size"):
        parse_size("lots")


def test_recommendation_order_and_impossible():
    run = RunShape(batch_size=8, max_seq_len=2048)
    need = estimate_peak_memory(QWEN05, run).total
    ckpt = estimate_peak_memory(QWEN05, run, grad_checkpoint=True).total
    assert plan.recommend(QWEN05, run, int(need / plan.HEADROOM) + 1).changes == ()
    rec = plan.recommend(QWEN05, run, int(ckpt / plan.HEADROOM) + 1)
    assert rec.changes == ("--grad-checkpoint",) and rec.run.grad_checkpoint
    rec = plan.recommend(QWEN05, run, int(ckpt / plan.HEADROOM) - 1)
    assert rec.changes[:2] == ("--grad-checkpoint", "--grad-accum 2")
    assert plan.recommend(QWEN05, run, 100 * 1024**2) is None  # 100 MB: nothing fits


def test_memory_warning_for_train():
    run = RunShape(batch_size=4, max_seq_len=2048)
    assert plan.memory_warning(QWEN05, run, budget=64 * GB) is None
    msg = plan.memory_warning(QWEN05, run, budget=2 * GB)
    assert msg.startswith("warning: this run needs ~") and "try --grad-checkpoint" in msg


def test_default_budget_is_physical_memory_on_linux():
    if sys.platform != "linux":
        pytest.skip("Linux only")
    size, source = plan.default_budget()
    assert source == "physical memory"
    assert size == pytest.approx(int(Path("/proc/meminfo").read_text().split()[1]) * 1024, rel=0.01)


def test_cli_plan(tiny_llama):
    runner = CliRunner()
    ok = runner.invoke(main, ["plan", "-m", str(tiny_llama), "--memory-budget", "8GB"])
    assert ok.exit_code == 0, ok.output
    assert "fits as configured" in ok.output and "total" in ok.output
    tight = runner.invoke(
        main, ["plan", "-m", str(tiny_llama), "--max-seq-len", "1024", "--memory-budget", "60MB"]
    )
    assert tight.exit_code == 0, tight.output
    assert "does not fit; recommended: --grad-checkpoint" in tight.output
    bad = runner.invoke(main, ["plan", "-m", str(tiny_llama), "--memory-budget", "x"])
    assert bad.exit_code == 2 and "cannot read memory size" in bad.output


def test_cli_plan_with_data(tiny_llama, tmp_path):
    rows = [
        {
            "messages": [
                {"role": "user", "content": "hi " * n},
                {"role": "assistant", "content": "ok"},
            ]
        }
        for n in (3, 10, 40)
    ]
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = CliRunner().invoke(
        main, ["plan", "-m", str(tiny_llama), "-d", str(data), "--max-seq-len", "256"]
    )
    assert out.exit_code == 0, out.output
    assert out.output.startswith("data: 3 examples,") and "0 truncated" in out.output


_MEASURE = """
import json, sys
sys.path.insert(0, {bench!r})
import bench_plan
print(json.dumps(bench_plan.measure(json.loads(sys.argv[1]), steps=2)))
"""


def test_estimate_within_25_percent_of_measured_peak():
    """One small configuration of benchmarks/bench_plan.py, measured in a fresh process."""
    from mlxsft.blas import preload_env

    bench = Path(__file__).resolve().parents[2] / "benchmarks"
    sys.path.insert(0, str(bench))
    from bench_plan import llama_config

    sys.path.remove(str(bench))
    model = llama_config(vocab=16384, hidden=128, inter=344, layers=2)
    spec = {"model": model, "run": {"batch_size": 2, "max_seq_len": 512}}
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE.format(bench=str(bench)), json.dumps(spec)],
        capture_output=True,
        text=True,
        env=preload_env(),
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    est = estimate_peak_memory(model, **spec["run"], trained_fraction=got["trained_fraction"])
    assert 0.75 < est.total / got["peak"] < 1.25, (est.total, got["peak"])


def test_already_quantized_checkpoint_counts_as_quantized():
    q4 = dict(QWEN05, quantization={"bits": 4, "group_size": 64})
    assert estimate_peak_memory(q4).weights == estimate_peak_memory(QWEN05, quantize=4).weights
    assert estimate_peak_memory(q4).weights < 0.35 * estimate_peak_memory(QWEN05).weights


def test_run_shape_follows_the_loss_flag():
    from mlxsft.config import TrainConfig

    assert plan.run_shape(TrainConfig(model="m", data="d")).selective_loss is True
    assert plan.run_shape(TrainConfig(model="m", data="d", loss="full")).selective_loss is False


def test_block_attention_keeps_only_the_causal_blocks():
    """On the CPU, llama-family attention (mlxsft/model/attention.py) keeps the probabilities of
    its causal blocks (sum over blocks of rows x visible keys, not L x L) per layer; with
    --grad-checkpoint and rows of 1024+ tokens it keeps none and C_BLOCK arrays of its largest
    block (128 x L) are alive.
    Other architectures keep one (B, H, L, L) array per layer."""
    from mlxsft.model.attention import applies_to, kept_fraction, largest_block

    assert kept_fraction(256, block=128) == (128 * 128 + 128 * 256) / 256**2 == 0.75
    assert kept_fraction(100, block=128) == 1.0
    assert largest_block(512) == 128 * 512 and largest_block(100) == 100 * 100
    run = RunShape(batch_size=2, max_seq_len=512)
    on = estimate_peak_memory(SMALL, run, block_attention=True)
    off = estimate_peak_memory(SMALL, run, block_attention=False)
    scores = 2 * 4 * 512 * 512 * 4  # (B, H, L, L) float32
    kept = (128 * 128 + 128 * 256 + 128 * 384 + 128 * 512) * 2 * 4 * 4  # 4 blocks of 128 rows
    assert off.activations - on.activations == 2 * plan.C_ATTN * (scores - kept)  # 2 layers
    ck_on = estimate_peak_memory(SMALL, run, block_attention=True, grad_checkpoint=True)
    ck_off = estimate_peak_memory(SMALL, run, block_attention=False, grad_checkpoint=True)
    assert ck_off.activations - ck_on.activations == plan.C_CK_ATTN * (scores - kept)
    long = RunShape(batch_size=2, max_seq_len=1024, grad_checkpoint=True)  # recomputed
    ck_on = estimate_peak_memory(SMALL, long, block_attention=True)
    ck_off = estimate_peak_memory(SMALL, long, block_attention=False)
    scores, block = 2 * 4 * 1024 * 1024 * 4, 2 * 4 * 128 * 1024 * 4
    assert ck_off.activations - ck_on.activations == plan.C_CK_ATTN * scores - plan.C_BLOCK * block
    assert applies_to("llama") and applies_to("mistral") and applies_to("qwen3")
    assert not applies_to("gemma") and not applies_to("phi3")
    assert estimate_peak_memory(SMALL, run).total == on.total  # this machine: the CPU
    gemma = dict(SMALL, model_type="gemma")
    assert (
        estimate_peak_memory(gemma, run).total
        == estimate_peak_memory(gemma, run, block_attention=False).total
    )


def test_lean_mlp_keeps_fewer_intermediate_arrays():
    """The lean SwiGLU (mlxsft/model/mlp.py) keeps C_INTER_LEAN fewer (tokens, intermediate)
    arrays per layer; with --grad-checkpoint only the recomputed block's are kept at a time."""
    from mlxsft.model.mlp import applies_to

    run = RunShape(batch_size=2, max_seq_len=512, block_attention=False)
    on = estimate_peak_memory(SMALL, run, lean_mlp=True)
    off = estimate_peak_memory(SMALL, run, lean_mlp=False)
    one = 2 * 512 * 128 * 4  # (tokens, intermediate) float32
    assert off.activations - on.activations == 2 * plan.C_INTER_LEAN * one  # 2 layers
    ck_on = estimate_peak_memory(SMALL, run, lean_mlp=True, grad_checkpoint=True)
    ck_off = estimate_peak_memory(SMALL, run, lean_mlp=False, grad_checkpoint=True)
    assert ck_off.activations - ck_on.activations == plan.C_INTER_LEAN * one
    assert applies_to("llama") and applies_to("qwen2") and not applies_to("phi3")
    assert estimate_peak_memory(SMALL, run).total == on.total
