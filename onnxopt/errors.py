"""One exception tree for onnxopt; each class carries the exit code the CLI maps it to.

0 done; 1 internal error (a bug: traceback shown); 2 bad input or usage; 3 quality gate
not met (DESIGN.md section 5).
"""


class OnnxoptError(Exception):
    """Base of every error onnxopt raises on purpose."""

    exit_code = 1


class UsageError(OnnxoptError):
    """Bad command line, bad argument value or bad API call."""

    exit_code = 2


class ModelError(OnnxoptError):
    """The input model is unreadable, invalid or unsafe (names the file, node or tensor)."""

    exit_code = 2


class ExternalDataError(ModelError):
    """External data that is missing or that points outside the model's folder."""


class PipelineError(OnnxoptError):
    """Pipeline text that does not parse or names an unknown pass or option."""

    exit_code = 2


class TargetError(OnnxoptError):
    """A target descriptor that is missing, malformed or fails the schema."""

    exit_code = 2


class CalibrationError(OnnxoptError):
    """Calibration data whose names, dtypes, shapes or values do not fit the model."""

    exit_code = 2


class OutputError(OnnxoptError):
    """The output cannot be written (missing or read-only folder, …)."""

    exit_code = 2


class PassFailedError(OnnxoptError):
    """A pass raised (a bug in the pass): fatal under --strict, rolled back otherwise."""

    exit_code = 1


class VerificationError(OnnxoptError):
    """A pass changed the model's results or broke it: fatal under --strict."""

    exit_code = 3


class QualityGateError(OnnxoptError):
    """The optimized model misses the accuracy gate the user set."""

    exit_code = 3
