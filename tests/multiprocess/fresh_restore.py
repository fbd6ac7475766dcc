"""Restores a checkpoint in a fresh single-device process: ``python -m ... CHECKPOINT OUT.npz``.

The process never saw the model's code or the job that wrote the checkpoint.
"""

import sys

import jax
import numpy as np

from pz_flax import checkpoint
from pz_flax import pz


def main(checkpoint_path: str, out_file: str) -> None:
    assert jax.device_count() == 1, jax.devices()
    model = checkpoint.restore(checkpoint_path)
    _, params = pz.unbind_params(model)
    np.savez(out_file, **{str(p.label): np.asarray(p.get_raw_value()) for p in params})


if __name__ == "__main__":
    main(*sys.argv[1:])
