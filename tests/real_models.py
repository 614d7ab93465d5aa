"""Where the tests find the real models of ../shared/models (skipped when absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MODELS = Path(os.environ.get("ONNXOPT_MODELS", REPO / ".models"))
EXAMPLES = REPO / "examples"


def real_model(name: str) -> Path:
    """Path of a real model from ../shared/models, or skip the test saying how to get it."""
    path = MODELS / name
    if not path.exists():
        pytest.skip(f"{name} not in {MODELS} (run ../shared/models/get_models.sh .models)")
    return path
