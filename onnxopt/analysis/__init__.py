"""Analyses: facts about a model computed on demand and cached in the PassContext."""

from onnxopt.analysis import shapes, use_def  # noqa: F401  (register the analyses)
