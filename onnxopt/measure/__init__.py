"""Measuring models: running them in onnxruntime, comparing two models, fidelity metrics and
the report."""
