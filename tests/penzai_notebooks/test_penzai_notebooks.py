"""Penzai 0.2.5's own tutorial notebooks, run on penzai and on pz_flax (slow).

The notebooks come from penzai's source distribution, downloaded from the package index
when the test runs (they are never stored here). Each notebook runs twice in a fresh
IPython shell: as published on penzai, and with ``penzai`` replaced by ``pz_flax``. Cells
that download Gemma weights are replaced, identically for both, by a tiny random release
written locally (see `offline_setup`). Every cell that runs on penzai must run on pz_flax,
without treescope rendering errors, and assign the same numbers (within float32 rounding).
The fake Gemma releases have four blocks (see `offline_setup`), which keeps the LoRA and
induction-head notebooks to about a minute each.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import pathlib
import subprocess
import sys
import tarfile

import pytest

from tests.penzai_notebooks import offline_setup

pytestmark = pytest.mark.slow

pytest.importorskip("IPython")
pytest.importorskip("sentencepiece")

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
NOTEBOOKS = (
    "how_to_think_in_penzai",
    "named_axes",
    "selectors",
    "jitting_and_sharding",
    "lora_from_scratch",
    "induction_heads_2B",
    "induction_heads",
)


@pytest.fixture(scope="module")
def notebook_dir(tmp_path_factory) -> pathlib.Path:
    download = tmp_path_factory.mktemp("sdist")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            "penzai==0.2.5",
            "-d",
            str(download),
            "-q",
        ],
        check=True,
        timeout=300,
    )
    (archive,) = download.glob("penzai-0.2.5.tar.gz")
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if "/notebooks/" in m.name and m.isfile()]
        tar.extractall(download, members=members, filter="data")
    return download / "penzai-0.2.5" / "notebooks"


def _run(notebook: pathlib.Path, library: str, work: pathlib.Path) -> list[dict]:
    out = work / f"{notebook.stem}.{library}.json"
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
        "PZ_NOTEBOOK_DIR": str(notebook.parent),
        "PZ_NOTEBOOK_WEIGHTS_DIR": str(work / f"weights_{library}"),
    }
    subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.penzai_notebooks.run_notebook",
            str(notebook),
            library,
            str(out),
        ],
        cwd=REPO_ROOT,
        env=env,
        check=True,
        timeout=1800,  # a generous bound: on a loaded machine one run took 20 minutes
    )
    return json.loads(out.read_text())


def _same_numbers(ours, theirs) -> bool:
    shape, total, magnitude = ours
    their_shape, their_total, their_magnitude = theirs
    if shape != their_shape or (total is None) != (their_total is None):
        return False
    if total is None:
        return True
    tolerance = 1e-4 * (their_magnitude + 1.0)
    return abs(total - their_total) <= tolerance and abs(magnitude - their_magnitude) <= tolerance


def compare(notebook: str, penzai_cells: list[dict], our_cells: list[dict]) -> list[str]:
    """Every difference between the two runs that counts against pz_flax."""
    problems = []
    for theirs, ours in zip(penzai_cells, our_cells, strict=True):
        where = f"{notebook} cell {theirs['index']} ({theirs['source'][:60]!r})"
        if not theirs["ok"]:
            continue
        if not ours["ok"]:
            problems.append(f"{where}: raises on pz_flax: {ours['error'].strip()[-300:]}")
            continue
        if ours["treescope_error"] and not theirs["treescope_error"]:
            problems.append(f"{where}: treescope reported an error while rendering")
        for name, fingerprint in theirs["fingerprints"].items():
            if name in ours["fingerprints"] and not _same_numbers(
                ours["fingerprints"][name], fingerprint
            ):
                problems.append(
                    f"{where}: {name} differs: pz_flax {ours['fingerprints'][name]},"
                    f" penzai {fingerprint}"
                )
    return problems


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_every_cell_that_runs_on_penzai_runs_on_pz_flax(name, notebook_dir, tmp_path):
    notebook = notebook_dir / f"{name}.ipynb"
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        penzai_run = pool.submit(_run, notebook, "penzai", tmp_path)
        our_run = pool.submit(_run, notebook, "pz_flax", tmp_path)
        penzai_cells, our_cells = penzai_run.result(), our_run.result()
    # The notebook must exercise something: most of its cells run on penzai offline.
    ran_on_penzai = sum(cell["ok"] for cell in penzai_cells)
    assert ran_on_penzai >= 0.8 * len(penzai_cells), (
        f"only {ran_on_penzai} of {len(penzai_cells)} cells ran on penzai"
    )
    problems = compare(name, penzai_cells, our_cells)
    assert not problems, "\n".join(problems)


def test_every_block_reference_rewrite_applies(notebook_dir):
    """A rewrite that matches nothing would leave a released block count in a notebook."""
    sources = "\n".join(
        "".join(cell["source"])
        for path in sorted(notebook_dir.glob("*.ipynb"))
        for cell in json.loads(path.read_text())["cells"]
    )
    unused = [released for released, _ in offline_setup.BLOCK_REFERENCES if released not in sources]
    assert not unused, f"these rewrites match no notebook cell: {unused}"
