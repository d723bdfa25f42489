"""Checks of untrusted model files before mlx or mlx-lm reads them, and config normalisation.

A model directory is input like any other: a truncated download, a corrupt header, a FIFO where
a file should be or an impossible `config.json` value must end in one `ModelError` line, never a
traceback, a hang or a huge allocation. Pure Python: safetensors headers are read with `json`.
"""

from __future__ import annotations

import fnmatch
import json
import math
import stat
from pathlib import Path
from typing import Any

from mlxsft.errors import ModelError

MAX_HEADER = 100_000_000  # bytes of a safetensors JSON header (real ones: a few hundred kB)
_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "C64": 8,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}  # fmt: skip
# config.json integers: (key, largest plausible value); each must be an integer >= 1.
CONFIG_BOUNDS = {
    "vocab_size": 10_000_000,
    "hidden_size": 1_000_000,
    "intermediate_size": 10_000_000,
    "num_hidden_layers": 10_000,
    "num_attention_heads": 100_000,
    "num_key_value_heads": 100_000,
    "head_dim": 100_000,
}


def check_regular(path: Path) -> None:
    """Refuse a FIFO, socket or device where a file is expected (reading one can block)."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise ModelError(f"cannot read: {exc.strerror}", where=str(path)) from None
    if not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
        raise ModelError("not a regular file (a FIFO, socket or device?)", where=str(path))


def check_files(directory: Path, patterns: list[str]) -> None:
    """Every entry of `directory` that loading would open (by `patterns`) is a regular file."""
    for entry in directory.iterdir():
        if any(fnmatch.fnmatch(entry.name, p) for p in patterns):
            check_regular(entry)


def check_safetensors(path: Path) -> None:
    """A complete, well-formed safetensors file: a sane header whose tensors fit in the file."""
    check_regular(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or n > min(size - 8, MAX_HEADER):
            raise ModelError(
                f"not a valid safetensors file (header of {n} bytes in a {size}-byte file); "
                "truncated or corrupt",
                where=str(path),
                hint="download or write it again",
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise ModelError("corrupt safetensors header (not JSON)", where=str(path)) from None
    if not isinstance(header, dict):
        raise ModelError("corrupt safetensors header (not an object)", where=str(path))
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        end = max(end, _tensor_end(path, name, info))
    if 8 + n + end > size:
        raise ModelError(
            f"truncated safetensors file: its tensors need {8 + n + end:,} bytes, "
            f"the file has {size:,}",
            where=str(path),
            hint="download or write it again",
        )


def _naturals(xs: Any) -> bool:
    return isinstance(xs, list) and all(
        isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in xs
    )


def _tensor_end(path: Path, name: str, info: Any) -> int:
    bad = ModelError(f"corrupt safetensors header: tensor {name[:80]!r}", where=str(path))
    if not isinstance(info, dict):
        raise bad
    offsets, shape, dtype = info.get("data_offsets"), info.get("shape"), info.get("dtype")
    if not (
        _naturals(offsets) and len(offsets) == 2 and offsets[0] <= offsets[1] and _naturals(shape)
    ):
        raise bad
    width = _DTYPE_BYTES.get(str(dtype))
    if width is not None and math.prod(shape) * width != offsets[1] - offsets[0]:
        raise bad
    return offsets[1]


def check_config_values(config: dict, where: str) -> None:
    """Sizes in config.json must be integers in a plausible range (not 0 heads, not 1e12 words)."""
    sections = [
        config,
        *(v for k, v in config.items() if k == "text_config" and isinstance(v, dict)),
    ]
    for section in sections:
        for key, high in CONFIG_BOUNDS.items():
            value = section.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
                raise ModelError(
                    f"impossible config value {key} = {value!r} (expected an integer in 1..{high:,})",
                    where=where,
                    hint="the checkpoint's config.json is broken; fix or re-download it",
                )
    heads, hidden = config.get("num_attention_heads"), config.get("hidden_size")
    kv = config.get("num_key_value_heads")
    if isinstance(heads, int) and isinstance(kv, int) and heads % kv:
        raise ModelError(
            f"impossible config: num_attention_heads {heads} is not a multiple of "
            f"num_key_value_heads {kv}",
            where=where,
        )
    derived = "head_dim" not in config and isinstance(hidden, int) and isinstance(heads, int)
    if derived and hidden % heads:
        raise ModelError(
            f"impossible config: hidden_size {hidden} is not a multiple of "
            f"num_attention_heads {heads}",
            where=where,
        )


def normalize_config(config: dict) -> dict:
    """A config.json readable by every version: fields that moved between transformers versions
    are present in both spellings. transformers >= 5 writes RoPE as `rope_parameters`
    {rope_theta, rope_type, scaling fields} (per attention type for some models); older ones and
    mlx-lm read top-level `rope_theta` and `rope_scaling`. Also `dtype` / `torch_dtype`."""
    out = dict(config)
    rope = out.get("rope_parameters")
    if isinstance(rope, dict) and rope:
        if all(isinstance(v, dict) for v in rope.values()):  # {"full_attention": {...}, ...}
            sliding = rope.get("sliding_attention") or {}
            if "rope_theta" in sliding:
                out.setdefault("rope_local_base_freq", sliding["rope_theta"])
            rope = rope.get("full_attention") or next(iter(rope.values()))
        for key in ("rope_theta", "partial_rotary_factor"):
            if key in rope:
                out.setdefault(key, rope[key])
        scaling = {
            k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")
        }
        if scaling.get("rope_type", "default") != "default" and out.get("rope_scaling") is None:
            out["rope_scaling"] = scaling
    elif "rope_theta" in out:
        params: dict[str, Any] = {"rope_theta": out["rope_theta"], "rope_type": "default"}
        scaling = out.get("rope_scaling")
        if isinstance(scaling, dict):
            params.update(scaling)
            params["rope_type"] = scaling.get("rope_type", scaling.get("type", "default"))
            params.pop("type", None)
        out["rope_parameters"] = params
    for a, b in (("dtype", "torch_dtype"), ("torch_dtype", "dtype")):
        if a in out and b not in out:
            out[b] = out[a]
    return out
