"""The array layer: the only code that knows whether NumPy or CuPy runs.

The compute code above it (nn, parallel, the loop) takes its array module from the
arrays or from a :class:`~gpucnn.array.backend.Backend`; datasets are host NumPy arrays
and need neither.
"""
