"""bench/run --smoke: every benchmark row on tiny sizes, so the benchmarks cannot rot.

Only correctness is asserted (every row ran, no job lost or run twice, every
command succeeded); the smoke run enforces no time target and this test
asserts none: the machine is shared and noisy.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROWS = (
    "crh_add",
    "crh_add vs cr_hydra's method",
    "crh_retrieve",
    "[db store]",
    "[dir store]",
    "dispatch latency",
    "worker overhead per job",
    "claims per new job",
    "throughput of tiny jobs",
    "claim latency",
    "crh_status --json",
    "crh web overview",
    "crh web model picture",
    "peak RSS of crh_add",
    "peak RSS of crh_worker",
    "peak RSS of crh_retrieve",
    "worker processes x",
)


def test_bench_smoke_runs_every_row(tmp_path: Path) -> None:
    for tool in ("zstd", "tar"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (the benchmarks compare with it)")
    table = tmp_path / "table.md"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run"), "--smoke", "--markdown", str(table)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    for row in ROWS:
        assert row in proc.stdout, f"row {row!r} missing:\n{output}"
    assert "FAIL" not in proc.stdout, output
    assert table.read_text().count("\n") >= len(ROWS)
