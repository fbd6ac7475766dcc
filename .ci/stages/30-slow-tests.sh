#!/usr/bin/env bash
# The slow test set (multi-process runs, penzai's notebooks, killed saves):
# deselected from README's test command by pyproject's `-m "not slow"`.
set -euo pipefail
status=0
.venv/bin/python -m pytest -n auto -m slow || status=$?
# Exit 5 means no test carried the marker: nothing slow to run is not a failure.
if [ "$status" -ne 0 ] && [ "$status" -ne 5 ]; then
  exit "$status"
fi
