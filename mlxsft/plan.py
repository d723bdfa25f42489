"""Memory planning: estimate a training run's peak memory from the model config and the run
settings, and recommend settings that fit a budget (`mlxsft plan`, and `train`'s warning).

The estimate adds up what is alive at the peak (the end of the forward pass / start of backward):
weights, adapters, gradients and optimizer state, activations saved for the backward pass
(per layer x tokens, plus the (B, H, L, L) attention probabilities that MLX's attention keeps
for its VJP; on the CPU, `model.attention` keeps only the causal blocks, and none for long rows
with --grad-checkpoint; `model.mlp` keeps one fewer intermediate-width array), the LM-head/loss
working set (full logits, or one chunk with the selective loss) and a compile/allocator overhead.
Coefficients were measured with mlxsft's compiled step
(benchmarks/bench_plan.py checks them: within +-25% of `mx.get_peak_memory`).
No mlx import at module level: the CLI and `plan` tests stay light.
"""

from __future__ import annotations

import os
import platform
import re
from dataclasses import dataclass, field, fields, replace

from mlxsft.config import TrainConfig
from mlxsft.errors import UserError

GB = 1024**3
# Saved activations per token per layer, in units of the activation dtype (measured, see above):
# ~C_HIDDEN x hidden + C_INTER x intermediate + C_QKV x (q + k + v widths).
C_HIDDEN = 8.0
C_INTER = 4.0
C_INTER_LEAN = 1.0  # `model.mlp` does not keep silu(gate) (measured: 0.97 on SmolLM2-135M)
C_QKV = 2.0
C_ATTN = 1.0  # (B, H, L, L) arrays kept per layer: the probabilities (the scores are freed)
# With --grad-checkpoint, measured on SmolLM2-135M (30 layers, L = 512-2048) and a 4-layer model:
# ~C_CK_KEEP x hidden per token per layer stays alive (the block input and what the backward
# pass keeps between blocks), plus one block's activations and C_CK_ATTN (B, H, L, L) arrays
# (probabilities, their gradient and the scores' gradient) while that block is recomputed.
C_CK_KEEP = 6.0
C_CK_ATTN = 3.0
# CPU block attention (mlxsft/model/attention.py) keeps the causal blocks' probabilities; with
# --grad-checkpoint and rows of RECOMPUTE_FROM tokens or more it recomputes them: then at most
# C_BLOCK arrays of its largest block (scores, probabilities and their gradients) are alive.
C_BLOCK = 4.0
C_LOGITS = 3.0  # full-logits loss: float32 (N, V) arrays alive at once (logits, lse, gradient)
C_CHUNK = 5.0  # selective loss: (C, V) float32 arrays alive at once in one chunk's backward
OVERHEAD = 0.10  # compile + allocator slack on top of the transient part
ADAPTER_WIDTHS = {  # LoRA target -> (in, out) in units of (hidden, intermediate, q, kv)
    "q_proj": ("D", "Q"),
    "k_proj": ("D", "K"),
    "v_proj": ("D", "K"),
    "o_proj": ("Q", "D"),
    "qkv_proj": ("D", "QKK"),
    "gate_proj": ("D", "I"),
    "up_proj": ("D", "I"),
    "gate_up_proj": ("D", "II"),
    "down_proj": ("I", "D"),
}
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a decoder-only transformer, from an HF config.json dict."""

    vocab: int
    hidden: int
    intermediate: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    tied: bool
    dtype_bytes: int

    @classmethod
    def from_config(cls, config: dict) -> ModelShape:
        c = config.get("text_config", config)  # multimodal configs nest the language model
        try:
            hidden, n_heads = int(c["hidden_size"]), int(c["num_attention_heads"])
            shape = cls(
                vocab=int(c["vocab_size"]),
                hidden=hidden,
                intermediate=int(c["intermediate_size"]),
                n_layers=int(c["num_hidden_layers"]),
                n_heads=n_heads,
                n_kv_heads=int(c.get("num_key_value_heads") or n_heads),
                head_dim=int(c.get("head_dim") or hidden // n_heads),
                tied=bool(c.get("tie_word_embeddings", False)),
                dtype_bytes=_DTYPE_BYTES.get(str(c.get("torch_dtype", "float32")), 2),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(
                f"config.json lacks {exc} needed to plan memory",
                hint="plan supports decoder-only transformers (llama, qwen, gemma, phi3, ...)",
            ) from None
        return shape

    def widths(self) -> dict[str, int]:
        q, k = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        return {"D": self.hidden, "I": self.intermediate, "Q": q, "K": k}

    def n_params(self) -> tuple[int, int]:
        """(transformer-block + norm parameters, embedding + head parameters)."""
        w = self.widths()
        attn = w["D"] * (w["Q"] + 2 * w["K"]) + w["Q"] * w["D"]
        block = attn + 3 * w["D"] * w["I"] + 2 * w["D"]
        embed = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.n_layers * block + self.hidden, embed


@dataclass(frozen=True)
class RunShape:
    """The run settings that decide memory (TrainConfig's names)."""

    batch_size: int = TrainConfig.batch_size
    max_seq_len: int = TrainConfig.max_seq_len
    grad_accum: int = TrainConfig.grad_accum
    fine_tune_type: str = TrainConfig.fine_tune_type
    rank: int = TrainConfig.rank
    target_modules: str = TrainConfig.target_modules
    num_layers: int = TrainConfig.num_layers
    quantize: int | None = TrainConfig.quantize
    grad_checkpoint: bool = TrainConfig.grad_checkpoint
    selective_loss: bool = True
    trained_fraction: float = 1.0  # trained targets / positions (from the data; 1 = worst case)
    row_len: int | None = None  # padded row length when it is shorter than max_seq_len
    block_attention: bool | None = None  # None: as `model.attention.applies_to` decides here
    lean_mlp: bool | None = None  # None: as `model.mlp.applies_to` decides here


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated peak memory of one training run, in bytes, by part."""

    weights: int
    adapters: int
    gradients: int
    optimizer: int
    activations: int
    loss: int
    overhead: int
    notes: tuple[str, ...] = field(default=())

    @property
    def total(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self) if f.name != "notes")

    def rows(self) -> list[tuple[str, int]]:
        """(part, bytes) for printing, ending with the total."""
        parts = [(f.name, getattr(self, f.name)) for f in fields(self) if f.name != "notes"]
        return [*parts, ("total", self.total)]


def _adapter_params(shape: ModelShape, run: RunShape) -> int:
    w = shape.widths()
    if run.target_modules == "all-linear":
        names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    else:
        names = [n.strip().rsplit(".", 1)[-1] for n in run.target_modules.split(",") if n.strip()]
    per_block = 0
    for name in names:
        if name in ADAPTER_WIDTHS:
            a, b = ADAPTER_WIDTHS[name]
            per_block += run.rank * (sum(w[c] for c in a) + sum(w[c] for c in b))
    n = shape.n_layers if run.num_layers < 0 else min(run.num_layers, shape.n_layers)
    return n * per_block


def estimate_peak_memory(config: dict, run: RunShape | None = None, **kw) -> MemoryEstimate:
    """Peak memory of training `config` (an HF config.json dict) with `run` (or keywords of
    RunShape): weights + adapters + gradients + optimizer + activations + loss + overhead."""
    run = replace(run or RunShape(), **kw)
    shape = ModelShape.from_config(config)
    a = shape.dtype_bytes
    block_params, embed_params = shape.n_params()
    quant = config.get("quantization") or config.get("quantization_config") or {}
    bits = run.quantize or quant.get("bits")  # --quantize, or an already quantized checkpoint
    if bits:  # affine groups: bits/8 bytes + a scale and a bias (dtype) per group
        group = int(quant.get("group_size", 64))
        weights = int((block_params + embed_params) * (bits / 8 + 2 * a / group))
    else:
        weights = (block_params + embed_params) * a
    full = run.fine_tune_type == "full"
    trainable = block_params + embed_params if full else _adapter_params(shape, run)
    t_bytes = a if full else 4  # LoRA/DoRA matrices are float32
    adapters = 0 if full else trainable * 4
    accum = 2 if run.grad_accum > 1 else 1  # an accumulator next to the micro-batch's gradient
    gradients = trainable * t_bytes * accum
    optimizer = 2 * trainable * t_bytes  # Adam(W): first and second moments

    rows = max(1, run.batch_size // max(1, run.grad_accum))
    L = min(run.row_len or run.max_seq_len, run.max_seq_len)
    n_tok = rows * L
    w = shape.widths()
    c_inter = C_INTER - (C_INTER_LEAN if _switched(config, run.lean_mlp, "mlp") else 0.0)
    per_token = C_HIDDEN * w["D"] + c_inter * w["I"] + C_QKV * (w["Q"] + 2 * w["K"])
    scores = rows * shape.n_heads * L * L * a  # one (B, H, L, L) array
    fraction, working = 1.0, 0
    # the CPU: attention keeps the causal blocks; long rows recompute them (with ckpt)
    if _switched(config, run.block_attention, "attention"):
        from mlxsft.model.attention import RECOMPUTE_FROM, kept_fraction, largest_block

        fraction = kept_fraction(L)
        if run.grad_checkpoint and L >= RECOMPUTE_FROM:
            working = int(C_BLOCK * rows * shape.n_heads * largest_block(L) * a)
    kept = C_ATTN * scores * fraction
    if run.grad_checkpoint:  # kept between blocks + one block's recompute and backward
        block = n_tok * per_token * a + (working or C_CK_ATTN * scores * fraction)
        activations = int(shape.n_layers * C_CK_KEEP * n_tok * w["D"] * a + block)
    else:
        activations = int(shape.n_layers * (n_tok * per_token * a + kept))
    from mlxsft.train.loss import SELECTIVE_MIN_VOCAB, default_chunk_size  # mlx already needed

    if run.selective_loss and shape.vocab >= SELECTIVE_MIN_VOCAB:  # as `loss.choose_loss`
        k = min(n_tok, int(n_tok * min(1.0, run.trained_fraction + 1 / 8)))
        loss = int(min(k, default_chunk_size(shape.vocab)) * shape.vocab * 4 * C_CHUNK)
        loss += k * w["D"] * 4
    else:
        loss = int(n_tok * shape.vocab * 4 * C_LOGITS)
    overhead = int(OVERHEAD * (activations + loss))
    notes = []
    if run.grad_checkpoint:
        notes.append("gradient checkpointing: blocks are recomputed in the backward pass")
    return MemoryEstimate(
        weights, adapters, gradients, optimizer, activations, loss, overhead, tuple(notes)
    )


def _switched(config: dict, setting: bool | None, module: str) -> bool:
    """`setting`, or (None) whether `mlxsft.model.<module>.applies_to` this model here."""
    if setting is not None:
        return setting
    import importlib  # imports mlx: only when estimating

    return importlib.import_module(f"mlxsft.model.{module}").applies_to(config.get("model_type"))


# --------------------------------------------------------------------------------- budget


def parse_size(text: str) -> int:
    """'16GB', '16G', '1.5 GiB', '800MB' -> bytes (powers of 1024, as memory is sold)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)i?b?\s*", text.lower())
    if not m:
        raise UserError(f"cannot read memory size {text!r}", hint="write it like 16GB or 800MB")
    unit = {"": 1, "k": 1024, "m": 1024**2, "g": GB, "t": 1024**4}[m.group(2)]
    return int(float(m.group(1)) * unit)


def default_budget() -> tuple[int, str]:
    """(bytes, where from): Metal's recommended working set on Apple silicon, else physical RAM."""
    if platform.system() == "Darwin":
        try:
            import mlx.core as mx

            info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
            size = int(info.get("max_recommended_working_set_size", 0))
            if size:
                return size, "Metal recommended working set"
        except Exception:  # no Metal device (e.g. CPU-only build): fall back to RAM
            pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "physical memory"
    except (ValueError, OSError, AttributeError):
        return 16 * GB, "assumed 16 GB"


def fmt_bytes(n: float) -> str:
    return f"{n / GB:.2f} GB" if n >= 0.1 * GB else f"{n / 1024**2:.0f} MB"


# --------------------------------------------------------------------------------- advice

HEADROOM = 0.85  # leave room for the OS, the eval step and allocator fragmentation


@dataclass(frozen=True)
class Recommendation:
    """A run shape that fits, what changed from the requested one, and its estimate."""

    run: RunShape
    estimate: MemoryEstimate
    changes: tuple[str, ...]


def _candidates(run: RunShape, n_layers: int):
    """Run shapes in order of preference: the least invasive changes first."""
    yield run, ()
    ck = replace(run, grad_checkpoint=True)
    if not run.grad_checkpoint:
        yield ck, ("--grad-checkpoint",)
    accum = run.grad_accum
    while run.batch_size // (accum * 2) >= 1 and run.batch_size % (accum * 2) == 0:
        accum *= 2
        yield replace(ck, grad_accum=accum), ("--grad-checkpoint", f"--grad-accum {accum}")
    micro = replace(ck, grad_accum=accum)
    base = ["--grad-checkpoint"] + ([f"--grad-accum {accum}"] if accum != run.grad_accum else [])
    current = n_layers if run.num_layers < 0 else min(run.num_layers, n_layers)
    if run.fine_tune_type != "full":
        for n in (16, 8, 4, 2):
            if n < current:
                yield replace(micro, num_layers=n), (*base, f"--num-layers {n}")
    length = run.max_seq_len
    while length > 256:
        length //= 2
        yield replace(micro, max_seq_len=length), (*base, f"--max-seq-len {length}")
    if run.fine_tune_type != "full" and not run.quantize:
        q = replace(micro, max_seq_len=length, quantize=4)
        yield q, (*base, f"--max-seq-len {length}", "--quantize 4")


def recommend(config: dict, run: RunShape, budget: int) -> Recommendation | None:
    """The first candidate (see `_candidates`) whose estimate fits HEADROOM x budget, or None."""
    n_layers = ModelShape.from_config(config).n_layers
    for cand, changes in _candidates(run, n_layers):
        est = estimate_peak_memory(config, cand)
        if est.total <= HEADROOM * budget:
            return Recommendation(cand, est, changes)
    return None


def largest_batch(config: dict, run: RunShape, budget: int, limit: int = 64) -> int | None:
    """The largest power-of-two multiple of batch_size (same grad_accum) that still fits."""
    best = None
    b = run.batch_size
    while b <= limit and estimate_peak_memory(config, run, batch_size=b).total <= HEADROOM * budget:
        best, b = b, b * 2
    return best


def memory_warning(config: dict, run: RunShape, budget: int | None = None) -> str | None:
    """One line for `train` to print before a run whose estimate exceeds the budget, else None."""
    budget, source = (budget, "--memory-budget") if budget else default_budget()
    est = estimate_peak_memory(config, run)
    if est.total <= budget:
        return None
    rec = recommend(config, run, budget)
    fix = f"try {' '.join(rec.changes)}" if rec and rec.changes else "use a smaller model"
    return (
        f"warning: this run needs ~{fmt_bytes(est.total)}, more than {fmt_bytes(budget)} "
        f"({source}); it may swap or be killed ({fix}; details: mlxsft plan)"
    )


# --------------------------------------------------------------------------------- report


@dataclass(frozen=True)
class DataProfile:
    """What the data says about memory: the worst batch's trained fraction and row length."""

    n_examples: int
    n_truncated: int
    p50: int
    p95: int
    longest: int
    trained_fraction: float  # max over batches of trained targets / (rows x row length)
    row_len: int  # longest padded row (= max_seq_len when packing)


def profile_data(encoded: list, run: RunShape, pack: bool) -> DataProfile:
    """Batch the encoded examples as `train` would and find the worst batch for memory."""
    import numpy as np

    from mlxsft.data.batching import plan_epoch

    lengths = np.array([len(e.input_ids) for e in encoded])
    trained = np.array([int(e.loss_mask[1:].sum()) for e in encoded])
    plans = plan_epoch(
        encoded, batch_size=run.batch_size, max_seq_len=run.max_seq_len, pack=pack, seed=0, epoch=0
    )
    frac = max(sum(int(trained[i]) for i in p.examples) / (len(p.rows) * p.seq_len) for p in plans)
    return DataProfile(
        n_examples=len(encoded),
        n_truncated=sum(e.truncated for e in encoded),
        p50=int(np.percentile(lengths, 50)),
        p95=int(np.percentile(lengths, 95)),
        longest=int(lengths.max()),
        trained_fraction=float(frac),
        row_len=max(p.seq_len for p in plans),
    )


def run_shape(cfg, profile: DataProfile | None = None) -> RunShape:
    """A RunShape from a TrainConfig (and the data's profile, if known)."""
    return RunShape(
        batch_size=cfg.batch_size,
        max_seq_len=cfg.max_seq_len,
        grad_accum=cfg.grad_accum,
        fine_tune_type=cfg.fine_tune_type,
        rank=cfg.rank,
        target_modules=cfg.target_modules,
        num_layers=cfg.num_layers,
        quantize=cfg.quantize,
        grad_checkpoint=cfg.grad_checkpoint,
        selective_loss=cfg.loss == "selective",
        trained_fraction=profile.trained_fraction if profile else 1.0,
        row_len=profile.row_len if profile else None,
    )


def report(
    config: dict, run: RunShape, budget: int, source: str, profile: DataProfile | None = None
) -> tuple[str, bool]:
    """(printable plan, fits as requested)."""
    est = estimate_peak_memory(config, run)
    lines = []
    if profile is not None:
        lines.append(
            f"data: {profile.n_examples} examples, tokens p50 {profile.p50} / p95 {profile.p95} / "
            f"max {profile.longest}, {profile.n_truncated} truncated; worst batch trains "
            f"{profile.trained_fraction:.0%} of {profile.row_len}-token rows"
        )
    lines.append(f"estimated peak memory (batch {run.batch_size}, max length {run.max_seq_len}):")
    lines += [f"  {name:12s} {fmt_bytes(n):>10s}" for name, n in est.rows()]
    fits = est.total <= HEADROOM * budget
    lines.append(f"budget: {fmt_bytes(budget)} ({source}); usable {HEADROOM:.0%}")
    if fits:
        lines.append("fits as configured")
        big = largest_batch(config, run, budget)
        if big and big > run.batch_size:
            lines.append(f"  room for up to --batch-size {big} (same settings otherwise)")
    else:
        rec = recommend(config, run, budget)
        if rec is None:
            lines.append("does not fit, even with checkpointing, 1-row micro-batches, 2 layers, ")
            lines[-1] += "256 tokens and 4-bit weights: use a smaller model or more memory"
        else:
            lines.append(
                f"does not fit; recommended: {' '.join(rec.changes)} "
                f"(~{fmt_bytes(rec.estimate.total)})"
            )
    notes = list(est.notes)
    if profile is None:
        notes.append("no --data: assumed full rows, every position trained (an upper bound)")
    return "\n".join(lines + [f"note: {n}" for n in notes]), fits
