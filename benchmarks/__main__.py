"""``python -m benchmarks``: runs every benchmark and writes ``benchmarks/RESULTS.md``."""

from benchmarks import run

raise SystemExit(run.main())
