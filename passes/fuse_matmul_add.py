"""fuse-matmul-add: MatMul + Add of a constant bias becomes one Gemm, where Gemm is legal.

Rules:

matmul-add
    ``Add(MatMul(A, B), C)`` (either Add operand) -> ``Gemm(A, B, C)`` when B is a constant
    2-D weight [K, N], A is known to be 2-D (from its declared shape or the ``shapes``
    analysis) and C is a constant that Gemm's one-way broadcasting takes to [M, N]: a
    scalar, [N], [1, N], [M, 1] or [M, N] (a dim above 1 must equal the known output dim).
    Gemm only takes 2-D operands, so MatMul + Add on 3-D inputs (batched, as in
    transformers) is left alone: a Gemm there would be wrong.

gemm-add
    ``Add(Gemm(A, B), C)`` where the Gemm has no C input -> ``Gemm(A, B, C)`` with beta 1,
    under the same conditions on C (M and N come from the Gemm's operands and transposes).

The MatMul (or Gemm) output must be read only by the Add, and the weight a float type
(float16, float, double): integer MatMul is valid ONNX but onnxruntime has no integer
Gemm kernel on CPU, so fusing it would make a runnable model unrunnable.
"""

from __future__ import annotations

import logging

import onnx_graphsurgeon as gs

from onnxopt.analysis.shapes import known_shape as _shape
from onnxopt.analysis.use_def import is_op, is_present, single_use
from onnxopt.ir.constants import constant_value
from onnxopt.ir.names import fresh_name
from onnxopt.ir.rewrite import RewritePass, RewriteRule
from onnxopt.ir.surgery import take_outputs
from onnxopt.pipeline.registry import register_pass

logger = logging.getLogger(__name__)


def _add_operands(add: gs.Node, *ops: str):
    """(producer node of one Add operand that is one of ``ops``, the other operand) or None."""
    if not is_op(add, "Add") or len(add.inputs) != 2:
        return None
    for i in (0, 1):
        t = add.inputs[i]
        if t.inputs and is_op(t.inputs[0], *ops):
            return t.inputs[0], add.inputs[1 - i]
    return None


def _rank(tensor: gs.Tensor, model, ctx) -> int | None:
    shape = _shape(tensor, model, ctx)
    return None if shape is None else len(shape)


def _dim0(tensor: gs.Tensor, model, ctx) -> int | None:
    shape = _shape(tensor, model, ctx)
    if shape and isinstance(shape[0], int) and shape[0] > 0:
        return shape[0]
    return None


def _bias_problem(bias, m: int | None, n: int) -> str | None:
    """Why constant ``bias`` cannot be Gemm's C for an [m, n] output (m None = unknown)."""
    if bias is None:
        return "added tensor is not constant"
    if bias.ndim > 2:
        return "added constant has rank above 2"
    shape = (1,) * (2 - bias.ndim) + bias.shape
    if shape[1] not in (1, n):
        return "added constant does not broadcast to [M, N]"
    if shape[0] != 1 and shape[0] != m:
        return "added constant has M rows but M is not known to match"
    return None


class FuseMatMulAdd(RewriteRule):
    """MatMul(A, B) + C -> Gemm(A, B, C) for 2-D A and constant 2-D B and C."""

    name = "matmul-add"
    root_ops = ("Add",)
    analyses = ("symbolic-shapes",)

    def match(self, node, graph):
        found = _add_operands(node, "MatMul")
        if found is None:
            return None
        return {"matmul": found[0], "add": node, "bias": found[1]}

    def check(self, match, model, ctx):
        mm, graph = match["matmul"], match["graph"]
        if model.opset < 7:
            return "opset below 7 (Gemm C does not broadcast)"
        if not single_use(mm.outputs[0], graph):
            return "MatMul output has other consumers"
        weight = constant_value(mm.inputs[1])
        if weight is None:
            return "MatMul weight is not constant"
        if weight.ndim != 2:
            return "MatMul weight is not 2-D"
        if weight.dtype.kind != "f":  # onnxruntime has no integer Gemm kernel on CPU
            return "MatMul weight is not a float type"
        rank = _rank(mm.inputs[0], model, ctx)
        if rank is None:
            return "MatMul input rank unknown"
        if rank != 2:
            return "MatMul input is not 2-D (Gemm needs 2-D)"
        bias = constant_value(match["bias"])
        problem = _bias_problem(bias, _dim0(mm.inputs[0], model, ctx), weight.shape[1])
        if problem:
            return problem
        if bias.dtype != weight.dtype:
            return "bias and weight dtypes differ"
        return None

    def rewrite(self, match, graph):
        mm, add = match["matmul"], match["add"]
        gemm = gs.Node("Gemm", name=fresh_name(graph, mm.name or "gemm"),
                       inputs=[mm.inputs[0], mm.inputs[1], match["bias"]])
        take_outputs(add, gemm)
        return [gemm]


class FuseGemmAdd(RewriteRule):
    """Gemm(A, B) without C, + C -> Gemm(A, B, C)."""

    name = "gemm-add"
    root_ops = ("Add",)
    analyses = ("symbolic-shapes",)

    def match(self, node, graph):
        found = _add_operands(node, "Gemm")
        if found is None or is_present(found[0], 2):
            return None
        return {"gemm": found[0], "add": node, "bias": found[1]}

    def check(self, match, model, ctx):
        gemm, graph = match["gemm"], match["graph"]
        if not single_use(gemm.outputs[0], graph):
            return "Gemm output has other consumers"
        a, b = gemm.inputs[0], gemm.inputs[1]
        b_value = constant_value(b)
        b_shape = b_value.shape if b_value is not None else b.shape
        n = b_shape[0 if gemm.attrs.get("transB", 0) else 1] if b_shape is not None and len(b_shape) == 2 else None
        if not isinstance(n, int):
            return "Gemm output width N not known"
        m = None
        if a.shape is not None and len(a.shape) == 2:
            dim = a.shape[1 if gemm.attrs.get("transA", 0) else 0]
            m = dim if isinstance(dim, int) and dim > 0 else None
        bias = constant_value(match["bias"])
        problem = _bias_problem(bias, m, n)
        if problem:
            return problem
        return None

    def rewrite(self, match, graph):
        gemm, add = match["gemm"], match["add"]
        attrs = dict(gemm.attrs)
        attrs["beta"] = 1.0
        fused = gs.Node("Gemm", name=fresh_name(graph, gemm.name or "gemm"), attrs=attrs,
                        inputs=[gemm.inputs[0], gemm.inputs[1], match["bias"]])
        take_outputs(add, fused)
        return [fused]


@register_pass("fuse-matmul-add")
class FuseMatMulAddPass(RewritePass):
    """Turn MatMul + Add (2-D input, constant weight and bias) and Gemm + Add into one Gemm."""

    lossless = True
    requires_ops = frozenset({"MatMul", "Gemm"})
    preserves = frozenset({"shapes", "symbolic-shapes"})  # the Gemm writes the Add's tensor
    rules = (FuseMatMulAdd(), FuseGemmAdd())
