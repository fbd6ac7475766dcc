"""Command-line tools over ``pz_flax.checkpoint``: the ``pz-flax-convert`` entry point."""
