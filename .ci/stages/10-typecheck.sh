#!/usr/bin/env bash
# The type check of pz_flax's public API (mypy; what it checks is set in pyproject's
# [tool.mypy]): tests/test_public_api_types.py against the signatures users see through
# py.typed, and every annotation in pz_flax being a valid type.
set -euo pipefail
.venv/bin/pip install --quiet -e ".[typecheck]"
.venv/bin/mypy
