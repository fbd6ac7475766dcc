#!/usr/bin/env bash
# The oldest supported versions: a virtual environment of its own (.venv-oldest; .venv, which
# holds the newest set that README's test command tests, is left alone), installed with
# .ci/constraints-oldest.txt, which pins every runtime dependency at pyproject's floor. It runs
# a named subset of the fast tests, the ones that exercise what changes between releases of
# flax, jax, orbax and treescope: the canaries of pz_flax._compat and the version check (which
# confirms that the installed versions are pyproject's floors), variables as NNX variables,
# the struct and tree traversals, parameters and layers, NNX conversion, and checkpoints
# (storage, golden checkpoints, NNX checkpoints).
set -euo pipefail
venv=.venv-oldest
rm -rf "$venv"
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet -e ".[test]" -c .ci/constraints-oldest.txt
"$venv/bin/python" -m pytest -n auto -q -m "not slow" \
  tests/_compat \
  tests/core/test_variables.py \
  tests/core/test_variables_nnx.py \
  tests/core/test_tree_util.py \
  tests/core/test_struct.py \
  tests/nn/test_parameters.py \
  tests/nn/test_layer.py \
  tests/interop/test_convert.py \
  tests/checkpoint/test_storage.py \
  tests/checkpoint/test_golden.py \
  tests/checkpoint/test_nnx_checkpoints.py
