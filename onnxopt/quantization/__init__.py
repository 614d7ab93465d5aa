"""Quantization support for passes: integer schemes and arithmetic (``scheme``), and
Q/DQ in the graph (``qdq``)."""
