"""fuse-layernorm and fuse-gelu on tiny graphs of every exported form, and on MiniLM."""

import numpy as np
import onnx
import pytest
from tests.real_models import real_model
from tests.graphs import gelu_erf, gelu_tanh, init, layernorm_decomposed, make_model, tensor
from onnx import TensorProto, helper

from onnxopt.ir.model import load
from onnxopt.testing import assert_equivalent, op_histogram, run_pass

from onnxopt.ir.opsets import raise_blockers

# Fused LayerNormalization/Gelu kernels round differently from the op-by-op graph (~1e-6).
TOL = {"rtol": 1e-5, "atol": 1e-6}


def fused(proto, name, target="cpu", **options):
    out, result = run_pass(name, proto, target=target, **options)
    onnx.checker.check_model(out, full_check=True)
    if result.changed:
        assert_equivalent(proto, out, **TOL)
    return out, result


def attrs(node):
    values = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return {k: v.decode() if isinstance(v, bytes) else v for k, v in values.items()}


def in_then_branch(inner, shape, opset=17):
    """``inner``'s graph as the then-branch of an If (else: Identity of x); output 'out'."""
    then_g = helper.make_graph(list(inner.graph.node), "then", [], [tensor("y", shape)],
                               list(inner.graph.initializer))
    else_g = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [], [tensor("e", shape)])
    return make_model([helper.make_node("If", ["cond"], ["out"], then_branch=then_g, else_branch=else_g)],
                      [tensor("cond", [], TensorProto.BOOL), tensor("x", shape)], [tensor("out", shape)], opset=opset)


def assert_untouched(proto, out, result):
    assert not result.changed
    assert out.SerializeToString() == proto.SerializeToString()


# -- fuse-layernorm -----------------------------------------------------------------------
@pytest.mark.parametrize("opset", [17, 18])
@pytest.mark.parametrize("square,divide", [("pow", "div"), ("mul", "reciprocal"), ("pow_int", "div")])
@pytest.mark.parametrize("scale,bias", [(True, True), (False, False), (True, False), (False, True)])
def test_layernorm_forms_fuse_to_one_node(opset, square, divide, scale, bias):
    proto = layernorm_decomposed(opset=opset, square=square, divide=divide, scale=scale, bias=bias, eps=1e-3)
    out, result = fused(proto, "fuse-layernorm")
    assert result.changed
    assert op_histogram(out) == {"LayerNormalization": 1, "Identity": 1}
    assert result.stats == {"fused": 1, "layernorm": 1, "layernorm-scale": int(scale), "layernorm-bias": int(bias)}
    ln = out.graph.node[0]
    assert attrs(ln)["axis"] == -1 and attrs(ln)["epsilon"] == pytest.approx(1e-3)
    assert len(ln.input) == (3 if bias else 2)


def test_layernorm_over_two_trailing_axes():
    proto = layernorm_decomposed(axes=(1, 2), shape=(2, 3, 4))
    out, result = fused(proto, "fuse-layernorm")
    assert result.stats["fused"] == 1 and op_histogram(out) == {"LayerNormalization": 1, "Identity": 1}
    assert attrs(out.graph.node[0])["axis"] == -2
    scale = next(i for i in out.graph.initializer if i.name == out.graph.node[0].input[1])
    assert list(scale.dims) == [3, 4]


def test_layernorm_with_constant_nodes_after_lift_constants():
    proto, _ = run_pass("lift-constants", layernorm_decomposed())
    as_nodes = layernorm_decomposed()
    # the same graph with its constants in Constant nodes, as torch writes them
    consts = [helper.make_node("Constant", [], [i.name], value=i) for i in as_nodes.graph.initializer]
    graph = helper.make_graph(consts + list(as_nodes.graph.node), "g", as_nodes.graph.input, as_nodes.graph.output)
    with_nodes = helper.make_model(graph, opset_imports=as_nodes.opset_import, ir_version=8)
    out, result = fused(with_nodes, "fuse-layernorm")
    assert result.stats["fused"] == 1 and result.stats["layernorm-scale"] == 1
    out, _ = run_pass("eliminate-dead-code", out)
    assert op_histogram(out) == {"LayerNormalization": 1, "Identity": 1}


@pytest.mark.parametrize("opset", [14, 16])
def test_layernorm_below_opset_17_raises_the_opset_when_no_op_changes_meaning(opset):
    proto = layernorm_decomposed(opset=opset)
    proto.ir_version = 7  # what torch writes for opset 14
    out, result = fused(proto, "fuse-layernorm")
    assert result.stats["opset_raised"] == f"{opset} -> 17" and result.stats["fused"] == 1
    assert out.opset_import[0].version == 17 and out.ir_version == 8  # the IR version opset 17 came with
    assert op_histogram(out) == {"LayerNormalization": 1, "Identity": 1}


def test_layernorm_below_opset_17_without_raise_stays_identical():
    proto = layernorm_decomposed(opset=16)
    out, result = fused(proto, "fuse-layernorm", raise_opset=False)
    assert_untouched(proto, out, result)
    assert result.stats == {"fused": 0, "skipped": {"opset 16 < 17, raise_opset off": 1}}


def test_layernorm_not_raised_when_an_op_would_change_meaning():
    # A BatchNormalization whose training outputs are read changed meaning in opset 14.
    base = layernorm_decomposed(opset=13)
    c = 5  # the channel axis of x [2, 5, 8]
    bn = helper.make_node("BatchNormalization", ["x0", "s", "b", "m", "v"], ["x", "rm", "rv", "sm", "sv"])
    params = [init(n, np.ones(c, np.float32)) for n in ("s", "b", "m", "v")]
    proto = make_model([bn] + list(base.graph.node), [tensor("x0", [2, c, 8])],
                       list(base.graph.output) + [tensor(n, [c]) for n in ("rm", "rv", "sm", "sv")],
                       list(base.graph.initializer) + params, opset=13)
    assert "BatchNormalization: BatchNormalization with training outputs (their meaning changed in opset 14)" \
        in raise_blockers(load(proto), 17)
    out, result = run_pass("fuse-layernorm", proto)
    assert not result.changed and out.opset_import[0].version == 13
    assert list(result.stats["skipped"]) == ["opset 13 < 17, raising unsafe: BatchNormalization: "
                                             "BatchNormalization with training outputs (their meaning changed "
                                             "in opset 14)"]


@pytest.mark.parametrize("reader", ["mean", "d", "var", "std"])
def test_layernorm_intermediate_read_elsewhere_does_not_fuse(reader):
    proto = layernorm_decomposed(extra_reader=reader)
    out, result = fused(proto, "fuse-layernorm")
    assert_untouched(proto, out, result)
    assert result.stats["skipped"] == {"layernorm: an intermediate tensor is read outside the pattern": 1}


def test_layernorm_read_before_affine_keeps_the_affine_ops():
    # n = normalized x is read by Neg too: the core fuses, gamma/beta stay separate ops.
    proto = layernorm_decomposed(extra_reader="n")
    out, result = fused(proto, "fuse-layernorm")
    assert result.stats["fused"] == 1 and result.stats["layernorm-scale"] == 0
    assert op_histogram(out) == {"LayerNormalization": 1, "Mul": 1, "Add": 1, "Identity": 1, "Neg": 1}
    assert "layernorm-scale: LayerNormalization output has other readers" in result.stats["skipped"]


def test_layernorm_over_a_middle_axis_does_not_fuse():
    proto = layernorm_decomposed(axes=(1,), shape=(2, 5, 8), scale=False, bias=False)
    out, result = fused(proto, "fuse-layernorm")
    assert_untouched(proto, out, result)
    assert result.stats["skipped"] == {"layernorm: the ReduceMeans do not both reduce the same trailing axes": 1}


def test_layernorm_needs_static_normalized_dims():
    proto = layernorm_decomposed(scale=False, bias=False)
    proto.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "hidden"
    out, result = fused(proto, "fuse-layernorm")
    assert_untouched(proto, out, result)
    assert result.stats["skipped"] == {"layernorm: normalized dims are not static": 1}


def test_layernorm_scale_varying_along_batch_axis_is_not_folded():
    proto = layernorm_decomposed(bias=False)
    gamma = next(i for i in proto.graph.initializer if i.name == "gamma")
    gamma.CopyFrom(init("gamma", np.linspace(0.5, 1.5, 5, dtype=np.float32).reshape(5, 1)))
    out, result = fused(proto, "fuse-layernorm")
    assert result.stats["fused"] == 1 and result.stats["layernorm-scale"] == 0
    assert op_histogram(out) == {"LayerNormalization": 1, "Mul": 1, "Identity": 1}
    assert list(result.stats["skipped"]) == ["layernorm-scale: constant varies along axes that are not normalized"]


def test_affine_after_an_existing_layernormalization_is_folded():
    r = np.random.default_rng(5)
    nodes = [helper.make_node("LayerNormalization", ["x", "s", "b"], ["ln"], axis=-1, epsilon=1e-5),
             helper.make_node("Mul", ["g", "ln"], ["m"]), helper.make_node("Add", ["m", "c"], ["y"])]
    inits = [init("s", r.uniform(0.5, 1.5, 8).astype(np.float32)), init("b", r.standard_normal(8).astype(np.float32)),
             init("g", np.array(2.0, np.float32)), init("c", r.standard_normal((1, 8)).astype(np.float32))]
    proto = make_model(nodes, [tensor("x", [3, 8])], [tensor("y", [3, 8])], inits)
    out, result = fused(proto, "fuse-layernorm")
    assert result.stats == {"fused": 0, "layernorm": 0, "layernorm-scale": 1, "layernorm-bias": 1}
    assert op_histogram(out) == {"LayerNormalization": 1} and out.graph.node[0].output[0] == "y"


def test_layernorm_inside_if_branch():
    proto = in_then_branch(layernorm_decomposed(), [2, 5, 8])
    out, result = run_pass("fuse-layernorm", proto)
    assert result.stats["fused"] == 1
    onnx.checker.check_model(out, full_check=True)
    then_out = attrs(out.graph.node[0])["then_branch"]
    assert [n.op_type for n in then_out.node] == ["LayerNormalization", "Identity"]
    feeds = {"cond": np.array(True), "x": np.random.default_rng(0).standard_normal((2, 5, 8)).astype(np.float32)}
    assert_equivalent(proto, out, feeds, **TOL)


def test_layernorm_second_run_changes_nothing():
    out, _ = fused(layernorm_decomposed(), "fuse-layernorm")
    again, result = run_pass("fuse-layernorm", out)
    assert not result.changed and result.stats["fused"] == 0


# -- fuse-gelu ----------------------------------------------------------------------------
@pytest.mark.parametrize("order", ["torch", "half_first", "unit_half"])
@pytest.mark.parametrize("scaled", ["div", "mul"])
def test_gelu_erf_orderings_fuse_to_contrib_gelu_below_opset_20(order, scaled):
    proto = gelu_erf(order=order, scaled=scaled)
    out, result = fused(proto, "fuse-gelu", allow_contrib=True, raise_opset=False)
    assert op_histogram(out) == {"Gelu": 1}
    assert out.graph.node[0].domain == "com.microsoft" and out.graph.node[0].output[0] == "y"
    assert {(o.domain, o.version) for o in out.opset_import} == {("", 17), ("com.microsoft", 1)}
    assert result.stats == {"fused": 1, "gelu-erf": 1, "gelu-tanh": 0, "emitted": "com.microsoft Gelu/FastGelu"}


@pytest.mark.parametrize("cube", ["mul", "pow"])
def test_gelu_tanh_fuses_to_fastgelu_below_opset_20(cube):
    out, result = fused(gelu_tanh(cube=cube), "fuse-gelu", allow_contrib=True, raise_opset=False)
    assert op_histogram(out) == {"FastGelu": 1} and out.graph.node[0].domain == "com.microsoft"
    assert result.stats["gelu-tanh"] == 1 and result.stats["fused"] == 1


@pytest.mark.parametrize("builder,approximate", [(gelu_erf, None), (gelu_tanh, "tanh")])
def test_gelu_standard_op_from_opset_20_even_with_contrib_allowed(builder, approximate):
    out, result = fused(builder(opset=20), "fuse-gelu", allow_contrib=True)
    assert op_histogram(out) == {"Gelu": 1} and out.graph.node[0].domain == ""
    assert attrs(out.graph.node[0]).get("approximate") == approximate
    assert [(o.domain, o.version) for o in out.opset_import] == [("", 20)]
    assert result.stats["emitted"] == "Gelu (opset 20)"


def test_gelu_below_opset_20_without_contrib_or_raise_stays_identical():
    proto = gelu_erf()
    out, result = fused(proto, "fuse-gelu", allow_contrib=False, raise_opset=False)
    assert_untouched(proto, out, result)
    assert result.stats == {"fused": 0, "skipped": {"opset 17 < 20, contrib ops not allowed, raise_opset off": 1}}


@pytest.mark.parametrize("target,expected", [("cpu", {"Gelu": 1}), ("npu", None)])
def test_allow_contrib_defaults_to_the_target(target, expected):
    proto = gelu_erf()
    out, result = fused(proto, "fuse-gelu", target=target, raise_opset=False)
    if expected is None:
        assert_untouched(proto, out, result)
    else:
        assert op_histogram(out) == expected


@pytest.mark.parametrize("options", [{}, {"allow_contrib": True}, {"allow_contrib": False}])
def test_raise_opset_when_every_op_keeps_its_meaning(options):
    # raising is the default, and is tried before contrib ops
    out, result = fused(gelu_tanh(), "fuse-gelu", **options)
    assert [(o.domain, o.version) for o in out.opset_import] == [("", 20)]
    assert op_histogram(out) == {"Gelu": 1} and attrs(out.graph.node[0])["approximate"] == "tanh"
    assert result.stats["opset_raised"] == "17 -> 20"


def test_raise_opset_without_a_gelu_keeps_the_model():
    proto = layernorm_decomposed()
    out, result = fused(proto, "fuse-gelu", allow_contrib=False, raise_opset=True)
    assert_untouched(proto, out, result)


def _gelu_after_reduce_mean():
    """A GELU fed by ReduceMean with an axes attribute (not valid at opset 18+)."""
    proto = gelu_erf(shape=(2, 1))
    nodes = [helper.make_node("ReduceMean", ["x0"], ["x"], axes=[1])] + list(proto.graph.node)
    return make_model(nodes, [tensor("x0", [2, 16])], [tensor("y", [2, 1])], list(proto.graph.initializer))


def test_raise_opset_refused_when_reduce_axes_are_an_attribute():
    proto = _gelu_after_reduce_mean()
    assert raise_blockers(load(proto), 20) == {"ReduceMean: axes attribute became an input in opset 18": 1}
    out, result = fused(proto, "fuse-gelu", allow_contrib=False, raise_opset=True)
    assert_untouched(proto, out, result)
    assert list(result.stats["skipped"]) == ["opset 17 < 20, contrib ops not allowed; raising unsafe: "
                                             "ReduceMean: axes attribute became an input in opset 18"]
    # with contrib ops allowed they are the fallback
    out, result = fused(proto, "fuse-gelu", allow_contrib=True, raise_opset=True)
    assert out.opset_import[0].version == 17 and out.graph.node[1].domain == "com.microsoft"
    assert result.stats["opset_not_raised"] == ["ReduceMean: axes attribute became an input in opset 18"]


def test_gelu_intermediate_read_elsewhere_does_not_fuse():
    proto = gelu_erf()
    proto.graph.output.append(tensor("e", [2, 16]))
    out, result = fused(proto, "fuse-gelu", allow_contrib=True, raise_opset=False)
    assert_untouched(proto, out, result)
    assert result.stats["skipped"] == {"gelu-erf: an intermediate tensor is read outside the pattern": 1}


def test_gelu_with_other_constants_is_not_matched():
    proto = gelu_erf()
    for i in proto.graph.initializer:
        if i.name == "sqrt2":
            i.CopyFrom(init("sqrt2", np.array(1.5, np.float32)))
    out, result = fused(proto, "fuse-gelu", allow_contrib=True)
    assert_untouched(proto, out, result)
    assert result.stats == {"fused": 0, "gelu-erf": 0, "gelu-tanh": 0}


def test_gelu_float64_has_no_contrib_kernel():
    proto = gelu_erf()
    for i in list(proto.graph.initializer):
        i.CopyFrom(helper.make_tensor(i.name, TensorProto.DOUBLE, [], [float(onnx.numpy_helper.to_array(i))]))
    for v in list(proto.graph.input) + list(proto.graph.output):
        v.type.tensor_type.elem_type = TensorProto.DOUBLE
    out, result = run_pass("fuse-gelu", proto, allow_contrib=True, raise_opset=False)
    assert not result.changed
    assert result.stats["skipped"] == {"gelu-erf: dtype float64 not supported by com.microsoft Gelu": 1}


def test_gelu_inside_if_branch():
    proto = in_then_branch(gelu_erf(opset=20), [2, 16], opset=20)
    out, result = run_pass("fuse-gelu", proto)
    assert result.stats["fused"] == 1
    onnx.checker.check_model(out, full_check=True)
    assert [n.op_type for n in attrs(out.graph.node[0])["then_branch"].node] == ["Gelu"]
    feeds = {"cond": np.array(True), "x": np.linspace(-3, 3, 32, dtype=np.float32).reshape(2, 16)}
    assert_equivalent(proto, out, feeds, **TOL)


# -- the real model -----------------------------------------------------------------------
def test_minilm_gelu_fused_and_outputs_equal():
    from onnxopt.optimize import optimize

    path = real_model("minilm_l6.onnx")
    result = optimize(str(path), target="cpu", verify=True,
                      pipeline="lift-constants,fuse-layernorm,fuse-gelu,eliminate-dead-code")
    stats = {p["name"]: p["stats"] for p in result.report["passes"]}
    # torch (opset 17) writes LayerNormalization itself: nothing to fuse; 6 erf GELUs
    assert stats["fuse-layernorm"]["fused"] == 0
    assert stats["fuse-gelu"]["fused"] == 6 and stats["fuse-gelu"]["gelu-erf"] == 6
    hist = op_histogram(result.model)
    assert hist["Gelu"] == 6 and "Erf" not in hist and hist["LayerNormalization"] == 13
    verified = {p["name"]: p["verified"] for p in result.report["passes"]}
    assert verified["fuse-gelu"] == "equal"
