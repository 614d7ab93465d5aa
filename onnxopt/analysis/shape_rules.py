"""Per-op rules of the symbolic shape analysis: output shapes, dtypes and small integer values.

A rule reads one node through a ``View`` (its inputs' shapes, dtypes and, for small int and
bool tensors, values; its attributes; the opset) and returns one ``(shape, dtype, value)``
per output, or None when it cannot say (the analysis then asks onnx's own inference of
that one node). A shape is a tuple of dims (``onnxopt.analysis.dims``: int or Sym) or None
(rank unknown); a value is a tuple of dims, one per element, for int/bool tensors of rank
0 or 1 with at most ``MAX_VALUE`` elements (rank >= 2 is never tracked: onnxsim #1284 folded
a rank-2 value as if it were flat), else None.

Rules never read declared shapes (value_info, graph outputs): exporters write wrong ones.
They follow the ONNX operator definitions, including the opset in which an attribute
became an input (Squeeze/Unsqueeze/ReduceSum/Split at 13, Reduce* at 18, Slice at 10, Pad
at 11, Shape start/end at 15, ...). What a rule cannot decide it leaves unknown or makes a
fresh symbol, never a guess.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from onnxopt.analysis import dims as D
from onnxopt.analysis.dims import Dim

MAX_VALUE = 64  # longest rank-1 int tensor whose elements are tracked

BOOL = np.dtype(np.bool_)
INT64 = np.dtype(np.int64)
INT32 = np.dtype(np.int32)
FLOAT = np.dtype(np.float32)

Out = tuple  # (shape | None, dtype | None, value | None)


class View:
    """What a rule may read about one node (implemented by the analysis)."""

    node: Any
    op: str
    opset: int

    def has(self, i: int) -> bool: ...
    def shape(self, i: int) -> tuple | None: ...
    def dtype(self, i: int) -> np.dtype | None: ...
    def value(self, i: int) -> tuple | None: ...
    def array(self, i: int) -> np.ndarray | None: ...  # a small constant's value, any dtype
    def attr(self, name: str, default=None): ...

    @property
    def n_out(self) -> int: ...

    # -- derived ------------------------------------------------------------------------
    def rank(self, i: int) -> int | None:
        s = self.shape(i)
        return None if s is None else len(s)

    def ints(self, i: int) -> list[int] | None:
        """A constant-valued int input as a list of Python ints (scalars give one element)."""
        if not self.has(i):
            return None
        v = self.value(i)
        if v is not None and all(type(x) is int for x in v):
            return list(v)
        return None

    def floats(self, i: int) -> list[float] | None:
        a = self.array(i) if self.has(i) else None
        if a is None or a.dtype.kind not in "fiu":
            return None
        return [float(x) for x in a.reshape(-1)]


# --------------------------------------------------------------------------- helpers
def _norm_axis(axis: int, rank: int) -> int | None:
    a = axis + rank if axis < 0 else axis
    return a if 0 <= a < rank else None


def broadcast(*shapes: tuple) -> tuple | None:
    """Multidirectional broadcast of known shapes; None if a rank is unknown or shapes clash."""
    if any(s is None for s in shapes):
        return None
    rank = max((len(s) for s in shapes), default=0)
    out = []
    for k in range(rank):
        dims = [s[len(s) - rank + k] for s in shapes if len(s) - rank + k >= 0]
        result: Dim = 1
        for d in dims:
            result = _broadcast_dim(result, d)
            if result is None:
                return None
        out.append(result)
    return tuple(out)


def _broadcast_dim(a: Dim, b: Dim) -> Dim | None:
    if a == 1:
        return b
    if b == 1 or a == b:
        return a
    if type(a) is int and type(b) is int:
        return None  # incompatible: an invalid model
    if type(a) is int:
        return a  # b must be 1 or a in a valid model
    if type(b) is int:
        return b
    for x, y in ((a, b), (b, a)):
        # x against min(k, x), k > 1 (x[:, :seq] of a table of k rows): when x > k neither
        # is 1 and they differ, an invalid model; so the result is x
        args = D.min_args(y)
        if args is not None and x in args:
            k = args[1] if args[0] == x else args[0]
            if type(k) is int and k > 1:
                return x
    first, second = sorted((str(a), str(b)))
    return D.opaque(f"bcast({first}, {second})", True)


def _value_ok(shape: tuple | None, value) -> tuple | None:
    if value is None or shape is None or len(shape) > 1:
        return None
    return tuple(value)


def _elementwise_values(values: list, shapes: list, fn: Callable) -> tuple | None:
    """Apply ``fn`` elementwise to rank <= 1 values with broadcasting."""
    if any(v is None for v in values) or any(s is None or len(s) > 1 for s in shapes):
        return None
    n = max(len(v) for v in values)
    if any(len(v) not in (1, n) for v in values):
        return None
    try:
        return tuple(fn(*[v[i] if len(v) > 1 else v[0] for v in values]) for i in range(n))
    except (ZeroDivisionError, _Undecided):
        return None


class _Undecided(Exception):
    pass


def _decided(x):
    if x is None:
        raise _Undecided
    return x


# --------------------------------------------------------------------------- rule table
RULES: dict[str, Callable[[View], list[Out] | None]] = {}


def rule(*ops: str):
    def decorate(fn):
        for op in ops:
            RULES[op] = fn
        return fn
    return decorate


SAME_SHAPE = (
    "Abs", "Acos", "Acosh", "Asin", "Asinh", "Atan", "Atanh", "BitwiseNot", "Ceil", "Celu", "Cos",
    "Cosh", "Elu", "Erf", "Exp", "Floor", "Gelu", "HardSigmoid", "HardSwish", "Hardmax", "Identity",
    "LeakyRelu", "Log", "LogSoftmax", "Mish", "Neg", "Reciprocal", "Relu", "Round", "Selu",
    "Shrink", "Sigmoid", "Sign", "Sin", "Sinh", "Softmax", "Softplus", "Softsign", "Sqrt", "Tan",
    "Tanh", "ThresholdedRelu", "Clip", "CumSum", "Trilu", "LRN", "MeanVarianceNormalization",
    "InstanceNormalization", "LpNormalization", "Dropout", "BatchNormalization",
    "LayerNormalization", "GroupNormalization", "Swish",
)


@rule(*SAME_SHAPE)
def _same_shape(v: View):
    s, dt = v.shape(0), v.dtype(0)
    value = None
    if v.op == "Identity":
        value = v.value(0)
    elif v.op == "Neg":
        x = v.value(0)
        value = None if x is None else tuple(D.neg(a) for a in x)
    elif v.op == "Abs":
        x = v.value(0)
        if x is not None and all(D.nonneg(a) or type(a) is int for a in x):
            value = tuple(abs(a) if type(a) is int else a for a in x)
    outs = [(s, dt, value)]
    if v.op == "Dropout":
        outs.append((s, BOOL, None))
    elif v.op == "BatchNormalization":
        c = (s[1],) if s is not None and len(s) > 1 else None
        outs += [(c, dt, None)] * 4
    elif v.op == "LayerNormalization":
        axis = v.attr("axis", -1)
        stash = v.attr("stash_type", 1)
        red = None
        if s is not None:
            a = _norm_axis(axis, len(s))
            if a is not None:
                red = s[:a] + (1,) * (len(s) - a)
        stash_dt = FLOAT if stash == 1 else None
        outs += [(red, stash_dt, None)] * 2
    return outs[:max(v.n_out, 1)]


@rule("Not")
def _not(v: View):
    x = v.value(0)
    value = tuple(int(not a) for a in x) if x is not None and all(type(a) is int for a in x) else None
    return [(v.shape(0), BOOL, value)]


@rule("IsNaN", "IsInf")
def _is_nan(v: View):
    return [(v.shape(0), BOOL, None)]


_ARITH = {
    "Add": D.add, "Sub": D.sub, "Mul": D.mul, "Div": D.trunc_div, "Mod": D.mod,
}


@rule("Add", "Sub", "Mul", "Div", "Mod", "Pow", "PRelu", "BitShift", "BitwiseAnd", "BitwiseOr",
      "BitwiseXor")
def _binary(v: View):
    shapes = [v.shape(0), v.shape(1)]
    s = broadcast(*shapes)
    dt = v.dtype(0)
    value = None
    fn = _ARITH.get(v.op)
    if fn is not None and dt is not None and dt.kind in "iu" and s is not None and len(s) <= 1:
        if v.op != "Mod" or not v.attr("fmod", 0):
            value = _elementwise_values([v.value(0), v.value(1)], shapes, fn)
    return [(s, dt, _value_ok(s, value))]


_COMPARE = {
    "Equal": lambda a, b: int(_decided(D.equal(a, b))),
    "Less": lambda a, b: int(_decided(D.compare(a, b)) < 0),
    "Greater": lambda a, b: int(_decided(D.compare(a, b)) > 0),
    "LessOrEqual": lambda a, b: int(_decided(D.compare(a, b)) <= 0),
    "GreaterOrEqual": lambda a, b: int(_decided(D.compare(a, b)) >= 0),
    "And": lambda a, b: int(bool(a) and bool(b)),
    "Or": lambda a, b: int(bool(a) or bool(b)),
    "Xor": lambda a, b: int(bool(a) != bool(b)),
}


@rule("Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor")
def _compare(v: View):
    shapes = [v.shape(0), v.shape(1)]
    s = broadcast(*shapes)
    value = None
    dt = v.dtype(0)
    if s is not None and len(s) <= 1 and dt is not None and dt.kind in "iub":
        a, b = v.value(0), v.value(1)
        if v.op in ("And", "Or", "Xor") and not all(type(x) is int for x in (a or ()) + (b or ())):
            a = None
        value = _elementwise_values([a, b], shapes, _COMPARE[v.op])
    return [(s, BOOL, _value_ok(s, value))]


@rule("Max", "Min", "Sum", "Mean")
def _variadic(v: View):
    n = len(v.node.inputs)
    shapes = [v.shape(i) for i in range(n)]
    s = broadcast(*shapes)
    dt = v.dtype(0)
    value = None
    if v.op in ("Max", "Min", "Sum") and dt is not None and dt.kind in "iu" and s is not None and len(s) <= 1:
        fn = {"Max": D.maximum, "Min": D.minimum, "Sum": D.add}[v.op]
        values = [v.value(i) for i in range(n)]

        def combine(*xs):
            out = xs[0]
            for x in xs[1:]:
                out = fn(out, x)
            return out
        value = _elementwise_values(values, shapes, combine)
    return [(s, dt, _value_ok(s, value))]


@rule("Where")
def _where(v: View):
    shapes = [v.shape(0), v.shape(1), v.shape(2)]
    s = broadcast(*shapes)
    dt = v.dtype(1) or v.dtype(2)
    value = None
    if s is not None and len(s) <= 1:
        value = _elementwise_values([v.value(0), v.value(1), v.value(2)], shapes,
                                    lambda c, a, b: (a if c else b) if type(c) is int else _decided(None))
    return [(s, dt, _value_ok(s, value))]


@rule("Cast")
def _cast(v: View):
    from onnxopt.analysis.shapes import np_dtype

    to = np_dtype(v.attr("to"))
    x, src = v.value(0), v.dtype(0)
    value = None
    if x is not None and to is not None and src is not None and src.kind in "iub":
        if to.kind in "iu":
            info = np.iinfo(to)
            # a symbolic element is a dim (or a product of dims): it fits int32 and int64
            if all(info.min <= a <= info.max if type(a) is int else to.itemsize >= 4 for a in x):
                value = x
        elif to == BOOL and all(type(a) is int for a in x):
            value = tuple(int(bool(a)) for a in x)
    return [(v.shape(0), to, value)]


@rule("CastLike")
def _cast_like(v: View):
    return [(v.shape(0), v.dtype(1), None)]


@rule("Shape")
def _shape_op(v: View):
    s = v.shape(0)
    if s is None:
        return [(None, INT64, None)]
    rank = len(s)
    start, end = v.attr("start", 0), v.attr("end", None)

    def clamp(x, default):
        if x is None:
            return default
        x = x + rank if x < 0 else x
        return min(max(x, 0), rank)
    dims = s[clamp(start, 0):clamp(end, rank)]
    return [((len(dims),), INT64, dims if len(dims) <= MAX_VALUE else None)]


@rule("Size")
def _size(v: View):
    s = v.shape(0)
    return [((), INT64, None if s is None else (D.product(s),))]


def _reshape_dims(data: tuple | None, target: tuple, allowzero: int) -> tuple | None:
    """Output dims of Reshape(data, target) with symbolic entries (ints may be 0 or -1)."""
    out: list = []
    infer = None
    for i, t in enumerate(target):
        if type(t) is int and t == -1:
            if infer is not None:
                return None
            infer = i
            out.append(None)
        elif type(t) is int and t == 0 and not allowzero:
            if data is None or i >= len(data):
                return None
            out.append(data[i])
        elif type(t) is int and t < -1:
            return None
        elif type(t) is int or D.nonneg(t):
            out.append(t)
        else:
            return None  # an entry that may be 0 or -1 at run time
    if infer is not None:
        if data is None:
            out[infer] = D.fresh()
        else:
            known = D.product(d for d in out if d is not None)
            total = D.product(data)
            q = D.exact_div(total, known)
            out[infer] = q if q is not None else D.opaque(f"({total})/({known})", True)
    return tuple(out)


@rule("Reshape")
def _reshape(v: View):
    target = v.value(1)
    tshape = v.shape(1)
    data, dt = v.shape(0), v.dtype(0)
    if target is None:
        if tshape is not None and len(tshape) == 1 and type(tshape[0]) is int:
            return [(tuple(D.fresh() for _ in range(tshape[0])), dt, None)]
        return [(None, dt, None)]
    out = _reshape_dims(data, target, v.attr("allowzero", 0))
    if out is None:
        return [(tuple(D.fresh() for _ in target), dt, None)]
    value = v.value(0)
    if value is None or len(out) > 1 or len(value) != (out[0] if out else 1):
        value = None
    return [(out, dt, value)]


@rule("Flatten")
def _flatten(v: View):
    s, dt = v.shape(0), v.dtype(0)
    if s is None:
        return [((D.fresh(), D.fresh()), dt, None)]
    axis = v.attr("axis", 1)
    a = axis + len(s) if axis < 0 else axis
    if not 0 <= a <= len(s):
        return None
    return [((D.product(s[:a]), D.product(s[a:])), dt, None)]


def _axes(v: View, attr_before: int, index: int = 1) -> tuple[list[int] | None, bool]:
    """(axes, given): the ``axes`` attribute below opset ``attr_before``, else input ``index``."""
    if v.opset < attr_before:
        axes = v.attr("axes")
        return (None, False) if axes is None else (list(axes), True)
    if not v.has(index):
        return None, False
    axes = v.ints(index)
    return (axes, True) if axes is not None else (None, True)


@rule("Squeeze")
def _squeeze(v: View):
    s, dt = v.shape(0), v.dtype(0)
    axes, given = _axes(v, 13)
    if s is None or (given and axes is None):
        return [(None, dt, None)]
    rank = len(s)
    if not given:
        if not all(type(d) is int for d in s):
            return [(None, dt, None)]  # which dims are 1 is unknown
        out = tuple(d for d in s if d != 1)
    else:
        norm = {_norm_axis(a, rank) for a in axes}
        if None in norm:
            return None
        out = tuple(d for i, d in enumerate(s) if i not in norm)
    value = v.value(0)
    value = value if value is not None and len(out) <= 1 else None
    return [(out, dt, value)]


@rule("Unsqueeze")
def _unsqueeze(v: View):
    s, dt = v.shape(0), v.dtype(0)
    axes, given = _axes(v, 13)
    if s is None or axes is None:
        return [(None, dt, None)]
    rank = len(s) + len(axes)
    norm = sorted(_norm_axis(a, rank) if _norm_axis(a, rank) is not None else -1 for a in axes)
    if -1 in norm or len(set(norm)) != len(norm):
        return None
    out, it = [], iter(s)
    for i in range(rank):
        out.append(1 if i in norm else next(it))
    value = v.value(0)
    value = value if value is not None and rank <= 1 else None
    return [(tuple(out), dt, value)]


@rule("Transpose")
def _transpose(v: View):
    s, dt = v.shape(0), v.dtype(0)
    perm = v.attr("perm")
    if s is None:
        return [(None if perm is None else tuple(D.fresh() for _ in perm), dt, None)]
    if perm is None:
        perm = list(range(len(s)))[::-1]
    if sorted(perm) != list(range(len(s))):
        return None
    return [(tuple(s[p] for p in perm), dt, v.value(0) if len(s) <= 1 else None)]


@rule("Concat")
def _concat(v: View):
    present = [i for i in range(len(v.node.inputs)) if v.has(i)]
    shapes = [v.shape(i) for i in present]
    dt = next((v.dtype(i) for i in present if v.dtype(i) is not None), None)
    if not shapes or any(s is None for s in shapes):
        rank = next((len(s) for s in shapes if s is not None), None)
        return [(None if rank is None else tuple(D.fresh() for _ in range(rank)), dt, None)]
    rank = len(shapes[0])
    axis = _norm_axis(v.attr("axis", 0), rank) if rank else None
    if axis is None or any(len(s) != rank for s in shapes):
        return None
    out = []
    for k in range(rank):
        if k == axis:
            total: Dim = 0
            for s in shapes:
                total = D.add(total, s[k])
            out.append(total)
        else:  # equal in a valid model: a static size is the better name for it
            out.append(next((s[k] for s in shapes if type(s[k]) is int), shapes[0][k]))
    value = None
    if rank == 1:
        values = [v.value(i) for i in present]
        if all(x is not None for x in values):
            value = tuple(e for x in values for e in x)
            value = value if len(value) <= MAX_VALUE else None
    return [(tuple(out), dt, value)]


@rule("Split")
def _split(v: View):
    s, dt = v.shape(0), v.dtype(0)
    n = v.n_out
    if s is None:
        return [(None, dt, None)] * n
    axis = _norm_axis(v.attr("axis", 0), len(s))
    if axis is None:
        return None
    if v.opset < 13:
        sizes = v.attr("split")
        sizes = list(sizes) if sizes is not None else None
    elif v.has(1):
        sizes = v.value(1)
        if sizes is None:
            return [(tuple(D.fresh() if k == axis else d for k, d in enumerate(s)), dt, None)] * n
    else:
        sizes = None
    dim = s[axis]
    if sizes is None:
        num = v.attr("num_outputs", None) if v.opset >= 18 else None
        if type(dim) is int:
            if num is not None:  # ceil-sized parts, the last one smaller
                chunk = -(-dim // num)
                sizes = [min(chunk, max(dim - chunk * i, 0)) for i in range(num)]
            elif dim % n == 0:
                sizes = [dim // n] * n
            else:
                return None
        else:
            part = D.exact_div(dim, n) if num is None else None
            sizes = [part if part is not None else D.fresh() for _ in range(n)]
    if len(sizes) != n:
        return None
    return [(tuple(size if k == axis else d for k, d in enumerate(s)), dt, None) for size in sizes]


def _slice_params(v: View, rank: int):
    """(starts, ends, axes, steps) as int lists, or None when not constant."""
    if v.opset < 10:
        starts, ends = v.attr("starts"), v.attr("ends")
        axes = v.attr("axes")
        steps = None
    else:
        starts, ends = v.ints(1), v.ints(2)
        axes = v.ints(3) if v.has(3) else None
        if v.has(3) and axes is None:
            return None
        steps = v.ints(4) if v.has(4) else None
        if v.has(4) and steps is None:
            return None
    if (starts is None or ends is None) and v.opset >= 10:
        starts, ends = v.value(1), v.value(2)  # symbolic bounds: the sliced axes alone are unknown
    if starts is None or ends is None or len(starts) != len(ends):
        return None
    axes = list(axes) if axes is not None else list(range(len(starts)))
    steps = list(steps) if steps is not None else [1] * len(starts)
    if len(axes) != len(starts) or len(steps) != len(starts) or 0 in steps:
        return None
    norm = [_norm_axis(a, rank) for a in axes]
    if None in norm or len(set(norm)) != len(norm):
        return None
    return list(starts), list(ends), norm, steps


def slice_range(dim: int, start: int, end: int, step: int) -> range:
    """The indices ONNX Slice takes from an axis of size ``dim`` (its clamping, which
    differs from Python's for a negative step and a start below -dim: ONNX clamps the
    start to 0, Python's slice makes the range empty)."""
    if start < 0:
        start += dim
    if end < 0:
        end += dim
    if step > 0:
        start, end = min(max(start, 0), dim), min(max(end, 0), dim)
    else:
        start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
    return range(start, end, step)


def _symbolic_slice_dim(dim: Dim, start: Dim, end: Dim, step: int) -> Dim | None:
    """dim[start:end] for a symbolic bound: only the plain x[:n] (n a dim, step 1)."""
    if start == 0 and step == 1 and type(end) is not int and D.nonneg(end):
        return D.minimum(dim, end)
    return None


def _slice_dim(dim: Dim, start: int, end: int, step: int) -> Dim | None:
    """Length of dim[start:end:step] (ONNX clamping), symbolic where it can be."""
    if type(dim) is int:
        return len(slice_range(dim, start, end, step))
    big = 1 << 62
    if step == 1 and start >= 0 and end >= big:
        return D.sub(dim, start) if start == 0 else D.opaque(f"slice({dim}, {start}:)", True)
    if step == 1 and start == 0 and end >= 0:
        return D.minimum(dim, end) if end < big else dim
    if step == 1 and start < 0 and end >= big:
        return D.minimum(dim, -start)
    return None


@rule("Slice")
def _slice(v: View):
    s, dt = v.shape(0), v.dtype(0)
    if s is None:
        return [(None, dt, None)]
    params = _slice_params(v, len(s))
    if params is None:
        return [(tuple(D.fresh() for _ in s), dt, None)]
    starts, ends, axes, steps = params
    out = list(s)
    for st, en, ax, sp in zip(starts, ends, axes, steps):
        d = _slice_dim(s[ax], st, en, sp) if type(st) is int and type(en) is int else \
            _symbolic_slice_dim(s[ax], st, en, sp)
        out[ax] = d if d is not None else D.fresh()
    value = None
    x = v.value(0)
    if x is not None and len(s) == 1 and axes == [0] and type(starts[0]) is int and type(ends[0]) is int:
        value = tuple(x[i] for i in slice_range(len(x), starts[0], ends[0], steps[0]))
        if len(value) != out[0]:
            value = None
    return [(tuple(out), dt, value)]


@rule("Gather")
def _gather(v: View):
    s, dt, idx_shape = v.shape(0), v.dtype(0), v.shape(1)
    if s is None or idx_shape is None:
        return [(None, dt, None)]
    axis = _norm_axis(v.attr("axis", 0), len(s))
    if axis is None:
        return None
    out = s[:axis] + tuple(idx_shape) + s[axis + 1:]
    value = None
    x, idx = v.value(0), v.ints(1)
    if x is not None and idx is not None and len(s) == 1 and len(idx_shape) <= 1:
        n = len(x)
        if all(-n <= i < n for i in idx):
            value = tuple(x[i] for i in idx)
    return [(out, dt, value)]


@rule("GatherElements")
def _gather_elements(v: View):
    return [(v.shape(1), v.dtype(0), None)]


@rule("ScatterND", "ScatterElements", "Scatter")
def _scatter(v: View):
    return [(v.shape(0), v.dtype(0), None)]


@rule("Expand")
def _expand(v: View):
    s, dt = v.shape(0), v.dtype(0)
    target = v.value(1)
    if target is None or s is None or any(type(t) is not int and not D.nonneg(t) for t in target):
        ts = v.shape(1)
        rank = ts[0] if ts is not None and len(ts) == 1 and type(ts[0]) is int else None
        if rank is None or s is None:
            return [(None, dt, None)]
        return [(tuple(D.fresh() for _ in range(max(rank, len(s)))), dt, None)]
    out = broadcast(s, tuple(target))
    if out is None:
        return None
    value = None
    x = v.value(0)
    if x is not None and len(out) <= 1:
        if len(x) == (out[0] if out else 1):
            value = x
        elif len(x) == 1 and out and type(out[0]) is int and out[0] <= MAX_VALUE:
            value = x * out[0]
    return [(out, dt, value)]


@rule("Tile")
def _tile(v: View):
    s, dt = v.shape(0), v.dtype(0)
    reps = v.value(1)
    if s is None:
        return [(None, dt, None)]
    if reps is None or len(reps) != len(s):
        return [(tuple(D.fresh() for _ in s), dt, None)]
    out = tuple(D.mul(d, r) for d, r in zip(s, reps))
    value = None
    x = v.value(0)
    if x is not None and len(s) == 1 and type(reps[0]) is int and len(x) * reps[0] <= MAX_VALUE:
        value = tuple(x) * reps[0]
    return [(out, dt, value)]


@rule("ConstantOfShape")
def _constant_of_shape(v: View):
    from onnxopt.ir.constants import exact_array

    target = v.value(0)
    fill = v.attr("value")
    arr = exact_array(fill) if fill is not None and hasattr(fill, "_values") else None
    dt = arr.dtype if arr is not None else (FLOAT if fill is None else None)
    if target is None:
        ts = v.shape(0)
        rank = ts[0] if ts is not None and len(ts) == 1 and type(ts[0]) is int else None
        return [(None if rank is None else tuple(D.fresh() for _ in range(rank)), dt, None)]
    out = tuple(target)
    if any(type(t) is not int and not D.nonneg(t) for t in out):
        return [(tuple(D.fresh() for _ in out), dt, None)]
    value = None
    if len(out) <= 1 and dt is not None and dt.kind in "iub":
        n = out[0] if out else 1
        f = int(arr.reshape(-1)[0]) if arr is not None else 0
        if type(n) is int and n <= MAX_VALUE:
            value = (f,) * n
    return [(out, dt, value)]


@rule("Range")
def _range(v: View):
    dt = v.dtype(0)
    a, b, c = v.value(0), v.value(1), v.value(2)
    if dt is not None and dt.kind in "iu" and a is not None and b is not None and c is not None:
        start, limit, delta = a[0], b[0], c[0]
        if all(type(x) is int for x in (start, limit, delta)) and delta != 0:
            n = max(-(-(limit - start) // delta), 0)
            value = tuple(range(start, limit, delta)) if n <= MAX_VALUE else None
            return [((n,), dt, value)]
        if type(delta) is int and delta > 0:
            n = D.ceil_div(D.sub(limit, start), delta)
            if D.nonneg(D.sub(limit, start)):
                return [((n,), dt, None)]
    af, bf, cf = v.floats(0), v.floats(1), v.floats(2)
    if af and bf and cf and cf[0] != 0:
        return [((max(int(np.ceil((bf[0] - af[0]) / cf[0])), 0),), dt, None)]
    return [((D.fresh(),), dt, None)]


@rule("MatMul", "MatMulInteger")
def _matmul(v: View):
    a, b = v.shape(0), v.shape(1)
    dt = INT32 if v.op == "MatMulInteger" else v.dtype(0)
    if a is None or b is None or not a or not b:
        return [(None, dt, None)]
    a2 = (1,) + a if len(a) == 1 else a
    b2 = b + (1,) if len(b) == 1 else b
    batch = broadcast(a2[:-2], b2[:-2])
    if batch is None:
        return None
    out = batch + (a2[-2], b2[-1])
    if len(a) == 1:
        out = out[:-2] + out[-1:]
    if len(b) == 1:
        out = out[:-1]
    return [(out, dt, None)]


@rule("Gemm")
def _gemm(v: View):
    a, b = v.shape(0), v.shape(1)
    dt = v.dtype(0)
    if a is None or b is None or len(a) != 2 or len(b) != 2:
        return [(None, dt, None)]
    m = a[1] if v.attr("transA", 0) else a[0]
    n = b[0] if v.attr("transB", 0) else b[1]
    return [((m, n), dt, None)]


def _spatial(v: View, kernel: list, in_dims: tuple, transposed: bool = False) -> list | None:
    n = len(kernel)
    strides = list(v.attr("strides") or [1] * n)
    dil = list(v.attr("dilations") or [1] * n)
    pads = list(v.attr("pads") or [0] * (2 * n))
    auto_pad = v.attr("auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    ceil_mode = v.attr("ceil_mode", 0)
    if len(strides) != n or len(dil) != n or len(pads) != 2 * n or transposed:
        return None
    out = []
    for k in range(n):
        d, kk, st, dl = in_dims[k], kernel[k], strides[k], dil[k]
        if st <= 0:
            return None
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            out.append(D.ceil_div(d, st))
            continue
        if auto_pad == "VALID":
            span = D.sub(d, dl * (kk - 1))
            out.append(D.add(D.floor_div(D.sub(span, 1), st), 1) if type(span) is not int or span > 0 else 0)
            continue
        if auto_pad != "NOTSET":
            return None
        span = D.sub(D.add(d, pads[k] + pads[k + n]), dl * (kk - 1) + 1)
        if ceil_mode:
            if type(span) is not int:
                out.append(D.opaque(f"pool_ceil({span}, {st}, {pads[k]})", True))
                continue
            o = -(-span // st) + 1
            if (o - 1) * st >= d + pads[k]:  # the last window must start inside the input
                o -= 1
            out.append(o)
            continue
        if type(span) is int and span < 0:
            return None
        out.append(D.add(D.floor_div(span, st), 1))
    return out


@rule("Conv", "ConvInteger")
def _conv(v: View):
    x, w = v.shape(0), v.shape(1)
    dt = INT32 if v.op == "ConvInteger" else v.dtype(0)
    if x is None or w is None or len(x) != len(w) or len(x) < 3:
        return [(None if x is None else tuple(D.fresh() for _ in x), dt, None)]
    kernel = v.attr("kernel_shape") or list(w[2:])
    if any(type(k) is not int for k in kernel):
        return [(tuple(D.fresh() for _ in x), dt, None)]
    spatial = _spatial(v, list(kernel), x[2:])
    if spatial is None:
        return None
    return [((x[0], w[0]) + tuple(spatial), dt, None)]


@rule("MaxPool", "AveragePool", "LpPool")
def _pool(v: View):
    x, dt = v.shape(0), v.dtype(0)
    kernel = v.attr("kernel_shape")
    if x is None or kernel is None or len(x) != len(kernel) + 2:
        return [(None if x is None else tuple(D.fresh() for _ in x), dt, None)] * v.n_out
    if v.attr("storage_order", 0) and v.n_out > 1:
        return None
    spatial = _spatial(v, list(kernel), x[2:])
    if spatial is None:
        return None
    out = (x[0], x[1]) + tuple(spatial)
    outs = [(out, dt, None)]
    if v.n_out > 1:
        outs.append((out, INT64, None))
    return outs


@rule("GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool")
def _global_pool(v: View):
    x = v.shape(0)
    if x is None or len(x) < 2:
        return [(None, v.dtype(0), None)]
    return [((x[0], x[1]) + (1,) * (len(x) - 2), v.dtype(0), None)]


_REDUCE = ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
           "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")


@rule(*_REDUCE)
def _reduce(v: View):
    s, dt = v.shape(0), v.dtype(0)
    keep = v.attr("keepdims", 1)
    input_axes = 13 if v.op == "ReduceSum" else 18
    axes, given = _axes(v, input_axes)
    if s is None or (given and axes is None):
        return [(None if s is None or not keep else tuple(D.fresh() for _ in s), dt, None)]
    rank = len(s)
    if not axes:
        if v.opset >= input_axes and v.attr("noop_with_empty_axes", 0):
            return [(s, dt, v.value(0))]
        axes = list(range(rank))
    norm = {_norm_axis(a, rank) for a in axes}
    if None in norm:
        return None
    out = tuple((1 if i in norm else d) for i, d in enumerate(s) if keep or i not in norm)
    value = None
    x = v.value(0)
    if x is not None and rank == 1 and v.op in ("ReduceProd", "ReduceSum", "ReduceMax", "ReduceMin") and x:
        fn = {"ReduceProd": D.mul, "ReduceSum": D.add, "ReduceMax": D.maximum, "ReduceMin": D.minimum}[v.op]
        acc = x[0]
        for e in x[1:]:
            acc = fn(acc, e)
        value = (acc,)
    return [(out, dt, value)]


@rule("ArgMax", "ArgMin")
def _argmax(v: View):
    s = v.shape(0)
    if s is None:
        return [(None, INT64, None)]
    axis = _norm_axis(v.attr("axis", 0), len(s))
    if axis is None:
        return None
    keep = v.attr("keepdims", 1)
    out = tuple((1 if i == axis else d) for i, d in enumerate(s) if keep or i != axis)
    return [(out, INT64, None)]


@rule("Pad")
def _pad(v: View):
    s, dt = v.shape(0), v.dtype(0)
    if s is None:
        return [(None, dt, None)]
    pads = v.attr("pads") if v.opset < 11 else v.value(1)
    if pads is None:
        return [(tuple(D.fresh() for _ in s), dt, None)]
    rank = len(s)
    axes = list(range(rank))
    if v.opset >= 18 and v.has(3):
        ax = v.ints(3)
        if ax is None:
            return [(tuple(D.fresh() for _ in s), dt, None)]
        axes = [_norm_axis(a, rank) for a in ax]
        if None in axes:
            return None
    if len(pads) != 2 * len(axes):
        return None
    out = list(s)
    n = len(axes)
    for k, a in enumerate(axes):
        out[a] = D.add(D.add(s[a], pads[k]), pads[k + n])
    return [(tuple(out), dt, None)]


@rule("Resize", "Upsample")
def _resize(v: View):
    s, dt = v.shape(0), v.dtype(0)
    if s is None:
        return [(None, dt, None)]
    rank = len(s)
    if v.op == "Upsample" or v.opset < 11:
        return None
    if v.opset >= 18 and (v.has(4) or v.attr("keep_aspect_ratio_policy", "stretch") not in ("stretch", b"stretch")):
        return None
    if v.has(3):
        sizes = v.value(3)
        if sizes is None or len(sizes) != rank:
            return [(tuple(D.fresh() for _ in s), dt, None)]
        return [(tuple(sizes), dt, None)]
    scales = v.floats(2) if v.has(2) else None
    if scales is None or len(scales) != rank:
        return [(tuple(D.fresh() for _ in s), dt, None)]
    mode = v.attr("coordinate_transformation_mode", "half_pixel")
    if mode in ("tf_crop_and_resize", b"tf_crop_and_resize"):
        return None
    out = []
    for d, sc in zip(s, scales):
        if sc == int(sc) and sc >= 1:
            out.append(D.mul(d, int(sc)))
        elif type(d) is int:
            return None  # non-integral scale: onnx's inference (float rounding) decides
        else:
            out.append(D.opaque(f"resize({d}, {sc!r})", True))
    return [(tuple(out), dt, None)]


@rule("DepthToSpace", "SpaceToDepth")
def _depth_to_space(v: View):
    s, dt = v.shape(0), v.dtype(0)
    b = v.attr("blocksize")
    if s is None or len(s) != 4 or not b:
        return [(None if s is None else tuple(D.fresh() for _ in s), dt, None)]
    n, c, h, w = s
    if v.op == "DepthToSpace":
        cc = D.exact_div(c, b * b)
        if cc is None:
            return None
        return [((n, cc, D.mul(h, b), D.mul(w, b)), dt, None)]
    hh, ww = D.exact_div(h, b), D.exact_div(w, b)
    if hh is None or ww is None:
        return None
    return [((n, D.mul(c, b * b), hh, ww), dt, None)]


@rule("TopK")
def _topk(v: View):
    s, dt = v.shape(0), v.dtype(0)
    if s is None:
        return [(None, dt, None), (None, INT64, None)]
    axis = _norm_axis(v.attr("axis", -1), len(s))
    if axis is None:
        return None
    k = v.attr("k") if v.opset < 10 else (v.value(1) or [None])[0]
    kd = k if k is not None and (type(k) is int or D.nonneg(k)) else D.fresh()
    out = tuple(kd if i == axis else d for i, d in enumerate(s))
    return [(out, dt, None), (out, INT64, None)]


@rule("NonZero")
def _nonzero(v: View):
    s = v.shape(0)
    return [(None if s is None else (len(s), D.fresh()), INT64, None)]


@rule("QuantizeLinear")
def _quantize(v: View):
    dt = v.dtype(2) if v.has(2) else np.dtype(np.uint8)
    return [(v.shape(0), dt, None)]


@rule("DequantizeLinear")
def _dequantize(v: View):
    return [(v.shape(0), v.dtype(1), None)]


def _rnn(v: View):
    """LSTM/GRU/RNN: Y [seq, dirs, batch, hidden] (layout 1: [batch, seq, dirs, hidden])."""
    s, dt = v.shape(0), v.dtype(0)
    hidden = v.attr("hidden_size")
    direction = v.attr("direction", "forward")
    direction = direction.decode() if isinstance(direction, bytes) else direction
    dirs = 2 if direction == "bidirectional" else 1
    if s is None or len(s) != 3 or hidden is None:
        return None
    layout = v.attr("layout", 0) if v.opset >= 14 else 0
    if layout:
        batch, seq = s[0], s[1]
        y = (batch, seq, dirs, hidden)
        h = (batch, dirs, hidden)
    else:
        seq, batch = s[0], s[1]
        y = (seq, dirs, batch, hidden)
        h = (dirs, batch, hidden)
    outs = [(y, dt, None), (h, dt, None)]
    if v.op == "LSTM":
        outs.append((h, dt, None))
    return outs[:v.n_out]


RULES["LSTM"] = RULES["GRU"] = RULES["RNN"] = _rnn


# --------------------------------------------------------------------------- small arrays
# Ops computed exactly on small integer (and bool) constants of any rank, with numpy and the
# ONNX semantics spelled out (integer Div truncates, Slice clamps as ONNX does): a pads
# vector built as F.pad does (Reshape [-1, 2], reversed, Transpose, Reshape [-1]) is then
# known in the same walk, so the shapes after it are too.
ARRAY_OPS = frozenset({
    "Identity", "Reshape", "Transpose", "Slice", "Concat", "Gather", "Squeeze", "Unsqueeze", "Cast",
    "Add", "Sub", "Mul", "Div", "Mod", "Neg", "Abs", "Equal", "Less", "Greater", "LessOrEqual",
    "GreaterOrEqual", "Not", "And", "Or", "Where", "Range", "ConstantOfShape", "Expand", "Tile", "Flatten",
})


def evaluate_small(v: View, arrays: list) -> list[Out] | None:
    """The node's output (shape, dtype, value, array) from its inputs' known ``arrays``
    (None for an absent input), or None when it is not one of ARRAY_OPS' simple cases."""
    from onnxopt.analysis.shapes import np_dtype

    op = v.op
    a = arrays[0] if arrays else None
    if op in ("Add", "Sub", "Mul", "Div", "Mod", "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual",
              "And", "Or"):
        x, y = arrays[0], arrays[1]
        if x.dtype != y.dtype:
            return None
        if op == "Div":
            if np.any(y == 0):
                return None
            q = np.floor_divide(x, y)
            out = np.where((q < 0) & (q * y != x), q + 1, q).astype(x.dtype)  # truncate toward 0
        elif op == "Mod":
            if v.attr("fmod", 0) or np.any(y == 0):
                return None
            out = np.mod(x, y)
        else:
            out = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Equal": np.equal, "Less": np.less,
                   "Greater": np.greater, "LessOrEqual": np.less_equal, "GreaterOrEqual": np.greater_equal,
                   "And": np.logical_and, "Or": np.logical_or}[op](x, y)
    elif op in ("Identity", "Neg", "Abs", "Not"):
        out = {"Identity": lambda t: t, "Neg": np.negative, "Abs": np.abs, "Not": np.logical_not}[op](a)
    elif op == "Where":
        out = np.where(arrays[0], arrays[1], arrays[2])
    elif op == "Cast":
        to = np_dtype(v.attr("to"))
        if to is None or to.kind not in "iub":
            return None
        out = a.astype(to)
    elif op == "Reshape":
        target = [int(t) for t in arrays[1].reshape(-1)]
        allowzero = v.attr("allowzero", 0)
        dims = [a.shape[i] if t == 0 and not allowzero and i < a.ndim else t for i, t in enumerate(target)]
        out = a.reshape(dims)
    elif op == "Flatten":
        axis = v.attr("axis", 1)
        axis = axis + a.ndim if axis < 0 else axis
        out = a.reshape(int(np.prod(a.shape[:axis], dtype=np.int64)), -1)
    elif op == "Transpose":
        perm = v.attr("perm")
        out = np.transpose(a, perm if perm is None else list(perm))
    elif op == "Slice":
        if v.opset < 10:
            return None
        starts, ends = [int(t) for t in arrays[1].reshape(-1)], [int(t) for t in arrays[2].reshape(-1)]
        axes = [int(t) for t in arrays[3].reshape(-1)] if len(arrays) > 3 and arrays[3] is not None \
            else list(range(len(starts)))
        steps = [int(t) for t in arrays[4].reshape(-1)] if len(arrays) > 4 and arrays[4] is not None \
            else [1] * len(starts)
        index = [slice(None)] * a.ndim
        for st, en, ax, sp in zip(starts, ends, axes, steps):
            ax = ax + a.ndim if ax < 0 else ax
            if sp == 0 or not 0 <= ax < a.ndim:
                return None
            index[ax] = list(slice_range(a.shape[ax], st, en, sp))
        out = a
        for ax, idx in enumerate(index):
            if not isinstance(idx, slice):
                out = np.take(out, np.array(idx, dtype=np.int64), axis=ax)
    elif op == "Concat":
        parts = [x for x in arrays if x is not None]
        out = np.concatenate(parts, axis=v.attr("axis", 0))
    elif op == "Gather":
        idx = arrays[1]
        axis = v.attr("axis", 0)
        axis = axis + a.ndim if axis < 0 else axis
        if np.any(idx < -a.shape[axis]) or np.any(idx >= a.shape[axis]):
            return None
        out = np.take(a, idx.astype(np.int64), axis=axis)
    elif op in ("Squeeze", "Unsqueeze"):
        axes = v.attr("axes") if v.opset < 13 else (None if len(arrays) < 2 or arrays[1] is None
                                                     else [int(t) for t in arrays[1].reshape(-1)])
        if op == "Squeeze":
            out = np.squeeze(a) if axes is None else np.squeeze(a, axis=tuple(axes))
        else:
            if axes is None:
                return None
            rank = a.ndim + len(axes)
            out = np.expand_dims(a, tuple(x + rank if x < 0 else x for x in axes))
    elif op == "Range":
        start, limit, delta = (x.reshape(()).item() for x in arrays[:3])
        if delta == 0 or max(-(-(limit - start) // delta), 0) > MAX_VALUE:
            return None
        out = np.arange(start, limit, delta, dtype=a.dtype)
    elif op == "ConstantOfShape":
        from onnxopt.ir.constants import exact_array

        fill = v.attr("value")
        fill = exact_array(fill) if fill is not None and hasattr(fill, "_values") else np.zeros(1, np.float32)
        if fill is None or fill.dtype.kind not in "iub" or int(np.prod(a)) > MAX_VALUE:
            return None
        out = np.full([int(t) for t in a.reshape(-1)], fill.reshape(-1)[0], dtype=fill.dtype)
    elif op == "Expand":
        shape = np.broadcast_shapes(a.shape, tuple(int(t) for t in arrays[1].reshape(-1)))
        if int(np.prod(shape)) > MAX_VALUE:
            return None
        out = np.broadcast_to(a, shape).copy()
    elif op == "Tile":
        reps = [int(t) for t in arrays[1].reshape(-1)]
        if a.size * int(np.prod(reps)) > MAX_VALUE:
            return None
        out = np.tile(a, reps)
    else:
        return None
    out = np.asarray(out)
    if out.size > MAX_VALUE:
        return None
    value = tuple(int(x) for x in out.reshape(-1)) if out.ndim <= 1 else None
    return [(tuple(int(d) for d in out.shape), out.dtype, value, out)]
