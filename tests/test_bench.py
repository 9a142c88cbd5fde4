"""The benchmark must not rot: its quick mode runs end to end (no timing is asserted here)."""
from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT


def test_bench_quick_runs_and_reports_every_row(tmp_path):
    results = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--results", str(results)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(results.read_text())["rows"]
    assert len(rows) == 12 and all(row["ours"] for row in rows)
    assert proc.stdout.count("\n| ") == 13  # header and twelve rows of the Markdown table
