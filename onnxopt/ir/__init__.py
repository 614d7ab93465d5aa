"""The model and its graph: load and save, the bridge onto graphsurgeon, and the helpers
every pass uses to read and rewrite a graph (constants, names, order, surgery, weight axes,
opsets, rewrite rules)."""
