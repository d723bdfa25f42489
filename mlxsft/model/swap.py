"""Give chosen module instances another `__call__` without touching their class.

`swap_call(module, tag, make_call)` sets the instance's `__class__` to a subclass of its class
(one per class and tag, cached) whose `__call__` is `make_call(base_class)`. Every other
instance of the class, and the class itself, keep mlx-lm's code; parameters, `state` and
`isinstance` are unchanged, so compiling, saving and loading see the same module.
Used by `model.attention` and `model.mlp`.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.nn as nn

_SUBCLASSES: dict[tuple[type, str], type] = {}


def swap_call(module: nn.Module, tag: str, make_call: Callable[[type], Callable]) -> None:
    """Make `module` a `tag` subclass of its class, whose `__call__` is `make_call(base)`."""
    base = type(module)
    if getattr(base, "_mlxsft_tag", None) == tag:
        return
    key = (base, tag)
    if key not in _SUBCLASSES:
        _SUBCLASSES[key] = type(
            f"{tag}{base.__name__}",
            (base,),
            {"__call__": make_call(base), "_mlxsft_tag": tag, "__module__": base.__module__},
        )
    module.__class__ = _SUBCLASSES[key]
