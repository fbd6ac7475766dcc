#!/usr/bin/env bash
# The huggingface extra's converter tests and penzai's own notebooks (run on penzai and on
# pz_flax), which need packages the [test] extra does not install: transformers with a CPU
# build of torch (pinned: an unpinned torch pulls a multi-GB CUDA build), and IPython and
# sentencepiece for the notebooks.
set -euo pipefail
.venv/bin/pip install -q "torch==2.13.0" -e ".[huggingface]" ipython sentencepiece
.venv/bin/python -m pytest -p no:xdist -q tests/models/transformer/variants
.venv/bin/python -m pytest -p no:xdist -q -m slow tests/penzai_notebooks
