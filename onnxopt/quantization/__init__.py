"""Quantization support for passes: integer schemes and arithmetic (``scheme``), Q/DQ in
the graph (``qdq``), quantized layers as the graph stores them (``stored``), GPTQ rounding
(``gptq``) and activation smoothing (``smoothing``)."""
