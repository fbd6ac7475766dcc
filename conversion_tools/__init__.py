"""A runnable script over :mod:`pz_flax.cli`; not installed (the wheel ships only pz_flax)."""
