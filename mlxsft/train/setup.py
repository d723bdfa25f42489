"""What a run trains on: the model (QLoRA when quantized) with adapters, and the encoded splits.

Data is strict: one bad row stops the run with its `file:line` before any model is loaded
(nothing is silently skipped); the encoder's drops and truncations are reported per split.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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
    tokenizer_changed: bool = False  # --add-chat-tokens: save the tokenizer with the adapter
    eval_prompts: list[Any] = field(default_factory=list)  # train/gen_eval.EvalPrompt
    renderer: Any = None  # data/render.Renderer for generation (set with eval_prompts)
    data_sha256: str = ""  # of the training data as read (part of the resume fingerprint)


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
    if stats.n_generation_disagrees:
        notes_extra = (
            f"; {stats.n_generation_disagrees} examples: the template's {{% generation %}} spans "
            "differ from the rendered-prefix spans (the generation spans are trained)"
        )
    else:
        notes_extra = ""
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
    note += notes_extra
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
        from mlxsft.data.reading import find_splits

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
        from mlxsft.rundir import resolve_adapter

        adapter, note = resolve_adapter(cfg.adapter)  # a run dir: its final or newest adapter
        if note:
            notes.append(note)
        adapter = ensure_mlx_adapter(adapter)  # a PEFT adapter dir is converted on the fly
        model = lora.load_adapters(model, adapter)
        adapter_config = lora.read_adapter_config(adapter)
        if (Path(cfg.adapter) / "tokenizer.json").is_file():  # trained with added tokens
            from mlxsft.model.loading import load_tokenizer

            loaded.tokenizer = load_tokenizer(cfg.adapter)
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
    prompt_rows = _eval_prompt_rows(cfg, valid_rows)
    loaded, adapter_config, notes = load_model(cfg, train=True)
    pack = use_packing(cfg, loaded.model)
    from mlxsft.train.tokens import add_chat_tokens, setup_token_rows

    added, rows = None, None
    if cfg.add_chat_tokens:
        if cfg.template not in ("auto", "chatml"):
            raise UserError(
                f"--add-chat-tokens adds ChatML's tokens, but the template is {cfg.template!r}",
                hint="drop --template (chatml is used) or drop --add-chat-tokens",
            )
        cfg.template = "chatml"  # recorded in config.yaml, used by generate/chat
        added, rows, note = add_chat_tokens(loaded.model, loaded.tokenizer)
        loaded.config["vocab_size"] = rows
        notes.append(note)
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
    notes += setup_token_rows(
        cfg.train_tokens,
        loaded.model,
        loaded.tokenizer,
        train,
        adapter_config,
        added=added,
        vocab_size=rows,
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
    prepared = Prepared(
        loaded.model,
        loaded.tokenizer,
        loaded.config,
        adapter_config,
        train,
        valid,
        pack,
        notes,
        template,
        data_sha256=data_sha256(cfg.data),
    )
    prepared.tokenizer_changed = bool(cfg.add_chat_tokens)
    if prompt_rows:
        _add_eval_prompts(cfg, prepared, prompt_rows)
    return prepared


def _eval_prompt_rows(cfg: TrainConfig, valid_rows: list[Example]) -> list[Example]:
    """Rows for --eval-prompts: its FILE, or the validation rows for `valid`."""
    if not cfg.eval_prompts:
        return []
    if cfg.eval_prompts != "valid":
        return read_split(cfg, cfg.eval_prompts, "train")
    if not valid_rows:
        raise UserError(
            "--eval-prompts valid, but there is no validation data",
            hint="pass --valid FILE (or a DATA dir with valid.jsonl), or --eval-prompts FILE",
        )
    return valid_rows


def _add_eval_prompts(cfg: TrainConfig, prepared: Prepared, rows: list[Example]) -> None:
    from mlxsft.data.render import Renderer
    from mlxsft.train.gen_eval import prompts_from_examples

    prompts = prompts_from_examples(rows, cfg.eval_num_prompts)
    if not prompts:
        raise DataError(
            "--eval-prompts: no row has an assistant reply after a prompt",
            where=str(cfg.eval_prompts),
            hint="rows need a user turn followed by the reference assistant reply",
        )
    eos = prepared.config.get("eos_token_id")
    prepared.renderer = Renderer(prepared.tokenizer, prepared.template, eos_token_id=eos)
    prepared.eval_prompts = prompts
    prepared.notes.append(
        f"generation eval: {len(prompts)} prompts, greedy, up to {cfg.eval_max_tokens} tokens"
    )


def data_sha256(data: str) -> str:
    """sha256 of the training split's file(s); of the name for a hub dataset."""
    import hashlib

    from mlxsft.data.reading import data_files
    from mlxsft.runguard import hash_files

    if not Path(data).exists():
        return hashlib.sha256(data.encode()).hexdigest()
    return hash_files(data_files(data, "train"))
