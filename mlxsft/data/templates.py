"""Chat templates: the built-in ones, the tokenizer's own, or a `.jinja` file, rendered in a
sandboxed Jinja environment that matches transformers' `apply_chat_template(..., tokenize=False)`.

`resolve_template(spec, tokenizer)` picks one; `ChatTemplate.render(messages, ...)` renders it.
Built-in templates never write a BOS token: `encode.py` adds the tokenizer's BOS when the tokenizer
adds one itself, so a BOS is never doubled.

A template is code from a model repo or a user: rendering is bounded (RENDER_LIMITS: `range()`
items over the whole render, output size, time, `*`/`**` result sizes, recursion), and any
failure is a one-line TemplateRenderError naming the row, never a hang or a traceback.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from mlxsft.config import BUILTIN_TEMPLATES as BUILTIN
from mlxsft.config import TEMPLATES as CHOICES
from mlxsft.errors import DataError, UserError

BUILTIN_MARKERS = {
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "gemma": ("<start_of_turn>", "<end_of_turn>"),
    "phi3": ("<|user|>", "<|assistant|>", "<|end|>"),
}


class TemplateRenderError(DataError):
    """A template raised (`raise_exception`) or failed while rendering one example."""


# Far above what any real chat template needs for one conversation.
RENDER_LIMITS = {"range_items": 1_000_000, "chars": 10_000_000, "seconds": 10.0}


class _LimitExceeded(Exception):
    pass


class _Budget:
    """The bounds of one render: `range()` counts its items and watches the clock."""

    def __init__(self) -> None:
        self.items = 0
        self.deadline = time.perf_counter() + RENDER_LIMITS["seconds"]

    def check_time(self) -> None:
        if time.perf_counter() > self.deadline:
            raise _LimitExceeded(f"rendering took over {RENDER_LIMITS['seconds']:g} s")

    def range(self, *args: int) -> _CountedRange:
        from jinja2.sandbox import safe_range

        return _CountedRange(safe_range(*args), self)

    def count(self, values: range) -> Iterator[int]:
        for i, value in enumerate(values):
            self.items += 1
            if self.items > RENDER_LIMITS["range_items"]:
                raise _LimitExceeded(f"loops over more than {RENDER_LIMITS['range_items']:,} items")
            if i % 4096 == 0:
                self.check_time()
            yield value


class _CountedRange(Sequence):
    """A `range` whose iteration is charged to the render's budget (nested loops included)."""

    def __init__(self, values: range, budget: _Budget):
        self.values, self.budget = values, budget

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, index):  # type: ignore[override]
        item = self.values[index]
        return _CountedRange(item, self.budget) if isinstance(item, range) else item

    def __iter__(self) -> Iterator[int]:
        return self.budget.count(self.values)

    def __reversed__(self) -> Iterator[int]:
        return self.budget.count(self.values[::-1])


def _sized_binop(left: Any, operator: str, right: Any) -> Any:
    """`*` and `**` that refuse results too big to build (e.g. `'x' * 10**9`, `9 ** 9 ** 9`)."""
    if operator == "*":
        for seq, n in ((left, right), (right, left)):
            sized = isinstance(seq, (str, list, tuple)) and isinstance(n, int)
            if sized and len(seq) * n > RENDER_LIMITS["chars"]:
                raise _LimitExceeded("a repetition (`*`) builds a result that is too large")
        return left * right
    ints = isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0
    if ints and right * math.log2(abs(left)) > 1e5:
        raise _LimitExceeded("a power (`**`) builds a number that is too large")
    return left**right


def _raise_exception(message: str) -> None:
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


def _tojson(x: Any, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # HF's override: no HTML escaping, and indent/separators options that templates use.
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=64)
def _compile(source: str):
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from mlxsft.data.generation_tag import GenerationExtension

    class Sandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["*", "**"])

        def call_binop(self, context, operator, left, right):
            return _sized_binop(left, operator, right)

    env = Sandbox(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, GenerationExtension]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = dict
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise UserError(
            f"chat template does not parse: {exc.message} (template line {exc.lineno})",
            hint="check the .jinja file, or pick a built-in with --template",
        ) from None


@dataclass(frozen=True)
class ChatTemplate:
    """A Jinja chat template plus what it needs from the tokenizer to render."""

    name: str  # "alpaca", "chatml", ..., "tokenizer", or the .jinja path
    source: str
    builtin: bool  # built-ins never write BOS; encode adds it when the tokenizer would
    special_tokens: tuple[tuple[str, str], ...] = ()  # bos_token, eos_token, ... as HF passes them

    def render(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = False,
        tools: list[dict[str, Any]] | None = None,
        where: str | None = None,
        **extra: Any,
    ) -> str:
        """Render like transformers: special tokens first, then `extra` kwargs override them."""
        import jinja2

        compiled = _compile(self.source)
        variables: dict[str, Any] = {**dict(self.special_tokens), **extra}
        if self.builtin:  # built-ins write eos_token; a tokenizer without one renders ""
            variables.setdefault("eos_token", "")
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        budget = _Budget()
        try:
            parts, size = [], 0
            for part in compiled.generate(
                messages=messages,
                tools=tools,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                range=budget.range,
                **variables,
            ):
                parts.append(part)
                size += len(part)
                if size > RENDER_LIMITS["chars"]:
                    raise _LimitExceeded(f"output over {RENDER_LIMITS['chars']:,} characters")
                budget.check_time()
            return "".join(parts)
        except _LimitExceeded as exc:
            raise TemplateRenderError(
                f"template {self.name!r} exceeded a rendering limit: {exc}",
                where=where,
                hint="the template (or this row) is not a usable chat template",
            ) from None
        except RecursionError:
            raise TemplateRenderError(
                f"template {self.name!r} recursed too deeply", where=where
            ) from None
        except jinja2.TemplateError as exc:
            message = getattr(exc, "message", None) or str(exc)
            raise TemplateRenderError(
                f"template {self.name!r} raised: {message}",
                where=where,
                hint="fix the row or pick another --template",
            ) from None
        except (
            TypeError,
            ValueError,
            KeyError,
            AttributeError,
            IndexError,
            ArithmeticError,
        ) as exc:
            first = (str(exc).strip().splitlines() or [""])[0]
            raise TemplateRenderError(
                f"template {self.name!r} failed: {type(exc).__name__}: {first}",
                where=where,
                hint="the template may not support this conversation shape; try another --template",
            ) from None


def render_marked(
    template: ChatTemplate,
    messages: list[dict[str, Any]],
    *,
    tools: list[dict[str, Any]] | None = None,
    where: str | None = None,
) -> tuple[str, list[tuple[int, int]]]:
    """Render with `{% generation %}` bodies marked -> (text, their character spans)."""
    from mlxsft.data.generation_tag import MARK_VARIABLE, strip_marks

    marked = template.render(messages, tools=tools, where=where, **{MARK_VARIABLE: True})
    return strip_marks(marked)


def builtin_source(name: str) -> str:
    files = resources.files("mlxsft.data") / "builtin_templates" / f"{name}.jinja"
    return files.read_text(encoding="utf-8")


def tokenizer_chat_template(tokenizer: Any) -> str | None:
    """The tokenizer's own chat template (the `default` one if it has several), or None."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default") or next(iter(template.values()), None)
    if isinstance(template, list):  # old serialisation: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) and template.strip() else None


def special_tokens_of(tokenizer: Any) -> tuple[tuple[str, str], ...]:
    """bos_token, eos_token, ... as transformers passes them to templates (strings only)."""
    mapping = getattr(tokenizer, "special_tokens_map", None) or {}
    out = {k: str(v) for k, v in mapping.items() if isinstance(v, str)}
    for key in ("bos_token", "eos_token"):
        value = getattr(tokenizer, key, None)
        if value is not None and key not in out:
            out[key] = str(value)
    return tuple(sorted(out.items()))


def resolve_template(spec: str, tokenizer: Any) -> ChatTemplate:
    """--template value -> ChatTemplate. `auto` = the tokenizer's own if any, else `alpaca`."""
    special = special_tokens_of(tokenizer)
    own = tokenizer_chat_template(tokenizer)
    if spec == "auto":
        spec = "tokenizer" if own else "alpaca"
    if spec == "tokenizer":
        if not own:
            raise UserError(
                "the tokenizer has no chat template",
                hint=f"pass --template {'|'.join(BUILTIN)} or a .jinja file",
            )
        return ChatTemplate("tokenizer", own, builtin=False, special_tokens=special)
    if spec in BUILTIN:
        return ChatTemplate(spec, builtin_source(spec), builtin=True, special_tokens=special)
    path = Path(spec)
    if path.suffix == ".jinja" or path.exists():
        if not path.is_file():
            raise UserError(f"template file not found: {spec}", hint="give a path to a .jinja file")
        source = path.read_text(encoding="utf-8")
        _compile(source)  # fail early on syntax errors
        return ChatTemplate(str(path), source, builtin=False, special_tokens=special)
    raise UserError(
        f"unknown template {spec!r}",
        hint=f"use one of {', '.join(CHOICES)} or a path to a .jinja file",
    )


def template_warnings(template: ChatTemplate, tokenizer: Any) -> list[str]:
    """Built-in markers this tokenizer does not know as single tokens (learned as plain text)."""
    if not template.builtin:
        return []
    vocab = tokenizer.get_vocab()
    missing = [m for m in BUILTIN_MARKERS.get(template.name, ()) if m not in vocab]
    if not missing:
        return []
    return [
        f"template {template.name!r}: {', '.join(missing)} not single tokens in this tokenizer; "
        "they will be trained as plain text (is this the template the model was trained with?)"
    ]


def template_label(name: str, examples: list[Any]) -> str:
    """The template's name as the data uses it: completion and text rows are never templated
    (raw text), so a dataset of only those uses no template at all."""
    kinds = {e.kind for e in examples}
    raw = kinds & {"completion", "text"}
    if not raw:
        return name
    if raw == kinds:
        return "none (completion/text rows are raw text)"
    return f"{name} (completion/text rows: raw text)"
