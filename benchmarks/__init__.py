"""Side-by-side benchmarks of pz_flax against raw ``jax.jit``, Flax NNX and penzai 0.2.5.

Run them all with ``python -m benchmarks`` (see ``benchmarks.run``); each module also exposes
``run(quick: bool) -> list[dict]`` for use on its own.
"""
