"""The built-in pass library, installed as ``onnxopt.passes``: one family a module.

Every module here is imported on first use of the registry, and its passes register
themselves with ``@register_pass``.
"""

import importlib
import pkgutil

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if not _module.startswith("_"):
        importlib.import_module(f"{__name__}.{_module}")
