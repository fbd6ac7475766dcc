"""Treescope renderers for ``pz_flax.nn`` layers."""
