"""The layers a low-rank pass can split, seen the same way whatever their op.

``dense_split(node, graph)`` (MatMul with a constant right operand of rank ≥ 2, Gemm with a
constant B, any transA/transB/alpha/beta) and ``conv_split(node, graph, method)`` (2-D
Conv with a constant kernel) return a ``Split`` or a reason why not. A Split knows:

- the statistics its factorization can be whitened with (``gram``), and builds the
  decomposition (``decompose``), centered on the input mean when the layer has a bias that
  can absorb the mean's share of the error (``bias_correction``);
- its cost at any rank (``params``, ``macs`` from the concrete input/output shapes);
- the nodes that replace it (``specs(rank)``: a chain of NodeSpecs), which are written into
  the graph (``rewrite``) or into a one-layer model for a micro-benchmark (``bench_models``);
- the weights that simulate the split inside the original graph (``replacements``, for a
  sensitivity measurement);
- how to refit the last factor and the bias from the student's activations to the
  teacher's outputs (``refit_request``, ``apply_refit``: ``Gram.solve``).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper, numpy_helper

from onnxopt.analysis.use_def import is_op
from onnxopt.data.statistics import REFERENCE, Gram, Patches, Tap
from onnxopt.factorization import conv as C
from onnxopt.ir.constants import constant_value, is_constant
from onnxopt.ir.names import NameTable, new_constant
from onnxopt.ir.surgery import remove_nodes, replace_input, take_outputs
from onnxopt.ir.weights import bias_add_after, is_float32_constant

METHODS = ("channel", "spatial", "tucker2", "separable")


@dataclass
class NodeSpec:
    """One node of a split chain. Inputs: "x" (the layer's input), "prev" (the previous
    node's output), a numpy array (a new float32 constant) or a gs.Tensor (kept as it is)."""

    op: str
    inputs: list
    attrs: dict = field(default_factory=dict)


def _users(t: gs.Tensor) -> int:
    return len(t.outputs)


class Split:
    """Base of DenseSplit and ConvSplit (see the module docstring)."""

    kind = ""
    node: gs.Node
    x: gs.Tensor
    decomposition: Any = None
    mean: np.ndarray | None = None  # input mean the bias absorbs (centered whitening), per input dim
    whitened: bool = False
    x_shape: tuple | None = None
    y_shape: tuple | None = None
    last: gs.Node | None = None  # after rewrite: the node holding the last factor
    z: gs.Tensor | None = None  # after rewrite: the input of the last factor

    array: np.ndarray  # the weight as factored: [..., K, N] (alpha folded in) or the Conv kernel

    @property
    def name(self) -> str:
        return self.node.name or self.node.outputs[0].name

    @property
    def weight_shape(self) -> tuple:
        return tuple(self.array.shape)

    @property
    def full_params(self) -> int:
        return int(self.array.size)

    def set_shapes(self, x_shape, y_shape) -> None:
        """The concrete shapes of the layer's input and output on the sample batch."""
        self.x_shape, self.y_shape = x_shape, y_shape

    # -- rewrite -------------------------------------------------------------------------------
    def rewrite(self, graph: gs.Graph, names: NameTable, rank: int) -> list[gs.Node]:
        """Replace the node by the chain for ``rank`` (in place, at the same position)."""
        specs = self.specs(rank)
        base = self.name
        nodes, prev = [], None
        for i, spec in enumerate(specs):
            inputs = []
            for j, item in enumerate(spec.inputs):
                if isinstance(item, str) and item == "x":
                    inputs.append(self.x)
                elif isinstance(item, str) and item == "prev":
                    inputs.append(prev)
                elif isinstance(item, np.ndarray):
                    inputs.append(new_constant(names, f"{base}_lowrank{i}_{j}", item.astype(np.float32)))
                else:
                    inputs.append(item)
            last = i == len(specs) - 1
            out = [] if last else [gs.Variable(names(f"{base}_lowrank{i}"), dtype=np.float32)]
            node = gs.Node(spec.op, names(f"{base}_lowrank{i}"), attrs=dict(spec.attrs), inputs=inputs, outputs=out)
            nodes.append(node)
            prev = out[0] if out else None
        take_outputs(self.node, nodes[-1])
        at = next(i for i, n in enumerate(graph.nodes) if n is self.node)
        remove_nodes(graph, [self.node])
        graph.nodes[at:at] = nodes
        self.last = nodes[-1]
        self.z = nodes[-1].inputs[0]
        self._after_rewrite(names)
        return nodes

    def _after_rewrite(self, names: NameTable) -> None:
        pass

    # -- micro-benchmark -------------------------------------------------------------------------
    def original_specs(self) -> list[NodeSpec]:  # pragma: no cover - abstract
        raise NotImplementedError

    def bench_models(self, rank: int, opset: int) -> tuple[onnx.ModelProto, onnx.ModelProto, dict]:
        """(one-layer model of the original, of the split at ``rank``, feeds) at the concrete
        input shape; the bias Add that follows a MatMul comes along in both."""
        rng = np.random.default_rng(0)
        feeds = {"x": rng.standard_normal(self.x_shape).astype(np.float32)}
        tail = self._bench_tail()
        return (_one_layer(self.original_specs() + tail, self.x_shape, opset),
                _one_layer(self.specs(rank) + tail, self.x_shape, opset), feeds)

    def _bench_tail(self) -> list[NodeSpec]:
        return []

    def bench_key(self, rank: int) -> tuple:  # pragma: no cover - abstract
        raise NotImplementedError


def solve_near(gram: Gram, w0: np.ndarray, b0: np.ndarray | None, ridge: float, columns=None,
               bias: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """``Gram.solve`` for the residual y − (x w0 + b0), added back: least squares whose ridge
    pulls toward the current factor ``w0`` [D_in, D_out] (and bias ``b0``) instead of toward
    zero, so a refit from few rows cannot stray far from the SVD's solution. With
    ``columns``, only those inputs are refitted (w0 holds every input's current weights)."""
    shifted = copy.copy(gram)
    shifted.xty = gram.xty - gram.xtx @ w0
    shifted.sum_y = gram.sum_y - gram.sum_x @ w0
    if b0 is not None:
        shifted.xty = shifted.xty - np.outer(gram.sum_x, b0)
        shifted.sum_y = shifted.sum_y - gram.count * b0
    dw, db = shifted.solve(ridge, columns=columns, bias=bias)
    w = (w0 if columns is None else w0[np.asarray(columns)]) + dw
    return w, ((b0 if b0 is not None else 0.0) + db) if db is not None else None


def _one_layer(specs: list[NodeSpec], x_shape, opset: int) -> onnx.ModelProto:
    nodes, inits, prev = [], [], "x"
    for i, spec in enumerate(specs):
        names = []
        for j, item in enumerate(spec.inputs):
            if isinstance(item, str) and item == "x":
                names.append("x")
            elif isinstance(item, str) and item == "prev":
                names.append(prev)
            elif isinstance(item, gs.Tensor):
                value = constant_value(item) if isinstance(item, gs.Constant) else None
                if value is None:  # a variable operand (Gemm's C): zeros of its shape time the same
                    shape = [d if isinstance(d, int) else 1 for d in (item.shape or [1])]
                    value = np.zeros(shape, np.float32)
                inits.append(numpy_helper.from_array(np.asarray(value), f"w{i}_{j}"))
                names.append(f"w{i}_{j}")
            else:
                inits.append(numpy_helper.from_array(np.asarray(item, np.float32), f"w{i}_{j}"))
                names.append(f"w{i}_{j}")
        out = f"t{i}"
        nodes.append(helper.make_node(spec.op, names, [out], **spec.attrs))
        prev = out
    graph = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, list(x_shape))],
                              [helper.make_tensor_value_info(prev, onnx.TensorProto.FLOAT, None)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _rows(shape) -> int:
    return int(math.prod(shape)) if shape is not None else 0


# -- MatMul / Gemm ---------------------------------------------------------------------------------
class DenseSplit(Split):
    """x W (+ b) with W constant: MatMul(x, W) or Gemm(x, B, C) of any transA/transB/alpha/beta.
    The split is x A then (x A) B, the bias on the second product."""

    kind = "dense"

    def __init__(self, node: gs.Node, graph: gs.Graph, w_kn: np.ndarray, bias_add):
        self.node, self.graph = node, graph
        self.x = node.inputs[0]
        self.op = node.op
        self.w_kn = self.array = w_kn  # [..., K, N] float64, alpha folded in
        self.stacked = w_kn.ndim > 2
        self.bias_add = bias_add  # (Add node, constant [N]) after a MatMul, or None
        attrs = node.attrs if node.op == "Gemm" else {}
        self.trans_a = bool(int(attrs.get("transA", 0)))
        self.beta = float(attrs.get("beta", 1.0))
        c = node.inputs[2] if node.op == "Gemm" and len(node.inputs) > 2 and node.inputs[2].name else None
        self.c = c
        n = self.n
        self.c_vector = None  # Gemm's C as [N] when it is a constant that broadcasts along rows
        if c is not None and is_float32_constant(c) and tuple(c.shape) in ((), (1,), (n,), (1, n), (1, 1)):
            self.c_vector = np.broadcast_to(constant_value(c).reshape(-1), (n,)).astype(np.float64) * self.beta

    @property
    def k(self) -> int:
        return self.w_kn.shape[-2]

    @property
    def n(self) -> int:
        return self.w_kn.shape[-1]

    def gram_width(self) -> int:
        """The side of the Gram ``gram()`` asks for."""
        return self.k

    @property
    def can_center(self) -> bool:
        """A bias can absorb the mean's share of the error: MatMul + constant bias Add, or a
        Gemm whose C is absent or a constant row vector."""
        if self.stacked:
            return False
        if self.op == "MatMul":
            return self.bias_add is not None
        return self.c is None or self.c_vector is not None

    @property
    def output(self) -> gs.Tensor:
        """The layer's output including its bias (the refit target)."""
        if self.bias_add is not None:
            return self.bias_add[0].outputs[0]
        return (self.last or self.node).outputs[0]

    def gram(self) -> Gram:
        return Gram(self.x.name, axis=0 if self.trans_a else -1)

    def decompose(self, gram: Gram | None, damp: float, center: bool = True) -> None:
        cov, self.mean = None, None
        if gram is not None and gram.count:
            cov = gram.covariance()
            if center and self.can_center:
                self.mean = gram.mean_x
                cov = cov - np.outer(self.mean, self.mean)
        self.whitened = cov is not None
        self.decomposition = C.Dense(self.w_kn, cov, damp)

    def params(self, rank: int) -> int:
        return self.decomposition.params(rank)

    @property
    def rows(self) -> int:
        """Rows of x W (all stack slices): the MACs are rows × K × N."""
        if self.y_shape is not None:
            return _rows(self.y_shape[:-1])
        return 0

    @property
    def full_macs(self) -> int:
        return self.rows * self.k * self.n

    def macs(self, rank: int) -> int:
        return self.rows * rank * (self.k + self.n)

    def _correction(self, a, b) -> np.ndarray | None:
        if self.mean is None:
            return None
        from onnxopt.factorization.svd import bias_correction

        return bias_correction(self.w_kn, a, b, self.mean)

    def specs(self, rank: int) -> list[NodeSpec]:
        a, b = self.decomposition.weights(rank)
        corr = self._correction(a, b)
        if self.op == "MatMul":
            self._pending_bias = corr
            return [NodeSpec("MatMul", ["x", a]), NodeSpec("MatMul", ["prev", b])]
        first = NodeSpec("Gemm", ["x", a], {"transA": int(self.trans_a)})
        if corr is not None:  # C (times beta) plus the correction, as one [N] constant
            bias = (self.c_vector if self.c_vector is not None else 0.0) + corr
            return [first, NodeSpec("Gemm", ["prev", b, np.asarray(bias)], {})]
        if self.c is not None:
            return [first, NodeSpec("Gemm", ["prev", b, self.c], {"beta": self.beta})]
        return [first, NodeSpec("Gemm", ["prev", b], {})]

    def _after_rewrite(self, names: NameTable) -> None:
        corr = getattr(self, "_pending_bias", None)
        if self.op == "MatMul" and corr is not None and self.bias_add is not None:
            add, bias = self.bias_add
            value = constant_value(bias).astype(np.float64) + corr
            replace_input(add, bias, new_constant(names, f"{bias.name}_lowrank", value.astype(np.float32)))
            self.bias_add = (add, add.inputs[0] if isinstance(add.inputs[0], gs.Constant) else add.inputs[1])

    def replacements(self, rank: int) -> dict[str, np.ndarray]:
        """The stored weight (and bias) that make the original layer compute the split."""
        a, b = self.decomposition.weights(rank)
        w = a @ b
        weight = self.node.inputs[1]
        out = {}
        if self.op == "Gemm":
            alpha = float(self.node.attrs.get("alpha", 1.0))
            w = w / alpha if alpha else w
            if int(self.node.attrs.get("transB", 0)):
                w = w.T
        out[weight.name] = w.astype(np.float32)
        corr = self._correction(a, b)
        if corr is not None:
            if self.op == "MatMul":
                bias = self.bias_add[1]
                out[bias.name] = (constant_value(bias).astype(np.float64) + corr).astype(np.float32)
            elif self.c is not None and self.beta and int(np.prod(self.c.shape)) == self.n:
                # (a C of one value cannot take a per-column correction: left out, it is small)
                c = constant_value(self.c).astype(np.float64)
                out[self.c.name] = (c + (corr / self.beta).reshape(c.shape)).astype(np.float32)
        return out

    def original_specs(self) -> list[NodeSpec]:
        return [NodeSpec(self.op, list(["x"] + list(self.node.inputs[1:])), dict(self.node.attrs))]

    def _bench_tail(self) -> list[NodeSpec]:
        if self.op == "MatMul" and self.bias_add is not None:
            return [NodeSpec("Add", ["prev", constant_value(self.bias_add[1]).astype(np.float32)])]
        return []

    def bench_key(self, rank: int) -> tuple:
        return ("dense", self.op, tuple(self.x_shape), self.weight_shape, self.trans_a,
                self.c is not None or self.bias_add is not None, int(rank))

    # -- refit ---------------------------------------------------------------------------------
    def refit_request(self) -> tuple[Gram | None, str | None]:
        if self.stacked:
            return None, "stacked weight: one Gram cannot refit each slice"
        if self.op == "Gemm" and self.c is not None and self.c_vector is None:
            return None, "Gemm with a variable or matrix C"
        return Gram(self.z.name, axis=-1, y=Tap(self.output.name, REFERENCE), y_axis=-1), None

    def apply_refit(self, gram: Gram, names: NameTable, ridge: float) -> None:
        with_bias = self.op == "Gemm" or self.bias_add is not None
        b0 = constant_value(self.last.inputs[1]).astype(np.float64)
        bias0 = None
        if self.op == "MatMul" and self.bias_add is not None:
            bias0 = constant_value(self.bias_add[1]).astype(np.float64)
        elif self.op == "Gemm":
            c = self.last.inputs[2] if len(self.last.inputs) > 2 else None
            beta = float(self.last.attrs.get("beta", 1.0))
            bias0 = np.broadcast_to(constant_value(c).reshape(-1) * beta, (self.n,)).astype(np.float64) \
                if c is not None else np.zeros(self.n)
        b, bias = solve_near(gram, b0, bias0, ridge, bias=with_bias)
        replace_input(self.last, self.last.inputs[1], new_constant(names, f"{self.name}_refit", b.astype(np.float32)))
        if bias is None:
            return
        bias = bias.astype(np.float32)
        if self.op == "MatMul":
            add, old = self.bias_add
            replace_input(add, old, new_constant(names, f"{old.name}_refit", bias))
            return
        constant = new_constant(names, f"{self.name}_refit_bias", bias)
        if len(self.last.inputs) > 2:
            replace_input(self.last, self.last.inputs[2], constant)
        else:
            self.last.inputs.append(constant)
        self.last.attrs["beta"] = 1.0


def dense_split(node: gs.Node, graph: gs.Graph) -> DenseSplit | str:
    """The DenseSplit of a MatMul/Gemm, or why it cannot be split."""
    if not is_op(node, "MatMul", "Gemm") or len(node.inputs) < 2 or not node.outputs:
        return "not a MatMul/Gemm of the default domain"
    x, w = node.inputs[:2]
    if not isinstance(w, gs.Constant):
        if is_constant(w):
            return "the weight is a Constant node (lift-constants, in the lossless pipeline, makes it an initializer)"
        return "the weight is not a constant" + (" (a constant left operand is not handled)"
                                                  if is_constant(x) else "")
    if not is_float32_constant(w):
        return "the weight is not float32"
    if _users(w) > 1:
        return f"the weight is shared with {_users(w) - 1} other node(s)"
    value = constant_value(w)
    if value is None or value.ndim < 2:
        return "the weight is not a matrix"
    if node.op == "MatMul":
        if x.shape is not None and len(x.shape) < 2 and value.ndim == 2:
            return "1-D input"
        w_kn = value.astype(np.float64)
        bias = bias_add_after(node, graph) if value.ndim == 2 else None
        if bias is not None and _users(bias[1]) > 1:
            bias = None
        return DenseSplit(node, graph, w_kn, bias)
    attrs = node.attrs
    alpha = float(attrs.get("alpha", 1.0))
    w_kn = (value.T if int(attrs.get("transB", 0)) else value).astype(np.float64) * alpha
    return DenseSplit(node, graph, w_kn, None)


# -- Conv ------------------------------------------------------------------------------------------
def explicit_pads(node: gs.Node, x_shape) -> list[int] | None:
    """The Conv's pads as [top, left, bottom, right], resolving auto_pad from the input size;
    None when SAME_* padding needs an input size that is unknown."""
    attrs = node.attrs
    auto = attrs.get("auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("NOTSET", ""):
        pads = list(attrs.get("pads", [0, 0, 0, 0]))
        return pads
    if auto == "VALID":
        return [0, 0, 0, 0]
    if x_shape is None or not all(isinstance(d, int) for d in x_shape[2:]):
        return None
    kernel = list(attrs.get("kernel_shape", []))
    strides = list(attrs.get("strides", [1, 1]))
    dilations = list(attrs.get("dilations", [1, 1]))
    begin, end = [], []
    for size, k, s, d in zip(x_shape[2:], kernel, strides, dilations):
        out = -(-size // s)
        total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
        small, large = total // 2, total - total // 2
        begin.append(small if auto == "SAME_UPPER" else large)
        end.append(large if auto == "SAME_UPPER" else small)
    return begin + end


class ConvSplit(Split):
    """A 2-D Conv with a constant kernel, split by ``method`` (onnxopt.factorization.conv)."""

    kind = "conv"

    def __init__(self, node: gs.Node, kernel: np.ndarray, method: str):
        self.node = node
        self.x = node.inputs[0]
        self.kernel = self.array = kernel.astype(np.float64)
        self.method = method
        self.groups = int(node.attrs.get("group", 1))
        self.b = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
        m, cg, kh, kw = kernel.shape
        self.strides = list(node.attrs.get("strides", [1, 1]))
        self.dilations = list(node.attrs.get("dilations", [1, 1]))
        self.pads: list[int] | None = None  # explicit, once the input shape is known

    @property
    def output(self) -> gs.Tensor:
        return (self.last or self.node).outputs[0]

    def set_shapes(self, x_shape, y_shape) -> None:
        super().set_shapes(x_shape, y_shape)
        self.pads = explicit_pads(self.node, x_shape)

    def _patches(self, kernel, strides, pads, dilations) -> Patches:
        return Patches(tuple(kernel), tuple(strides), tuple(pads), tuple(dilations))

    def gram(self) -> Gram | None:
        m, cg, kh, kw = self.kernel.shape
        if self.pads is None:
            return None
        if self.method == "tucker2":  # the first 1×1 conv sees every input position
            return Gram(self.x.name, axis=1)
        if self.method == "spatial":
            return Gram(self.x.name, patches=self._patches((kh, 1), (self.strides[0], 1),
                                                           (self.pads[0], 0, self.pads[2], 0), (self.dilations[0], 1)))
        return Gram(self.x.name, patches=self._patches((kh, kw), self.strides, self.pads, self.dilations))

    def gram_width(self) -> int:
        """The side of the Gram ``gram()`` asks for (what its memory grows with)."""
        m, cg, kh, kw = self.kernel.shape
        c = cg * self.groups
        return {"tucker2": c, "spatial": c * kh}.get(self.method, c * kh * kw)

    def decompose(self, gram: Gram | None, damp: float, center: bool = True) -> None:
        cov, self.mean = None, None
        m, cg, kh, kw = self.kernel.shape
        if gram is not None and gram.count:
            cov = gram.covariance()
            if center:
                mean = gram.mean_x
                cov = cov - np.outer(mean, mean)
                c = cg * self.groups
                self.mean = mean.reshape(c, -1).mean(1)  # per input channel
        self.whitened = cov is not None
        if self.method == "channel":
            self.decomposition = C.ChannelSVD(self.kernel, self.groups, cov, damp)
        elif self.method == "spatial":
            self.decomposition = C.SpatialSVD(self.kernel, cov, damp)
        elif self.method == "tucker2":
            self.decomposition = C.Tucker2(self.kernel, cov, damp)
        else:
            self.decomposition = C.Separable(self.kernel, cov, damp)

    def params(self, rank: int) -> int:
        return self.decomposition.params(rank)

    @property
    def out_positions(self) -> int:
        return _rows(self.y_shape) // self.kernel.shape[0] if self.y_shape is not None else 0

    @property
    def full_macs(self) -> int:
        return self.out_positions * self.full_params

    def macs(self, rank: int) -> int:
        m, cg, kh, kw = self.kernel.shape
        c = cg * self.groups
        if self.method == "spatial" and self.x_shape is not None and self.y_shape is not None:
            n, _, _, w_in = self.x_shape
            h_out = self.y_shape[2]
            return n * h_out * w_in * rank * c * kh + self.out_positions * m * rank * kw
        if self.method == "tucker2" and self.x_shape is not None:
            d = self.decomposition
            r1, r2 = min(rank, c), d.out_rank(rank)
            p_in = _rows(self.x_shape) // c
            return p_in * c * r1 + self.out_positions * (r2 * r1 * kh * kw + m * r2)
        return self.out_positions * self.params(rank)

    def _conv_attrs(self) -> dict:
        """The attributes the k×k part keeps as they are."""
        return {k: v for k, v in self.node.attrs.items() if k in ("strides", "dilations", "pads", "auto_pad")}

    def _bias(self, delta: np.ndarray) -> np.ndarray | gs.Tensor | None:
        """The last conv's bias: the layer's, plus the mean's share of the error when centered."""
        b = constant_value(self.b).astype(np.float64) if self.b is not None else None
        if self.mean is None:
            return self.b
        corr = C.kernel_bias_correction(delta, self.mean)
        return (b if b is not None else 0.0) + corr

    def specs(self, rank: int) -> list[NodeSpec]:
        d = self.decomposition
        m, cg, kh, kw = self.kernel.shape
        weights = d.weights(rank)
        bias = self._bias(self.kernel - d.reconstruct(rank)) if self.mean is not None else self.b
        tail = [bias] if bias is not None else []
        if self.method == "channel":
            first, second = weights
            g = {"group": self.groups} if self.groups > 1 else {}
            return [NodeSpec("Conv", ["x", first], {**self._conv_attrs(), "kernel_shape": [kh, kw], **g}),
                    NodeSpec("Conv", ["prev", second] + tail, {"kernel_shape": [1, 1], **g})]
        if self.method == "spatial":
            first, second = weights
            p = self.pads
            return [NodeSpec("Conv", ["x", first], {"kernel_shape": [kh, 1], "strides": [self.strides[0], 1],
                                                    "pads": [p[0], 0, p[2], 0], "dilations": [self.dilations[0], 1]}),
                    NodeSpec("Conv", ["prev", second] + tail, {"kernel_shape": [1, kw], "strides": [1, self.strides[1]],
                                                               "pads": [0, p[1], 0, p[3]],
                                                               "dilations": [1, self.dilations[1]]})]
        if self.method == "tucker2":
            first, core, last = weights
            return [NodeSpec("Conv", ["x", first], {"kernel_shape": [1, 1]}),
                    NodeSpec("Conv", ["prev", core], {**self._conv_attrs(), "kernel_shape": [kh, kw]}),
                    NodeSpec("Conv", ["prev", last] + tail, {"kernel_shape": [1, 1]})]
        depthwise, pointwise = weights
        c = cg * self.groups
        return [NodeSpec("Conv", ["x", depthwise], {**self._conv_attrs(), "kernel_shape": [kh, kw], "group": c}),
                NodeSpec("Conv", ["prev", pointwise] + tail, {"kernel_shape": [1, 1]})]

    def replacements(self, rank: int) -> dict[str, np.ndarray]:
        d = self.decomposition
        w = d.reconstruct(rank)
        out = {self.node.inputs[1].name: w.astype(np.float32)}
        if self.mean is not None and self.b is not None:
            out[self.b.name] = np.asarray(self._bias(self.kernel - w), np.float32)
        return out

    def original_specs(self) -> list[NodeSpec]:
        return [NodeSpec("Conv", ["x"] + list(self.node.inputs[1:]), dict(self.node.attrs))]

    def bench_key(self, rank: int) -> tuple:
        attrs = sorted((k, str(v)) for k, v in self.node.attrs.items())
        return ("conv", self.method, tuple(self.x_shape), self.weight_shape, tuple(attrs), self.b is not None,
                self.mean is not None, int(rank))

    # -- refit ---------------------------------------------------------------------------------
    def refit_request(self) -> tuple[Gram | None, str | None]:
        target = Tap(self.output.name, REFERENCE)
        if self.method == "spatial":
            m, cg, kh, kw = self.kernel.shape
            p = self.pads
            patches = self._patches((1, kw), (1, self.strides[1]), (0, p[1], 0, p[3]), (1, self.dilations[1]))
            return Gram(self.z.name, patches=patches, y=target, y_axis=1), None
        return Gram(self.z.name, axis=1, y=target, y_axis=1), None

    def apply_refit(self, gram: Gram, names: NameTable, ridge: float) -> None:
        m = self.kernel.shape[0]
        old = self.last.inputs[1]
        shape = tuple(old.shape)
        kernel0 = constant_value(old).astype(np.float64)
        bias0 = constant_value(self.last.inputs[2]).astype(np.float64) if len(self.last.inputs) > 2 \
            else np.zeros(m)
        if self.method == "channel" and self.groups > 1:
            g, r = self.groups, shape[1]
            per = m // g
            w0 = np.zeros((g * r, m))  # the grouped 1×1 conv as one block-diagonal matrix
            for i in range(g):
                w0[i * r:(i + 1) * r, i * per:(i + 1) * per] = kernel0[i * per:(i + 1) * per, :, 0, 0].T
            w = np.zeros((m, r), np.float64)
            bias = np.zeros(m, np.float64)
            for i in range(g):
                wi, bi = solve_near(gram, w0, bias0, ridge, columns=np.arange(i * r, (i + 1) * r))
                w[i * per:(i + 1) * per] = wi[:, i * per:(i + 1) * per].T
                bias[i * per:(i + 1) * per] = bi[i * per:(i + 1) * per]
            kernel = w.reshape(shape)
        else:
            if self.method == "spatial":  # rows of the patches: (channel, kernel column)
                w0 = kernel0[:, :, 0, :].reshape(m, -1).T
            else:
                w0 = kernel0.reshape(m, -1).T
            wi, bias = solve_near(gram, w0, bias0, ridge)  # [r·kw or r, M]
            if self.method == "spatial":
                r, kw = shape[1], shape[3]
                kernel = wi.T.reshape(m, r, 1, kw)
            else:
                kernel = wi.T.reshape(shape)
        replace_input(self.last, old, new_constant(names, f"{self.name}_refit", kernel.astype(np.float32)))
        constant = new_constant(names, f"{self.name}_refit_bias", bias.astype(np.float32))
        if len(self.last.inputs) > 2:
            replace_input(self.last, self.last.inputs[2], constant)
        else:
            self.last.inputs.append(constant)


def conv_split(node: gs.Node, method: str) -> ConvSplit | str:
    """The ConvSplit of a 2-D Conv for ``method`` (a 1×1 kernel always by channel SVD), or why
    it cannot be split."""
    if not is_op(node, "Conv") or len(node.inputs) < 2 or not node.outputs:
        return "not a Conv of the default domain"
    w = node.inputs[1]
    if not isinstance(w, gs.Constant) and is_constant(w):
        return "the kernel is a Constant node (lift-constants, in the lossless pipeline, makes it an initializer)"
    if not is_float32_constant(w):
        return "the kernel is not a float32 constant"
    if _users(w) > 1:
        return f"the kernel is shared with {_users(w) - 1} other node(s)"
    kernel = constant_value(w)
    if kernel is None or kernel.ndim != 4:
        return "not a 2-D convolution"
    b = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    if b is not None and not is_float32_constant(b):
        return "the bias is not a float32 constant"
    m, cg, kh, kw = kernel.shape
    groups = int(node.attrs.get("group", 1))
    if groups > 1 and cg == 1:
        return "depthwise: nothing to factor"
    if kh * kw == 1:
        if method == "separable":
            return "1×1 kernel: already pointwise"
        method = "channel"
    if groups > 1 and method != "channel":
        return f"grouped convolution: method={method} needs group=1 (method=channel handles groups)"
    if method == "spatial" and (kh == 1 or kw == 1):
        return f"{kh}×{kw} kernel: nothing to split spatially"
    return ConvSplit(node, kernel, method)
