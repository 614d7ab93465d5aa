"""The pass infrastructure: the pass API, the registry, pipeline text, the pass context and
the pass manager that runs a pipeline (the passes themselves live in ``onnxopt.passes``)."""
