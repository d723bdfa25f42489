"""Trainable token rows: float deltas on chosen rows of the input embedding and the LM head.

LoRA on the linear layers cannot move the embedding / LM-head row of a token the base model never
learned (`</s>` in a base pretrained without it, chat markers new to the model), so a fine-tune
answers and never stops. Here those rows get a trainable delta (n, D) beside the LoRA weights,
as PEFT's `trainable_token_indices`:

    embedding  E'[t] = E[t] + delta[slot(t)]                 for t in indices
    LM head    logits[..., t] += h @ delta_head[slot(t)]      (untied heads)

A tied model has one delta (E' is both its embedding and its head). A quantized base stays
quantized; the deltas are float32. The wrapped modules keep HF-style parameter names:
`model.embed_tokens.delta` / `lm_head.delta` (the base module moves to `.embedding` / `.linear`),
saved in token_rows.safetensors beside adapters.safetensors (mlx-lm's loader rejects unknown
tensors there, so `mlx_lm.load(adapter_path=...)` still loads the LoRA part) and listed in
adapter_config.json under "trainable_tokens" = {indices, modules, form}. `form` is
"delta" for mlxsft adapters and "values" for rows imported from PEFT (PEFT stores the new rows,
not their difference to the base).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlxsft import _mlxlm
from mlxsft.errors import UserError

EMBEDDING, HEAD = "embedding", "head"  # adapter_config "trainable_tokens" "modules" names

# A row is "untrained" when at least MIN_TWINS other rows point the same way (cosine >= TWIN_COS)
# or its norm is below SMALL_NORM x the median row norm. Tokens a model never saw collapse onto
# one shared vector during pretraining: they only ever get the same "not this token" gradient and
# weight decay (stories260K: `</s>`, `<unk>` and ~240 byte tokens share one row; SmolLM2:
# `<file_sep>`, `<jupyter_code>`, ... share another). Rows left at a zero or small init are caught
# by the norm rule.
TWIN_COS = 0.999
MIN_TWINS = 2
SMALL_NORM = 0.5


def _shape(module: nn.Module) -> tuple[int, int]:
    vocab, dim = module.weight.shape
    if hasattr(module, "bits"):
        dim = dim * 32 // module.bits
    return vocab, dim


class _TokenRows(nn.Module):
    """Shared parts: the delta (trainable) and index maps (constants, not parameters)."""

    def _init_rows(self, indices: list[int], vocab: int, dim: int) -> None:
        n = len(indices)
        self.delta = mx.zeros((n, dim), dtype=mx.float32)  # (n, D)
        lut = np.zeros(vocab, np.int32)
        lut[indices] = np.arange(1, n + 1)
        onehot = np.zeros((n, vocab), np.float32)
        onehot[np.arange(n), indices] = 1.0
        # Plain attributes (object.__setattr__), so they are neither parameters nor saved.
        object.__setattr__(self, "indices", [int(i) for i in indices])
        object.__setattr__(self, "_lut", mx.array(lut))  # (V,) token -> slot + 1, 0 = none
        object.__setattr__(self, "_onehot", mx.array(onehot))  # (n, V)

    @property
    def n_rows(self) -> int:
        return int(self._lut.shape[0])

    def _head_extra(self, h: mx.array, delta: mx.array, dtype: mx.Dtype) -> mx.array:
        """(..., V) logits added by the delta rows: h @ delta.T scattered to their columns."""
        return ((h.astype(mx.float32) @ delta.T) @ self._onehot).astype(dtype)

    def _parts(self, base: Any) -> tuple[Any, list[mx.array], int]:
        def head(h: mx.array, delta: mx.array) -> mx.array:
            y = base(h)
            return y + self._head_extra(h, delta, y.dtype)

        return head, [self.delta], int(self._lut.shape[0])

    def _fused_weight(self, base: nn.Module) -> mx.array:
        w = _mlxlm.dense_weight(base)
        idx = mx.array(self.indices)
        return w.at[idx].add(self.delta.astype(w.dtype))


class TokenRowsEmbedding(_TokenRows):
    """An Embedding (or QuantizedEmbedding) whose rows `indices` get `delta` added; its
    `as_linear` (the tied LM head) uses the same rows."""

    def __init__(self, embedding: nn.Module, indices: list[int]):
        super().__init__()
        self.embedding = embedding
        self._init_rows(indices, *_shape(embedding))

    def __call__(self, x: mx.array) -> mx.array:
        y = self.embedding(x)  # (..., D)
        table = mx.concatenate([mx.zeros_like(self.delta[:1]), self.delta])  # (n + 1, D)
        return y + table[self._lut[x]].astype(y.dtype)

    def as_linear(self, h: mx.array) -> mx.array:
        y = self.embedding.as_linear(h)  # (..., V)
        return y + self._head_extra(h, self.delta, y.dtype)

    def head_parts(self) -> tuple[Any, list[mx.array], int]:
        """(fn(h, delta) -> logits, [delta], vocab) for the chunked selective loss."""
        return self._parts(self.embedding.as_linear)

    def fuse(self, dequantize: bool = False) -> nn.Module:
        weight = self._fused_weight(self.embedding)
        vocab, dim = weight.shape
        fused = nn.Embedding(vocab, dim)
        fused.weight = weight
        base = self.embedding
        if hasattr(base, "bits") and not dequantize:
            fused = nn.QuantizedEmbedding.from_embedding(
                fused, group_size=base.group_size, bits=base.bits, mode=base.mode
            )
        return fused


class TokenRowsHead(_TokenRows):
    """An untied LM head (Linear / QuantizedLinear) with `delta` added to rows `indices`."""

    def __init__(self, linear: nn.Module, indices: list[int]):
        super().__init__()
        self.linear = linear
        self._init_rows(indices, *_shape(linear))

    def __call__(self, h: mx.array) -> mx.array:
        y = self.linear(h)
        return y + self._head_extra(h, self.delta, y.dtype)

    def head_parts(self) -> tuple[Any, list[mx.array], int]:
        return self._parts(self.linear)

    def fuse(self, dequantize: bool = False) -> nn.Module:
        weight, base = self._fused_weight(self.linear), self.linear
        fused = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in base)
        fused.weight = weight
        if "bias" in base:
            fused.bias = base.bias
        if hasattr(base, "bits") and not dequantize:
            fused = nn.QuantizedLinear.from_linear(
                fused, group_size=base.group_size, bits=base.bits, mode=base.mode
            )
        return fused


def is_token_rows(module: nn.Module) -> bool:
    return isinstance(module, _TokenRows)


def is_tied(model: nn.Module) -> bool:
    return _mlxlm.untied_head(model) is None


def _matrix(model: nn.Module, module: str) -> nn.Module:
    """The embedding or the untied head, unwrapped from any token-row wrapper."""
    target = _mlxlm.input_embedding(model) if module == EMBEDDING else _mlxlm.untied_head(model)
    if is_token_rows(target):
        target = target.embedding if module == EMBEDDING else target.linear
    return target


def apply_token_rows(
    model: nn.Module, indices: list[int], modules: list[str] | None = None
) -> dict[str, Any]:
    """Wrap the embedding (and an untied head) with trainable deltas on rows `indices`; only the
    deltas are trainable in the wrappers. `modules`: "embedding" and/or "head" (default: both
    when untied). Returns the adapter_config entry."""
    indices = sorted({int(i) for i in indices})
    embedding = _mlxlm.input_embedding(model)
    vocab, _ = _shape(embedding)
    bad = [i for i in indices if not 0 <= i < vocab]
    if not indices or bad:
        raise UserError(f"token ids {bad or indices} are not rows of the {vocab}-row embedding")
    if modules is None:
        modules = [EMBEDDING] + ([] if is_tied(model) else [HEAD])
    wrapped: list[tuple[str, _TokenRows]] = []
    if EMBEDDING in modules:
        wrapper: _TokenRows = TokenRowsEmbedding(embedding, indices)
        _mlxlm.set_input_embedding(model, wrapper)
        wrapped.append((EMBEDDING, wrapper))
    if HEAD in modules and not is_tied(model):
        wrapper = TokenRowsHead(_mlxlm.untied_head(model), indices)
        _mlxlm.set_output_head(model, wrapper)
        wrapped.append((HEAD, wrapper))
    for _, w in wrapped:
        w.freeze()
        w.unfreeze(keys=["delta"], recurse=False)
    return {"indices": indices, "modules": [n for n, _ in wrapped], "form": "delta"}


def delta_key(module: str) -> str:
    """The parameter name of a delta in adapter files (`model.embed_tokens.delta`, ...)."""
    return (_mlxlm.EMBEDDING_PATH if module == EMBEDDING else _mlxlm.HEAD_PATH) + ".delta"


def base_rows(model: nn.Module, module: str, indices: list[int]) -> mx.array:
    """(n, D) float32 base rows of the "embedding" or the "head" (through any wrapper)."""
    return _mlxlm.dense_weight(_matrix(model, module))[mx.array(indices)].astype(mx.float32)


def values_to_deltas(
    model: nn.Module, weights: dict[str, mx.array], entry: dict[str, Any]
) -> dict[str, mx.array]:
    """Adapter weights with PEFT-style row values ("form": "values") turned into deltas."""
    if entry.get("form", "delta") == "delta":
        return weights
    out = dict(weights)
    for module in (EMBEDDING, HEAD):
        key = delta_key(module)
        if key in out:
            out[key] = out[key].astype(mx.float32) - base_rows(model, module, entry["indices"])
    return out


# --------------------------------------------------------------------------------------------
# Which rows look untrained
# --------------------------------------------------------------------------------------------


@dataclass
class RowCheck:
    """How one token's row compares with the rest of the vocabulary."""

    token_id: int
    token: str
    twins: int  # other rows with cosine >= TWIN_COS
    norm_ratio: float  # row norm / median row norm
    where: str  # "embedding" or "LM head"

    @property
    def untrained(self) -> bool:
        return self.twins >= MIN_TWINS or self.norm_ratio < SMALL_NORM

    def why(self) -> str:
        if self.where == "added":
            return "a new token"
        if self.twins >= MIN_TWINS:
            return f"its {self.where} row is one of {self.twins + 1} near-identical rows"
        return f"its {self.where} row norm is {self.norm_ratio:.2f}x the median"


def check_rows(model: nn.Module, ids: list[int], tokenizer: Any = None) -> list[RowCheck]:
    """A RowCheck per id and matrix (embedding; also the head when untied); see TWIN_COS."""
    out = []
    for module in [EMBEDDING] + ([] if is_tied(model) else [HEAD]):
        w = _mlxlm.dense_weight(_matrix(model, module)).astype(mx.float32)  # (V, D)
        norms = mx.linalg.norm(w, axis=1)  # (V,)
        unit = w / mx.maximum(norms, 1e-12)[:, None]
        cos = unit[mx.array(ids)] @ unit.T  # (n, V)
        twins = ((cos >= TWIN_COS).sum(axis=1) - 1).tolist()
        median = float(np.median(np.array(norms)))
        where = "embedding" if module == EMBEDDING else "LM head"
        for k, i in enumerate(ids):
            name = tokenizer.convert_ids_to_tokens(i) if tokenizer is not None else str(i)
            ratio = float(norms[i].item()) / max(median, 1e-12)
            out.append(RowCheck(int(i), str(name), int(twins[k]), ratio, where))
    return out


def untrained(checks: list[RowCheck]) -> dict[int, RowCheck]:
    """token id -> the first failing check, for the ids that look untrained."""
    found: dict[int, RowCheck] = {}
    for c in checks:
        if c.untrained and c.token_id not in found:
            found[c.token_id] = c
    return found


# --------------------------------------------------------------------------------------------
# Growing the vocabulary (added tokens, `--add-chat-tokens`)
# --------------------------------------------------------------------------------------------


def n_rows(model: nn.Module) -> int:
    return _shape(_matrix(model, EMBEDDING))[0]


def _grow(module: nn.Module, rows: int) -> nn.Module:
    """A copy of an Embedding / Linear head (quantized or not) with rows up to `rows`, the new
    ones the mean of the existing rows; frozen. Existing rows (packed, if quantized) are kept
    bit for bit: a quantized row only depends on its own groups."""
    vocab, dim = _shape(module)
    dense = _mlxlm.dense_weight(module)
    mean = dense.astype(mx.float32).mean(axis=0, keepdims=True)  # (1, D)
    extra = mx.broadcast_to(mean, (rows - vocab, dim)).astype(dense.dtype)  # (n_new, D)
    quantized = hasattr(module, "bits")
    is_head = not hasattr(module, "as_linear")
    if quantized:
        kw = dict(group_size=module.group_size, bits=module.bits, mode=module.mode)
        new = (
            nn.QuantizedLinear(dim, rows, bias="bias" in module, **kw)
            if is_head
            else nn.QuantizedEmbedding(rows, dim, **kw)
        )
        parts = mx.quantize(extra, **kw)
        for name, part in zip(("weight", "scales", "biases"), parts, strict=False):
            setattr(new, name, mx.concatenate([module[name], part]))
    else:
        new = nn.Linear(dim, rows, bias="bias" in module) if is_head else nn.Embedding(rows, dim)
        new.weight = mx.concatenate([module.weight, extra])
    if "bias" in module:
        new.bias = mx.concatenate([module.bias, mx.zeros((rows - vocab,), module.bias.dtype)])
    new.freeze()
    return new


def resize_vocab(model: nn.Module, rows: int) -> None:
    """Grow the embedding (and an untied head) to `rows` rows; new rows = mean of the old ones."""
    if rows <= n_rows(model):
        return
    _mlxlm.set_input_embedding(model, _grow(_mlxlm.input_embedding(model), rows))
    head = _mlxlm.untied_head(model)
    if head is not None:
        _mlxlm.set_output_head(model, _grow(head, rows))
