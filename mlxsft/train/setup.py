"""What a run trains on: the model (QLoRA when quantized) with adapters, and the encoded splits.

Data is strict: one bad row stops the run with its `file:line` before any model is loaded
(nothing is silently skipped); the encoder's drops and truncations are reported per split.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlxsft.config import TrainConfig
from mlxsft.data.types import Encoded, Example
from mlxsft.errors import DataError, UserError


@dataclass
class Prepared:
    """A loaded model with adapters, its tokenizer and encoded data."""

    model: Any
    tokenizer: Any
    config: dict[str, Any]  # the model's config.json (after quantization, if any)
    adapter_config: dict[str, Any]
    train: list[Encoded]
    valid: list[Encoded]
    pack: bool
    notes: list[str]
    template: Any = None  # the resolved data.templates.ChatTemplate


def read_split(cfg: TrainConfig, path: str, split: str) -> list[Example]:
    """Every row of one split as an Example; any bad row is a DataError naming `file:line`."""
    from mlxsft.data.formats import read_examples

    examples, errors = read_examples(path, cfg.format, split=split)
    if errors:
        more = f" (and {len(errors) - 1} more bad rows)" if len(errors) > 1 else ""
        raise DataError(
            f"{errors[0].one_line()}{more}",
            hint="fix the rows; `mlxsft data validate DATA` lists them all",
        )
    if not examples:
        raise DataError(f"no rows in {split} data", where=str(path))
    return examples


def encode_rows(
    cfg: TrainConfig, tokenizer: Any, examples: list[Example], label: str, template: Any = None
) -> tuple[list[Encoded], str]:
    """Encode examples as training does -> (encoded, a one-line note on drops/truncation)."""
    from mlxsft.data.encode import encode_dataset
    from mlxsft.data.templates import resolve_template

    template = template or resolve_template(cfg.template, tokenizer)
    encoded, stats = encode_dataset(examples, tokenizer, template, cfg.train_on, cfg.max_seq_len)
    if not encoded:
        reasons = ", ".join(f"{k}: {v}" for k, v in stats.dropped.items())
        raise DataError(
            f"every {label} example was dropped ({reasons})",
            hint="check --template / --train-on with `mlxsft data inspect`",
        )
    dropped = ", ".join(f"{n} {reason}" for reason, n in stats.dropped.items())
    note = (
        f"{label}: {len(encoded)} examples, {stats.n_trained} trained of {stats.n_tokens} tokens"
        f"; {stats.n_truncated} truncated to {cfg.max_seq_len}; {stats.n_dropped} dropped"
        + (f" ({dropped})" if dropped else "")
    )
    if stats.n_truncated == len(encoded):
        note += (
            f"\nwarning: every {label} example is longer than --max-seq-len {cfg.max_seq_len} and "
            "was cut (prompts lose their start); raise --max-seq-len"
        )
    return encoded, note


def template_note(spec: str, template: Any, examples: list[Example]) -> str:
    """`template: NAME (where it came from)` for the start of a run."""
    from mlxsft.data.templates import template_label

    label = template_label(template.name, examples)
    if label != template.name:
        return f"template: {label}"
    if template.name == "tokenizer":
        why = "the model's own chat template"
    elif template.builtin:
        why = "built-in" + ("; the model has no chat template" if spec == "auto" else "")
    else:
        why = "template file"
    return f"template: {template.name} ({why})"


def dropped_tool_rows(examples: list[Example], template: Any) -> int:
    """Rows with tool calls or tool results that the template renders without them (the model
    would train without ever seeing the tool turns). Rows the template rejects are reported as
    drops elsewhere."""
    from mlxsft.data.templates import TemplateRenderError

    n = 0
    for ex in examples:
        tool_text = [m.content for m in ex.messages if m.role == "tool" and m.content.strip()]
        for call in (c for m in ex.messages for c in (m.tool_calls or [])):
            function = call.get("function")
            tool_text.append(
                str((function if isinstance(function, dict) else call).get("name", ""))
            )
        tool_text = [t for t in tool_text if t]
        if not tool_text:
            continue
        try:
            text = template.render([m.to_template_dict() for m in ex.messages], tools=ex.tools)
        except TemplateRenderError:
            continue
        n += any(t not in text for t in tool_text)
    return n


def encode_split(cfg: TrainConfig, tokenizer: Any, path: str, split: str):
    """Read (strictly) and encode one split of `path` -> (encoded, note). Used by `mlxsft plan`."""
    return encode_rows(cfg, tokenizer, read_split(cfg, path, split), split)


def valid_source(cfg: TrainConfig) -> tuple[str, str] | None:
    """(path, split) of the validation data: --valid, else DATA dir's valid split."""
    if cfg.valid:
        return cfg.valid, "train"
    data = Path(cfg.data or "")
    if data.is_dir():
        from mlxsft.data.formats import find_splits

        if "valid" in find_splits(data):
            return str(data), "valid"
    return None


def load_model(cfg: TrainConfig, *, train: bool) -> tuple[Any, dict[str, Any], list[str]]:
    """(loaded, adapter_config, notes); `loaded.model` carries the adapters. `train`: add fresh
    adapters (or continue --adapter, mlx-lm or PEFT); otherwise only apply --adapter (eval)."""
    from mlxsft import _mlxlm
    from mlxsft.model import lora
    from mlxsft.model.loading import load

    loaded = load(cfg.model, quantize=cfg.quantize)
    model, notes = loaded.model, []
    adapter_config: dict[str, Any] = {}
    if _mlxlm.is_quantized(model):
        notes.append("quantized base: LoRA on a frozen quantized model (QLoRA)")
    if cfg.adapter:
        from mlxsft.model.peft import ensure_mlx_adapter

        adapter = ensure_mlx_adapter(cfg.adapter)  # a PEFT adapter dir is converted on the fly
        model = lora.load_adapters(model, adapter)
        adapter_config = lora.read_adapter_config(adapter)
        if train:
            notes.append(f"continuing adapter {cfg.adapter} (its rank and targets apply)")
    elif train:
        adapter_config = lora.apply_adapters(
            model,
            fine_tune_type=cfg.fine_tune_type,
            rank=cfg.rank,
            alpha=cfg.alpha,
            dropout=cfg.dropout,
            target_modules=cfg.target_modules,
            num_layers=cfg.num_layers,
        )
    loaded.model = model
    return loaded, adapter_config, notes


def use_packing(cfg: TrainConfig, model: Any) -> bool:
    """--pack/--no-pack, default: pack when the architecture takes block masks (RoPE models)."""
    from mlxsft import _mlxlm

    if cfg.pack is None:
        return _mlxlm.supports_mask(model)
    if cfg.pack and not _mlxlm.supports_mask(model):
        raise UserError(
            f"--pack is not supported for model_type {_mlxlm.model_type(model)!r}",
            hint="use --no-pack",
        )
    return cfg.pack


def prepare(cfg: TrainConfig) -> Prepared:
    """Read data (fail fast), load the model with adapters, encode train and valid splits."""
    if not cfg.model:
        raise UserError("no model given", hint="pass --model DIR_OR_HUB_ID")
    if not cfg.data:
        raise UserError("no training data given", hint="pass --data FILE_OR_DIR")
    from mlxsft.data.templates import resolve_template

    train_rows = read_split(cfg, cfg.data, "train")
    source = valid_source(cfg)
    valid_rows = read_split(cfg, *source) if source else []
    loaded, adapter_config, notes = load_model(cfg, train=True)
    pack = use_packing(cfg, loaded.model)
    template = resolve_template(cfg.template, loaded.tokenizer)
    notes.append(template_note(cfg.template, template, train_rows))
    train, note = encode_rows(cfg, loaded.tokenizer, train_rows, "train", template)
    notes.append(note)
    n_tools = dropped_tool_rows(train_rows, template)
    if n_tools:
        notes.append(
            f"warning: template {template.name!r} leaves out the tool calls/results of "
            f"{n_tools} train rows (the model never sees them); use a template with tool "
            "support (e.g. the model's own) or a .jinja file"
        )
    valid: list[Encoded] = []
    if valid_rows:
        valid, note = encode_rows(cfg, loaded.tokenizer, valid_rows, "valid", template)
        notes.append(note)
    else:
        notes.append(
            "warning: no validation data (no valid.jsonl beside DATA, no --valid): no val loss "
            "and no best checkpoint"
        )
    return Prepared(
        loaded.model,
        loaded.tokenizer,
        loaded.config,
        adapter_config,
        train,
        valid,
        pack,
        notes,
        template,
    )
