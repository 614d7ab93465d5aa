"""onnxopt: a compiler-style optimizer for ONNX models.

Public API::

    import onnxopt
    result = onnxopt.optimize("model.onnx", target="cpu", pipeline="lossless")
    result.save("model.opt.onnx")

Write a pass with ``Pass``, ``PassResult``, ``option`` and ``@register_pass``.
"""

__version__ = "0.1.0"

from .errors import (CalibrationError, ModelError, OnnxoptError, PassFailedError,  # noqa: E402
                     PipelineError, QualityGateError, TargetError, UsageError, VerificationError)
from .model import Model, load, save  # noqa: E402
from .optimize import OptimizeResult, optimize, plan  # noqa: E402
from .pass_base import Pass, PassResult, option  # noqa: E402
from .pipeline import PassSpec, format_pipeline, parse  # noqa: E402
from .registry import all_passes, get_pass, register_pass  # noqa: E402
from .target import Target, load_target  # noqa: E402
from .context import PassContext  # noqa: E402

__all__ = [
    "__version__", "optimize", "plan", "OptimizeResult", "load", "save", "Model",
    "Pass", "PassResult", "option", "register_pass", "get_pass", "all_passes",
    "PassSpec", "parse", "format_pipeline", "Target", "load_target", "PassContext",
    "OnnxoptError", "UsageError", "ModelError", "PipelineError", "TargetError",
    "CalibrationError", "PassFailedError", "VerificationError", "QualityGateError",
]
