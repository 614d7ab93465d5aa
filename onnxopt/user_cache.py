"""Where onnxopt keeps what is costly to compute again (layer sensitivities, layer timings).

One folder for every cache: ``$ONNXOPT_CACHE_DIR``, else the platform's user cache folder
(``$XDG_CACHE_HOME`` or ``~/.cache``, ``%LOCALAPPDATA%`` on Windows) with ``onnxopt`` in it.
Each user of it takes a subfolder or file of its own.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def user_cache_dir() -> Path:
    if os.environ.get("ONNXOPT_CACHE_DIR"):
        return Path(os.environ["ONNXOPT_CACHE_DIR"])
    if sys.platform == "win32" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / "onnxopt" / "cache"
    base = os.environ.get("XDG_CACHE_HOME") or (Path.home() / ".cache")
    return Path(base) / "onnxopt"
