"""The array layer: the only code that knows whether NumPy or CuPy runs.

Everything above it (nn, parallel, data, the loop) takes its array module from the
arrays or from a :class:`~gpucnn.array.backend.Backend`.
"""
