"""ggml's block quantization formats in NumPy: q4_0, q4_1, q5_0, q5_1, q8_0 and the k-quants
q4_K, q5_K, q6_K, both ways.

The quantizers reproduce ggml's reference ("_ref") quantizers, which llama-quantize runs when no
importance matrix is given, bit for bit: every float32 operation is done in the C code's order
(sums over a block accumulate left to right via `np.add.accumulate`, never NumPy's pairwise sum),
`nearest_int` is round-half-to-even, and C's float -> int casts truncate. Work is vectorised over
the blocks of a chunk of rows; the arithmetic inside a block follows the C loop.

Block layouts (little-endian, per block):
- q4_0 (32 values, 18 B): f16 d, 16 B nibbles (value j low, j + 16 high); x = d * (q - 8)
- q4_1 (32, 20 B): f16 d, f16 m, 16 B nibbles; x = d * q + m
- q5_0 (32, 22 B): f16 d, u32 high bits, 16 B nibbles; x = d * (q - 16)
- q5_1 (32, 24 B): f16 d, f16 m, u32 high bits, 16 B nibbles; x = d * q + m
- q8_0 (32, 34 B): f16 d, 32 int8; x = d * q
- q4_K (256, 144 B): f16 d, f16 dmin, 12 B of 6-bit scales/mins for 8 sub-blocks of 32,
  128 B nibbles; x = d * sc * q - dmin * m
- q5_K (256, 176 B): as q4_K plus 32 B of fifth bits before the nibbles
- q6_K (256, 210 B): 128 B low nibbles, 64 B high 2-bit pairs, 16 int8 scales (sub-blocks of
  16), f16 d; x = d * sc * (q - 32)
"""

from __future__ import annotations

import numpy as np

GGML_F32, GGML_F16 = 0, 1
GGML_Q4_0, GGML_Q4_1, GGML_Q5_0, GGML_Q5_1, GGML_Q8_0 = 2, 3, 6, 7, 8
GGML_Q4_K, GGML_Q5_K, GGML_Q6_K = 12, 13, 14
QK_K = 256

# ggml type -> (values per block, bytes per block)
BLOCKS = {
    GGML_F32: (1, 4),
    GGML_F16: (1, 2),
    GGML_Q4_0: (32, 18),
    GGML_Q4_1: (32, 20),
    GGML_Q5_0: (32, 22),
    GGML_Q5_1: (32, 24),
    GGML_Q8_0: (32, 34),
    GGML_Q4_K: (QK_K, 144),
    GGML_Q5_K: (QK_K, 176),
    GGML_Q6_K: (QK_K, 210),
}
TYPE_NAMES = {
    GGML_F32: "f32",
    GGML_F16: "f16",
    GGML_Q4_0: "q4_0",
    GGML_Q4_1: "q4_1",
    GGML_Q5_0: "q5_0",
    GGML_Q5_1: "q5_1",
    GGML_Q8_0: "q8_0",
    GGML_Q4_K: "q4_K",
    GGML_Q5_K: "q5_K",
    GGML_Q6_K: "q6_K",
}
_F32 = np.float32
_CHUNK = 1 << 18  # values quantized at once: bounds the temporaries to a few MiB each


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    """float32 (n,) -> (n, 2) uint8 of IEEE half, round to nearest even (ggml's conversion)."""
    return x.astype(np.float16).reshape(-1, 1).view(np.uint8)


def _f16_value(raw: np.ndarray) -> np.ndarray:
    """(n, 2) uint8 -> float32 (n,)."""
    return np.ascontiguousarray(raw).view(np.float16).reshape(-1).astype(_F32)


def _seq_sum(a: np.ndarray) -> np.ndarray:
    """Sum over the FIRST axis, left to right in float32, as a C `for` loop accumulates (the
    block index is the last axis, so each step is one vectorised add)."""
    out = a[0].astype(_F32, copy=True)
    for row in a[1:]:
        out += row
    return out


def _rint(x: np.ndarray) -> np.ndarray:
    """ggml's nearest_int: round half to even (float32 in, float32 integer values out)."""
    return np.rint(x)


def _first_absmax(x: np.ndarray) -> np.ndarray:
    """Per row, the value of largest magnitude, the first one on ties (a strict `>` scan)."""
    idx = np.abs(x).argmax(axis=-1)
    v = np.take_along_axis(x, idx[..., None], axis=-1)[..., 0]
    return np.where(v == 0, _F32(0), v)  # the scan starts from +0.0, so an all-zero row gives +0


def _nibbles(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return (lo.astype(np.uint8) & 15) | ((hi.astype(np.uint8) & 15) << 4)


def _high_bits_u32(q: np.ndarray) -> np.ndarray:
    """(n, 32) 5-bit values -> (n, 4) uint8: bit j of a little-endian u32 = bit 4 of value j."""
    bits = ((q.astype(np.uint32) >> 4) & 1) << np.arange(32, dtype=np.uint32)
    return np.bitwise_or.reduce(bits, axis=1).astype("<u4").reshape(-1, 1).view(np.uint8)


# ------------------------------------------------------------------------- 32-value blocks


def _q4_0(b: np.ndarray) -> np.ndarray:
    d = _first_absmax(b) / _F32(-8)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, _F32(1) / d, _F32(0)).astype(_F32)
    q = np.minimum(15, np.trunc(b * inv[:, None] + _F32(8.5)))
    return np.concatenate([_f16_bytes(d), _nibbles(q[:, :16], q[:, 16:])], axis=1)


def _min_max_d(b: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # the first minimum / maximum in scan order (decides the sign of a zero)
    lo = np.take_along_axis(b, b.argmin(axis=1)[:, None], axis=1)[:, 0]
    hi = np.take_along_axis(b, b.argmax(axis=1)[:, None], axis=1)[:, 0]
    d = (hi - lo) / _F32(levels)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, _F32(1) / d, _F32(0)).astype(_F32)
    return lo, d, inv


def _q4_1(b: np.ndarray) -> np.ndarray:
    lo, d, inv = _min_max_d(b, 15)
    q = np.minimum(15, np.trunc((b - lo[:, None]) * inv[:, None] + _F32(0.5)))
    return np.concatenate([_f16_bytes(d), _f16_bytes(lo), _nibbles(q[:, :16], q[:, 16:])], 1)


def _q5_0(b: np.ndarray) -> np.ndarray:
    d = _first_absmax(b) / _F32(-16)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, _F32(1) / d, _F32(0)).astype(_F32)
    q = np.minimum(31, np.trunc(b * inv[:, None] + _F32(16.5)))
    lo = _nibbles(q[:, :16], q[:, 16:])
    return np.concatenate([_f16_bytes(d), _high_bits_u32(q), lo], axis=1)


def _q5_1(b: np.ndarray) -> np.ndarray:
    lo, d, inv = _min_max_d(b, 31)
    q = np.trunc((b - lo[:, None]) * inv[:, None] + _F32(0.5)).astype(np.uint8)
    nib = _nibbles(q[:, :16], q[:, 16:])
    return np.concatenate([_f16_bytes(d), _f16_bytes(lo), _high_bits_u32(q), nib], axis=1)


def _q8_0(b: np.ndarray) -> np.ndarray:
    d = np.abs(b).max(axis=1) / _F32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, _F32(1) / d, _F32(0)).astype(_F32)
    v = b * inv[:, None]
    q = (np.sign(v) * np.floor(np.abs(v) + _F32(0.5))).astype(np.int8)  # roundf: half away
    return np.concatenate([_f16_bytes(d), q.view(np.uint8)], axis=1)


# ------------------------------------------------------------------------------- k-quants


def _qkx2(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """ggml's make_qkx2_quants on columns of 32 (x, w: (32, n)): (scale, -min, levels)
    minimising the weighted squared error of x ~ scale * L + min over nstep + 1 trial scales."""
    lo = np.minimum(x.min(axis=0), _F32(0))
    hi = x.max(axis=0)
    flat = hi == lo
    hi = np.where(flat, _F32(1), hi)  # flat rows are fixed up at the end
    sum_w, sum_x = _seq_sum(w), _seq_sum(w * x)
    iscale = _F32(nmax) / (hi - lo)
    scale = _F32(1) / iscale
    L = np.clip(_rint(iscale[None, :] * (x - lo[None, :])), 0, nmax)
    diff = (scale[None, :] * L + lo[None, :]) - x
    best = _seq_sum(w * (diff * diff))
    for step in range(nstep + 1):
        # as in ggml, a trial that wins moves `lo`, which the later trials start from
        iscale = (_F32(rmin) + _F32(rdelta) * _F32(step) + _F32(nmax)) / (hi - lo)
        la = np.clip(_rint(iscale[None, :] * (x - lo[None, :])), 0, nmax)
        wl = w * la
        sum_l, sum_l2, sum_xl = _seq_sum(wl), _seq_sum(wl * la), _seq_sum(wl * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        with np.errstate(divide="ignore", invalid="ignore"):
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            clamp = this_min > 0
            this_scale = np.where(clamp, sum_xl / sum_l2, this_scale)
        this_min = np.where(clamp, _F32(0), this_min)
        diff = (this_scale[None, :] * la + this_min[None, :]) - x
        err = _seq_sum(w * (diff * diff))
        better = (D > 0) & (err < best) & ~flat
        L = np.where(better[None, :], la, L)
        best = np.where(better, err, best)
        scale = np.where(better, this_scale, scale)
        lo = np.where(better, this_min, lo)
    L = np.where(flat[None, :], _F32(0), L)
    scale = np.where(flat, _F32(0), scale)
    return scale.astype(_F32), (-lo).astype(_F32), L


def _pack_scales_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """(n, 8) 6-bit scales and mins -> (n, 12) bytes (ggml's get_scale_min_k4 layout)."""
    ls, lm = ls.astype(np.uint8), lm.astype(np.uint8)
    out = np.zeros((ls.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    out[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:] & 15) | ((lm[:, 4:] & 15) << 4)
    return out


def _unpack_scales_k4(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, 12) bytes -> 6-bit scales and mins, each (n, 8)."""
    sc = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 15) | ((s[:, 0:4] >> 6) << 4)], axis=1)
    mn = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
    return sc, mn


def _qK_scaled(b: np.ndarray, nmax: int, rmin: float, nstep: int):
    """Shared part of q4_K / q5_K for blocks (n, 256): levels (n, 256), d, dmin, scale bytes."""
    n = b.shape[0]
    sub = np.ascontiguousarray(b.reshape(n * 8, 32).T)  # (32, n * 8)
    av = np.sqrt(_seq_sum(sub * sub) / _F32(32))
    w = av[None, :] + np.abs(sub)
    scales, mins, L = _qkx2(sub, w, nmax, rmin, 0.1, nstep)
    scales, mins, L = scales.reshape(n, 8), mins.reshape(n, 8), L.T.reshape(n, 8, 32)
    max_scale = np.maximum(scales.max(axis=1), _F32(0))
    max_min = np.maximum(mins.max(axis=1), _F32(0))
    with np.errstate(divide="ignore"):
        inv_s = np.where(max_scale > 0, _F32(63) / max_scale, _F32(0)).astype(_F32)
        inv_m = np.where(max_min > 0, _F32(63) / max_min, _F32(0)).astype(_F32)
    ls = np.minimum(63, _rint(inv_s[:, None] * scales))
    lm = np.minimum(63, _rint(inv_m[:, None] * mins))
    d16, dmin16 = _f16_bytes(max_scale / _F32(63)), _f16_bytes(max_min / _F32(63))
    d = _f16_value(d16)[:, None] * ls.astype(_F32)  # (n, 8)
    dm = _f16_value(dmin16)[:, None] * lm.astype(_F32)
    x = b.reshape(n, 8, 32)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.clip(_rint((x + dm[..., None]) / d[..., None]), 0, nmax)
    L = np.where((d != 0)[..., None], q, L).reshape(n, 256).astype(np.uint8)
    return L, d16, dmin16, _pack_scales_k4(ls, lm)


def _q4_K(b: np.ndarray) -> np.ndarray:
    L, d16, dmin16, sc = _qK_scaled(b, 15, -1.0, 20)
    L = L.reshape(-1, 4, 2, 32)  # 64-value groups: first 32 low nibbles, next 32 high
    qs = (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(-1, 128)
    return np.concatenate([d16, dmin16, sc, qs], axis=1)


def _q5_K(b: np.ndarray) -> np.ndarray:
    L, d16, dmin16, sc = _qK_scaled(b, 31, -0.5, 15)
    L = L.reshape(-1, 4, 2, 32)
    qs = ((L[:, :, 0] & 15) | ((L[:, :, 1] & 15) << 4)).reshape(-1, 128)
    bit = np.arange(8, dtype=np.uint8).reshape(4, 2)[None, :, :, None]  # group g, half h: 2g+h
    qh = np.bitwise_or.reduce(((L >> 4) & 1) << bit, axis=(1, 2)).astype(np.uint8)  # (n, 32)
    return np.concatenate([d16, dmin16, sc, qh, qs], axis=1)


def _qx(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """ggml's make_qx_quants (rmse_type 1, weights x^2) on columns of 16 (x: (16, n)):
    (scale, levels 0..2nmax)."""
    mx = _first_absmax(x.T)
    zero = np.abs(mx) < _F32(1e-15)
    mx = np.where(zero, _F32(1), mx)
    w = x * x

    def trial(iscale: np.ndarray):
        l_ = np.clip(_rint(iscale[None, :] * x), -nmax, nmax - 1)
        return l_, _seq_sum((w * x) * l_), _seq_sum((w * l_) * l_)

    iscale = _F32(-nmax) / mx
    lv, sumlx, suml2 = trial(iscale)
    L = lv + nmax
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(suml2 != 0, sumlx / suml2, _F32(0)).astype(_F32)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(_F32(nmax) + _F32(0.1) * _F32(step)) / mx
        lv, sumlx, suml2 = trial(iscale)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        L = np.where(better[None, :], lv + nmax, L)
        with np.errstate(divide="ignore", invalid="ignore"):
            scale = np.where(better, sumlx / suml2, scale)
        best = np.where(better, scale * sumlx, best)
    return np.where(zero, _F32(0), scale), np.where(zero[None, :], _F32(0), L)


def _q6_K(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    scales, L = _qx(np.ascontiguousarray(b.reshape(n * 16, 16).T), 32)
    scales, L = scales.reshape(n, 16), L.T.reshape(n, 16, 16)
    max_scale = _first_absmax(scales)
    zero = np.abs(max_scale) < _F32(1e-15)
    max_scale = np.where(zero, _F32(1), max_scale)
    iscale = _F32(-128) / max_scale
    d16 = _f16_bytes(np.where(zero, _F32(0), _F32(1) / iscale))
    sc = np.minimum(127, _rint(iscale[:, None] * scales)).astype(np.int8)  # (n, 16)
    d = _f16_value(d16)[:, None] * sc.astype(_F32)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.clip(_rint(b.reshape(n, 16, 16) / d[..., None]), -32, 31) + 32
    L = np.where((d != 0)[..., None], q, L).reshape(n, 2, 4, 32).astype(np.uint8)
    ql = np.concatenate(
        [L[:, :, 0] & 15 | (L[:, :, 2] & 15) << 4, L[:, :, 1] & 15 | (L[:, :, 3] & 15) << 4], 2
    ).reshape(n, 128)  # per 128-value half: 64 bytes
    qh = L[:, :, 0] >> 4 | (L[:, :, 1] >> 4) << 2 | (L[:, :, 2] >> 4) << 4 | (L[:, :, 3] >> 4) << 6
    out = np.concatenate([ql, qh.reshape(n, 64), sc.view(np.uint8), d16], axis=1)
    out[zero] = 0
    return out


_QUANTIZE = {
    GGML_Q4_0: _q4_0,
    GGML_Q4_1: _q4_1,
    GGML_Q5_0: _q5_0,
    GGML_Q5_1: _q5_1,
    GGML_Q8_0: _q8_0,
    GGML_Q4_K: _q4_K,
    GGML_Q5_K: _q5_K,
    GGML_Q6_K: _q6_K,
}


def quantize(x: np.ndarray, ggml_type: int) -> np.ndarray:
    """float array (..., n), n a multiple of the block size -> raw bytes (uint8, (..., bytes))."""
    qk, size = BLOCKS[ggml_type]
    if x.shape[-1] % qk:
        raise ValueError(f"{TYPE_NAMES[ggml_type]} needs rows of a multiple of {qk} values")
    flat = np.ascontiguousarray(x, dtype=_F32).reshape(-1)
    step = max(qk, _CHUNK // qk * qk)
    out = [
        _QUANTIZE[ggml_type](flat[i : i + step].reshape(-1, qk)) for i in range(0, flat.size, step)
    ]
    raw = np.concatenate(out, axis=0) if out else np.zeros((0, size), np.uint8)
    return raw.reshape(*x.shape[:-1], x.shape[-1] // qk * size)


# ----------------------------------------------------------------------------- dequantize


def _dq_32(raw: np.ndarray, t: int) -> np.ndarray:
    d = _f16_value(raw[:, 0:2])[:, None]
    if t == GGML_Q8_0:
        return d * raw[:, 2:].view(np.int8).astype(_F32)
    has_min = t in (GGML_Q4_1, GGML_Q5_1)
    pos = 4 if has_min else 2
    high = np.zeros((raw.shape[0], 32), np.uint8)
    if t in (GGML_Q5_0, GGML_Q5_1):
        u = np.ascontiguousarray(raw[:, pos : pos + 4]).view("<u4")  # (n, 1)
        high = (((u >> np.arange(32, dtype=np.uint32)) & 1) << 4).astype(np.uint8)
        pos += 4
    nib = raw[:, pos : pos + 16]
    q = (np.concatenate([nib & 15, nib >> 4], axis=1) | high).astype(_F32)
    if has_min:
        return d * q + _f16_value(raw[:, 2:4])[:, None]
    return d * (q - _F32(16 if t == GGML_Q5_0 else 8))


def _dq_k(raw: np.ndarray, t: int) -> np.ndarray:
    n = raw.shape[0]
    if t == GGML_Q6_K:
        ql, qh = raw[:, :128].reshape(n, 2, 64), raw[:, 128:192].reshape(n, 2, 32)
        sc = raw[:, 192:208].view(np.int8).astype(_F32).reshape(n, 16, 1)
        lo = np.stack(
            [ql[:, :, :32] & 15, ql[:, :, 32:] & 15, ql[:, :, :32] >> 4, ql[:, :, 32:] >> 4], 2
        )
        hi = np.stack([(qh >> s) & 3 for s in (0, 2, 4, 6)], axis=2)
        q = (lo | (hi << 4)).astype(_F32).reshape(n, 16, 16) - _F32(32)
        d = _f16_value(raw[:, 208:210]).reshape(n, 1, 1)
        return (d * sc * q).reshape(n, 256)
    d, dmin = _f16_value(raw[:, 0:2])[:, None], _f16_value(raw[:, 2:4])[:, None]
    sc, mn = _unpack_scales_k4(raw[:, 4:16])
    qs = raw[:, -128:].reshape(n, 4, 32)
    q = np.stack([qs & 15, qs >> 4], axis=2)  # (n, 4, 2, 32)
    if t == GGML_Q5_K:
        qh = raw[:, 16:48].reshape(n, 1, 1, 32)
        bit = np.arange(8, dtype=np.uint8).reshape(1, 4, 2, 1)
        q = q | (((qh >> bit) & 1) << 4)
    q = q.reshape(n, 8, 32).astype(_F32)
    return ((d * sc)[..., None] * q - (dmin * mn)[..., None]).reshape(n, 256)


def dequantize(raw: np.ndarray, ggml_type: int, shape: tuple[int, ...]) -> np.ndarray:
    """Raw bytes of `ggml_type` -> float32 array of `shape` (NumPy order)."""
    qk, size = BLOCKS[ggml_type]
    blocks = np.asarray(raw, dtype=np.uint8).reshape(-1, size)
    if qk == QK_K:
        return _dq_k(blocks, ggml_type).reshape(shape)
    return _dq_32(blocks, ggml_type).reshape(shape)
