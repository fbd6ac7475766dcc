"""Neural-network building blocks over named axes.

Every layer here is an immutable ``Struct`` called as ``layer(x, **side_inputs)``; its
parameters are ``pz_flax.core.variables.Parameter`` objects, which are also Flax NNX
``Param`` variables, so the same model can be inspected penzai-style and trained NNX-style.
Users normally reach these classes through the ``pz.nn`` alias namespace.
"""
