"""pz_flax: penzai's named-axis, selectable, visualizable models inside Flax NNX codebases."""

__version__ = "0.1.0"
