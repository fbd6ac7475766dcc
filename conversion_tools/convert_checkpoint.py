"""Runs ``pz-flax-convert`` from a source checkout, without installing pz_flax.

``python conversion_tools/convert_checkpoint.py ARGS`` behaves as ``pz-flax-convert ARGS``; the
implementation is :mod:`pz_flax.cli`.
"""

import pathlib
import sys

if __name__ == "__main__":
    # Make the checkout importable, as an installed console script would find pz_flax.
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
    from pz_flax.cli import main

    sys.exit(main())
