"""Hugging Face's `{% generation %}` ... `{% endgeneration %}` chat-template tags.

Training templates (TRL's, some recent models') wrap each assistant reply in these tags so that
`apply_chat_template(..., return_assistant_tokens_mask=True)` knows which text is the assistant's.
Rendering emits the body unchanged. With marking on, the body is wrapped in two private-use
characters that `strip_marks` removes again, returning the marked character spans; mlxsft uses
them as the assistant spans of a conversation (data/render.py) and cross-checks them against the
spans it finds by rendering prefixes.
"""

from __future__ import annotations

import re
from typing import Any

from jinja2 import nodes
from jinja2.ext import Extension

OPEN, CLOSE = "\ue000", "\ue001"  # private-use code points: never in real text
MARK_VARIABLE = "_mlxsft_mark_generation"
_TAG = re.compile(r"{%-?\s*generation\s*-?%}")


def has_generation_tags(source: str) -> bool:
    return bool(_TAG.search(source))


class GenerationExtension(Extension):
    """`{% generation %}body{% endgeneration %}` renders `body` (marked when MARK_VARIABLE)."""

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        call = self.call_method("_render", [nodes.ContextReference()])
        return nodes.CallBlock(call, [], [], body).set_lineno(lineno)

    def _render(self, context: Any, caller: Any) -> str:
        body = caller()
        return f"{OPEN}{body}{CLOSE}" if context.get(MARK_VARIABLE) else body


def strip_marks(text: str) -> tuple[str, list[tuple[int, int]]]:
    """Text rendered with marking -> (the plain text, character spans of the marked bodies)."""
    out: list[str] = []
    spans: list[tuple[int, int]] = []
    pos, start = 0, None
    for piece in re.split(f"([{OPEN}{CLOSE}])", text):
        if piece == OPEN:
            start = pos
        elif piece == CLOSE:
            if start is not None and pos > start:
                spans.append((start, pos))
            start = None
        else:
            out.append(piece)
            pos += len(piece)
    return "".join(out), spans
