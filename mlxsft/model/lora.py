"""LoRA / DoRA layers, applying them to a model, saving/loading them, and fusing them back.

Parameter names and the on-disk layout follow mlx-lm's tuner (`linear`, `lora_a` (in, r),
`lora_b` (r, out), DoRA `m`; `adapters.safetensors` + `adapter_config.json` with
`lora_parameters{rank, scale, dropout, keys}`), so `mlx_lm.load(base, adapter_path=OUT)` loads
what we save. scale = alpha / rank as in PEFT; `alpha` is stored too.

Default targets: "all-linear" = every Linear/QuantizedLinear inside the transformer blocks
(attention and MLP projections); the LM head and embeddings live outside the blocks and are never
adapted. A quantized base (QLoRA) stays frozen and quantized.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from mlxsft import _mlxlm
from mlxsft.errors import ModelError, UserError
from mlxsft.model.files import check_safetensors
from mlxsft.rundir import ADAPTER_CONFIG, TOKEN_ROWS

FINE_TUNE_TYPES = ("lora", "dora", "full")
DEFAULT_TARGETS = "all-linear"
ADAPTER_LEAVES = ("lora_a", "lora_b", "m")
TOKEN_ROWS_FILE = TOKEN_ROWS  # named by rundir, which moves adapter files


def _dims(linear: nn.Module) -> tuple[int, int]:
    """(input_dims, output_dims) of a Linear or QuantizedLinear."""
    out_dims, in_dims = linear.weight.shape
    if isinstance(linear, nn.QuantizedLinear):
        in_dims = in_dims * 32 // linear.bits
    return in_dims, out_dims


class LoRALinear(nn.Module):
    """y = linear(x) + scale * (dropout(x) @ lora_a) @ lora_b."""

    def __init__(self, linear: nn.Module, rank: int, scale: float, dropout: float = 0.0):
        super().__init__()
        in_dims, out_dims = _dims(linear)
        self.linear = linear
        self.dropout = nn.Dropout(p=dropout)
        self.scale = scale
        bound = 1 / math.sqrt(in_dims)
        self.lora_a = mx.random.uniform(-bound, bound, (in_dims, rank))  # (in, r)
        self.lora_b = mx.zeros((rank, out_dims))  # (r, out): zero, so at init == base

    def __call__(self, x: mx.array) -> mx.array:
        y = self.linear(x)
        xa = self.dropout(x) @ self.lora_a
        if y.dtype == xa.dtype == self.lora_b.dtype:  # one fused matmul-add, no extra passes
            return mx.addmm(y, xa, self.lora_b, alpha=self.scale)
        return y + (self.scale * (xa @ self.lora_b)).astype(x.dtype)

    def delta(self) -> mx.array:
        """scale * (A @ B)^T, shaped like the base weight (out, in)."""
        return self.scale * (self.lora_a @ self.lora_b).T

    def fuse(self, dequantize: bool = False) -> nn.Module:
        weight = _mlxlm.dense_weight(self.linear)
        return _new_linear(self.linear, weight + self.delta().astype(weight.dtype), dequantize)


class DoRALinear(LoRALinear):
    """LoRA direction with a learned per-output magnitude `m` (DoRA, as in mlx-lm)."""

    def __init__(self, linear: nn.Module, rank: int, scale: float, dropout: float = 0.0):
        super().__init__(linear, rank, scale, dropout)
        self.m = mx.linalg.norm(_mlxlm.dense_weight(linear).astype(mx.float32), axis=1)  # (out,)

    def __call__(self, x: mx.array) -> mx.array:
        w = _mlxlm.dense_weight(self.linear)  # (out, in)
        y = x @ w.T
        z = (self.dropout(x) @ self.lora_a) @ self.lora_b
        out = y + (self.scale * z).astype(x.dtype)
        denom = mx.stop_gradient(mx.linalg.norm(w + self.delta().astype(w.dtype), axis=1))
        out = (self.m / denom).astype(x.dtype) * out
        if "bias" in self.linear:
            out = out + self.linear.bias
        return out

    def fuse(self, dequantize: bool = False) -> nn.Module:
        weight = _mlxlm.dense_weight(self.linear)
        weight = weight + self.delta().astype(weight.dtype)
        weight = (self.m / mx.linalg.norm(weight, axis=1))[:, None].astype(weight.dtype) * weight
        return _new_linear(self.linear, weight, dequantize)


def _is_adapter(module: nn.Module) -> bool:
    """Ours or mlx-lm's LoRA/DoRA layers (same names, same `fuse(dequantize)`), or trainable
    token rows (model/token_rows.py)."""
    return ("lora_a" in module or "delta" in module) and callable(getattr(module, "fuse", None))


def _new_linear(base: nn.Module, weight: mx.array, dequantize: bool) -> nn.Module:
    """A Linear with `weight` and base's bias, re-quantized like `base` unless `dequantize`."""
    out_dims, in_dims = weight.shape
    has_bias = "bias" in base
    fused = nn.Linear(in_dims, out_dims, bias=has_bias)
    fused.weight = weight
    if has_bias:
        fused.bias = base.bias
    if isinstance(base, nn.QuantizedLinear) and not dequantize:
        fused = nn.QuantizedLinear.from_linear(
            fused, group_size=base.group_size, bits=base.bits, mode=base.mode
        )
    return fused


def _blocks(model: nn.Module) -> list[nn.Module]:
    blocks = _mlxlm.transformer_blocks(model)
    if not blocks:
        raise ModelError(f"{type(model).__name__} has no transformer `layers` to adapt")
    return blocks


def _linear_keys(block: nn.Module) -> list[str]:
    """Names (relative to a block) of its Linear / QuantizedLinear modules."""
    return [
        k for k, m in block.named_modules() if isinstance(m, (nn.Linear, nn.QuantizedLinear)) and k
    ]


def resolve_keys(model: nn.Module, target_modules: list[str] | str) -> list[str]:
    """Block-relative keys (e.g. `self_attn.q_proj`) for names like `q_proj` or `all-linear`."""
    available = _linear_keys(_blocks(model)[-1])
    if target_modules == "all-linear":
        return available
    names = target_modules.split(",") if isinstance(target_modules, str) else target_modules
    names = [n.strip() for n in names if n.strip()]
    keys = [k for k in available if any(k == n or k.endswith("." + n) for n in names)]
    missing = [n for n in names if not any(k == n or k.endswith("." + n) for k in available)]
    if missing or not keys:
        short = sorted({k.rsplit(".", 1)[-1] for k in available})
        raise UserError(
            f"target modules {missing or names} not found in {type(model).__name__}",
            hint=f"choose from {', '.join(short)} or all-linear",
        )
    return keys


def apply_adapters(
    model: nn.Module,
    *,
    fine_tune_type: str = "lora",
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    target_modules: list[str] | str = DEFAULT_TARGETS,
    num_layers: int = -1,
) -> dict[str, Any]:
    """Wrap target linears of the last `num_layers` blocks (-1: all) in LoRA/DoRA layers, freeze
    the base and unfreeze the adapters. `full` unfreezes everything (num_layers -1) or the last
    `num_layers` blocks. Returns the adapter_config saved next to the adapters."""
    if fine_tune_type not in FINE_TUNE_TYPES:
        raise UserError(
            f"unknown fine_tune_type {fine_tune_type!r}", hint=f"one of {FINE_TUNE_TYPES}"
        )
    if any(_is_adapter(m) for _, m in model.named_modules()):
        raise UserError(
            "the model already has adapters", hint="fuse them first (mlxsft fuse) or load the base"
        )
    if num_layers == 0 or num_layers < -1:
        raise UserError(f"num_layers must be -1 (all) or >= 1, got {num_layers}")
    blocks = _blocks(model)
    n = len(blocks) if num_layers < 0 else min(num_layers, len(blocks))
    config: dict[str, Any] = {"fine_tune_type": fine_tune_type, "num_layers": n}
    if fine_tune_type == "full":
        if any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules()):
            raise UserError(
                "full fine-tuning needs a float model, this one is quantized",
                hint="use --fine-tune-type lora (QLoRA) or an unquantized checkpoint",
            )
        if num_layers < 0:  # everything, embeddings and LM head included
            config["num_layers"] = -1
            model.unfreeze()
        else:  # the last n blocks only, as mlx_lm.lora does
            model.freeze()
            for block in blocks[len(blocks) - n :]:
                block.unfreeze()
        return config
    if rank < 1:
        raise UserError(f"LoRA rank must be >= 1, got {rank}")
    if not 0.0 <= dropout < 1.0:
        raise UserError(f"LoRA dropout must be in [0, 1), got {dropout}")
    keys = resolve_keys(model, target_modules)
    scale = float(alpha) / rank
    layer_cls = DoRALinear if fine_tune_type == "dora" else LoRALinear
    model.freeze()
    for block in blocks[len(blocks) - n :]:
        mods = dict(block.named_modules())
        wrapped = [(k, layer_cls(mods[k], rank, scale, dropout)) for k in keys if k in mods]
        block.update_modules(tree_unflatten(wrapped))
        for _, layer in wrapped:
            layer.unfreeze(keys=list(ADAPTER_LEAVES), recurse=False, strict=False)
    config["lora_parameters"] = {
        "rank": rank,
        "scale": scale,
        "dropout": dropout,
        "keys": keys,
        "alpha": float(alpha),
    }
    return config


def is_token_row_key(name: str) -> bool:
    """Trainable token-row deltas (model/token_rows.py), kept out of adapters.safetensors."""
    return name.rsplit(".", 1)[-1] == "delta"


def save_adapters(model: nn.Module, out_dir: str | Path, adapter_config: dict[str, Any]) -> Path:
    """Write adapters.safetensors (trainable parameters) + adapter_config.json, atomically.

    Token-row deltas go to TOKEN_ROWS_FILE beside it: mlx-lm's loader rejects unknown tensors
    in adapters.safetensors, and this way it still loads the LoRA part.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.trainable_parameters()))
    rows = {k: weights.pop(k) for k in list(weights) if is_token_row_key(k)}
    for name, part in (("adapters.safetensors", weights), (TOKEN_ROWS_FILE, rows)):
        if not part and name == TOKEN_ROWS_FILE:
            (out / name).unlink(missing_ok=True)  # a stale file of an earlier run
            continue
        tmp = out / f".{name}.tmp.safetensors"
        with open(tmp, "wb") as f:  # a Python file: a full disk raises OSError (mlx's own
            mx.save_safetensors(f, part, metadata={"format": "mlx"})  # writer does not say)
        os.replace(tmp, out / name)
    tmp_cfg = out / ".adapter_config.tmp.json"
    tmp_cfg.write_text(json.dumps(adapter_config, indent=2) + "\n")
    os.replace(tmp_cfg, out / ADAPTER_CONFIG)
    return out


def read_adapter_weights(adapter_dir: str | Path) -> dict[str, mx.array]:
    """adapters.safetensors plus the token-row deltas (TOKEN_ROWS_FILE) when there are any."""
    d = Path(adapter_dir)
    check_safetensors(d / "adapters.safetensors")
    weights = mx.load(str(d / "adapters.safetensors"))
    if (d / TOKEN_ROWS_FILE).is_file():
        check_safetensors(d / TOKEN_ROWS_FILE)
        weights.update(mx.load(str(d / TOKEN_ROWS_FILE)))
    return weights


def read_adapter_config(adapter_dir: str | Path) -> dict[str, Any]:
    path = Path(adapter_dir) / ADAPTER_CONFIG
    if not path.is_file():
        raise ModelError(f"no adapter_config.json in {adapter_dir}", hint="pass an adapter dir")
    return json.loads(path.read_text())


def load_adapters(model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """Apply a saved adapter dir (ours or mlx_lm.lora's) to `model` and load its weights."""
    config = read_adapter_config(adapter_dir)
    kind = config.get("fine_tune_type", "lora")
    params = config.get("lora_parameters", {})
    rank = int(params.get("rank", 8))
    apply_adapters(
        model,
        fine_tune_type=kind,
        rank=rank,
        alpha=float(params.get("alpha", params.get("scale", 20.0) * rank)),
        dropout=float(params.get("dropout", 0.0)),
        target_modules=params.get("keys") or DEFAULT_TARGETS,
        num_layers=int(config.get("num_layers", -1)),
    )
    tokens = config.get("trainable_tokens")
    if tokens:
        from mlxsft.model import token_rows

        token_rows.resize_vocab(model, int(tokens.get("vocab_size", 0)))  # --add-chat-tokens
        token_rows.apply_token_rows(model, tokens["indices"], tokens.get("modules"))
    weights_path = Path(adapter_dir) / "adapters.safetensors"
    if not weights_path.is_file():
        raise ModelError(f"no adapters.safetensors in {adapter_dir}")
    weights = read_adapter_weights(adapter_dir)
    if tokens:
        weights = token_rows.values_to_deltas(model, weights, tokens)
    expected = dict(tree_flatten(model.trainable_parameters()))
    bad = [k for k, v in weights.items() if k not in expected or v.shape != expected[k].shape]
    if bad:
        raise ModelError(
            f"adapter {adapter_dir} does not fit this model: {bad[:3]}",
            hint="load the base model the adapter was trained on",
        )
    model.load_weights(list(weights.items()), strict=False)
    mx.eval(model.parameters())
    return model


def fuse_adapters(model: nn.Module, *, dequantize: bool = False) -> nn.Module:
    """Replace every LoRA/DoRA layer by a plain (or re-quantized) linear with the adapter folded in
    (W + scale * (A @ B)^T, DoRA rescaled by m). `dequantize` also dequantizes the whole model."""
    fused = [(k, m.fuse(dequantize)) for k, m in model.named_modules() if _is_adapter(m)]
    if fused:
        model.update_modules(tree_unflatten(fused))
    if dequantize:
        _mlxlm.dequantize(model)
    return model


def n_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a quantized weight counts its unpacked size."""
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    total = 0
    for _, module in model.named_modules():
        own = {k: v for k, v in module.items() if isinstance(v, mx.array)}
        if hasattr(module, "bits") and "weight" in own:  # packed weight; scales/biases are overhead
            total += own["weight"].size * 32 // module.bits + (
                own["bias"].size if "bias" in own else 0
            )
        else:
            total += sum(v.size for v in own.values())
    return trainable, total
