"""``make gpu`` cannot rot: its ``--smoke`` mode runs the whole GPU check on the CPU at tiny sizes
(the ``gpu`` test tier with ``VLPROMPT_GPU_SMOKE=1``, then every benchmark) and writes its report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_gpu_check_runs_on_the_cpu_at_tiny_sizes(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from gpu_report import PARTS
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("PYTEST_XDIST_WORKER", None)
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_report.py"), "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=1200, env=env, cwd=ROOT)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    report = json.loads((tmp_path / "gpu_report.json").read_text())
    assert report["smoke"] and report["environment"]["device"] == "cpu"
    tests = report["tests"]["tests"]
    assert len(tests) >= 19 and {t["outcome"] for t in tests} == {"passed"}, [t for t in tests if t["outcome"] != "passed"]
    assert set(report["benchmarks"]) == {p.name for p in PARTS}
    assert all(part["ok"] and part["rows"] for part in report["benchmarks"].values())
    text = (tmp_path / "gpu_report.md").read_text()
    assert "## `gpu` test tier: " in text and all(f"## {p.name} " in text for p in PARTS)
