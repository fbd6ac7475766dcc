"""The only place in pz_flax that touches private names of flax, jax, orbax or treescope.

Each use says why, since which version, and what happens when the assumption breaks; a canary
test names the assumption.
"""
