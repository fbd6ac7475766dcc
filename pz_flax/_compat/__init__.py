"""The only place in pz_flax that touches private names of flax, jax, orbax or treescope.

Each use says why, since which version, and what happens when the assumption breaks; a canary
test (``tests/_compat/``) names the assumption. ``nnx`` holds NNX's internals (bookkeeping
attributes, graph definitions, variable construction and raw-value slots, metadata vocabulary,
the trace token NNX checks writes against), ``nnx_modules`` the taking apart and rebuilding of
NNX modules that checkpoints need, and ``orbax`` Orbax's on-disk layout. JAX needs no entry:
every JAX detail pz_flax relies on has a public route (``jax.random.key_impl``,
``type(jnp.float32)``, public module aliases).
"""
