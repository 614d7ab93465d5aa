"""onnxopt: a compiler-style optimizer for ONNX models.

Public API::

    import onnxopt
    result = onnxopt.optimize("model.onnx", target="cpu", pipeline="lossless")
    result.save("model.opt.onnx")

Write a pass with ``Pass``, ``PassResult``, ``option`` and ``@register_pass``.
"""

__version__ = "0.1.0"

from onnxopt.errors import (CalibrationError, ModelError, OnnxoptError, PassFailedError,  # noqa: E402
                     PipelineError, QualityGateError, TargetError, UsageError, VerificationError)
from onnxopt.ir.model import Model, load, save  # noqa: E402
from onnxopt.optimize import OptimizeResult, optimize, plan  # noqa: E402
from onnxopt.pipeline.pass_api import Pass, PassResult, option  # noqa: E402
from onnxopt.pipeline.text import PassSpec, format_pipeline, parse  # noqa: E402
from onnxopt.pipeline.registry import all_passes, get_pass, register_pass  # noqa: E402
from onnxopt.target import Target, load_target  # noqa: E402
from onnxopt.pipeline.context import PassContext  # noqa: E402

__all__ = [
    "__version__", "optimize", "plan", "OptimizeResult", "load", "save", "Model",
    "Pass", "PassResult", "option", "register_pass", "get_pass", "all_passes",
    "PassSpec", "parse", "format_pipeline", "Target", "load_target", "PassContext",
    "OnnxoptError", "UsageError", "ModelError", "PipelineError", "TargetError",
    "CalibrationError", "PassFailedError", "VerificationError", "QualityGateError",
]
