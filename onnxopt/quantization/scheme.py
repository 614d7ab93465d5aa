"""Integer quantization arithmetic: schemes, ranges, scales, and quantizing values.

Conventions (ONNX QuantizeLinear): q = saturate(round(x / scale) + zero_point), and
DequantizeLinear gives (q - zero_point) * scale. Rounding is half to even, as in ONNX.
Every pass that quantizes (static, dynamic, weight-only, and the passes that correct
quantization error) uses these functions; ``quantize_weight`` is the one weight quantizer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx

logger = logging.getLogger(__name__)

# Integer types a QuantizeLinear may produce, with their ONNX element types and the
# default-domain opset that first allows them in QuantizeLinear/DequantizeLinear.
QUANT_DTYPES = {
    "uint8": (np.uint8, onnx.TensorProto.UINT8, 10),
    "int8": (np.int8, onnx.TensorProto.INT8, 10),
    "uint16": (np.uint16, onnx.TensorProto.UINT16, 21),
    "int16": (np.int16, onnx.TensorProto.INT16, 21),
    "int32": (np.int32, onnx.TensorProto.INT32, 10),  # bias only (DequantizeLinear)
}

# QuantizeLinear/DequantizeLinear take an `axis` (per-channel) from opset 13.
PER_CHANNEL_OPSET = 13

FLOAT_DTYPES = (np.float32,)


@dataclass(frozen=True)
class QuantScheme:
    """How one kind of tensor is quantized (one entry of a target's [quantization.schemes])."""

    dtype: str = "int8"  # uint8 | int8 | uint16 | int16
    symmetric: bool = True
    granularity: str = "per_channel"  # per_channel | per_tensor (hyphens accepted)
    reduce_range: bool = False  # one bit less (7-bit weights; avoids int16 overflow on AVX2)

    @property
    def per_channel(self) -> bool:
        return self.granularity.replace("-", "_") == "per_channel"

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(QUANT_DTYPES[self.dtype][0])

    @property
    def min_opset(self) -> int:
        return QUANT_DTYPES[self.dtype][2]


def scheme_from_table(table: dict | None, fallback: QuantScheme) -> QuantScheme:
    """A QuantScheme from a target's scheme table (missing keys keep ``fallback``'s)."""
    if not table:
        return fallback
    return QuantScheme(
        dtype=table.get("dtype", fallback.dtype),
        symmetric=table.get("symmetric", fallback.symmetric),
        granularity=table.get("granularity", fallback.granularity),
        reduce_range=table.get("reduce_range", fallback.reduce_range),
    )


def qrange(dtype: str, symmetric: bool, reduce_range: bool = False) -> tuple[int, int]:
    """The integer range a scheme uses. Symmetric signed types drop the lowest value
    (-127..127 for int8) so that zero is exactly in the middle, as TensorRT does."""
    info = np.iinfo(QUANT_DTYPES[dtype][0])
    qmin, qmax = int(info.min), int(info.max)
    if reduce_range:
        bits = info.bits - 1
        if qmin < 0:
            qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        else:
            qmin, qmax = 0, 2 ** bits - 1
    if symmetric and qmin < 0:
        qmin = -qmax
    return qmin, qmax


def scale_zero_point(lo, hi, scheme: QuantScheme) -> tuple[np.ndarray, np.ndarray]:
    """Scale (float32) and zero point (scheme dtype) covering [lo, hi] (arrays broadcast).

    The range is widened to include 0 so that 0 is exactly representable (padding, ReLU).
    Symmetric: scale = max|.| / qmax, zero point = 0 (unsigned types: the middle value).
    Asymmetric: scale = (hi - lo) / (qmax - qmin), zero point = round(qmin - lo / scale).
    A zero range gets scale 1 (any scale is exact for an all-zero tensor).
    """
    lo = np.minimum(np.asarray(lo, dtype=np.float64), 0.0)
    hi = np.maximum(np.asarray(hi, dtype=np.float64), 0.0)
    qmin, qmax = qrange(scheme.dtype, scheme.symmetric, scheme.reduce_range)
    if scheme.symmetric:
        absmax = np.maximum(-lo, hi)
        if qmin < 0:
            scale = absmax / qmax
            zp = np.zeros_like(scale)
        else:  # unsigned symmetric: zero point in the middle of the range
            half = (qmax - qmin) // 2
            scale = absmax / max(qmax - qmin - half, 1)
            zp = np.full_like(scale, qmin + half)
    else:
        scale = (hi - lo) / (qmax - qmin)
        safe = np.where(scale > 0, scale, 1.0)
        zp = np.clip(np.round(qmin - lo / safe), qmin, qmax)
    scale = np.where(scale > 0, scale, 1.0)
    scale = np.maximum(scale, np.finfo(np.float32).tiny)
    return np.asarray(scale, np.float32), np.asarray(zp).astype(scheme.np_dtype)


def quantize_values(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, dtype: str,
                    axis: int | None = None, qmin: int | None = None, qmax: int | None = None) -> np.ndarray:
    """ONNX QuantizeLinear in numpy (per-tensor, or per-channel along ``axis``)."""
    x = np.asarray(x, dtype=np.float32)
    scale = np.asarray(scale, dtype=np.float32)
    zp = np.asarray(zero_point).astype(np.float64)
    if axis is not None and scale.ndim == 1:
        shape = [1] * x.ndim
        shape[axis] = -1
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    info = np.iinfo(QUANT_DTYPES[dtype][0])
    lo = info.min if qmin is None else qmin
    hi = info.max if qmax is None else qmax
    q = np.clip(np.rint(x.astype(np.float64) / scale.astype(np.float64)) + zp, lo, hi)
    return q.astype(QUANT_DTYPES[dtype][0])


# -- weights -------------------------------------------------------------------------------
def quantize_weight(w: np.ndarray, scheme: QuantScheme, axis: int | None):
    """(q, scale, zero_point, axis_used) for a float weight; per-channel along ``axis``
    when the scheme says so and an axis exists, per-tensor otherwise."""
    w = np.asarray(w, dtype=np.float32)
    if scheme.per_channel and axis is not None and w.ndim >= 1 and w.shape[axis] > 1:
        reduce_axes = tuple(i for i in range(w.ndim) if i != axis)
        lo = w.min(axis=reduce_axes) if w.size else np.zeros(w.shape[axis], np.float32)
        hi = w.max(axis=reduce_axes) if w.size else np.zeros(w.shape[axis], np.float32)
        used = axis
    else:
        lo = np.float32(w.min()) if w.size else np.float32(0)
        hi = np.float32(w.max()) if w.size else np.float32(0)
        used = None
    scale, zp = scale_zero_point(lo, hi, scheme)
    qmin, qmax = qrange(scheme.dtype, scheme.symmetric, scheme.reduce_range)
    q = quantize_values(w, scale, zp, scheme.dtype, used, qmin, qmax)
    return q, scale, zp, used


def quantize_bias(b: np.ndarray, input_scale: float, weight_scale: np.ndarray):
    """Bias as int32 with scale input_scale * weight_scale and zero point 0."""
    scale = (np.float64(input_scale) * np.asarray(weight_scale, dtype=np.float64)).astype(np.float32)
    scale = np.maximum(scale, np.finfo(np.float32).tiny)
    if scale.ndim == 0 or scale.size == 1:
        scale = np.full(np.asarray(b).shape, float(np.ravel(scale)[0]), np.float32)
    info = np.iinfo(np.int32)
    q = np.clip(np.rint(np.asarray(b, np.float64) / scale.astype(np.float64)), info.min, info.max).astype(np.int32)
    return q, scale, np.zeros(q.shape, np.int32)


# -- the target's schemes ---------------------------------------------------------------------------
def target_schemes(target) -> tuple[QuantScheme, QuantScheme]:
    """(activation scheme, weight scheme) named by the target's [quantization] table."""
    q = target.quantization
    schemes = q.get("schemes", {}) or {}
    act = scheme_from_table(schemes.get(q.get("activations", "")), QuantScheme("uint8", False, "per_tensor"))
    wt = scheme_from_table(schemes.get(q.get("weights", "")), QuantScheme("int8", True, "per_channel"))
    return act, wt


REDUCE_RANGE_CHOICES = ("target", "on", "off", "auto")
REDUCE_RANGE_HELP = ("7-bit weights: target (the target's weight scheme decides), on, off, or auto (probe "
                     "this machine: on for uint8 x int8 on an x86 CPU without VNNI, whose dot products "
                     "saturate int16; the report and the model's metadata say what was found)")


def reduce_range_choice(option: str, weights: QuantScheme, u8s8: bool, ctx) -> tuple[bool, str]:
    """(7-bit weights or not, why): the option, else the target's weight scheme; ``auto``
    probes this machine and records what it found and chose in ``ctx.metadata``."""
    if option in ("on", "off"):
        return option == "on", "option"
    if option != "auto":
        return weights.reduce_range, "target"
    from onnxopt.hardware import cpu_has_vnni, describe_cpu

    chosen = u8s8 and not cpu_has_vnni()
    why = f"auto: {describe_cpu()}" + ("" if u8s8 else ", not uint8 x int8")
    ctx.metadata["reduce_range"] = f"{'on' if chosen else 'off'} ({why})"
    return chosen, why


# -- packing sub-byte codes ---------------------------------------------------------------------
def pack_low_first(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned codes along the last axis into uint8, lowest bits first.

    4-bit: element 2i in the low nibble, 2i+1 in the high one; an odd count gets a zero
    high nibble in the last byte.
    """
    codes = np.asarray(codes).astype(np.uint8)
    if bits == 8:
        return codes
    if bits != 4:
        raise ValueError(f"cannot pack {bits}-bit codes")
    if codes.shape[-1] % 2:
        codes = np.concatenate([codes, np.zeros(codes.shape[:-1] + (1,), np.uint8)], axis=-1)
    return (codes[..., 0::2] & 0x0F) | ((codes[..., 1::2] & 0x0F) << 4)


def unpack_low_first(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of pack_low_first."""
    if bits == 8:
        return packed[..., :count]
    out = np.empty(packed.shape[:-1] + (packed.shape[-1] * 2,), np.uint8)
    out[..., 0::2] = packed & 0x0F
    out[..., 1::2] = packed >> 4
    return out[..., :count]
