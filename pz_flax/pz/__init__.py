"""Aliases for users: ``from pz_flax import pz``."""
