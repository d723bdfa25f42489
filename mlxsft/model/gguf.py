"""The GGUF v3 file format in NumPy alone: write and read metadata + tensors.

Layout (little-endian): magic `GGUF`, version 3, tensor count (u64), metadata count (u64), the
metadata key/values, the tensor infos (name, n_dims, dims innermost-first, ggml type, offset),
padding to `general.alignment`, then the tensor data, each tensor aligned. A NumPy array of shape
(rows, cols) is stored with dims [cols, rows]. Quantized types pack blocks along the innermost
axis; the block formats (q4_0 ... q8_0, q4_K, q5_K, q6_K) live in `gguf_quants.py`.
What goes *into* the file for a model (names, metadata, vocab) lives in `gguf_model.py`.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from mlxsft.model.gguf_quants import (  # noqa: F401  (re-exported: the ggml type ids)
    BLOCKS,
    GGML_F16,
    GGML_F32,
    GGML_Q4_0,
    GGML_Q4_1,
    GGML_Q4_K,
    GGML_Q5_0,
    GGML_Q5_1,
    GGML_Q5_K,
    GGML_Q6_K,
    GGML_Q8_0,
    TYPE_NAMES,
    dequantize,
    quantize,
)

MAGIC = b"GGUF"
VERSION = 3
ALIGNMENT = 32

# GGUF metadata value types.
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY = range(10)
UINT64, INT64, FLOAT64 = 10, 11, 12
_SCALAR = {
    UINT8: "<B",
    INT8: "<b",
    UINT16: "<H",
    INT16: "<h",
    UINT32: "<I",
    INT32: "<i",
    FLOAT32: "<f",
    BOOL: "<?",
    UINT64: "<Q",
    INT64: "<q",
    FLOAT64: "<d",
}
_NP_TO_GGUF = {
    np.dtype(np.uint8): UINT8,
    np.dtype(np.int8): INT8,
    np.dtype(np.uint16): UINT16,
    np.dtype(np.int16): INT16,
    np.dtype(np.uint32): UINT32,
    np.dtype(np.int32): INT32,
    np.dtype(np.float32): FLOAT32,
    np.dtype(np.bool_): BOOL,
    np.dtype(np.uint64): UINT64,
    np.dtype(np.int64): INT64,
    np.dtype(np.float64): FLOAT64,
}


@dataclass
class Tensor:
    """One tensor of a GGUF file: `data` in NumPy order (quantized types read back as float32
    values; `raw` holds their bytes, (rows, bytes per row) uint8)."""

    name: str
    ggml_type: int
    shape: tuple[int, ...]  # NumPy order, outermost first
    data: np.ndarray
    raw: np.ndarray | None = None


def encode_tensor(x: np.ndarray, ggml_type: int) -> np.ndarray:
    """A float array as the bytes of `ggml_type` (uint8 or typed array, C order)."""
    if ggml_type == GGML_F32:
        return np.ascontiguousarray(x, dtype=np.float32)
    if ggml_type == GGML_F16:
        return np.ascontiguousarray(x, dtype=np.float16)
    if ggml_type in BLOCKS:
        return quantize(x, ggml_type)
    raise ValueError(f"unsupported ggml type {ggml_type}")


# ---------------------------------------------------------------------------------- writing


def _w_str(f: BinaryIO, s: str) -> None:
    b = s.encode("utf-8")
    f.write(struct.pack("<Q", len(b)))
    f.write(b)


def _value_type(v: Any) -> tuple[int, Any]:
    """(gguf type, value) for a Python/NumPy value; ints become UINT32 (llama.cpp's choice)."""
    if isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], int) and v[0] in _SCALAR:
        return v  # explicit (type, value)
    if isinstance(v, (bool, np.bool_)):
        return BOOL, bool(v)
    if isinstance(v, (int, np.integer)):
        return (UINT32 if 0 <= v < 2**32 else INT64), int(v)
    if isinstance(v, (float, np.floating)):
        return FLOAT32, float(v)
    if isinstance(v, str):
        return STRING, v
    if isinstance(v, (list, np.ndarray)):
        return ARRAY, v
    raise TypeError(f"cannot store {type(v).__name__} in GGUF metadata")


def _w_value(f: BinaryIO, vtype: int, v: Any) -> None:
    if vtype == STRING:
        _w_str(f, v)
    elif vtype == ARRAY:
        if isinstance(v, np.ndarray):
            etype = _NP_TO_GGUF[v.dtype]
            f.write(struct.pack("<IQ", etype, v.size))
            f.write(np.ascontiguousarray(v).astype(v.dtype.newbyteorder("<")).tobytes())
            return
        etype = _value_type(v[0])[0] if v else STRING
        f.write(struct.pack("<IQ", etype, len(v)))
        if etype == STRING:
            for s in v:
                _w_str(f, s)
        else:
            for x in v:
                _w_value(f, etype, x)
    else:
        f.write(struct.pack(_SCALAR[vtype], v))


def _pad(n: int, align: int) -> int:
    return (align - n % align) % align


class Lazy:
    """A tensor produced on demand (`fn()` -> float array of `shape`), so writing a big model
    holds one converted tensor at a time instead of a float32 copy of all of them."""

    def __init__(self, shape: tuple[int, ...], fn: Callable[[], np.ndarray]):
        self.shape, self.fn = tuple(shape), fn

    def __call__(self) -> np.ndarray:
        return self.fn()


def tensor_nbytes(shape: tuple[int, ...], ggml_type: int) -> int:
    """Bytes of a tensor of `shape` stored as `ggml_type`."""
    qk, size = BLOCKS[ggml_type]
    return int(np.prod(shape)) // qk * size


def write_gguf(
    path: str | Path,
    metadata: dict[str, Any],
    tensors: list[tuple[str, np.ndarray | Lazy, int]],
) -> Path:
    """Write a GGUF v3 file: `tensors` are (name, float array in NumPy order or Lazy, ggml type)."""
    path = Path(path)
    align = int(metadata.get("general.alignment", ALIGNMENT))
    with open(path, "wb") as f:
        f.write(MAGIC)
        f.write(struct.pack("<IQQ", VERSION, len(tensors), len(metadata)))
        for key, value in metadata.items():
            vtype, v = _value_type(value)
            _w_str(f, key)
            f.write(struct.pack("<I", vtype))
            _w_value(f, vtype, v)
        offset = 0
        for name, x, t in tensors:
            _w_str(f, name)
            f.write(struct.pack("<I", len(x.shape)))
            for dim in reversed(x.shape):  # ggml: innermost first
                f.write(struct.pack("<Q", dim))
            f.write(struct.pack("<IQ", t, offset))
            n = tensor_nbytes(tuple(x.shape), t)
            offset += n + _pad(n, align)
        f.write(b"\0" * _pad(f.tell(), align))
        for name, x, t in tensors:
            data = encode_tensor(x() if isinstance(x, Lazy) else x, t)
            assert data.nbytes == tensor_nbytes(tuple(x.shape), t), name
            f.write(data.tobytes())
            f.write(b"\0" * _pad(data.nbytes, align))
    return path


# ---------------------------------------------------------------------------------- reading


class _Reader:
    def __init__(self, buf: memoryview):
        self.buf, self.pos = buf, 0

    def unpack(self, fmt: str) -> Any:
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return v

    def string(self) -> str:
        n = self.unpack("<Q")
        s = bytes(self.buf[self.pos : self.pos + n]).decode("utf-8")
        self.pos += n
        return s

    def value(self, vtype: int) -> Any:
        if vtype == STRING:
            return self.string()
        if vtype == ARRAY:
            etype, n = self.unpack("<I"), self.unpack("<Q")
            if etype in (STRING, ARRAY):
                return [self.value(etype) for _ in range(n)]
            dtype = np.dtype(_SCALAR[etype])
            arr = np.frombuffer(self.buf, dtype=dtype, count=n, offset=self.pos).copy()
            self.pos += n * dtype.itemsize
            return arr
        return self.unpack(_SCALAR[vtype])


def read_gguf(
    path: str | Path, *, dequantize_all: bool = True
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(metadata, tensors by name) of a GGUF v2/v3 file (f32, f16 and the `gguf_quants` types).

    The file is memory-mapped; with `dequantize_all=False` quantized tensors keep only `raw`
    (their `data` is an empty array) so a big file is not expanded to float32."""
    data = np.memmap(path, dtype=np.uint8, mode="r")
    r = _Reader(memoryview(data))
    if bytes(r.buf[:4]) != MAGIC:
        raise ValueError(f"{path}: not a GGUF file")
    r.pos = 4
    version, n_tensors, n_kv = r.unpack("<I"), r.unpack("<Q"), r.unpack("<Q")
    if version not in (2, 3):
        raise ValueError(f"{path}: unsupported GGUF version {version}")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = r.string()
        metadata[key] = r.value(r.unpack("<I"))
    infos = []
    for _ in range(n_tensors):
        name = r.string()
        n_dims = r.unpack("<I")
        dims = [r.unpack("<Q") for _ in range(n_dims)]
        infos.append((name, tuple(reversed(dims)), r.unpack("<I"), r.unpack("<Q")))
    align = int(metadata.get("general.alignment", ALIGNMENT))
    start = r.pos + _pad(r.pos, align)
    tensors = {}
    for name, shape, t, off in infos:
        if t not in BLOCKS:
            raise ValueError(f"{path}: tensor {name} has unsupported ggml type {t}")
        nbytes = tensor_nbytes(shape, t)
        if start + off + nbytes > data.size:
            raise ValueError(f"{path}: truncated (tensor {name} ends past the end of the file)")
        raw = data[start + off : start + off + nbytes]
        if t in (GGML_F32, GGML_F16):
            arr = raw.view(np.float32 if t == GGML_F32 else np.float16).reshape(shape)
            tensors[name] = Tensor(name, t, shape, arr)
            continue
        raw = raw.reshape(-1, tensor_nbytes(shape[-1:], t))
        arr = dequantize(raw, t, shape) if dequantize_all else np.zeros(0, np.float32)
        tensors[name] = Tensor(name, t, shape, arr, raw)
    return metadata, tensors
