"""Least-squares reconstruction of layers against the reference model (the teacher).

After a structural change (channels removed, a layer factorized), a layer's input differs
from what it was; refitting its weight so that, on calibration data, its output matches
the *original* model's output of the same name recovers most of the loss without
training (AIMET's channel-pruning reconstruction, Kwon et al.'s mask tuning). For each
layer: X = its input in the current model, Y = its output in the reference model, both
streamed into a ``Gram`` (im2col patches for a Conv), then ``Gram.solve`` with the
right-hand side taken relative to the current weight, so the ridge pulls the fit toward
the weight it has (not toward zero) when there are fewer samples than inputs.

Layers are refitted level by level (a layer after every refitted layer upstream of it),
the independent layers of a level in one streamed run, in chunks whose Gram matrices fit
a memory budget; each level's statistics are collected on the model as the levels before
it left it, so each refit also absorbs the error of the layers before it. A fit that does
not lower the squared error on the calibration data is not applied.

``refit_layers`` is what passes call (pruning's consumer reconstruction, the general
``refit``): it needs ``ctx.calibration`` with a reference model.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.data.statistics import REFERENCE, Gram, Patches, Tap, conv_patches
from onnxopt.ir.constants import constant_value
from onnxopt.ir.names import NameTable, new_constant
from onnxopt.ir.surgery import dependency_levels, replace_input
from onnxopt.ir.weights import bias_add_after, dense_layer

logger = logging.getLogger(__name__)


@dataclass
class LayerFit:
    """One layer to refit: ``node`` (a Conv with group 1, or a MatMul/Gemm dense layer)
    and ``columns``, the channels of the reference output its current outputs are (None:
    all of them, in order). ``keep_zeros``: the weight's zeros are a pruning mask and stay
    zero (the other weights are fitted, then made up for the zeros by the OBS sweep)."""

    node: gs.Node
    columns: np.ndarray | None = None
    keep_zeros: bool = False


def transposed_conv_patches(node: gs.Node) -> Patches | None:
    """A ConvTranspose (group 1, explicit pads, 1-D or 2-D, no ``output_shape``) as the Conv it
    equals: over its input spread out by the strides, padded by dilation·(k−1) − pad (plus
    output_padding at the end), with the kernel flipped and its channel axes swapped."""
    attrs = node.attrs
    if str(attrs.get("auto_pad", "NOTSET")) not in ("NOTSET", "VALID") or int(attrs.get("group", 1)) != 1 \
            or "output_shape" in attrs:
        return None
    kernel = tuple(int(k) for k in node.inputs[1].shape[2:])
    n = len(kernel)
    if n not in (1, 2):
        return None
    pads = [int(p) for p in attrs.get("pads", [0] * (2 * n))]
    strides = tuple(int(s) for s in attrs.get("strides", [1] * n))
    dilations = tuple(int(d) for d in attrs.get("dilations", [1] * n))
    extra = [int(p) for p in attrs.get("output_padding", [0] * n)]
    begin = [d * (k - 1) - p for d, k, p in zip(dilations, kernel, pads[:n])]
    end = [d * (k - 1) - p + e for d, k, p, e in zip(dilations, kernel, pads[n:], extra)]
    if min(begin + end) < 0:
        return None
    return Patches(kernel, (1,) * n, tuple(begin + end), dilations, strides)


class _Plan:
    """How one layer maps to a Gram (X rows, Y columns) and back to its weights."""

    def __init__(self, fit: LayerFit, graph: gs.Graph):
        self.fit = fit
        node = fit.node
        self.node = node
        self.why = None
        self.patches = None
        self.bias_add = None
        if node.op == "Conv":
            self.patches = conv_patches(node) if int(node.attrs.get("group", 1)) == 1 else None
            if self.patches is None:
                self.why = "grouped, padded by auto_pad or 3-D convolution"
                return
            w = constant_value(node.inputs[1])
            self.w0 = w.reshape(w.shape[0], -1).T.astype(np.float64)  # [C·k·k, M]
            self.b0 = constant_value(node.inputs[2]).astype(np.float64) if len(node.inputs) > 2 \
                and node.inputs[2].name else np.zeros(w.shape[0])
            self.x_axis = self.y_axis = 1
            self.fit_bias = True
            return
        if node.op == "ConvTranspose":
            self.patches = transposed_conv_patches(node)
            if self.patches is None:
                self.why = "grouped, auto_pad, output_shape or 3-D transposed convolution"
                return
            w = constant_value(node.inputs[1])  # [C, M, k…] -> the equal Conv's [M, C, k…]
            self.w0 = _flip(w).reshape(w.shape[1], -1).T.astype(np.float64)
            self.b0 = constant_value(node.inputs[2]).astype(np.float64) if len(node.inputs) > 2 \
                and node.inputs[2].name else np.zeros(w.shape[1])
            self.x_axis = self.y_axis = 1
            self.fit_bias = True
            return
        layer = dense_layer(node)
        if layer is None:
            self.why = "not a Conv, ConvTranspose or dense MatMul/Gemm"
            return
        self.layer = layer
        self.w0 = layer.weight_kn().astype(np.float64)
        self.x_axis = self.y_axis = -1
        if node.op == "Gemm":
            self.fit_bias = True
            self.b0 = layer.bias_n().astype(np.float64) if layer.bias is not None else np.zeros(layer.n)
        else:
            # MatMul + Add(bias): the fitted intercept is added to the Add's constant
            self.bias_add = bias_add_after(node, graph)
            self.fit_bias = self.bias_add is not None
            self.b0 = np.zeros(layer.n)

    @property
    def dim(self) -> int:
        return self.w0.shape[0]

    def bytes(self) -> int:
        return 8 * self.dim * (self.dim + self.w0.shape[1] + 2)

    def gram(self) -> Gram:
        return Gram(self.node.inputs[0].name, axis=self.x_axis, y=Tap(self.node.outputs[0].name, REFERENCE),
                    y_axis=self.y_axis, patches=self.patches)

    def solve(self, gram: Gram, ridge: float) -> tuple[np.ndarray, np.ndarray, float, float] | None:
        """(W, b, error before, error after) in the Gram's layout, or None when the statistics
        do not fit this layer."""
        cols = self.fit.columns
        if gram.count == 0 or gram.xty is None or gram.xtx.shape[0] != self.dim:
            return None
        if cols is None:
            cols = np.arange(gram.xty.shape[1])
        if len(cols) != self.w0.shape[1] or (len(cols) and cols.max() >= gram.xty.shape[1]):
            return None
        # The fit of the residual Y - X·W0 (ridge pulls toward the current weight)
        rel = copy.copy(gram)
        rel.xty = gram.xty[:, cols] - gram.xtx @ self.w0
        rel.sum_y = gram.sum_y[cols] - gram.sum_x @ self.w0
        # few samples per input: shrink harder toward the current weight, (inputs/samples)²
        # (negligible with plenty of data, dominant when the system is underdetermined)
        delta, b = rel.solve(ridge=ridge + (self.dim / max(gram.count, 1)) ** 2, bias=self.fit_bias)
        if self.fit.keep_zeros:
            delta, b = self._keep_zeros(gram, cols, self.w0 + delta, b, ridge)
        before = _error(gram, cols, self.w0, self.b0 if self.fit_bias else None)
        after = _error(gram, cols, self.w0 + delta, b)
        return self.w0 + delta, b, before, after

    def _keep_zeros(self, gram: Gram, cols, w: np.ndarray, b, ridge: float):
        """The fit ``w`` (+ ``b``) with the current weight's zeros put back, the kept weights
        compensating them on this layer's inputs (``onnxopt.data.obs``); returns the change
        from the current weight and the bias refitted for it."""
        from onnxopt.data.obs import hessian, prune_compensated

        n = max(gram.count, 1)
        h = gram.xtx / n
        mean = gram.sum_x / n
        if self.fit_bias:  # the bias takes the mean: only the spread matters
            h = h - np.outer(mean, mean)
        keep = self.w0 != 0  # [dim, M]
        # damped as the fit is: with fewer samples than inputs, H has directions the data
        # never saw, and an undamped sweep would fit the calibration samples exactly
        damp = min(10.0, max(ridge, 0.01) + (self.dim / n) ** 2)
        pruned = prune_compensated(w.T, hessian(h, damp), keep.T).T
        if self.fit_bias:
            b = gram.sum_y[cols] / n - mean @ pruned
        return pruned - self.w0, b

    def write(self, w: np.ndarray, b: np.ndarray | None, names: NameTable) -> None:
        node = self.node
        if node.op in ("Conv", "ConvTranspose"):
            old = constant_value(node.inputs[1])
            if node.op == "Conv":
                _set(node, 1, w.T.reshape(old.shape).astype(old.dtype), names)
            else:
                conv_shape = (old.shape[1], old.shape[0]) + old.shape[2:]
                _set(node, 1, _flip(w.T.reshape(conv_shape)).astype(old.dtype), names)
            if b is not None:
                if len(node.inputs) > 2 and node.inputs[2].name:
                    _set(node, 2, b.astype(old.dtype), names)
                else:
                    node.inputs.append(new_constant(names, f"{node.inputs[1].name}_bias", b.astype(old.dtype)))
            return
        layer = self.layer
        dtype = constant_value(layer.weight).dtype
        _set(node, 1, (w.T if layer.transposed else w).astype(dtype), names)
        if b is None:
            return
        if node.op == "Gemm":
            if layer.bias is not None:
                shape = constant_value(layer.bias).shape
                full = np.broadcast_to(b, (layer.n,))
                _set(node, 2, full.reshape(shape if int(np.prod(shape)) == layer.n else (layer.n,)).astype(dtype),
                     names)
            else:
                node.inputs.append(new_constant(names, f"{layer.weight.name}_bias", b.astype(dtype)))
                node.attrs["beta"] = 1.0
        elif self.bias_add is not None:
            add, const = self.bias_add
            index = next(i for i, t in enumerate(add.inputs) if t is const)
            _set(add, index, (constant_value(const) + b).astype(dtype), names)


def _flip(w: np.ndarray) -> np.ndarray:
    """A ConvTranspose kernel [C, M, k…] as its equal Conv's [M, C, k…] (and back: it is its
    own inverse): channel axes swapped, kernel flipped."""
    return np.ascontiguousarray(np.flip(np.swapaxes(w, 0, 1), axis=tuple(range(2, w.ndim))))


def _set(node: gs.Node, index: int, values: np.ndarray, names: NameTable) -> None:
    """Input ``index`` of ``node`` holds ``values``: in place when only this node reads the
    constant, else a new constant for this node."""
    t = node.inputs[index]
    if isinstance(t, gs.Constant) and len(t.outputs) == 1:
        t.values = np.ascontiguousarray(values)
    else:
        replace_input(node, t, new_constant(names, t.name, values))


def _error(gram: Gram, cols: np.ndarray, w: np.ndarray, b: np.ndarray | None) -> float:
    """‖X·W + b − Y[:, cols]‖² from the sums, without the constant ‖Y‖² term (only
    differences between two fits of the same layer are meaningful)."""
    xtx, xty, n = gram.xtx, gram.xty[:, cols], gram.count
    e = float(np.sum(w * (xtx @ w)) - 2.0 * np.sum(w * xty))
    if b is not None:
        e += float(2.0 * b @ (gram.sum_x @ w) - 2.0 * b @ gram.sum_y[cols] + n * b @ b)
    return e


def refit_layers(model, ctx, fits: list[LayerFit], ridge: float = 1e-3,
                 budget_bytes: int = 384 << 20, max_dim: int = 8192) -> list[dict]:
    """Refit each layer of ``fits`` (in the order given: topological) so its output matches
    the reference model's tensor of the same name on ``ctx.calibration``. Returns one record
    per layer: its name and ``status`` (refitted, worse, skipped) with the reason or the
    relative change of the squared error."""
    records = []
    plans = []
    names = NameTable.of(model.graph)
    for fit in fits:
        plan = _Plan(fit, model.graph)
        if plan.why is None and plan.dim > max_dim:
            plan.why = f"{plan.dim} inputs per output (more than {max_dim})"
        if plan.why is not None:
            records.append({"layer": fit.node.name, "status": "skipped", "reason": plan.why})
            continue
        plans.append(plan)
    for level in dependency_levels(model.graph, plans, lambda p: p.node):
        chunk: list[_Plan] = []
        used = 0
        for plan in level + [None]:
            if plan is not None and (not chunk or used + plan.bytes() <= budget_bytes):
                chunk.append(plan)
                used += plan.bytes()
                continue
            if chunk:
                records.extend(_fit_chunk(model, ctx, chunk, ridge, names))
            chunk, used = ([plan], plan.bytes()) if plan is not None else ([], 0)
    return records


def _fit_chunk(model, ctx, chunk: list[_Plan], ridge: float, names: NameTable) -> list[dict]:
    records = []
    grams = ctx.calibration.reduce(model, [p.gram() for p in chunk])
    changed = False
    for p, g in zip(chunk, grams):
        solved = p.solve(g, ridge)
        if solved is None:
            records.append({"layer": p.node.name, "status": "skipped",
                            "reason": "no statistics (output not in the reference model?)"})
            continue
        w, b, before, after = solved
        if after >= before:
            records.append({"layer": p.node.name, "status": "worse", "error_change": after - before})
            continue
        p.write(w, b, names)
        changed = True
        records.append({"layer": p.node.name, "status": "refitted", "error_change": after - before})
    if changed:
        ctx.calibration.invalidate()
    return records
