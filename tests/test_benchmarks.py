"""The benchmark scripts run end to end at small sizes (on the CPU in CI: numbers labelled CPU)."""

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_every_suite_runs_and_writes_its_report(tmp_path):
    subprocess.run([sys.executable, "-m", "benchmarks.run", "--suite", "all", "--quick", "--out", str(tmp_path)],
                   cwd=ROOT, check=True, capture_output=True, text=True, timeout=600)
    report = json.loads((tmp_path / "results.json").read_text())
    suites = {row["suite"] for row in report["rows"]}
    assert suites == {"adapter", "gmu", "fusion", "e2e"}
    backends = {row["backend"] for row in report["rows"] if row["suite"] == "adapter"}
    assert {"eager", "torch.compile"} <= backends and len(backends) >= 3
    for row in report["rows"]:
        assert row["median_ms"] > 0
    assert report["copy_GBps"] > 0 and report["matmul_TFLOPs"] > 0
    if report["device"] == "cpu":
        assert "CPU numbers" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "results.png").read_bytes()[:4] == b"\x89PNG"
