"""Built-in target descriptors (TOML data), installed as ``onnxopt.targets``."""
