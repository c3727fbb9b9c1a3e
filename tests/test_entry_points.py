"""The console scripts as a user runs them: installed entry points, run as subprocesses, judged by
their exit status and what they print (the in-process tests cannot see what sys.exit does)."""

import json
import os
import shutil
import subprocess
import sys

import pytest

SCRIPTS = ("ampfuse-demo", "ampfuse-info")


def script(name):
    """The installed console script, from the running interpreter's bin folder first (a venv)."""
    here = os.path.join(os.path.dirname(sys.executable), name)
    path = here if os.access(here, os.X_OK) else shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (pip install . puts it on PATH)")
    return path


def run(name, *args, env=None, timeout=600):
    """(stdout and stderr redirected, as in a log file or CI); AMPFUSE_DEMO_ARGS only from `env`."""
    full_env = {k: v for k, v in os.environ.items() if k != "AMPFUSE_DEMO_ARGS"}
    full_env.update({"HF_HUB_OFFLINE": "1", **(env or {})})
    return subprocess.run([script(name), *args], capture_output=True, text=True, timeout=timeout, env=full_env)


def one_line_error(proc, prefix):
    """A failure: non-zero status, nothing on stdout, exactly one line on stderr starting with prefix."""
    assert proc.returncode != 0
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix), proc.stderr


def test_info_exits_0_with_a_json_report():
    proc = run("ampfuse-info")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert set(report["backends"]) == {"cuda", "triton", "torch"} and report["backends"]["torch"]["available"]
    cuda = report["backends"]["cuda"]
    if not cuda["available"] and "not built" in cuda["reason"]:
        assert "pip install --no-build-isolation" in cuda["how_to_build"] and cuda["build"]


def test_info_rejects_an_unknown_argument_in_one_line():
    proc = run("ampfuse-info", "--bogus")
    assert proc.returncode == 2 and proc.stdout == "" and len(proc.stderr.splitlines()) == 1


@pytest.mark.parametrize("args,status", [(["--epochs", "x"], 2), (["--variants", "text,nope"], 2),
                                         (["--threads", "0"], 2), (["--model", "/nonexistent/model"], 1)])
def test_demo_failures_are_one_line_and_non_zero(args, status, tmp_path):
    proc = run("ampfuse-demo", *args, "--out", str(tmp_path))
    one_line_error(proc, "ampfuse-demo: error: ")
    assert proc.returncode == status


def test_demo_exits_0_and_its_redirected_log_is_one_line_per_epoch(tmp_path, minilm_path):
    out = tmp_path / "out"
    proc = run("ampfuse-demo", env={"AMPFUSE_DEMO_ARGS": f"--train-size 8 --epochs 2 --batch-size 8 --out {out}"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # no progress bars, no warnings, no result list
    assert "\x1b" not in proc.stdout and "\r" not in proc.stdout
    epochs = [line for line in proc.stdout.splitlines() if " epoch " in line]
    assert len(epochs) == 2 * 4, proc.stdout  # four variants, two epochs each
    assert all("train samples/s" in line and "ms of CPU per sample" in line for line in epochs)
    assert proc.stdout.splitlines()[-1].startswith("wrote metrics.json")
    report = json.loads((out / "metrics.json").read_text())
    assert [r["variant"] for r in report["results"]] == ["text", "gmu", "gmu_fusion", "gmu_shared"]
    assert "--train-size 8" in report["command"]
