"""Sphinx configuration of pz_flax's documentation site.

Built by ``.ci/stages/20-docs.sh`` with warnings as errors. Tutorial notebooks under
``notebooks/`` are committed without outputs and executed on every build (myst-nb), so
treescope renderings and printed results always come from the code as it is.
"""

import os

import pz_flax

project = "pz_flax"
author = "The pz_flax authors"
copyright = "The pz_flax authors"
release = pz_flax.__version__
version = release

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
]

exclude_patterns = ["_build", "jupyter_execute", "**/.ipynb_checkpoints"]

# Notebooks: always executed, an error in any cell fails the build.
nb_execution_mode = "force"
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_execution_timeout = 300
# Notebook kernels inherit the environment: never the test suite's fake devices (the sharding
# tutorial asks for its own), and CPU, as on the machines the docs are built on.
os.environ.pop("XLA_FLAGS", None)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

myst_enable_extensions = ["colon_fence"]
myst_heading_anchors = 3

# API reference from docstrings (Google style: Args/Returns/Raises sections).
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": True, "show-inheritance": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# "Attributes:" sections as fields of the class, so dataclass fields are not described twice.
napoleon_use_ivar = True

html_theme = "furo"
html_title = f"pz_flax {release}"
