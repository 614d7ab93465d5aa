"""The two capability keys pruning reads: nm_sparsity and channel_multiple."""

import pytest

from onnxopt.errors import TargetError
from onnxopt.target import load_target, parse_nm


def test_builtin_values():
    cpu, gpu, npu = (load_target(n).capabilities for n in ("cpu", "gpu", "npu"))
    assert (cpu.nm_sparsity, cpu.channel_multiple) == ([], 8)
    assert (gpu.nm_sparsity, gpu.channel_multiple) == (["2:4"], 8)
    assert (npu.nm_sparsity, npu.channel_multiple) == ([], 32)


def test_defaults_for_a_target_that_sets_neither(tmp_path):
    p = tmp_path / "t.toml"
    p.write_text('schema = 1\nname = "t"\n[pipelines]\nlossless = "lift-constants"\ndefault = "lossless"\n')
    caps = load_target(p).capabilities
    assert caps.nm_sparsity == [] and caps.channel_multiple == 1


@pytest.mark.parametrize("text, message", [
    ('nm_sparsity = ["2-4"]', r"nm_sparsity: '2-4' is not an 'n:m' pattern"),
    ('nm_sparsity = ["4:4"]', r"nm_sparsity: '4:4' is not an 'n:m' pattern"),
    ('nm_sparsity = ["0:4"]', r"'0:4'"),
    ('nm_sparsity = "2:4"', r"nm_sparsity must be a list of a string"),
    ("channel_multiple = 0", r"channel_multiple = 0: must be 1 or more"),
    ("channel_multiple = 8.0", r"channel_multiple must be an integer"),
])
def test_bad_values_are_refused_at_load(tmp_path, text, message):
    p = tmp_path / "t.toml"
    p.write_text(f'schema = 1\nname = "t"\nextends = "cpu"\n[capabilities]\n{text}\n')
    with pytest.raises(TargetError, match=message) as err:
        load_target(p)
    assert err.value.exit_code == 2 and "t.toml" in str(err.value)


def test_parse_nm():
    assert parse_nm("2:4") == (2, 4) and parse_nm(" 1 : 8 ") == (1, 8)
    assert parse_nm("4:2") is None and parse_nm("2") is None and parse_nm("a:b") is None
