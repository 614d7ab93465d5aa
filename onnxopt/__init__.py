"""onnxopt: a compiler-style optimizer for ONNX models.

Public API::

    import onnxopt
    result = onnxopt.optimize("model.onnx", target="cpu", pipeline="lossless")
    result.save("model.opt.onnx")

Write a pass with ``Pass``, ``PassResult``, ``option`` and ``@register_pass``.

The names below are imported on first use (PEP 562): ``import onnxopt`` costs nothing, so
``onnxopt --help`` does not pay for onnx (about a second) or onnxruntime.
"""

import sys
import types

__version__ = "0.1.0"

from onnxopt.errors import (CalibrationError, ModelError, OnnxoptError, PassFailedError,  # noqa: E402
                            PipelineError, QualityGateError, TargetError, UsageError, VerificationError)

# public name -> the module that defines it
_LAZY = {
    "Model": "onnxopt.ir.model", "load": "onnxopt.ir.model", "save": "onnxopt.ir.model",
    "OptimizeResult": "onnxopt.optimize", "optimize": "onnxopt.optimize", "plan": "onnxopt.optimize",
    "Pass": "onnxopt.pipeline.pass_api", "PassResult": "onnxopt.pipeline.pass_api",
    "option": "onnxopt.pipeline.pass_api",
    "PassSpec": "onnxopt.pipeline.text", "format_pipeline": "onnxopt.pipeline.text", "parse": "onnxopt.pipeline.text",
    "all_passes": "onnxopt.pipeline.registry", "get_pass": "onnxopt.pipeline.registry",
    "register_pass": "onnxopt.pipeline.registry",
    "Target": "onnxopt.target", "load_target": "onnxopt.target",
    "PassContext": "onnxopt.pipeline.context",
}

__all__ = [
    "__version__", "optimize", "plan", "OptimizeResult", "load", "save", "Model",
    "Pass", "PassResult", "option", "register_pass", "get_pass", "all_passes",
    "PassSpec", "parse", "format_pipeline", "Target", "load_target", "PassContext",
    "OnnxoptError", "UsageError", "ModelError", "PipelineError", "TargetError",
    "CalibrationError", "PassFailedError", "VerificationError", "QualityGateError",
]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'onnxopt' has no attribute '{name}'")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next access is a plain lookup
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class _Package(types.ModuleType):
    """Importing the submodule ``onnxopt.optimize`` must not replace the function
    ``onnxopt.optimize`` (Python sets a package attribute for each submodule it imports)."""

    def __setattr__(self, name: str, value) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            return  # the public name stays the function, resolved by __getattr__
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
