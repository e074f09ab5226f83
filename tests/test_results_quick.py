"""``bench/results.py --quick`` end to end (slow: ~3-5 min on 2 CPU cores): the page and its PNGs are written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_results_quick_writes_page_and_plots(tmp_path: Path) -> None:
    out, work = tmp_path / "page", tmp_path / "work"
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "results.py"),
        "--quick",
        "--out",
        str(out),
        "--work",
        str(work),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    page = (out / "RESULTS.md").read_text()
    for heading in ("## 1. Learning", "## 2. Real checkpoint", "## 3. Test-time compute", "## 4. Throughput",
                    "## 5. GSM8K and MATH-500", "## GPU"):  # fmt: skip
        assert heading in page
    assert "failed in this run" not in page, page
    assert (
        "| PRM-weighted vote |" in page and "+ PRM |" in page
    )  # the PRM bench ran and its PRM drove ablate cells
    for png in ("learning_curves.png", "test_time_compute.png", "throughput.png"):
        assert (out / "img" / png).stat().st_size > 10_000
