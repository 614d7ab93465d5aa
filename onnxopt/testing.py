"""Helpers for testing passes, ours and third-party ones.

    from onnxopt.testing import run_pass, assert_equivalent, check_pass_contract

``check_pass_contract(MyPass, [model, …])`` is what a plugin author runs: the pass keeps
every model valid, a lossless pass keeps outputs equal in onnxruntime, a second run
reports no change, and an unchanged model stays byte-identical.

``run_pass`` checks honesty on every call: a digest of the model is taken before and after
the pass (``onnxopt.ir.digest``, as the pass manager does), and a pass that changed the
model while reporting no change fails with an AssertionError. So a test asserting that a
pass must not fire (``not result.changed``) also proves that the model was left alone.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx

from onnxopt.measure import verify
from onnxopt.pipeline.context import PassContext
from onnxopt.ir.digest import model_digest
from onnxopt.ir.model import load
from onnxopt.pipeline.pass_api import PassResult
from onnxopt.pipeline.registry import get_pass
from onnxopt.target import load_target


def run_pass(pass_or_name: Any, model: onnx.ModelProto | str, target: str = "cpu", ctx: PassContext | None = None,
             **options: Any) -> tuple[onnx.ModelProto, PassResult]:
    """Run one pass directly (no manager, no rollback); returns (new proto, result).

    Raises AssertionError when the pass reports no change but changed the model.
    """
    m, result = _run(pass_or_name, model, target, ctx, options)
    return m.to_proto(), result


def _run(pass_or_name: Any, model, target: str, ctx: PassContext | None, options: dict):
    cls = get_pass(pass_or_name) if isinstance(pass_or_name, str) else pass_or_name
    m = load(model)
    ctx = ctx or PassContext(target=load_target(target))
    before = model_digest(m)
    result = cls(**options).run(m, ctx)
    if not result.changed:
        assert model_digest(m) == before, f"{cls.name}: reported no change but changed the model"
    else:
        m.modified = True
    return m, result


def op_histogram(proto: onnx.ModelProto) -> dict[str, int]:
    """Op type -> count in the main graph."""
    out: dict[str, int] = {}
    for node in proto.graph.node:
        out[node.op_type] = out.get(node.op_type, 0) + 1
    return out


def assert_equivalent(ref: onnx.ModelProto, cand: onnx.ModelProto, feeds: dict[str, np.ndarray] | None = None,
                      rtol: float = 1e-3, atol: float = 1e-5, seed: int = 0) -> None:
    """Both models give the same outputs in onnxruntime (ORT_DISABLE_ALL on both sides)."""
    feeds, expected = verify.run(ref, feeds, seed=seed)
    _, got = verify.run(cand, feeds)
    problems = verify.compare_outputs(expected, got, rtol=rtol, atol=atol)
    assert not problems, "; ".join(map(str, problems))


def assert_valid_and_equivalent(ref: onnx.ModelProto, cand: onnx.ModelProto,
                                feeds: dict[str, np.ndarray] | None = None, **tolerance: float) -> None:
    """``cand`` passes the full onnx checker and gives ``ref``'s outputs in onnxruntime."""
    onnx.checker.check_model(cand, full_check=True)
    assert_equivalent(ref, cand, feeds, **tolerance)


def plain_bytes(proto: onnx.ModelProto) -> bytes:
    """The bytes a model has after onnxopt's load and export with no pass run: what an
    untouched model must still serialize to after a pass that did not fire."""
    return _plain(proto).SerializeToString()


def check_pass_contract(pass_cls: type, models: list[onnx.ModelProto], **options: Any) -> None:
    """The contract every pass keeps; raises AssertionError naming the broken rule."""
    for proto in models:
        m, result = _run(pass_cls, proto, "cpu", None, options)
        out = m.export()  # the graph as the pass left it, whatever it reported
        onnx.checker.check_model(out)
        if not result.changed:
            assert out.SerializeToString() == _plain(proto).SerializeToString(), \
                f"{pass_cls.name}: reported no change but the model differs"
            continue
        if pass_cls.lossless:
            assert_equivalent(proto, out)
        again, second = run_pass(pass_cls, out, **options)
        assert not second.changed, f"{pass_cls.name}: a second run still changed the model ({second.stats})"


def _plain(proto: onnx.ModelProto) -> onnx.ModelProto:
    return load(proto).to_proto()
