"""The channel-dependency analysis on one tiny graph per pattern (onnxopt/analysis/channel_groups.py)."""

import numpy as np
import pytest

from onnxopt.analysis.channel_groups import channel_graph, kept_count
from onnxopt.ir.model import load
from tests import pruning_graphs as pg


def analyse(builder):
    m = load(builder())
    return m, channel_graph(m)


def prunable(cg):
    return [g for g in cg.groups if g.prunable]


def test_chain_one_group_with_bn_and_consumer():
    _, cg = analyse(pg.chain)
    (g,) = prunable(cg)
    kinds = sorted(m.kind for m in g.members)
    assert len(g.classes) == 8 and kinds == ["in", "out"] + ["param"] * 5  # bias + 4 BN params


def test_residual_couples_both_producers():
    _, cg = analyse(pg.residual)
    (g,) = prunable(cg)
    assert len(g.producers) == 2 and len(g.classes) == 8
    assert sum(m.kind == "in" for m in g.members) == 2  # conv2 and conv3 read the stream


def test_concat_keeps_producers_apart_and_offsets_the_consumer():
    _, cg = analyse(pg.concat)
    groups = prunable(cg)
    assert sorted(len(g.classes) for g in groups) == [6, 8]
    (consumer,) = [m for m in cg.members if m.kind == "in"]
    a, c = sorted(groups, key=lambda g: -len(g.classes))
    roots = cg.atoms.roots(consumer.layout)
    assert set(roots[:8]) == set(a.classes) and set(roots[8:]) == set(c.classes)


def test_split_and_slice_are_cut_from_the_producer():
    _, cg = analyse(pg.split_slice)
    (g,) = prunable(cg)
    assert len(g.classes) == 12
    assert {m.kind for m in g.members} >= {"split", "slice", "in"}


def test_flatten_repeats_each_channel_over_its_block():
    _, cg = analyse(pg.flatten_gemm)
    (g,) = prunable(cg)
    (fc,) = [m for m in g.members if m.kind == "in"]
    roots = cg.atoms.roots(fc.layout)
    assert len(roots) == 128 and all(len(set(roots[i * 16:(i + 1) * 16])) == 1 for i in range(8))


def test_depthwise_passes_through_and_shrinks_groups():
    _, cg = analyse(pg.depthwise)
    (g,) = prunable(cg)
    assert any(m.kind == "depthwise" for m in g.members)
    assert any(m.kind == "in" and m.node.op == "Conv" for m in g.members)


def test_grouped_conv_gives_block_constraints():
    _, cg = analyse(pg.grouped)
    groups = prunable(cg)
    assert len(groups) == 2 and all(g.blocks is not None and len(g.blocks) == 2 for g in groups)


def test_nhwc_transpose_into_matmul():
    _, cg = analyse(pg.nhwc_matmul)
    (g,) = prunable(cg)
    (mm,) = [m for m in g.members if m.kind == "in"]
    assert mm.node.op == "MatMul" and mm.axis == 0


def test_ffn_hidden_neurons_form_a_group_and_the_hidden_state_is_frozen():
    _, cg = analyse(pg.ffn)
    groups = {len(g.classes): g for g in cg.groups}
    assert groups[16].prunable and not groups[6].prunable
    assert any("ties axis 2 to 'x'" in r for r in groups[6].reasons)  # the residual input


def test_attention_heads_are_one_class_each():
    _, cg = analyse(pg.attention)
    (g,) = prunable(cg)
    assert len(g.producers) == 3 and len(g.classes) == 4 and list(g.width) == [3, 3, 3, 3]
    assert sum(m.kind == "shape" for m in g.members) == 4  # three head reshapes and the merge


def test_se_excite_conv_is_coupled_to_the_trunk():
    _, cg = analyse(pg.se_block)
    groups = {len(g.producers): g for g in prunable(cg)}
    assert 2 in groups and len(groups[2].classes) == 8  # trunk conv + excite conv
    assert any(len(g.classes) == 4 for g in prunable(cg))  # the squeeze conv alone


@pytest.mark.parametrize("name", sorted(pg.REFUSALS))
def test_refusals_freeze_with_a_reason(name):
    builder, reason = pg.REFUSALS[name]
    _, cg = analyse(builder)
    first = [g for g in cg.groups if any(p for p in g.producers)][0]
    frozen = [g for g in cg.groups if not g.prunable]
    assert frozen and any(reason in r for g in frozen for r in g.reasons) or \
        any(reason in why for _, why in cg.skipped), (name, [g.reasons for g in cg.groups], cg.skipped)
    assert first is not None


def test_perturbing_one_channel_changes_exactly_the_predicted_consumer_columns():
    """Execution cross-check (NNI's idea): change one producer row; the analysis says which
    consumer input channel carries it; the consumer's output must depend on exactly it."""
    import onnx
    from onnx import numpy_helper

    from onnxopt.runtime import session

    model = pg.concat()
    cg = channel_graph(load(model))
    (consumer,) = [x for x in cg.members if x.kind == "in"]
    cat_name = consumer.node.inputs[0].name
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(onnx.helper.make_tensor_value_info(cat_name, onnx.TensorProto.FLOAT, None))
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    base = session(probe).run([cat_name], {"x": x})[0]
    small = [g for g in cg.groups if len(g.classes) == 6][0]
    (prod,) = [x_ for x_ in small.members if x_.kind == "out"]
    target = int(small.classes[2])
    w = [t for t in probe.graph.initializer if t.name == prod.node.inputs[1].name][0]
    arr = numpy_helper.to_array(w).copy()
    row = int(np.flatnonzero(cg.atoms.roots(prod.layout) == target)[0])
    arr[row] += 1.0
    w.CopyFrom(numpy_helper.from_array(arr, w.name))
    moved = session(probe).run([cat_name], {"x": x})[0]
    changed = np.flatnonzero(np.abs(moved - base).reshape(14, -1).max(1) > 0)
    predicted = np.flatnonzero(cg.atoms.roots(consumer.layout) == target)
    assert list(changed) == list(predicted)


def test_kept_count_rounds_to_the_multiple():
    assert kept_count(64, 0.3) == 45 and kept_count(64, 0.3, 8) == 48 and kept_count(16, 0.3, 32) == 16
    assert kept_count(10, 0.99, 1, min_keep=2) == 2


def test_split_sizes_as_an_attribute_before_opset_13():
    import onnx

    from tests.pruning_graphs import Builder, tensor

    b = Builder(50)
    h = b.node("Relu", [b.conv("x", 3, 8)])
    p, q = b.node("Split", [h], n_out=2, axis=1)  # equal halves, no sizes given
    b.node("Add", [b.conv(p, 4, 4, bias=False), b.conv(q, 4, 4, bias=False)])
    model = b.model([tensor("x", [1, 3, 4, 4])], "y", [1, 4, 4, 4], opset=11)
    m = load(model)
    cg = channel_graph(m)
    (g,) = [g for g in cg.groups if g.prunable]
    cg.apply({int(g.classes[0]), int(g.classes[5])})
    (split,) = [n for n in m.graph.nodes if n.op == "Split"]
    assert split.attrs["split"] == [3, 3] and len(split.inputs) == 1
    m.modified = True
    onnx.checker.check_model(m.to_proto())
