"""Shared fixtures. Helpers are modules of the ``tests`` package (tests/graphs.py builds tiny
models, tests/real_models.py finds the real ones): import them as ``tests.graphs``, so
``pytest`` and ``python -m pytest`` load each once, under one name."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.real_models import EXAMPLES


@pytest.fixture
def digits_model() -> Path:
    return EXAMPLES / "digits_cnn.onnx"
