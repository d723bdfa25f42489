"""Fuse a LoRA/DoRA adapter into its base model, check the result, write it in HF format.

The fidelity report compares three models on a few prompts: the base, base + adapter (what was
trained) and the fused model (what is shipped). `max_abs_diff` and `kl_adapter_fused` should be ~0
for a float fuse; re-quantising can erase a small adapter, which `retained` measures:
`1 - KL(adapter || fused) / KL(adapter || base)` is 1 when the fused model behaves like base +
adapter and 0 when it behaves like the base model again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mlxsft.errors import UserError

FIDELITY_PROMPTS = (
    "Below is an instruction that describes a task. Write a response.",
    "The quick brown fox jumps over the lazy dog. Then it",
    "Question: what is 12 + 30? Answer:",
)
RETAINED_WARN = 0.5  # warn when less than half of the adapter's effect survives


@dataclass
class Fidelity:
    """Logit agreement between base + adapter and the fused model (float32 log-softmax)."""

    max_abs_diff: float
    kl_adapter_fused: float
    kl_adapter_base: float | None  # None for a full fine-tune (no base inside the model)
    n_tokens: int

    @property
    def retained(self) -> float:
        if self.kl_adapter_base is None or self.kl_adapter_base <= 1e-9:
            return 1.0
        return 1.0 - self.kl_adapter_fused / self.kl_adapter_base

    @property
    def warning(self) -> str | None:
        base = self.kl_adapter_base
        if base is not None and base > 1e-6 and self.retained < RETAINED_WARN:
            return (
                f"quantisation erased most of the adapter's effect: only {self.retained:.0%} "
                "retained (KL(adapter||fused) vs KL(adapter||base)); fuse with --dequantize, "
                "or use --quantize 8"
            )
        return None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "max_abs_logit_diff": float(f"{self.max_abs_diff:.3g}"),
            "mean_kl_adapter_fused": float(f"{self.kl_adapter_fused:.3g}"),
            "tokens": self.n_tokens,
        }
        if self.kl_adapter_base is not None:
            out["mean_kl_adapter_base"] = float(f"{self.kl_adapter_base:.3g}")
            out["adapter_effect_retained"] = round(self.retained, 4)
        return out

    def lines(self) -> list[str]:
        lines = [
            f"fidelity on {self.n_tokens} tokens: max |logit diff| {self.max_abs_diff:.2e}, "
            f"mean KL(base+adapter || fused) {self.kl_adapter_fused:.2e}"
        ]
        if self.kl_adapter_base is not None:
            lines.append(
                f"adapter effect KL(base+adapter || base) {self.kl_adapter_base:.2e}, "
                f"retained after fusing {self.retained:.1%}"
            )
        return lines


def prompt_ids(tokenizer: Any, prompts: tuple[str, ...] = FIDELITY_PROMPTS) -> list[list[int]]:
    """Token ids of the fidelity prompts."""
    return [list(tokenizer(p)["input_ids"]) for p in prompts]


def logits_of(model: Any, prompts: list[list[int]]) -> list[np.ndarray]:
    """float32 logits (L, V) of each prompt."""
    import mlx.core as mx

    from mlxsft import _mlxlm

    out = []
    for ids in prompts:
        logits = _mlxlm.forward(model, mx.array([ids], dtype=mx.int32))[0]  # (L, V)
        out.append(np.array(logits.astype(mx.float32)))
    return out


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def mean_kl(p_logits: list[np.ndarray], q_logits: list[np.ndarray]) -> float:
    """Mean over tokens of KL(p || q)."""
    kls = []
    for p, q in zip(p_logits, q_logits, strict=True):
        lp, lq = _log_softmax(p), _log_softmax(q)
        kls.append((np.exp(lp) * (lp - lq)).sum(axis=-1))  # (L,)
    return float(np.concatenate(kls).mean())


def fidelity(
    adapted: list[np.ndarray], fused: list[np.ndarray], base: list[np.ndarray] | None
) -> Fidelity:
    """Compare fused with adapted logits; `base` None when the model has no adapter layers."""
    diff = max(float(np.abs(a - f).max()) for a, f in zip(adapted, fused, strict=True))
    return Fidelity(
        max_abs_diff=diff,
        kl_adapter_fused=mean_kl(adapted, fused),
        kl_adapter_base=None if base is None else mean_kl(adapted, base),
        n_tokens=sum(a.shape[0] for a in adapted),
    )


def base_logits(model: Any, prompts: list[list[int]]) -> list[np.ndarray] | None:
    """Logits with every adapter layer temporarily swapped back for the layer it wraps; None
    when there are none (a full fine-tune)."""
    from mlx.utils import tree_unflatten

    wrapped = [(k, m) for k, m in model.named_modules() if hasattr(m, "fuse")]
    if not wrapped:
        return None
    inner = [(k, getattr(m, "linear", None) or getattr(m, "embedding", None)) for k, m in wrapped]
    model.update_modules(tree_unflatten(inner))
    try:
        return logits_of(model, prompts)
    finally:
        model.update_modules(tree_unflatten(wrapped))


def load_with_adapter(model: str, adapter: str | Path | None) -> Any:
    """`Loaded` base model with mlxsft LoRA/DoRA layers applied from `adapter` (mlx-lm or PEFT)."""
    from mlxsft.model.loading import load

    return load(model, adapter=None if adapter is None else str(adapter))


def fuse_model(
    model: str,
    adapter: str | Path,
    output: str | Path,
    *,
    dequantize: bool = False,
    quantize: int | None = None,
    echo: Any = print,
) -> Fidelity:
    """`mlxsft fuse`: merge `adapter` into `model`, report fidelity, write an HF dir at `output`."""
    from mlxsft import _mlxlm
    from mlxsft.export.hf import save_hf_model
    from mlxsft.model import lora

    if quantize is not None and quantize not in (4, 8):
        raise UserError(f"--quantize must be 4 or 8, not {quantize}")
    loaded = load_with_adapter(model, adapter)
    out = Path(output).resolve()
    if out in (loaded.path.resolve(), Path(adapter).resolve()):
        raise UserError(
            "--output would overwrite the base model or the adapter",
            where=str(output),
            hint="choose a new directory",
        )
    net, config = loaded.model, dict(loaded.config)
    if _mlxlm.is_quantized(net) and quantize is not None and not dequantize:
        raise UserError(
            "the base model is already quantized",
            hint="add --dequantize to fuse in float and re-quantize with --quantize",
        )
    prompts = prompt_ids(loaded.tokenizer)
    adapted = logits_of(net, prompts)
    base = base_logits(net, prompts)
    lora.fuse_adapters(net, dequantize=dequantize)
    if dequantize:
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    report = fidelity(adapted, logits_of(net, prompts), base)
    if base is None:
        echo(f"{adapter} is a full fine-tune: nothing to merge, writing its weights")
    else:
        echo(f"merged adapter {adapter} with base {model} (the base is not changed)")
    for line in report.lines():
        echo(line)
    if quantize is not None:
        net, config = _mlxlm.quantize(net, config, quantize)
        report = fidelity(adapted, logits_of(net, prompts), base)
        echo(f"after re-quantising to {quantize} bits:")
        for line in report.lines():
            echo(line)
    if report.warning:
        echo(f"warning: {report.warning}")
    save_hf_model(
        output,
        net,
        config,
        loaded.path,
        base_model=str(model),
        adapter_dir=Path(adapter),
        fidelity=report.as_dict(),
    )
    echo(f"wrote the fused model to {output}")
    return report


def run_template(adapter: str | Path | None, tokenizer: Any, echo: Any = print) -> str | None:
    """The chat template a run trained with: its config.yaml's `template` resolved against the
    tokenizer (a built-in's source, the tokenizer's own, a .jinja file); None without a run config
    (then the model's own template is used)."""
    from mlxsft.data.templates import resolve_template
    from mlxsft.rundir import read_config

    spec = read_config(adapter).get("template") if adapter is not None else None
    if not isinstance(spec, str):
        return None
    try:
        return resolve_template(spec, tokenizer).source
    except UserError as exc:  # e.g. the run's .jinja file was moved since
        echo(f"warning: the run's template {spec!r}: {exc}; the GGUF gets the model's own")
        return None


def export_gguf(
    model: str,
    output: str | Path,
    *,
    adapter: str | Path | None = None,
    dtype: str = "f16",
    echo: Any = print,
) -> Path:
    """`mlxsft export --format gguf`: (fuse in float and) write a GGUF file plus a Modelfile, both
    with the chat template the adapter's run trained with."""
    from mlx.utils import tree_flatten

    from mlxsft import _mlxlm
    from mlxsft.export.gguf_model import write_model_gguf
    from mlxsft.export.gguf_vocab import chat_template_of
    from mlxsft.export.modelfile import write_modelfile
    from mlxsft.model import lora

    output = Path(output)
    if output.suffix != ".gguf":
        raise UserError("the GGUF output must be a file name ending in .gguf", where=str(output))
    if adapter is not None and (Path(adapter) / "tokenizer.json").is_file():
        raise UserError(
            "this adapter added tokens to the vocabulary (--add-chat-tokens); the GGUF writer "
            "reads the base model's vocabulary",
            where=str(adapter),
            hint="fuse first (mlxsft fuse --output DIR), then export --model DIR --format gguf",
        )
    loaded = load_with_adapter(model, adapter)
    net = loaded.model
    lora.fuse_adapters(net, dequantize=True)
    if _mlxlm.is_quantized(net):
        _mlxlm.dequantize(net)
    weights = dict(tree_flatten(net.parameters()))  # converted one tensor at a time
    output.parent.mkdir(parents=True, exist_ok=True)
    name = Path(str(model)).name
    template = run_template(adapter, loaded.tokenizer, echo) or chat_template_of(loaded.path)
    write_model_gguf(
        output,
        weights,
        loaded.config,
        loaded.path,
        dtype=dtype,
        name=name,
        chat_template=template,
        tokenizer=loaded.tokenizer,
        echo=echo,
    )
    eos = getattr(loaded.tokenizer, "eos_token", None)
    modelfile = write_modelfile(output, template, eos)
    echo(f"wrote {output} ({dtype}, {output.stat().st_size / 2**20:.1f} MiB) and {modelfile}")
    return output
