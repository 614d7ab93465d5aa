"""Constant folding: compute what does not depend on the model's inputs once, at compile time.

fold-constants
    A node of the default ONNX domain whose inputs are all constant (initializers, Constant
    nodes, outputs of nodes folded before it) is evaluated and its outputs become
    initializers. Evaluation is batched: every node whose output size follows from the
    shapes of its inputs joins the current batch (so a chain of any depth is one batch),
    and each batch is one small model run in one onnxruntime session (ORT_DISABLE_ALL, so
    the values are exactly what the runtime would compute); a node whose size needs its
    inputs' values waits for the next batch. When a batch fails, its nodes are evaluated
    one by one, by onnxruntime, else by onnx's ReferenceEvaluator, else left alone.

    Shape computations: a node whose every output value the symbolic shape analysis
    (``symbolic-shapes``: symbolic dims, small int values, declared shapes never trusted)
    knows as plain integers becomes constants without evaluating anything: ``Shape`` (with
    its ``start``/``end``) and ``Size`` of a tensor of static shape, and any Gather, Slice,
    Concat, Cast, arithmetic, Equal/Where, ConstantOfShape, Range ... of shape values that
    pick or compute only known numbers (``Gather(Shape(x), 1)`` with x of shape
    [batch, 3, H] is 3; ``Equal([batch, -1], -1)`` is [false, true], since a dim is never
    -1). So exported Shape -> Gather -> Unsqueeze -> Concat -> Reshape chains fold away
    wherever the dims they read are known.

    Size bound (option ``max_bytes``): a node is folded only when the byte size of every
    output is known BEFORE it is evaluated and is at most ``max_bytes``: from the
    broadcast of its inputs for elementwise ops, else from the symbolic shapes, else
    from onnx's shape inference of that one node fed the constant input values. So a
    ConstantOfShape/Expand/Tile/Range/Resize to a huge size is never computed.

    Left alone: random ops (RandomNormal/Uniform[Like], Multinomial, Bernoulli), ops of
    other domains (custom or contrib: their kernels may be missing or nondeterministic),
    If/Loop/Scan, sequence and optional ops, DequantizeLinear (folding it would turn the
    int8 weights of a Q/DQ model back into float; onnxruntime's folder skips it too), and
    values numpy cannot hold exactly (bfloat16, float8, int4, complex, strings).

    Graph outputs: a folded tensor that is an output of the main graph keeps being
    produced by a node: its producer is replaced by a ``Constant`` node writing the same
    name (an initializer cannot stand for a graph output here). A node writing an output
    of an If/Loop/Scan body is left as it is (nothing to gain).

    Subgraphs: bodies are folded after the graph that holds them, so constants of the outer
    graph (including ones just folded) are visible inside; the shape analysis covers bodies
    too (a Loop's carried values get fresh dims: they may change from one iteration to the
    next).
    An ``If`` whose condition becomes constant is replaced by the nodes of the branch it
    takes (their names kept, renamed only on a clash), then folding goes on.

    Safety net for If: with a constant condition, onnxruntime checks the taken branch's
    shapes when it loads the model, more strictly than its kernels run them. When the
    folded model no longer loads in onnxruntime but the input did, the pass folds again
    leaving If conditions and what computes them alone (stat ``if_conditions_kept``).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from onnxopt.analysis.shape_rules import MAX_VALUE
from onnxopt.analysis.shapes import ShapeFacts, symbolic_shapes
from onnxopt.ir.constants import (EXACT_DTYPES, EXACT_TYPES, constant_node_value, exact_array, has_exact_value,
                                  is_default_domain)
from onnxopt.ir.graph_io import export_node, import_graph
from onnxopt.ir.ops import BOOL_RESULT, ELEMENTWISE, NONDETERMINISTIC
from onnxopt.ir.submodel import submodel
from onnxopt.ir.surgery import detach_nodes, topological_order
from onnxopt.pipeline.pass_api import Pass, PassResult, option
from onnxopt.pipeline.registry import register_pass

logger = logging.getLogger(__name__)

MIB = 1 << 20

NEVER_FOLD = NONDETERMINISTIC | frozenset({
    "If", "Loop", "Scan", "Constant", "DequantizeLinear",
    "SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceErase", "SequenceInsert",
    "SequenceLength", "SplitToSequence", "ConcatFromSequence", "SequenceMap",
    "Optional", "OptionalGetElement", "OptionalHasElement",
})

def _nbytes(spec: tuple) -> int:
    shape, dtype = spec
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


# Inputs of these ops that are parameters, not data (left out of the broadcast).
_PARAM_INPUTS = {"Clip": 1}

# Constant inputs up to this size go into the evaluation model as initializers, not feeds.
_SMALL_VALUE = 4096

# Inputs up to this size are handed to onnx's per-node shape inference as values.
_INFER_DATA_LIMIT = 64 * 1024


def graph_output_ids(model) -> set[int]:
    """ids of every tensor that is an output of the main graph or of any body."""
    return {id(t) for g in model.graphs() for t in g.outputs}


@register_pass("fold-constants")
class FoldConstantsPass(Pass):
    """Evaluate nodes whose inputs are all constant and store their outputs as initializers."""

    lossless = True
    # Folding replaces computed tensors by constants of the same shape and type, and an
    # inlined If's outputs keep theirs: every shape the analysis knew stays true (tensors
    # it never saw are simply unknown to it), so the next pass need not infer again.
    preserves = frozenset({"shapes", "symbolic-shapes"})

    @dataclass
    class Options:
        max_bytes: int = option(MIB, "never fold a node whose output would be larger than this many bytes")

    def run(self, model, ctx) -> PassResult:
        if not any(n.op == "If" for g in model.graphs() for n in g.nodes):
            changed, stats = self.fold(model, ctx, inline_ifs=True)
            return PassResult(changed=changed, stats=dict(sorted(stats.items())))
        # A constant If condition (or an inlined If) shows onnxruntime's load-time checks the
        # shapes of the taken branch, and those checks are stricter than its kernels (ONNX's
        # own AffineGrid function feeds Range 1-element tensors where scalars are due). So a
        # model with If nodes must still load after folding; if it no longer does, fold
        # again leaving If conditions (and what computes them) alone, else give up.
        before = model.export()
        changed, stats = self.fold(model, ctx, inline_ifs=True)
        if not changed or _loads(model.export()) or not _loads(before):
            return PassResult(changed=changed, stats=dict(sorted(stats.items())))
        logger.info("folding If conditions breaks loading in onnxruntime: folding without them")
        model.graph = import_graph(before)
        _drop_shapes(ctx)
        changed, stats = self.fold(model, ctx, inline_ifs=False)
        stats["if_conditions_kept"] = 1
        if changed and not _loads(model.export()):
            model.graph = import_graph(before)
            _drop_shapes(ctx)
            changed, stats = False, {"folded_nodes": 0, "gave_up_model_does_not_load": 1}
        return PassResult(changed=changed, stats=dict(sorted(stats.items())))

    def fold(self, model, ctx, inline_ifs: bool) -> tuple[bool, dict]:
        stats: dict[str, int] = defaultdict(int)
        changed = False
        facts = self.facts(model, ctx)
        for round_ in range(8):
            folder = _Folder(model, facts, self.options.max_bytes, stats, inline_ifs)
            small_before = stats["evaluated_small_values"]
            round_changed, again = folder.fold_all()
            changed |= round_changed
            stats["rounds"] = round_ + 1
            if not round_changed:
                break
            # Small values computed by evaluation (a pads vector built through a rank-2
            # Reshape, which the analysis never tracks; Resize scales) may make more shapes
            # and values known: infer again, incrementally from what was folded.
            if stats["evaluated_small_values"] > small_before or again:
                if again:  # inlined If branches or sizes unknown: everything afresh
                    facts = symbolic_shapes(model)
                else:
                    facts = symbolic_shapes(model, previous=facts, changed=folder.folded_names)
                if ctx is not None:
                    ctx.invalidate(frozenset(a for a in ctx.cached_analyses
                                             if a not in ("shapes", "symbolic-shapes")))
                    ctx.provide("symbolic-shapes", facts)
                continue
            break
        stats["folded_nodes"] += 0
        return changed, {k: v for k, v in stats.items() if v or k == "folded_nodes"}


    @staticmethod
    def facts(model, ctx) -> ShapeFacts:
        """The symbolic shapes, when they can tell something evaluation cannot: a value that
        is not computed from constants alone starts at a Shape or a Size. Without either in
        the model (and none computed already) the walk over every node is saved."""
        if ctx is not None and "symbolic-shapes" in ctx.cached_analyses:
            return ctx.analysis("symbolic-shapes", model)
        if not any(n.op in ("Shape", "Size") for g in model.graphs() for n in g.nodes):
            return ShapeFacts()
        return ctx.analysis("symbolic-shapes", model) if ctx is not None else symbolic_shapes(model)


def _drop_shapes(ctx) -> None:
    if ctx is not None:
        ctx.invalidate(frozenset(a for a in ctx.cached_analyses if a not in ("shapes", "symbolic-shapes")))


def _loads(proto: onnx.ModelProto) -> bool:
    from onnxopt.measure import verify

    try:
        verify.session(proto)
    except verify.CannotRun:
        return False
    return True


def if_condition_cone(model) -> set[int]:
    """ids of the nodes that compute an If condition, directly or through other nodes."""
    cone: set[int] = set()
    stack = [n.inputs[0] for g in model.graphs() for n in g.nodes if n.op == "If" and n.inputs]
    while stack:
        t = stack.pop()
        node = t.inputs[0] if t.inputs else None
        if node is None or id(node) in cone:
            continue
        cone.add(id(node))
        stack.extend(i for i in node.inputs if i.name)
    return cone


class _Folder:
    """One round of folding over every graph of a model."""

    def __init__(self, model, facts: ShapeFacts, max_bytes: int, stats: dict, inline_ifs: bool = True):
        self.model = model
        self.inline_ifs = inline_ifs
        self.condition_cone = set() if inline_ifs else if_condition_cone(model)
        self.facts = facts
        self.max_bytes = max_bytes
        self.stats = stats
        self.opset_import = model.opset_protos()
        self.ir_version = model.template.ir_version
        self.known: dict[int, np.ndarray] = {}  # id(tensor) -> value
        self.planned: dict[int, tuple] = {}  # id(tensor) -> (shape, dtype), evaluated in this batch
        self.blocked_here = False
        self.outputs = graph_output_ids(model)
        self.body_outputs = self.outputs - {id(t) for t in model.graph.outputs}
        self.folded_names: set[str] = set()  # outputs replaced by constants

    # -- driver --------------------------------------------------------------------------
    def fold_all(self) -> tuple[bool, bool]:
        self.changed = self.blocked = False
        inlined_before = self.stats["inlined_ifs"]
        self.visit(self.model.graph)
        return self.changed, self.blocked or self.stats["inlined_ifs"] > inlined_before

    def visit(self, graph: gs.Graph) -> None:
        """Fold ``graph``, inline its Ifs with a constant condition, then its bodies."""
        while True:
            changed, blocked = self.fold_graph(graph)
            self.changed |= changed
            self.blocked |= blocked
            if not self.inline_constant_ifs(graph):
                break
            self.changed = True
            self.outputs = graph_output_ids(self.model)
            self.body_outputs = self.outputs - {id(t) for t in self.model.graph.outputs}
        for node in graph.nodes:
            for value in node.attrs.values():
                for sub in value if isinstance(value, list) else [value]:
                    if isinstance(sub, gs.Graph):
                        self.stats["subgraphs_visited"] += 1
                        self.visit(sub)

    def value_of(self, t: gs.Tensor) -> np.ndarray | None:
        key = id(t)
        if key in self.known:
            return self.known[key]
        value = None
        if isinstance(t, gs.Constant):
            value = exact_array(t)
        elif t.inputs and t.inputs[0].op == "Constant" and is_default_domain(t.inputs[0]):
            value = constant_node_value(t.inputs[0])
        if value is not None:
            self.known[key] = value
        return value

    def is_known(self, t: gs.Tensor) -> bool:
        """``value_of(t) is not None``, without reading a weight that is not needed."""
        return id(t) in self.known or has_exact_value(t)

    # -- one graph -----------------------------------------------------------------------
    def fold_graph(self, graph: gs.Graph) -> tuple[bool, bool]:
        """Fold every foldable node of ``graph``; returns (changed, some node had no size)."""
        missing: dict[int, int] = {}  # id(node) -> distinct inputs not yet known or planned
        waiting: dict[int, list[gs.Node]] = defaultdict(list)  # id(tensor) -> candidates
        ready: list[gs.Node] = []
        # tensors that can never be known here: graph inputs, and what is computed from them
        # (most of a model: one lookup per node settles it)
        unknowable: set[int] = {id(t) for t in graph.inputs}
        with_values = bool(self.facts.values)
        for node in topological_order(graph):
            if with_values and self.candidate(node) and self.known_values(node) is not None:
                ready.append(node)
                continue
            unknown = {id(t): t for t in node.inputs if t.name and not self.is_known(t)}
            if any(key in unknowable for key in unknown) or not self.candidate(node):
                unknowable.update(id(o) for o in node.outputs)
            elif not unknown:
                ready.append(node)
            elif all(t.inputs and self.candidate(t.inputs[0]) for t in unknown.values()):
                missing[id(node)] = len(unknown)
                for key in unknown:
                    waiting[key].append(node)
            else:
                unknowable.update(id(o) for o in node.outputs)

        folded: dict[int, gs.Node] = {}
        self.blocked_here = False
        while ready:
            # Plan as many waves as possible for one session: a node joins when its output
            # size follows from the shapes of its inputs; else it waits for their values.
            self.planned = {}
            batch, deferred = [], []
            queue = list(reversed(ready))
            while queue:
                node = queue.pop()
                values = self.known_values(node)
                if values is not None:
                    for out, value in zip(node.outputs, values):
                        if out.name:
                            self.known[id(out)] = value
                    folded[id(node)] = node
                    self.stats["shape_folds"] += 1
                    queue.extend(reversed(self.release(node, waiting, missing)))
                    continue
                specs = self.output_specs(node)
                if specs is None and any(self.value_of(t) is None for t in node.inputs if t.name):
                    deferred.append(node)  # its size needs input values: after this batch
                    continue
                if not self.fits(node, specs):
                    continue
                batch.append(node)
                for out, spec in zip([o for o in node.outputs if o.name], specs):
                    self.planned[id(out)] = spec
                queue.extend(reversed(self.release(node, waiting, missing)))
            self.planned = {}
            done = self.evaluate(batch, folded)
            ready = [n for n in deferred
                     if all(self.value_of(t) is not None for t in n.inputs if t.name)]
            if not done and len(ready) == len(deferred) and deferred and not batch:
                break  # nothing progressed (cannot happen, but never loop forever)
        if not folded:
            return False, self.blocked_here
        self.replace(graph, folded)
        return True, self.blocked_here

    @staticmethod
    def release(node: gs.Node, waiting: dict, missing: dict) -> list[gs.Node]:
        """Candidates whose last missing input ``node`` provides."""
        out = []
        for o in node.outputs:
            for user in waiting.pop(id(o), ()):
                missing[id(user)] -= 1
                if missing[id(user)] == 0:
                    out.append(user)
        return out

    def candidate(self, node: gs.Node) -> bool:
        if not is_default_domain(node) or node.op in NEVER_FOLD:
            return False
        if any(isinstance(v, gs.Graph) or (isinstance(v, list) and v and isinstance(v[0], gs.Graph))
               for v in node.attrs.values()):
            return False
        # A body's output stays computed by its node: a Constant there would only tell
        # onnxruntime's load-time checks the shape of the If/Loop output (nothing to gain).
        if any(id(o) in self.body_outputs for o in node.outputs):
            return False
        if id(node) in self.condition_cone:  # see FoldConstantsPass.run
            return False
        return bool(node.outputs)

    # -- shape folding -------------------------------------------------------------------
    def known_values(self, node: gs.Node) -> list[np.ndarray | None] | None:
        """The values of ``node``'s outputs when the shape analysis knows every one of them
        as plain integers (one per output, None for an unnamed one); else None."""
        if node.op == "Constant" or not node.outputs:
            return None
        values = []
        for out in node.outputs:
            if not out.name:
                values.append(None)
                continue
            value = self.facts.static_value(out.name)
            if value is None:
                return None
            values.append(value)
        return values

    # -- the size bound ------------------------------------------------------------------
    def fits(self, node: gs.Node, specs: list | None) -> bool:
        if specs is None:
            self.stats["skipped_unknown_size"] += 1
            self.blocked_here = True
            return False
        if max((_nbytes(spec) for spec in specs), default=0) > self.max_bytes:
            self.stats["skipped_too_large"] += 1
            return False
        return True

    def input_spec(self, t: gs.Tensor) -> tuple | None:
        """(shape, dtype) of a known or planned input."""
        value = self.value_of(t)
        if value is not None:
            return tuple(value.shape), value.dtype
        return self.planned.get(id(t))

    def output_specs(self, node: gs.Node) -> list[tuple] | None:
        """(shape, dtype) of each output, known without evaluating the node; None when unknown."""
        live = [o for o in node.outputs if o.name]
        if node.op in ELEMENTWISE and len(live) == 1:
            spec = self.elementwise_spec(node)
            if spec is not None:
                return [spec]
        specs = [self.analysis_spec(o) for o in live]
        if all(s is not None for s in specs):
            return specs
        if any(self.value_of(t) is None for t in node.inputs if t.name):
            return None
        return self.inferred_specs(node)

    def elementwise_spec(self, node: gs.Node) -> tuple | None:
        inputs = [self.input_spec(t) for t in node.inputs if t.name]
        if any(i is None for i in inputs):
            return None
        skip = _PARAM_INPUTS.get(node.op)
        data = inputs[:skip] if skip else inputs
        try:
            shape = tuple(int(d) for d in np.broadcast_shapes(*[i[0] for i in data])) if data else ()
        except ValueError:
            return None
        if node.op == "Cast":
            np_type = EXACT_TYPES.get(node.attrs.get("to"))
            dtype = np.dtype(np_type) if np_type else None
        elif node.op in BOOL_RESULT:
            dtype = np.dtype(np.bool_)
        elif node.op == "Where":
            dtype = inputs[1][1] if len(inputs) > 1 else None
        else:
            dtype = data[0][1] if data else None
        return None if dtype is None else (shape, dtype)

    def analysis_spec(self, t: gs.Tensor) -> tuple | None:
        shape, dtype = self.facts.static_shape(t.name), self.facts.dtype(t.name)
        if shape is None or dtype is None:
            return None
        return (tuple(shape), dtype) if dtype in EXACT_DTYPES else None

    def inferred_specs(self, node: gs.Node) -> list[tuple] | None:
        """onnx shape inference of this one node, fed the (small) constant inputs' values."""
        try:
            schema = onnx.defs.get_schema(node.op, max_inclusive_version=self.opset(""), domain="")
            proto = export_node(node)
            types, data = {}, {}
            for t in node.inputs:
                if not t.name or t.name in types:
                    continue
                value = self.value_of(t)
                types[t.name] = onnx.helper.make_tensor_type_proto(
                    onnx.helper.np_dtype_to_tensor_dtype(value.dtype), value.shape)
                if value.nbytes <= _INFER_DATA_LIMIT:
                    data[t.name] = numpy_helper.from_array(value, t.name)
            result = onnx.shape_inference.infer_node_outputs(
                schema, proto, types, data, opset_imports=self.opset_import, ir_version=self.ir_version)
        except Exception as exc:  # inference is best effort: an unknown size means no folding
            logger.debug("no shape for %s (%s): %s", node.name, node.op, exc)
            return None
        specs = []
        for out in node.outputs:
            if not out.name:
                continue
            tp = result.get(out.name)
            if tp is None or not tp.HasField("tensor_type") or not tp.tensor_type.HasField("shape"):
                return None
            dims = tp.tensor_type.shape.dim
            np_type = EXACT_TYPES.get(tp.tensor_type.elem_type)
            if np_type is None or not all(d.HasField("dim_value") for d in dims):
                return None
            specs.append((tuple(d.dim_value for d in dims), np.dtype(np_type)))
        return specs

    def opset(self, domain: str) -> int:
        return self.model.opset_of(domain) or onnx.defs.onnx_opset_version()

    # -- evaluation ----------------------------------------------------------------------
    def evaluate(self, batch: list[gs.Node], folded: dict) -> list[gs.Node]:
        """Evaluate a batch (in producer-first order); returns the nodes now known."""
        if not batch:
            return []
        self.stats["batches"] += 1
        results = self.run_ort(batch)
        if results is not None:
            return [n for n in batch if self.accept(n, results, folded)]
        # Some node of the batch fails in onnxruntime: evaluate one node at a time, with the
        # reference evaluator for the ones onnxruntime refuses.
        done = []
        for node in batch:
            if any(self.value_of(t) is None for t in node.inputs if t.name):
                continue  # a producer in this batch could not be evaluated
            single = self.run_ort([node])
            if single is None:
                single = self.run_reference(node)
                if single is not None:
                    self.stats["evaluated_by_reference"] += 1
            if single is not None and self.accept(node, single, folded):
                done.append(node)
            elif single is None:
                self.stats["skipped_not_evaluable"] += 1
        return done

    def accept(self, node: gs.Node, results: dict, folded: dict) -> bool:
        """Record the node's values when they are plain tensors within the size bound."""
        values = [results.get(o.name) for o in node.outputs if o.name]
        if any(not isinstance(v, np.ndarray) or v.dtype not in EXACT_DTYPES for v in values):
            self.stats["skipped_not_evaluable"] += 1
            return False
        if any(v.nbytes > self.max_bytes for v in values):  # the predicted size was wrong
            self.stats["skipped_too_large"] += 1
            return False
        for o in node.outputs:
            if o.name:
                self.known[id(o)] = results[o.name]
        folded[id(node)] = node
        if any(v.size <= MAX_VALUE for v in values):
            self.stats["evaluated_small_values"] += 1
        return True

    def batch_model(self, nodes: list[gs.Node]) -> tuple[onnx.ModelProto, dict]:
        produced = {o.name for n in nodes for o in n.outputs if o.name}
        constants, feeds = {}, {}
        for node in nodes:
            for t in node.inputs:
                if t.name and t.name not in produced and t.name not in constants and t.name not in feeds:
                    value = self.value_of(t)
                    # Small values are initializers: onnxruntime checks feed names in
                    # quadratic time, and shape chains have thousands of tiny inputs.
                    if value.nbytes <= _SMALL_VALUE and value.dtype.kind != "O":
                        constants[t.name] = value
                    else:
                        feeds[t.name] = value
        return submodel(nodes, constants, feeds, self.opset_import, self.ir_version), feeds

    def run_ort(self, nodes: list[gs.Node]) -> dict | None:
        from onnxopt.measure import verify

        try:
            proto, feeds = self.batch_model(nodes)
            sess = verify.session(proto)
            self.stats["sessions"] += 1
            names = [o.name for o in sess.get_outputs()]
            return dict(zip(names, sess.run(names, feeds)))
        except Exception as exc:  # onnxruntime refuses the model or a kernel fails
            logger.debug("onnxruntime cannot fold %d node(s) (%s): %s", len(nodes),
                         ",".join(sorted({n.op for n in nodes})), exc)
            return None

    def run_reference(self, node: gs.Node) -> dict | None:
        from onnx.reference import ReferenceEvaluator

        try:
            proto, feeds = self.batch_model([node])
            ref = ReferenceEvaluator(proto)
            names = [o.name for o in node.outputs if o.name]
            return dict(zip(names, ref.run(names, feeds)))
        except Exception as exc:
            logger.debug("cannot evaluate %s (%s): %s", node.name, node.op, exc)
            return None

    # -- If with a constant condition -----------------------------------------------------
    def inline_constant_ifs(self, graph: gs.Graph) -> int:
        """Replace each If whose condition is known by the nodes of the branch it takes."""
        inlined = 0
        for node in list(graph.nodes if self.inline_ifs else ()):
            if node.op != "If" or not is_default_domain(node) or not node.inputs:
                continue
            cond = self.value_of(node.inputs[0])
            if cond is None or cond.size != 1:
                continue
            branch = node.attrs.get("then_branch" if bool(cond.reshape(-1)[0]) else "else_branch")
            if not isinstance(branch, gs.Graph) or branch.inputs or len(branch.outputs) != len(node.outputs):
                continue
            self.inline(graph, node, branch)
            inlined += 1
            self.stats["inlined_ifs"] += 1
        return inlined

    def inline(self, graph: gs.Graph, node: gs.Node, branch: gs.Graph) -> None:
        taken = {id(n) for n in branch.nodes}
        outer_names = {t.name for t in graph.tensors().values()} - {t.name for t in node.outputs}
        results = list(node.outputs)
        node.inputs.clear()
        node.outputs.clear()
        moved = list(branch.nodes)
        extra = []
        renamed_twice = set()
        for inner, outer in zip(branch.outputs, results):
            producer = inner.inputs[0] if inner.inputs else None
            if producer is not None and id(producer) in taken and id(inner) not in renamed_twice:
                # The branch node writes the If's output name directly.
                renamed_twice.add(id(inner))
                for user in list(inner.outputs):
                    for i, t in enumerate(user.inputs):
                        if t is inner:
                            user.inputs[i] = outer
                slot = next(i for i, t in enumerate(producer.outputs) if t is inner)
                producer.outputs[slot] = outer
            else:  # an outer tensor, a constant, or an output listed twice
                extra.append(gs.Node("Identity", name=f"{outer.name}_inlined", inputs=[inner], outputs=[outer]))
        # Branch-local names that clash with names of this scope get a fresh suffix.
        for n in moved:
            for t in n.outputs:
                if t.name and t.name in outer_names:
                    t.name = f"{t.name}__inlined{self.stats['inlined_ifs']}"
        position = next(i for i, n in enumerate(graph.nodes) if n is node)
        graph.nodes[position:position + 1] = moved + extra
        branch.nodes.clear()

    # -- rewrite -------------------------------------------------------------------------
    def replace(self, graph: gs.Graph, folded: dict[int, gs.Node]) -> None:
        gone = [n for n in graph.nodes if id(n) in folded]
        outputs_of = {id(n): [o for o in n.outputs if o.name] for n in gone}
        detach_nodes(gone)
        new_nodes = []
        for node in graph.nodes:
            if id(node) not in folded:
                new_nodes.append(node)
                continue
            self.stats["folded_nodes"] += 1
            for o in outputs_of[id(node)]:
                self.folded_names.add(o.name)
                if id(o) not in self.outputs:
                    o.to_constant(self.known[id(o)])
                    continue
                # A graph output stays produced by a node.
                const = gs.Constant(f"{o.name}_value", self.known[id(o)])
                new_nodes.append(gs.Node("Constant", name=f"{o.name}_constant", attrs={"value": const},
                                         outputs=[o]))
                self.stats["graph_outputs_as_constant_nodes"] += 1
        graph.nodes[:] = new_nodes
