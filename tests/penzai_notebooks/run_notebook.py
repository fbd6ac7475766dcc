"""Runs one penzai notebook in an IPython shell and records what each cell did.

Usage: ``python -m tests.penzai_notebooks.run_notebook NOTEBOOK LIBRARY OUT_JSON``, where
LIBRARY is ``penzai`` (the notebook as published) or ``pz_flax`` (the same notebook with
the module name ``penzai`` replaced by ``pz_flax``). Cells that download weights are
replaced (the same way for both libraries) by `offline_setup`'s tiny local release, and
the block counts and indices the notebooks write out are rewritten for its size.

For every code cell the output records whether it raised (and what), whether treescope
reported an error while rendering, and a fingerprint of every array-valued variable the
cell assigned (shape, sum and sum of absolute values), to compare the two libraries'
numbers.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import traceback

from tests.penzai_notebooks import offline_setup

# What the published notebooks do online, and what they do here instead.
SUBSTITUTIONS = (
    ("kagglehub.login()", "pass  # offline: nothing to log in to"),
    (
        "kagglehub.model_download('google/gemma/Flax/",
        "from tests.penzai_notebooks import offline_setup\n"
        "weights_dir = os.environ['PZ_NOTEBOOK_WEIGHTS_DIR']\n"
        "offline_setup.write_fake_release(weights_dir, {release!r},"
        " offline_setup.corpus(os.environ['PZ_NOTEBOOK_DIR']))\n"
        "offline_setup.register_tiny_preset({release!r})\n"
        "ckpt_path = os.path.join(weights_dir, {release!r})\n"
        "vocab_path = os.path.join(weights_dir, 'tokenizer.model')\n",
    ),
    # jax.sharding.PositionalSharding no longer exists in JAX; restore unsharded instead.
    (
        "checkpointer.restore(ckpt_path, restore_args=restore_args)",
        "flat_params = checkpointer.restore(ckpt_path)\n",
    ),
)

TREESCOPE_ERROR = "Ignoring error inside wrapper hook"


def substitute(source: str) -> str:
    for marker, replacement in SUBSTITUTIONS:
        if marker in source:
            release = re.search(r"Flax/(\w+)'", source)
            return replacement.format(release=release.group(1) if release else "")
    return offline_setup.shrink_block_references(source)


def rewrite_imports(source: str) -> str:
    return re.sub(r"\bpenzai\b", "pz_flax", source)


def _fingerprint(value):
    """(shape description, sum, sum of |x|) of an array-like value, or None."""
    import numpy as np

    named_shape = getattr(value, "named_shape", None)
    try:
        if named_shape is not None and hasattr(value, "unwrap"):
            if value.positional_shape:
                value = value.tag_prefix(*[f"_pos{i}" for i in range(len(value.positional_shape))])
            names = sorted(value.named_shape)
            data = np.asarray(value.unwrap(*names), dtype=np.float64)
            shape = {name: value.named_shape[name] for name in names}
        elif hasattr(value, "shape") and hasattr(value, "dtype") and hasattr(value, "__array__"):
            data = np.asarray(value, dtype=np.float64)
            shape = list(data.shape)
        else:
            return None
    except Exception:  # typed PRNG keys, shardings, abstract values: not comparable
        return None
    if not np.isfinite(data).all():
        return [repr(shape), None, None]
    return [repr(shape), float(data.sum()), float(np.abs(data).sum())]


def main(notebook_path: str, library: str, out_path: str) -> None:
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.utils.capture import capture_output

    with open(notebook_path) as f:
        notebook = json.load(f)
    shell = InteractiveShell.instance()
    seen_ids: dict[str, int] = {}
    results = []
    cells = [c for c in notebook["cells"] if c["cell_type"] == "code"]
    for index, cell in enumerate(cells):
        source = substitute("".join(cell["source"]))
        if library == "pz_flax":
            source = rewrite_imports(source)
        start = time.time()
        with capture_output() as captured:
            outcome = shell.run_cell(source, store_history=True)
        error = outcome.error_before_exec or outcome.error_in_exec
        fingerprints = {}
        for name, value in list(shell.user_ns.items()):
            if name.startswith("_") or seen_ids.get(name) == id(value):
                continue
            seen_ids[name] = id(value)
            fingerprint = _fingerprint(value)
            if fingerprint is not None:
                fingerprints[name] = fingerprint
        text = captured.stdout + captured.stderr
        results.append(
            {
                "index": index,
                "ok": error is None,
                "error": None
                if error is None
                else "".join(traceback.format_exception_only(type(error), error))[-2000:],
                "treescope_error": TREESCOPE_ERROR in text,
                "fingerprints": fingerprints,
                "seconds": round(time.time() - start, 2),
                "source": source[:300],
            }
        )
    with open(out_path, "w") as f:
        json.dump(results, f)
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown of the notebook's objects


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[2] not in ("penzai", "pz_flax"):
        sys.exit(__doc__)
    main(*sys.argv[1:])
