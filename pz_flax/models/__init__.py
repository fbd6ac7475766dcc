"""Ready-made models built from ``pz_flax.nn`` layers, as penzai's ``penzai.models``.

``simple_mlp`` holds multi-layer perceptrons; ``transformer`` a small decoder-only
language model with a key/value-caching decoding mode.
"""
