"""Treescope renderers for pz_flax's core types.

Each type reaches its renderer through its own treescope hook
(``__treescope_repr__``, and ``__treescope_ndarray_adapter__`` for named
arrays), which imports the module here on first use: nothing in this package
is imported, and nothing is registered globally, until something is rendered.
"""
