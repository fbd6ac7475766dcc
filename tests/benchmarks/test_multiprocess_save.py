"""Smoke test of benchmarks/multiprocess_save.py: the 2-process job runs both contenders.

No timing is asserted (a quick run is one round of a 2 MB save on a shared machine); what is
checked is that both collective saves ran in both processes and the rows are well formed.
"""

import math

import pytest

from benchmarks import multiprocess_save

pytestmark = pytest.mark.slow


def test_quick_run_times_both_contenders_in_a_two_process_job():
    rows = multiprocess_save.run(quick=True)
    assert [row["contender"] for row in rows] == list(multiprocess_save.CONTENDERS)
    for row in rows:
        assert row["processes"] == "2 x 2 cpu"
        assert row["megabytes"] == pytest.approx(2 * 256 * 1024 * 4 / 1e6, abs=0.1)
        for key in ("median_s", "mb_per_s", "ratio_to_orbax"):
            assert math.isfinite(row[key]) and row[key] > 0, (key, row)
    assert rows[0]["ratio_to_orbax"] == 1.0
