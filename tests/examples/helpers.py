"""Shared helpers for the smoke tests of the scripts in examples/."""

import importlib.util
import pathlib
import sys
import types

EXAMPLES_DIR = pathlib.Path(__file__).resolve().parents[2] / "examples"


def load_example(file_name: str, module_name: str) -> types.ModuleType:
    """Imports ``examples/<file_name>`` (examples/ is not a package) as ``module_name``.

    The module is registered in ``sys.modules`` before it runs, because dataclasses defined in
    it look their module up there while the module is being executed; ``examples/`` goes on
    ``sys.path``, as it does when a script there is run, for the examples' shared ``_job``.

    Args:
        file_name: The script's file name, e.g. ``"quickstart.py"``.
        module_name: The name to import it under.

    Returns:
        The executed module.
    """
    if str(EXAMPLES_DIR) not in sys.path:
        sys.path.insert(0, str(EXAMPLES_DIR))
    spec = importlib.util.spec_from_file_location(module_name, EXAMPLES_DIR / file_name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module
