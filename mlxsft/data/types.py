"""The data path's value types: a normalised conversation (`Example`) and its encoding (`Encoded`).

Every input format becomes an `Example` of `Message`s; `encode.py` turns it into `Encoded` arrays.
`loss_mask[i] == 1` means token i is a training target, predicted from tokens < i, so
`loss_mask[0] == 0` always.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Message:
    role: str
    content: str
    train: bool | None = None  # None: the --train-on policy decides; False: never trained
    tool_calls: list[dict[str, Any]] | None = None
    name: str | None = None
    tool_call_id: str | None = None

    def to_template_dict(self) -> dict[str, Any]:
        """The dict a chat template sees: None-valued keys dropped, as transformers does."""
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        for key in ("tool_calls", "name", "tool_call_id"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out


@dataclass
class Example:
    messages: list[Message]
    kind: str  # one of config.DATA_KINDS
    source: str  # "file:line"
    context: str = ""  # alpaca `input` (kept apart so the alpaca template can render it)
    tools: list[dict[str, Any]] | None = None  # OpenAI-style tool schemas, passed to templates


@dataclass
class Encoded:
    input_ids: np.ndarray  # (L,) int32
    loss_mask: np.ndarray  # (L,) int32, 0/1
    source: str
    truncated: bool = False
    missing_eot: bool = False  # some trained turn had no end-of-turn marker
    not_prefix_stable: bool = False  # template re-renders earlier turns once later ones exist
    # the template's {% generation %} spans (used) differ from the spans found by rendering prefixes
    generation_disagrees: bool = False

    def __post_init__(self) -> None:
        assert self.input_ids.shape == self.loss_mask.shape, (
            self.input_ids.shape,
            self.loss_mask.shape,
        )

    @property
    def n_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def n_trained(self) -> int:
        return int(self.loss_mask.sum())


@dataclass
class Dropped:
    """An example that cannot be encoded into at least one trained token, and why."""

    source: str
    reason: str
    detail: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
