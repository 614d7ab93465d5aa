"""Accuracy-aware search over compression settings (``onnxopt optimize --search``).

``search(...)`` (``onnxopt.search.driver``) finds the Pareto front of size, latency and a
metric's drop within a budget; ``space`` holds the knobs (``register_knob`` for more),
``worker`` what a worker does, ``executor`` where workers run (processes or Ray),
``pareto`` the front.
"""

from onnxopt.search.driver import SearchResult, search
from onnxopt.search.space import Knob, register_knob

__all__ = ["search", "SearchResult", "Knob", "register_knob"]
