"""The benchmark scripts run end to end in their smoke mode (seconds): CI keeps them working.
Their numbers are not asserted: speed targets live in the scripts' printed ratios."""

import json
import os
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_throughput_benchmark_smoke():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(BENCHMARKS / "throughput.py"), "--smoke"],
                         capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(report) == {"train", "encode"}
    assert set(report["train"]) == {"ours", "st", "st-cached"}
    assert set(report["encode"]) == {"ours", "st"}
    for results in report.values():
        for r in results.values():
            assert r["items"] > 0 and r["per_second"] > 0 and r["peak_memory_mb"] > 0
    assert "ours/this" in out.stdout
