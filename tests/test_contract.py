"""Every built-in lossless pass keeps the pass contract on every tiny-graph builder."""

import pytest

from onnxopt.pipeline.registry import all_passes, builtin_names
from onnxopt.testing import check_pass_contract

from tests import graphs


def lossless_builtins():
    passes = all_passes()
    return sorted(n for n in builtin_names() if passes[n].lossless)


@pytest.mark.parametrize("name", lossless_builtins())
def test_lossless_pass_contract(name):
    check_pass_contract(all_passes()[name], [b() for b in graphs.BUILDERS])
