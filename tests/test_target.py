"""Target descriptors: built-ins load, the schema is strict, extends merges, errors name the place."""

import json

import pytest

from onnxopt.cli import main
from onnxopt.errors import TargetError
from onnxopt.target import builtin_target_names, load_target


@pytest.mark.parametrize("name", ["cpu", "gpu", "npu"])
def test_builtin_targets_load_with_required_pipelines(name):
    t = load_target(name)
    assert t.name == name
    assert {"lossless", "default"} <= set(t.pipelines)
    assert isinstance(t.capabilities.float16, bool)


def test_builtins_are_listed():
    assert {"cpu", "gpu", "npu"} <= set(builtin_target_names())


def write(tmp_path, text, name="t.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


BASE = 'schema = 1\nname = "mine"\n[pipelines]\nlossless = "eliminate-dead-code"\ndefault = "lossless"\n'


def test_user_target_file(tmp_path):
    t = load_target(write(tmp_path, BASE))
    assert t.name == "mine" and t.runtime.execution_providers == ["CPUExecutionProvider"]


def test_unknown_key_names_file_table_and_nearest(tmp_path):
    p = write(tmp_path, BASE + "[capabilities]\nallowed_op = []\n")
    with pytest.raises(TargetError, match=r"t\.toml: \[capabilities\]: unknown key 'allowed_op'; did you mean 'allowed_ops'"):
        load_target(p)


def test_wrong_type_names_the_key(tmp_path):
    p = write(tmp_path, BASE + "[runtime]\nintra_op_threads = \"8\"\n")
    with pytest.raises(TargetError, match="runtime.intra_op_threads must be an integer"):
        load_target(p)


def test_bad_toml_and_missing_file(tmp_path):
    with pytest.raises(TargetError, match="not valid TOML"):
        load_target(write(tmp_path, "schema = = 1"))
    with pytest.raises(TargetError, match="not found"):
        load_target(tmp_path / "nope.toml")
    with pytest.raises(TargetError, match="did you mean 'cpu'"):
        load_target("cpx")


def test_schema_version_and_required_pipelines(tmp_path):
    with pytest.raises(TargetError, match="'schema' must be 1"):
        load_target(write(tmp_path, BASE.replace("schema = 1", "schema = 2")))
    with pytest.raises(TargetError, match="must define 'default'"):
        load_target(write(tmp_path, 'schema = 1\nname = "x"\n[pipelines]\nlossless = "eliminate-dead-code"\n'))


def test_pipeline_and_pass_tables_are_checked_against_the_registry(tmp_path):
    with pytest.raises(TargetError, match=r"\[pipelines\] lossless: unknown pass 'eliminate-dead'"):
        load_target(write(tmp_path, BASE.replace('"eliminate-dead-code"', '"eliminate-dead"')))
    with pytest.raises(TargetError, match=r"\[passes.nope\]"):
        load_target(write(tmp_path, BASE + "[passes.nope]\nx = 1\n"))


def test_extends_merges_tables_key_by_key(tmp_path):
    p = write(tmp_path, 'schema = 1\nname = "mycpu"\nextends = "cpu"\n[capabilities]\nfloat16 = true\n'
                        '[pipelines]\ndefault = "eliminate-dead-code"\n')
    t = load_target(p)
    cpu = load_target("cpu")
    assert t.capabilities.float16 is True
    assert t.capabilities.int4 == cpu.capabilities.int4  # kept from the base
    assert t.pipelines["lossless"] == cpu.pipelines["lossless"]
    assert t.pipelines["default"] == "eliminate-dead-code"


def test_extends_a_relative_file_and_cycles(tmp_path):
    write(tmp_path, BASE, "base.toml")
    t = load_target(write(tmp_path, 'schema = 1\nname = "child"\nextends = "base.toml"\n'))
    assert t.pipelines["default"] == "lossless"
    write(tmp_path, 'schema = 1\nname = "a"\nextends = "b.toml"\n', "a.toml")
    write(tmp_path, 'schema = 1\nname = "b"\nextends = "a.toml"\n', "b.toml")
    with pytest.raises(TargetError, match="cycle"):
        load_target(tmp_path / "a.toml")


def test_cli_targets_json_shows_effective_target(capsys):
    assert main(["targets", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {t["name"] for t in data} >= {"cpu", "gpu", "npu"}
    assert all("lossless" in t["pipelines"] for t in data)


def test_cli_bad_target_file_exit_2(tmp_path, capsys):
    p = write(tmp_path, BASE + "[runtime]\nproviders = []\n")
    assert main(["targets", str(p)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("onnxopt: error:") and "unknown key 'providers'" in err and err.count("\n") == 1


@pytest.mark.parametrize("text, message", [
    ('[quantization.schemes.act_u8]\ndtype = "int4"\n',
     r"\[quantization.schemes.act_u8\] dtype = 'int4': activations can be uint8, int8, uint16, int16"),
    ('[quantization.schemes.w_s8]\ndtype = "uint4"\n',
     r"\[quantization.schemes.w_s8\] dtype = 'uint4': weights can be"),
    ('[quantization.schemes.w_s8]\ngranularity = "per_block"\n',
     r"\[quantization.schemes.w_s8\] granularity = 'per_block': one of per_tensor, per_channel"),
    ('[quantization.schemes.act_u8]\ngranularity = "per_channel"\n', "activations are quantized per tensor"),
    ('[quantization]\nbias_bits = 16\n', r"\[quantization\] bias_bits = 16: the passes take 0, 32"),
    ('[quantization]\nactivations = "act_u16"\n', "activations = 'act_u16' names no scheme; did you mean 'act_u8'"),
    ('[quantization.schemes.w_s8]\nblock_size = 32\n', r"unknown key 'block_size'"),
    ('[capabilities]\nstatic_shape = true\n', r"unknown key 'static_shape'; did you mean 'static_shapes'"),
    ('[capabilities]\nallowed_ops = ["Conv", "Relu6"]\n', r"'Relu6' is not an ONNX op; did you mean 'Relu'"),
    ('[capabilities]\ntensor_types = ["fp8"]\n', r"tensor_types = 'fp8': types are float32"),
    ('[capabilities.ops.Resize.attributes]\nmodes = ["nearest"]\n', r"Resize has no attribute 'modes'; did you mean 'mode'"),
    ('[capabilities.ops.Resize]\nmax_rank = 4\n', r"\[capabilities.ops.Resize\]: unknown key 'max_rank'"),
    ('[quantization.weight_schemes]\nMatMul = "w_u8"\n', r"weight_schemes\] MatMul = 'w_u8' names no scheme"),
])
def test_values_no_pass_can_honor_are_refused_at_load(tmp_path, text, message):
    """Before: an int4 activation scheme made quantize-static raise KeyError mid-run (rolled
    back, exit 0), and block_size or bias_bits != 32 were silently ignored; a misspelt op in
    allowed_ops silently disallowed the op."""
    p = write(tmp_path, 'schema = 1\nname = "t"\nextends = "cpu"\n' + text)
    with pytest.raises(TargetError, match=message) as err:
        load_target(p)
    assert err.value.exit_code == 2 and "t.toml" in str(err.value)


def test_reduce_range_comes_from_the_target_not_the_machine(tmp_path):
    """The same command gives the same file on any machine: the weight scheme decides."""
    import numpy as np
    import onnx

    import onnxopt
    from onnxopt.measure.fidelity import Floor
    from tests.graphs import conv_bn_relu

    p = write(tmp_path, 'schema = 1\nname = "avx2-box"\nextends = "cpu"\n'
                        '[quantization.schemes.w_s8]\nreduce_range = true\n')
    data = {"x": np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)}
    model = conv_bn_relu()
    data_name = model.graph.input[0].name
    batch = {data_name: data["x"]}

    def weight_max(target):
        out = onnxopt.optimize(model, target=target, pipeline="lossless,quantize-static", calibration=batch,
                               floor=Floor()).model  # the weights are the point, not the floor
        ints = [onnx.numpy_helper.to_array(i) for i in out.graph.initializer if i.data_type == onnx.TensorProto.INT8]
        return max(int(np.abs(a).max()) for a in ints)

    assert weight_max(str(p)) == 63 and weight_max("cpu") == 127
    result = onnxopt.optimize(model, target="cpu", pipeline="quantize-static{reduce_range=auto}", calibration=batch,
                              floor=Floor())
    meta = {m.key: m.value for m in result.model.metadata_props}
    assert meta["onnxopt.reduce_range"].startswith(("on (auto:", "off (auto:"))
    assert result.report["chosen"]["reduce_range"] == meta["onnxopt.reduce_range"]
