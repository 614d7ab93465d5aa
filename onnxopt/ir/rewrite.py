"""Rewrite rules: named patterns with a checked rewrite, grouped in rule sets, run to a fixed point.

A fusion is a ``RewriteRule`` subclass (one idea each, in the style of MLIR's
``RewritePattern`` and onnxscript's rewriter):

    class FuseFooBar(RewriteRule):
        name = "foo-bar"
        root_ops = ("Bar",)                  # op types a match can start from

        def match(self, node, graph):        # structure only: op types and wiring
            foo = producer_op(node, 0, "Foo")  # onnxopt.analysis.use_def
            return {"foo": foo, "bar": node} if foo else None

        def check(self, match, model, ctx):  # legality: None = apply, else the reason not
            if not single_use(match["foo"].outputs[0], match["graph"]):
                return "Foo output has other consumers"
            return None

        def rewrite(self, match, graph):     # returns the new nodes (or None after in-place edits)
            fused = gs.Node("FooBar", name=fresh_name(graph, "foobar"), inputs=list(match["foo"].inputs))
            take_outputs(match["bar"], fused)  # onnxopt.ir.surgery: bar's tensors, same names
            return [fused]

Contract of a rule:

- A match is anchored at its *root*, the last node of the pattern in graph order, and walks
  up to producers. The engine inserts the nodes that ``rewrite`` returns just before the
  root, which is a valid topological position because every tensor the pattern reads is
  computed before the root.
- ``match`` returns a dict of the matched nodes and tensors (any keys; every ``gs.Node``
  among the values, also inside lists, counts as a matched node) or None. It must not
  change the graph. The engine adds the key ``"graph"`` (the graph the match is in).
- ``check`` returns None to apply the rewrite or a short, node-independent reason (for
  example "weight is not constant") that the engine counts, as MLIR's
  ``notifyMatchFailure`` does. Put legality conditions here rather than in ``match`` so
  that the pass's stats say why a fusion did not happen. A ``check`` that reads an
  analysis (``ctx.analysis("shapes", model)``) lists it in ``analyses``: the engine
  computes those before its first rewrite, because during a sweep the node list is not
  yet in order (new nodes are placed when the sweep ends). Results computed then stay
  valid for the tensors the rules keep (they keep output names); tensors made by a
  rewrite are missing from them, so fall back to "unknown".
- ``rewrite`` rewires the graph through graphsurgeon's live links (node.inputs/outputs),
  never edits ``graph.nodes`` itself, never mutates numpy arrays or attribute values in
  place (build new ones), and keeps the names of the root's output tensors: move them to
  the new node with ``take_outputs`` so graph output names never change. A matched node
  may also be edited in place (fuse-conv-bn gives the Conv new weights and the BN's
  output): it keeps its position, so it may only read tensors computed before it. Matched
  nodes left without consumers are removed by the engine; shared ones (other consumers)
  stay (they are unlinked when the sweep ends). Read weights with ``onnxopt.ir.constants.constant_value``, which does not load
  lazy values into the graph (that alone would change how the model is written); name new
  tensors and nodes with ``onnxopt.ir.names.fresh_name(graph, base)`` and
  ``new_constant(graph, base, values)`` (one table for the whole model while rules run).

``RuleSet(rules).apply(model, ctx)`` sweeps every graph of the model (subgraphs
included): each sweep indexes the nodes by op type once and tries the rules in their
order on every node whose op is a root op of some rule, so one sweep is linear in the
graph size. Sweeps repeat until one changes nothing, bounded by ``max_sweeps``.
``RewritePass`` turns a rule list into a pass whose stats are the rewrites per rule and
the reasons of failed checks.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable, Iterator

import onnx_graphsurgeon as gs

from onnxopt.ir.names import naming
from onnxopt.ir.surgery import detach_nodes
from onnxopt.pipeline.pass_api import Pass, PassResult

logger = logging.getLogger(__name__)


class RewriteRule:
    """One named rewrite: ``match`` (structure), ``check`` (legality + reason), ``rewrite``."""

    name: ClassVar[str] = ""
    root_ops: ClassVar[tuple[str, ...]] = ()
    # Analyses (ctx.analysis names) that ``check`` reads; see the module docstring.
    analyses: ClassVar[tuple[str, ...]] = ()

    def match(self, node: gs.Node, graph: gs.Graph) -> dict[str, Any] | None:  # pragma: no cover
        raise NotImplementedError

    def check(self, match: dict[str, Any], model, ctx) -> str | None:
        return None

    def rewrite(self, match: dict[str, Any], graph: gs.Graph) -> list[gs.Node] | None:  # pragma: no cover
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<rule {self.name}>"


@dataclass
class RewriteStats:
    """What a rule set did: rewrites per rule, failed-check reasons, sweeps run."""

    applied: Counter = field(default_factory=Counter)  # rule name -> rewrites
    skipped: Counter = field(default_factory=Counter)  # "rule: reason" -> matches refused
    sweeps: int = 0
    hit_limit: bool = False

    @property
    def total(self) -> int:
        return sum(self.applied.values())

    def as_stats(self, rule_names: Iterable[str]) -> dict[str, Any]:
        out: dict[str, Any] = {name: self.applied.get(name, 0) for name in rule_names}
        if self.skipped:
            out["skipped"] = dict(sorted(self.skipped.items()))
        if self.hit_limit:
            out["hit_sweep_limit"] = True
        return out


class RuleSet:
    """Rules tried in order on every node, sweep after sweep, until nothing changes."""

    def __init__(self, rules: Iterable[RewriteRule], max_sweeps: int = 10):
        self.rules = list(rules)
        names = [r.name for r in self.rules]
        if len(set(names)) != len(names) or not all(names):
            raise ValueError(f"rule names must be unique and non-empty: {names}")
        self.max_sweeps = max_sweeps
        self._analyses = sorted({a for r in self.rules for a in r.analyses})
        self._by_op: dict[str, list[RewriteRule]] = {}
        for rule in self.rules:
            for op in rule.root_ops:
                self._by_op.setdefault(op, []).append(rule)

    def apply(self, model, ctx) -> RewriteStats:
        stats = RewriteStats()
        pending = list(self._analyses)  # computed before the first rewrite, then cleared
        graphs = list(model.graphs())
        with naming(graphs):  # one table: a new name must be unique in every scope
            for graph in graphs:
                self._apply_graph(graph, model, ctx, stats, pending)
        return stats

    def _apply_graph(self, graph: gs.Graph, model, ctx, stats: RewriteStats, pending: list[str]) -> None:
        refused: set[tuple[str, int]] = set()  # (rule, root id) whose refusal is counted
        for _ in range(self.max_sweeps):
            stats.sweeps += 1
            if not self._sweep(graph, model, ctx, stats, refused, pending):
                return
        stats.hit_limit = True
        logger.warning("rewrite rules still matching after %d sweeps in graph '%s'; stopped",
                       self.max_sweeps, graph.name)

    def _sweep(self, graph, model, ctx, stats, refused, pending) -> bool:
        output_ids = {id(t) for t in graph.outputs}
        inserts: dict[int, list[gs.Node]] = {}  # root id -> new nodes to place before it
        removed: set[int] = set()
        dead: list[gs.Node] = []  # unlinked together when the sweep ends (hub tensors once)
        # nodes of this graph (a producer found through an outer-scope name lives in an
        # enclosing graph: a match reaching it is skipped, a rewrite cannot move nodes
        # across scopes)
        members = {id(n) for n in graph.nodes}
        changed = False
        for node in list(graph.nodes):
            if id(node) in removed:
                continue
            for rule in self._by_op.get(node.op, ()):
                match = rule.match(node, graph)
                if match is None:
                    continue
                matched = list(_nodes_in(match))
                if any(id(n) not in members or id(n) in removed for n in matched):
                    continue
                match.setdefault("graph", graph)
                reason = rule.check(match, model, ctx)
                if reason is not None:
                    key = (rule.name, id(node))
                    if key not in refused:
                        refused.add(key)
                        stats.skipped[f"{rule.name}: {reason}"] += 1
                    logger.debug("%s not applied at %s: %s", rule.name, node.name, reason)
                    continue
                while pending:  # last chance to see the graph in order
                    ctx.analysis(pending.pop(), model)
                guarded = [t for n in matched for t in n.outputs if id(t) in output_ids]
                new_nodes = list(rule.rewrite(match, graph) or ())
                if new_nodes:
                    inserts.setdefault(id(node), []).extend(new_nodes)
                    members.update(id(n) for n in new_nodes)
                dead.extend(_remove_dead(matched, output_ids, removed))
                for t in guarded:
                    if not t.inputs or id(t.inputs[0]) in removed:
                        raise RuntimeError(f"rule {rule.name} left graph output '{t.name}' without a producer")
                stats.applied[rule.name] += 1
                changed = True
                logger.debug("%s applied at %s", rule.name, node.name)
                break
        if changed:
            detach_nodes(dead)
            nodes = []
            for node in graph.nodes:
                # a new node may already have been folded by a later match of this sweep
                nodes.extend(n for n in inserts.get(id(node), ()) if id(n) not in removed)
                if id(node) not in removed:
                    nodes.append(node)
            graph.nodes = nodes
        return changed


def _nodes_in(match: dict[str, Any]) -> Iterator[gs.Node]:
    seen: set[int] = set()
    for value in match.values():
        items = value if isinstance(value, (list, tuple)) else (value,)
        for item in items:
            if isinstance(item, gs.Node) and id(item) not in seen:
                seen.add(id(item))
                yield item


def _remove_dead(nodes: list[gs.Node], output_ids: set[int], removed: set[int]) -> list[gs.Node]:
    """Matched nodes whose outputs nobody (but removed nodes) reads, until none is left: marked
    removed and returned, to be unlinked when the sweep ends (a weight shared by thousands of
    nodes then has its reader list rebuilt once, not once per removed reader)."""
    out = []
    progress = True
    while progress:
        progress = False
        for node in nodes:
            if id(node) in removed:
                continue
            if any(id(t) in output_ids or any(id(r) not in removed for r in t.outputs) for t in node.outputs):
                continue
            removed.add(id(node))
            out.append(node)
            progress = True
    return out


class RewritePass(Pass):
    """Base of fusion passes: subclasses list their ``rules`` (instances) and nothing else."""

    rules: ClassVar[tuple[RewriteRule, ...]] = ()
    max_sweeps: ClassVar[int] = 10

    def run(self, model, ctx) -> PassResult:
        stats = RuleSet(self.rules, max_sweeps=self.max_sweeps).apply(model, ctx)
        return PassResult(changed=stats.total > 0, stats=stats.as_stats(r.name for r in self.rules))
