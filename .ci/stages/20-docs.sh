#!/usr/bin/env bash
# The documentation site: the API reference and every tutorial notebook, executed afresh
# (myst-nb, nb_execution_mode="force"), with Sphinx warnings as errors, so neither the
# notebooks nor the docstrings can rot. The site lands in docs/_build/html.
set -euo pipefail
.venv/bin/pip install --quiet -e ".[docs]"
rm -rf docs/_build docs/jupyter_execute
.venv/bin/python -m sphinx -W --keep-going -b html docs docs/_build/html
