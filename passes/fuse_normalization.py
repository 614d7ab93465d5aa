"""Fuse the decomposed LayerNormalization and GELU subgraphs of transformer exports.

fuse-layernorm
    ReduceMean(x) -> Sub -> Pow 2 (or Mul d*d) -> ReduceMean -> Add eps -> Sqrt (or Pow 0.5)
    -> Div (or Reciprocal + Mul) becomes LayerNormalization(x, ones) with ``axis`` = the
    first reduced axis and ``epsilon`` = the constant; a following Mul by a constant and
    Add of a constant (the affine scale and bias, each optional) are then folded into its
    Scale and B inputs. The folding rules also apply to LayerNormalization nodes that were
    in the model already. Checked: both ReduceMeans reduce the same trailing axes with
    keepdims=1 (axes as attribute before opset 18, as a constant input from 18), epsilon
    is one value, the normalized dims are static (Scale must be materialized), the scale
    and bias constants vary only along the normalized axes, and no intermediate tensor
    has a reader outside the pattern or is a graph output. LayerNormalization exists from
    opset 17. On an older model (opset 14 is common in exports) the pass raises the model's
    opset to 17 when some pattern would fuse and no node of the model changes meaning in
    the raise (``onnxopt.ir.opsets.raise_blockers``: every schema revision between the two
    opsets reviewed; option ``raise_opset``, on by default). Otherwise it changes nothing
    and reports the patterns it saw and why: there is no contrib op to fall back to
    (onnxruntime registers its own LayerNormalization in the default domain, which the onnx
    checker rejects below opset 17).

fuse-gelu
    x * 0.5 * (1 + Erf(x / sqrt(2)))  (any association of the three factors, Div by
    sqrt(2) or Mul by 1/sqrt(2))                      -> Gelu
    x * 0.5 * (1 + Tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))  (x^3 as Pow 3 or two Muls)
                                                      -> Gelu approximate="tanh"
    Constants must equal the formula's within two ulps of their dtype (1e-6 relative at
    least, so float64 models written with the usual 10-digit constants still match).

    Which op is emitted. Gelu is a standard op from opset 20 only, and raising a model's
    default opset is not free: between 17 and 20 ReduceMean and the other Reduce ops
    moved ``axes`` from an attribute to an input (18), Split requires ``split`` or
    ``num_outputs`` (18), DFT moved ``axis`` to an input and GridSample renamed its modes
    (20); the other ops revised in 14-20 only gained types or attributes whose defaults
    keep the old meaning. So, in this order:
      1. opset >= 20: the standard Gelu.
      2. ``raise_opset`` (on by default) and every node of every graph keeps its meaning at
         opset 20 (``onnxopt.ir.opsets``): raise to 20, standard Gelu. (Run after
         fuse-layernorm: the ReduceMeans a LayerNorm fusion removes no longer block it.)
      3. ``allow_contrib`` (default: the target's ``runtime.contrib_ops``): onnxruntime's
         com.microsoft Gelu (erf form) and FastGelu (tanh form, same formula), importing
         the com.microsoft domain; float32 and float16 only (the types their onnxruntime
         CPU kernels take).
      4. otherwise nothing, and the stats say why.
    Set ``raise_opset=false`` for a runtime that reads only the model's own opset.

Both passes are rule sets on onnxopt.ir.rewrite (match the structure, check legality with a
reason counted in the stats, rewrite) and run in every graph, If/Loop/Scan bodies included.
Constants may be initializers or Constant nodes; run ``lift-constants`` first so that the
folded scale/bias and the dead constants are cleaned up in one place.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.analysis.shapes import known_shape as _shape
from onnxopt.analysis.use_def import is_op
from onnxopt.ir.constants import constant_tensor, constant_value
from onnxopt.ir.opsets import raise_blockers, raise_opset
from onnxopt.ir.names import fresh_name, new_constant
from onnxopt.ir.rewrite import RewriteRule, RuleSet
from onnxopt.ir.surgery import take_outputs
from onnxopt.pipeline.pass_api import Pass, PassResult, option
from onnxopt.pipeline.registry import register_pass

logger = logging.getLogger(__name__)

LAYERNORM_OPSET = 17
GELU_OPSET = 20
CONTRIB_DOMAIN = "com.microsoft"

# dtypes LayerNormalization-17 and Gelu-20 take (bfloat16 has no numpy dtype here).
_FLOAT_DTYPES = {np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)}
# dtypes onnxruntime's CPU kernels of com.microsoft Gelu/FastGelu take.
_CONTRIB_DTYPES = {np.dtype(np.float16), np.dtype(np.float32)}


# -- helpers shared by the rules ---------------------------------------------------------
def _producer(tensor: gs.Tensor, *ops: str) -> gs.Node | None:
    """The default-domain node of one of ``ops`` that computes ``tensor``, else None."""
    node = tensor.inputs[0] if tensor.inputs else None
    return node if node is not None and is_op(node, *ops) else None


def _scalar(tensor: gs.Tensor, kinds: str = "f") -> np.ndarray | None:
    """A one-element constant (any rank) of a dtype kind in ``kinds``, else None."""
    const = constant_tensor(tensor)
    if const is None or int(np.prod(const.shape)) != 1:  # size from the shape: no weight is loaded
        return None
    value = constant_value(tensor)
    if value is None or value.size != 1 or value.dtype.kind not in kinds:
        return None
    return value


def _close(value: np.ndarray, target: float) -> bool:
    """``value`` is ``target`` rounded to its dtype (two ulps, at least 1e-6 relative)."""
    if value.dtype.kind != "f":
        return float(value.reshape(())) == target
    rtol = max(2 * float(np.finfo(value.dtype).eps), 1e-6)
    return abs(float(value.reshape(())) - target) <= rtol * abs(target)


def _is_scalar(tensor: gs.Tensor, target: float) -> bool:
    value = _scalar(tensor)
    return value is not None and _close(value, target)


def _is_exponent(tensor: gs.Tensor, target: float) -> bool:
    """Pow's exponent may be an integer or a float constant (its own type T1)."""
    value = _scalar(tensor, kinds="iuf")
    return value is not None and _close(value, target)


def _const_and_other(node: gs.Node) -> tuple[gs.Tensor, gs.Tensor] | None:
    """(constant operand, other operand) of a binary node with exactly one constant."""
    if len(node.inputs) != 2:
        return None
    a, b = node.inputs
    a_const, b_const = constant_tensor(a) is not None, constant_tensor(b) is not None
    if a_const == b_const:
        return None
    return (a, b) if a_const else (b, a)


def _escapes(nodes: list[gs.Node], root: gs.Node, graph: gs.Graph) -> bool:
    """True when a tensor computed inside the pattern (before the root) is read outside it."""
    inside = {id(n) for n in nodes}
    output_ids = {id(t) for t in graph.outputs}
    for node in nodes:
        if node is root:
            continue
        for t in node.outputs:
            if id(t) in output_ids or any(id(c) not in inside for c in t.outputs):
                return True
    return False


def _rank(tensor: gs.Tensor, model, ctx) -> int | None:
    shape = _shape(tensor, model, ctx)
    return None if shape is None else len(shape)


def _count_matches(rules: list[RewriteRule], model, ctx, check: bool) -> int:
    """Matches of ``rules`` in every graph, without rewriting; with ``check`` only legal ones.

    Without ``check`` every structural match counts (to report the patterns a pass cannot
    fuse for a model-wide reason such as the opset).
    """
    count = 0
    for graph in model.graphs():
        for node in graph.nodes:
            for rule in rules:
                if node.op not in rule.root_ops:
                    continue
                match = rule.match(node, graph)
                if match is None:
                    continue
                if not check or rule.check(match, model, ctx) is None:
                    count += 1
                    break
    return count


# -- LayerNormalization -------------------------------------------------------------------
def _reduce_axes(node: gs.Node) -> tuple[list[int] | None, str | None]:
    """(axes, None) of a ReduceMean (None axes = every axis), or (None, reason)."""
    if int(node.attrs.get("keepdims", 1)) != 1:
        return None, "ReduceMean has keepdims=0"
    if len(node.inputs) > 1 and node.inputs[1].name:
        value = constant_value(node.inputs[1])
        if value is None:
            return None, "ReduceMean axes are not constant"
        axes = [int(a) for a in value.reshape(-1)]
    else:
        axes = node.attrs.get("axes")
        axes = None if axes is None else [int(a) for a in axes]
    if not axes:
        if int(node.attrs.get("noop_with_empty_axes", 0)):
            return None, "ReduceMean with empty axes is a no-op"
        return None, None
    return axes, None


def _normalized_tail(axes_a, axes_b, rank: int) -> int | None:
    """Count of trailing axes both ReduceMeans reduce, or None when they differ or skip one."""
    sets = []
    for axes in (axes_a, axes_b):
        if axes is None:
            sets.append(set(range(rank)))
        elif any(not -rank <= a < rank for a in axes):
            return None
        else:
            sets.append({a % rank for a in axes})
    if sets[0] != sets[1] or not sets[0]:
        return None
    k = len(sets[0])
    return k if sets[0] == set(range(rank - k, rank)) else None


def _along_normalized(value: np.ndarray, rank: int, norm_shape: tuple[int, ...]) -> np.ndarray | None:
    """``value`` as an array of ``norm_shape`` when, multiplied into or added to a tensor of
    that rank, it varies only along the normalized (trailing) axes; else None."""
    k = len(norm_shape)
    if value.ndim > rank:
        return None
    padded = (1,) * (rank - value.ndim) + tuple(value.shape)
    if any(d != 1 for d in padded[: rank - k]):
        return None
    tail = padded[rank - k:]
    if any(d not in (1, n) for d, n in zip(tail, norm_shape)):
        return None
    return np.broadcast_to(value.reshape(tail), norm_shape)


class LayerNormCore(RewriteRule):
    """mean/variance/epsilon/sqrt/divide -> LayerNormalization(x, ones)."""

    name = "layernorm"
    root_ops = ("Div", "Mul")

    def __init__(self, check_opset: bool = True):
        self.check_opset = check_opset  # False: would it fuse once the opset is raised?

    def match(self, node, graph):
        if is_op(node, "Div"):
            d, std = node.inputs[0], node.inputs[1]
            recip = None
        elif is_op(node, "Mul") and len(node.inputs) == 2:
            for i in (0, 1):
                recip = _producer(node.inputs[i], "Reciprocal")
                if recip is not None:
                    d, std = node.inputs[1 - i], recip.inputs[0]
                    break
            else:
                return None
        else:
            return None
        sqrt = _producer(std, "Sqrt", "Pow")
        if sqrt is None or (is_op(sqrt, "Pow") and not _is_exponent(sqrt.inputs[1], 0.5)):
            return None
        add = _producer(sqrt.inputs[0], "Add")
        split = _const_and_other(add) if add is not None else None
        if split is None:
            return None
        eps, var = split
        rm2 = _producer(var, "ReduceMean")
        square = _producer(rm2.inputs[0], "Pow", "Mul") if rm2 is not None else None
        if square is None or square.inputs[0] is not d:
            return None
        if is_op(square, "Pow") and not _is_exponent(square.inputs[1], 2.0):
            return None
        if is_op(square, "Mul") and square.inputs[1] is not d:
            return None
        sub = _producer(d, "Sub")
        if sub is None:
            return None
        x, mean = sub.inputs
        rm1 = _producer(mean, "ReduceMean")
        if rm1 is None or rm1.inputs[0] is not x:
            return None
        nodes = [n for n in (rm1, sub, square, rm2, add, sqrt, recip, node) if n is not None]
        return {"x": x, "eps": eps, "rm1": rm1, "rm2": rm2, "nodes": nodes, "root": node, "graph": graph}

    def check(self, match, model, ctx):
        if self.check_opset and model.opset < LAYERNORM_OPSET:
            return f"opset {model.opset} < {LAYERNORM_OPSET}"
        eps = _scalar(match["eps"])
        if eps is None:
            return "epsilon is not one floating-point value"
        if eps.dtype not in _FLOAT_DTYPES:
            return f"dtype {eps.dtype} not supported by LayerNormalization"
        axes = []
        for rm in (match["rm1"], match["rm2"]):
            value, reason = _reduce_axes(rm)
            if reason:
                return reason
            axes.append(value)
        shape = _shape(match["x"], model, ctx)
        if shape is None:
            return "rank of the input is unknown"
        rank = len(shape)
        k = _normalized_tail(axes[0], axes[1], rank)
        if k is None:
            return "the ReduceMeans do not both reduce the same trailing axes"
        if eps.ndim > rank:
            return "epsilon has more dims than the input"
        norm_shape = shape[rank - k:]
        if not all(isinstance(n, int) and n > 0 for n in norm_shape):
            return "normalized dims are not static"
        if _escapes(match["nodes"], match["root"], match["graph"]):
            return "an intermediate tensor is read outside the pattern"
        # Facts the rewrite needs (computed once here).
        match.update(k=k, norm_shape=tuple(norm_shape), epsilon=float(eps.reshape(())), dtype=eps.dtype)
        return None

    def rewrite(self, match, graph):
        name = fresh_name(graph, f"{match['root'].name or 'fused'}/LayerNormalization")
        scale = new_constant(graph, f"{name}/scale", np.ones(match["norm_shape"], match["dtype"]))
        fused = gs.Node("LayerNormalization", name=name, inputs=[match["x"], scale],
                        attrs={"axis": -match["k"], "epsilon": match["epsilon"]})
        take_outputs(match["root"], fused)
        return [fused]


class _LayerNormAffine(RewriteRule):
    """Base of the rules folding ``LayerNormalization(..) <op> constant`` into Scale/B."""

    def match(self, node, graph):
        if len(node.inputs) != 2:
            return None
        for i in (0, 1):
            ln = _producer(node.inputs[i], "LayerNormalization")
            if ln is not None and constant_value(node.inputs[1 - i]) is not None:
                return {"ln": ln, "root": node, "operand": node.inputs[1 - i], "graph": graph}
        return None

    def check(self, match, model, ctx):
        ln, graph = match["ln"], match["graph"]
        y = ln.outputs[0]
        if len(y.outputs) != 1 or any(t is y for t in graph.outputs):
            return "LayerNormalization output has other readers"
        scale = constant_value(ln.inputs[1]) if len(ln.inputs) > 1 else None
        if scale is None:
            return "LayerNormalization scale is not constant"
        has_bias = len(ln.inputs) > 2 and bool(ln.inputs[2].name)
        bias = constant_value(ln.inputs[2]) if has_bias else None
        if has_bias and bias is None:
            return "LayerNormalization bias is not constant"
        operand = constant_value(match["operand"])
        if operand.dtype != scale.dtype:
            return "constant dtype differs from the LayerNormalization's"
        shape = _shape(ln.inputs[0], model, ctx)
        if shape is None:
            return "rank of the input is unknown"
        rank = len(shape)
        axis = int(ln.attrs.get("axis", -1))
        if not -rank <= axis < rank:
            return "LayerNormalization axis out of range"
        norm_shape = tuple(shape[axis % rank:])
        if not all(isinstance(n, int) and n > 0 for n in norm_shape):
            return "normalized dims are not static"
        factor = _along_normalized(operand, rank, norm_shape)
        if factor is None:
            return "constant varies along axes that are not normalized"
        scale_full = _along_normalized(scale, rank, norm_shape)
        bias_full = _along_normalized(bias, rank, norm_shape) if has_bias else None
        if scale_full is None or (has_bias and bias_full is None):
            return "LayerNormalization scale or bias does not match the normalized shape"
        match.update(factor=factor, scale=scale_full, bias=bias_full)
        return None

    def rewrite(self, match, graph):
        ln, root = match["ln"], match["root"]
        scale, bias = self.fold(match["scale"], match["bias"], match["factor"])
        base = ln.name or "LayerNormalization"
        if scale is not None:  # None: Scale unchanged
            ln.inputs[1] = new_constant(graph, f"{base}/scale", scale)
        if bias is not None:
            bias_const = new_constant(graph, f"{base}/bias", bias)
            if len(ln.inputs) > 2:
                ln.inputs[2] = bias_const
            else:
                ln.inputs.append(bias_const)
        # LayerNormalization now computes the root's output (its Mean/InvStdDev outputs,
        # if any, do not depend on Scale and B and stay as they are).
        out = root.outputs[0]
        root.outputs.clear()
        ln.outputs[0] = out
        return None


class LayerNormScale(_LayerNormAffine):
    """LayerNormalization(x, s, b) * g -> LayerNormalization(x, s*g, b*g)."""

    name = "layernorm-scale"
    root_ops = ("Mul",)

    @staticmethod
    def fold(scale, bias, factor):
        dtype = scale.dtype
        return ((scale * factor).astype(dtype),
                None if bias is None else (bias * factor).astype(dtype))


class LayerNormBias(_LayerNormAffine):
    """LayerNormalization(x, s, b) + c -> LayerNormalization(x, s, b+c)."""

    name = "layernorm-bias"
    root_ops = ("Add",)

    @staticmethod
    def fold(scale, bias, factor):
        return None, (factor if bias is None else bias + factor).astype(scale.dtype)


@register_pass("fuse-layernorm")
class FuseLayerNormPass(Pass):
    """Fuse decomposed layer normalization (ReduceMean/Sub/Pow/Sqrt/Div, affine) into LayerNormalization."""

    lossless = True
    requires_ops = frozenset({"ReduceMean", "LayerNormalization"})
    preserves = frozenset({"shapes", "symbolic-shapes"})  # the fused op writes the root's tensor

    @dataclass
    class Options:
        raise_opset: bool = option(True, "raise the default opset to 17 for LayerNormalization when every op "
                                         "keeps its meaning at 17")

    def run(self, model, ctx) -> PassResult:
        rules = [LayerNormCore(), LayerNormScale(), LayerNormBias()]
        stats: dict[str, Any] = {"fused": 0}
        opset = model.opset
        raised = False
        if opset < LAYERNORM_OPSET:
            legal = _count_matches([LayerNormCore(check_opset=False)], model, ctx, check=True)
            if not legal:
                found = _count_matches(rules[:1], model, ctx, check=False)
                if found:
                    stats["skipped"] = {f"opset {opset} < {LAYERNORM_OPSET}, and the patterns would not "
                                        "fuse at 17 either (see fuse-layernorm's stats at opset 17)": found}
                return PassResult(changed=False, stats=stats)
            blockers = raise_blockers(model, LAYERNORM_OPSET) if self.options.raise_opset else None
            if blockers is None or blockers:
                reason = (f"opset {opset} < {LAYERNORM_OPSET}, raise_opset off" if blockers is None else
                          f"opset {opset} < {LAYERNORM_OPSET}, raising unsafe: " + ", ".join(sorted(blockers)[:3]))
                stats["skipped"] = {reason: legal}
                return PassResult(changed=False, stats=stats)
            ok, how = raise_opset(model, LAYERNORM_OPSET, convert=False)
            assert ok, how  # no blockers were found above
            raised = True
            stats["opset_raised"] = f"{opset} -> {LAYERNORM_OPSET}"
            logger.info("raised the default opset %d -> %d for LayerNormalization", opset, LAYERNORM_OPSET)
        result = RuleSet(rules).apply(model, ctx)
        stats["fused"] = result.applied.get("layernorm", 0)
        stats.update(result.as_stats(r.name for r in rules))
        return PassResult(changed=result.total > 0 or raised, stats=stats)


# -- GELU ---------------------------------------------------------------------------------
SQRT_2 = float(np.sqrt(2.0))
SQRT_2_OVER_PI = float(np.sqrt(2.0 / np.pi))
TANH_CUBIC = 0.044715


def _one_plus(t: gs.Tensor, op: str) -> tuple[gs.Node, gs.Node] | None:
    """(Add, op node) when ``t`` = 1 + op(..), either operand order."""
    add = _producer(t, "Add")
    split = _const_and_other(add) if add is not None else None
    if split is None or not _is_scalar(split[0], 1.0):
        return None
    inner = _producer(split[1], op)
    return (add, inner) if inner is not None else None


def _times_const(t: gs.Tensor, value: float) -> tuple[gs.Node, gs.Tensor] | None:
    """(Mul, other operand) when ``t`` = other * value, either order."""
    mul = _producer(t, "Mul")
    split = _const_and_other(mul) if mul is not None else None
    if split is None or not _is_scalar(split[0], value):
        return None
    return mul, split[1]


def _cube_of(t: gs.Tensor, x: gs.Tensor) -> list[gs.Node] | None:
    """The nodes computing ``t`` = x^3 as Pow(x, 3), x*(x*x) or (x*x)*x; else None."""
    pow_node = _producer(t, "Pow")
    if pow_node is not None:
        return [pow_node] if pow_node.inputs[0] is x and _is_exponent(pow_node.inputs[1], 3.0) else None
    outer = _producer(t, "Mul")
    if outer is None or len(outer.inputs) != 2:
        return None
    for i in (0, 1):
        if outer.inputs[1 - i] is not x:
            continue
        square = _producer(outer.inputs[i], "Mul")
        if square is not None and square.inputs[0] is x and square.inputs[1] is x:
            return [outer, square]
    return None


class _GeluRule(RewriteRule):
    """x * 0.5 * unit(x) in any association, where ``unit`` is the form's 1 + f(x)."""

    root_ops = ("Mul",)
    approximate = "none"

    def __init__(self, domain: str = ""):
        self.domain = domain

    def unit(self, t: gs.Tensor) -> tuple[gs.Tensor, list[gs.Node], list[gs.Tensor]] | None:
        """(x, nodes, scalar constants) when ``t`` is this form's 1 + f(x)."""
        raise NotImplementedError

    def match(self, node, graph):
        if len(node.inputs) != 2:
            return None
        for i in (0, 1):
            inner = _producer(node.inputs[i], "Mul")
            if inner is None or len(inner.inputs) != 2:
                continue
            leaves = [inner.inputs[0], inner.inputs[1], node.inputs[1 - i]]
            for j, half in enumerate(leaves):
                if not _is_scalar(half, 0.5):
                    continue
                a, b = [t for k, t in enumerate(leaves) if k != j]
                for x, u in ((a, b), (b, a)):
                    found = self.unit(u)
                    if found is not None and found[0] is x:
                        _, nodes, consts = found
                        return {"x": x, "half": half, "consts": consts + [half],
                                "nodes": nodes + [inner, node], "root": node, "graph": graph}
        return None

    def check(self, match, model, ctx):
        dtype = constant_value(match["half"]).dtype
        allowed = _CONTRIB_DTYPES if self.domain == CONTRIB_DOMAIN else _FLOAT_DTYPES
        if dtype not in allowed:
            return f"dtype {dtype} not supported by {self.domain or 'onnx'} {self.emitted_op}"
        if any(_scalar(c).ndim > 0 for c in match["consts"]):
            rank = _rank(match["x"], model, ctx)
            if rank is None or any(_scalar(c).ndim > rank for c in match["consts"]):
                return "a constant may add dims to the input"
        if _escapes(match["nodes"], match["root"], match["graph"]):
            return "an intermediate tensor is read outside the pattern"
        return None

    @property
    def emitted_op(self) -> str:
        if self.domain == CONTRIB_DOMAIN:
            return "FastGelu" if self.approximate == "tanh" else "Gelu"
        return "Gelu"

    def rewrite(self, match, graph):
        root = match["root"]
        attrs = {"approximate": "tanh"} if self.approximate == "tanh" and not self.domain else {}
        fused = gs.Node(self.emitted_op, name=fresh_name(graph, f"{root.name or 'fused'}/{self.emitted_op}"),
                        domain=self.domain or None, inputs=[match["x"]], attrs=attrs)
        take_outputs(root, fused)
        return [fused]


class GeluErf(_GeluRule):
    """x * 0.5 * (1 + erf(x / sqrt(2))) -> Gelu."""

    name = "gelu-erf"

    def unit(self, t):
        found = _one_plus(t, "Erf")
        if found is None:
            return None
        add, erf = found
        scaled = erf.inputs[0]
        div = _producer(scaled, "Div")
        if div is not None and len(div.inputs) == 2 and _is_scalar(div.inputs[1], SQRT_2):
            return div.inputs[0], [add, erf, div], [_const_and_other(add)[0], div.inputs[1]]
        times = _times_const(scaled, 1.0 / SQRT_2)
        if times is not None:
            mul, x = times
            return x, [add, erf, mul], [_const_and_other(add)[0], _const_and_other(mul)[0]]
        return None


class GeluTanh(_GeluRule):
    """x * 0.5 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3))) -> Gelu approximate=tanh."""

    name = "gelu-tanh"
    approximate = "tanh"

    def unit(self, t):
        found = _one_plus(t, "Tanh")
        if found is None:
            return None
        add, tanh = found
        outer = _times_const(tanh.inputs[0], SQRT_2_OVER_PI)
        if outer is None:
            return None
        outer_mul, inner = outer
        inner_add = _producer(inner, "Add")
        if inner_add is None or len(inner_add.inputs) != 2:
            return None
        for i in (0, 1):
            x = inner_add.inputs[i]
            kappa = _times_const(inner_add.inputs[1 - i], TANH_CUBIC)
            if kappa is None:
                continue
            kappa_mul, cube = kappa
            cube_nodes = _cube_of(cube, x)
            if cube_nodes is None:
                continue
            consts = [_const_and_other(n)[0] for n in (add, outer_mul, kappa_mul)]
            return x, [add, tanh, outer_mul, inner_add, kappa_mul] + cube_nodes, consts
        return None


@register_pass("fuse-gelu")
class FuseGeluPass(Pass):
    """Fuse the erf and tanh GELU subgraphs into Gelu (opset 20) or onnxruntime's contrib op."""

    lossless = True
    requires_ops = frozenset({"Erf", "Tanh"})
    preserves = frozenset({"shapes", "symbolic-shapes"})  # the fused op writes the root's tensor

    @dataclass
    class Options:
        allow_contrib: bool = option(None, "emit com.microsoft Gelu/FastGelu when the model's opset is "
                                           "below 20 (default: the target's runtime.contrib_ops)")
        raise_opset: bool = option(True, "raise the default opset to 20 for the standard Gelu when every "
                                         "op keeps its meaning at 20 (tried before contrib ops)")

    def run(self, model, ctx) -> PassResult:
        allow_contrib = self.options.allow_contrib
        if allow_contrib is None:
            allow_contrib = bool(ctx.target.runtime.contrib_ops)
        opset = model.opset
        stats: dict[str, Any] = {"fused": 0}
        domain, raise_to = "", None
        refusal = None
        if opset < GELU_OPSET:
            blockers = raise_blockers(model, GELU_OPSET) if self.options.raise_opset else None
            if blockers is not None and not blockers:
                raise_to = GELU_OPSET
            elif allow_contrib:
                domain = CONTRIB_DOMAIN
                if blockers:
                    stats["opset_not_raised"] = sorted(blockers)[:3]
            else:
                refusal = f"opset {opset} < {GELU_OPSET}, contrib ops not allowed"
                if blockers:
                    refusal += "; raising unsafe: " + ", ".join(sorted(blockers)[:3])
                elif not self.options.raise_opset:
                    refusal += ", raise_opset off"
        rules = [GeluErf(domain), GeluTanh(domain)]
        if refusal is not None:
            found = _count_matches(rules, model, ctx, check=False)
            if found:
                stats["skipped"] = {refusal: found}
            return PassResult(changed=False, stats=stats)
        if raise_to is not None:
            legal = _count_matches(rules, model, ctx, check=True)
            if not legal:
                # nothing to fuse: keep the opset (the rule set below applies nothing and
                # reports why in its stats)
                raise_to = None
            else:
                raised, how = raise_opset(model, raise_to, convert=False)
                assert raised, how  # no blockers were found above
                stats["opset_raised"] = f"{opset} -> {raise_to}"
                logger.info("raised the default opset %d -> %d for Gelu", opset, raise_to)
        result = RuleSet(rules).apply(model, ctx)
        if domain and result.total:
            model.require_opset(CONTRIB_DOMAIN, 1)
        stats["fused"] = result.total
        stats.update(result.as_stats(r.name for r in rules))
        if result.total:
            stats["emitted"] = (f"{CONTRIB_DOMAIN} Gelu/FastGelu" if domain
                                else f"Gelu (opset {max(opset, GELU_OPSET)})")
        return PassResult(changed=result.total > 0 or raise_to is not None, stats=stats)
