"""The import-time benchmark: what it times and how the runner judges its rows (no timing asserted)."""

from benchmarks import import_time
from benchmarks import run


def test_time_statement_times_only_the_statement():
    assert 0 <= import_time.time_statement("pass") < 1
    assert import_time.time_statement("import time; time.sleep(0.2)") >= 0.2


def test_statements_run_from_a_private_bytecode_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    environment = import_time.bytecode_cached_environment(str(tmp_path))
    assert "PYTHONDONTWRITEBYTECODE" not in environment
    import_time.time_statement("import benchmarks.import_time", environment)
    assert list(tmp_path.rglob("import_time*.pyc")), "the statement's bytecode was not cached"


def test_rows_are_judged_against_flax_nnx():
    rows = [
        {"statement": "import flax.nnx", "s": 1.4, "ratio_to_flax_nnx": 1.0},
        {"statement": "import pz_flax", "s": 0.01, "ratio_to_flax_nnx": 0.01},
    ]
    (target,) = run.evaluate_targets({"import_time": rows})
    assert target["status"] == "met" and target["measured"].startswith("0.01x")
    rows[1]["ratio_to_flax_nnx"] = 1.5
    (target,) = run.evaluate_targets({"import_time": rows})
    assert target["status"] == "missed" and "eagerly" in target["why"]
    assert run.evaluate_targets({"import_time": []}) == []


def test_reference_and_bare_import_are_measured():
    assert import_time.REFERENCE in import_time.STATEMENTS
    assert "import pz_flax" in import_time.STATEMENTS
