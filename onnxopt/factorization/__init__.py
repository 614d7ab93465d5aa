"""Low-rank factorization support for passes: truncated (whitened) SVD of a weight matrix or
a stack of them (``svd``), the ways a Conv kernel becomes a chain of smaller Convs
(``conv``), and the choice of ranks per layer or under a global budget (``ranks``)."""
