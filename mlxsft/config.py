"""Run configuration and every choice list and default the commands share: the one place they live.

`TrainConfig` is flat, and its field names are the CLI flags with `_` for `-` (`--max-seq-len` ->
`max_seq_len`), so a YAML file, the flags and the saved `config.yaml` all use one vocabulary.
Precedence: dataclass defaults < `--config FILE` < flags given on the command line. Unknown keys
are rejected with the list of valid ones. The choice lists below (with their help texts) and
`SamplingParams` (generate, chat, demo) are read by the commands, `data/` and the library
functions, so a value is spelled once. No heavy imports here: the CLI reads this module.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from mlxsft.errors import UserError

FINE_TUNE_TYPES = ("lora", "dora", "full")
OPTIMIZERS = ("adamw", "adam", "sgd")
LR_SCHEDULES = ("constant", "linear", "cosine")
TRAIN_ON = ("responses", "last", "all")
TRAIN_ON_HELP = "responses: every assistant turn; last: the final one; all: every token."
DATA_KINDS = ("chat", "alpaca", "completion", "text")  # what a row is (data.types.Example.kind)
DATA_FORMATS = ("auto", *DATA_KINDS)
FORMAT_HELP = "Row format; auto: detected per file from the first row with known keys."
BUILTIN_TEMPLATES = ("alpaca", "chatml", "llama3", "mistral", "gemma", "phi3")
TEMPLATES = ("auto", *BUILTIN_TEMPLATES, "tokenizer")  # or a path to a .jinja file
TEMPLATE_HELP = (
    f"auto (the model's own chat template, else alpaca), {', '.join(TEMPLATES[1:])}, "
    "or a path to a .jinja file"
)
QUANTIZE_BITS = (4, 8)
LOSS_HEADS = ("selective", "full")
EXPORT_FORMATS = ("peft", "gguf")
GGUF_DTYPES = ("f16", "f32", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0")
GGUF_DEFAULT_DTYPE = "f16"
REPORT_TO = ("tensorboard", "wandb")

# Spellings other tools use for the same setting (mlx-lm YAML / TRL), accepted in config files.
KEY_ALIASES = {
    "lora_rank": "rank",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "lr": "learning_rate",
    "output_dir": "output",
    "adapter_path": "output",
    "max_seq_length": "max_seq_len",
    "gradient_accumulation_steps": "grad_accum",
    "grad_accumulation_steps": "grad_accum",
    "gradient_checkpointing": "grad_checkpoint",
    "num_train_epochs": "epochs",
    "steps_per_eval": "eval_every",
    "steps_per_report": "steps_per_report",
    "resume_adapter_file": "adapter",
    "train_data": "data",
    "valid_data": "valid",
}


@dataclass
class TrainConfig:
    """Everything `mlxsft train` (and `mlxsft eval`) needs. Field = flag name."""

    # what
    model: str | None = None  # local HF-format dir or hub id (required)
    data: str | None = None  # .jsonl/.json file or a dir with train.jsonl [valid.jsonl]
    valid: str | None = None  # validation file; default: DATA dir's valid split if any
    output: str = "adapters"  # output directory (mlx-lm's default name)
    # data
    template: str = "auto"
    format: str = "auto"
    train_on: str = "responses"
    max_seq_len: int = 2048  # tokens per example (longer ones are truncated) and per packed row
    pack: bool | None = None  # None: pack when the architecture supports block masks (RoPE models)
    # model / adapters
    fine_tune_type: str = "lora"
    rank: int = 8
    alpha: float = 16.0  # LoRA scale = alpha / rank (PEFT)
    dropout: float = 0.0
    target_modules: str = "all-linear"  # comma list (q_proj,v_proj) or all-linear
    num_layers: int = -1  # adapt the last N transformer blocks; -1 = all
    quantize: int | None = None  # quantize the base on load (QLoRA): 4 or 8
    adapter: str | None = None  # start from an existing adapter dir
    # embedding / LM-head rows trained as dense deltas: none, auto (special tokens of the data
    # whose rows look untrained), or a comma list of tokens / ids (train/tokens.py)
    train_tokens: str = "none"
    # a base model without a chat template: add ChatML's <|im_start|>/<|im_end|> as special tokens,
    # grow the embedding/head (new rows = mean row), train those rows, template chatml
    add_chat_tokens: bool = False
    # optimisation
    batch_size: int = 4  # rows per optimizer step (across all ranks and micro-batches)
    grad_accum: int = 1
    learning_rate: float = 1e-4
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    lr_schedule: str = "constant"
    warmup: float = 0.0  # >= 1: steps; in (0, 1): fraction of the total steps
    epochs: int | None = None  # default: 1 epoch when --iters is not given
    iters: int | None = None
    seed: int = 0
    max_grad_norm: float | None = None  # global-norm clipping; None = off
    grad_checkpoint: bool = False
    # selective: the LM head runs only at trained positions, in chunks (no (B, L, V) logits);
    # full: plain logits. Same loss and gradients; unknown architectures fall back to full.
    loss: str = "selective"
    # bookkeeping
    eval_every: int = 200  # steps; 0 = only at the end
    save_every: int = 100  # steps; 0 = only at the end
    steps_per_report: int = 10
    # generation-based evaluation (train/gen_eval.py): at every evaluation, greedy replies to
    # held-out prompts (a data FILE, or "valid" for the validation rows) scored against references
    eval_prompts: str | None = None
    eval_num_prompts: int = 16
    eval_max_tokens: int = 64
    resume: str | None = None  # "auto" or a checkpoint directory
    report_to: str | None = None  # also log metrics to: tensorboard, wandb (comma list)

    def validate(self) -> TrainConfig:
        """Check types and ranges; raise UserError naming the offending key."""
        _choice("fine_tune_type", self.fine_tune_type, FINE_TUNE_TYPES)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _choice("train_on", self.train_on, TRAIN_ON)
        _choice("format", self.format, DATA_FORMATS)
        _choice("loss", self.loss, LOSS_HEADS)
        if self.quantize is not None:
            _choice("quantize", self.quantize, QUANTIZE_BITS)
        for name in (self.report_to or "").split(","):
            if name.strip() not in ("", "none"):
                _choice("report_to", name.strip(), REPORT_TO)
        for key in (
            "rank", "batch_size", "grad_accum", "steps_per_report", "eval_num_prompts",
            "eval_max_tokens",
        ):  # fmt: skip
            _at_least(key, getattr(self, key), 1)
        _at_least("max_seq_len", self.max_seq_len, 2)
        for key in ("eval_every", "save_every", "seed", "weight_decay", "warmup"):
            _at_least(key, getattr(self, key), 0)
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"dropout must be in [0, 1), got {self.dropout}", where="dropout")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise UserError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise UserError(f"max_grad_norm must be > 0, got {self.max_grad_norm}")
        if self.epochs is not None and self.iters is not None:
            raise UserError(
                "both epochs and iters are set", hint="give one of --epochs / --iters, not both"
            )
        for key in ("epochs", "iters"):
            if getattr(self, key) is not None:
                _at_least(key, getattr(self, key), 1)
        if self.batch_size % self.grad_accum:
            raise UserError(
                f"batch_size {self.batch_size} is not a multiple of grad_accum {self.grad_accum}",
                hint="batch_size counts rows per optimizer step; grad_accum splits it",
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise UserError(
            f"invalid {key} {value!r}", where=key, hint=f"one of {', '.join(map(str, choices))}"
        )


def _at_least(key: str, value: Any, low: float) -> None:
    if value < low:
        raise UserError(f"{key} must be >= {low}, got {value}", where=key)


_FIELDS = {f.name: f for f in fields(TrainConfig)}


def _coerce(key: str, value: Any, where: str) -> Any:
    """A YAML value -> the field's type (ints accepted for floats; "1e-4" strings for numbers)."""
    if value is None:
        return None
    kind = str(_FIELDS[key].type).replace(" | None", "")
    if isinstance(value, bool):
        if kind == "bool":
            return value
    elif kind == "float" and isinstance(value, (int, float, str)):
        try:
            return float(value)
        except ValueError:
            pass
    elif kind == "int" and isinstance(value, (int, float, str)):
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if number.is_integer():
            return int(number)
    elif kind == "str":
        if key == "target_modules" and isinstance(value, list):
            return ",".join(str(v) for v in value)
        if isinstance(value, (str, int, float)):
            return str(value)
    raise UserError(f"{key}: expected {kind}, got {value!r}", where=where)


def normalize(values: dict[str, Any], where: str) -> dict[str, Any]:
    """Map aliases to field names, reject unknown keys, coerce types."""
    out: dict[str, Any] = {}
    for raw_key, value in values.items():
        key = str(raw_key).replace("-", "_")
        key = KEY_ALIASES.get(key, key)
        if key == "lora_parameters" and isinstance(value, dict):  # mlx-lm's nested block
            nested = {k: v for k, v in value.items() if k not in ("scale", "keys")}
            if "keys" in value:
                nested["target_modules"] = [str(k).rsplit(".", 1)[-1] for k in value["keys"]]
            out.update(normalize(nested, where))
            continue
        if key not in _FIELDS:
            raise UserError(
                f"unknown config key {raw_key!r}",
                where=where,
                hint=f"valid keys: {', '.join(_FIELDS)}",
            )
        out[key] = _coerce(key, value, where)
    return out


def load_config(path: str | Path) -> dict[str, Any]:
    """Read a YAML run config into {field: value} (only the keys it sets)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UserError(f"invalid YAML: {getattr(exc, 'problem', exc)}", where=where) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError("a config file must hold a mapping of key: value", where=str(path))
    return normalize(data, str(path))


def resolve(cli: dict[str, Any], config_path: str | Path | None = None) -> TrainConfig:
    """Defaults < config file < flags. `cli` holds only the flags the user gave (None = unset)."""
    values = load_config(config_path) if config_path else {}
    given = normalize({k: v for k, v in cli.items() if v is not None}, "command line")
    # --epochs on the command line replaces iters from the file, and vice versa.
    if "epochs" in given:
        values.pop("iters", None)
    if "iters" in given:
        values.pop("epochs", None)
    values.update(given)
    return TrainConfig(**values).validate()


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings of `generate`, `chat` and the demo; `temp == 0` is greedy. The 1.0 / 0
    values switch a filter off (top_p 1 keeps every token, top_k 0 keeps all, min_p 0 drops none).
    """

    temp: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    repetition_context_size: int = 20
    seed: int | None = None
    max_tokens: int = 256

    def __post_init__(self) -> None:
        checks = [
            (self.temp >= 0, "temp must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (0 <= self.min_p < 1, "min_p must be in [0, 1)"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (self.repetition_context_size > 0, "repetition_context_size must be > 0"),
            (self.max_tokens > 0, "max_tokens must be > 0"),
        ]
        for ok, problem in checks:
            if not ok:
                raise UserError(problem, hint="see `mlxsft generate --help`")

    def with_updates(self, assignments: list[str]) -> SamplingParams:
        """A copy with `name=value` assignments applied (as typed after `/params`)."""
        types = {f.name: f.type for f in fields(self)}
        changes: dict[str, Any] = {}
        for item in assignments:
            name, eq, value = item.partition("=")
            name = name.strip().replace("-", "_")
            if not eq or name not in types:
                raise UserError(
                    f"cannot set {item!r}", hint=f"use name=value with a name in {', '.join(types)}"
                )
            kind = int if "int" in str(types[name]) else float
            try:
                changes[name] = None if value.lower() == "none" and name == "seed" else kind(value)
            except ValueError:
                raise UserError(f"{name}: not a number: {value!r}") from None
        return replace(self, **changes)

    def describe(self) -> str:
        return " ".join(f"{k}={v}" for k, v in asdict(self).items())
