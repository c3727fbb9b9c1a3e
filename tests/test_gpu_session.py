"""The GPU session's first stage works before a GPU session spends minutes on it: its shell script
parses, the sanitizer cases run (Triton's interpreter, tiny shapes), the sanitizer runner schedules,
times out and reads reports (a fake compute-sanitizer), the summary names every failure from junit
XML and from the log of a run cut short, and a dry run of the whole stage writes its record."""

import json
import os
import pathlib
import stat
import subprocess
import sys
import tarfile
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # benchmarks/ is not installed: import it from the checkout

from benchmarks import sanitize, session_summary  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def test_session_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_session.sh")], check=True)


# ----------------------------------------------------------------------------- the test suite's summary

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="6">
<testcase classname="tests.test_gmu" name="test_ok[a]" file="tests/test_gmu.py" time="12.5" />
<testcase classname="tests.test_gmu" name="test_bad" file="tests/test_gmu.py" time="0.3">
  <failure message="AssertionError: dx&#10;0.02 &gt; 0.01">long traceback</failure></testcase>
<testcase classname="tests.test_gmu" name="test_hung" file="tests/test_gmu.py" time="0">
  <error message="failed on setup with &quot;worker 'gw3' crashed while running 'tests/test_gmu.py::test_hung'&quot;" />
</testcase>
<testcase classname="tests.test_gmu" name="test_gpu_only" file="tests/test_gmu.py" time="0">
  <skipped type="pytest.skip" message="needs a CUDA GPU" /></testcase>
<testcase classname="tests.test_gmu.TestGroup" name="test_method" file="tests/test_gmu.py" time="0.1" />
<testcase time="0.000" />
</testsuite></testsuites>"""

# The -v log of a second run, cut by its time limit before pytest wrote its XML: one test passed,
# one failed, one was still running.
CUT_LOG = """2 workers [5 items]
tests/test_cuda_extension.py::test_a
[gw0] [ 20%] PASSED tests/test_cuda_extension.py::test_a
tests/test_cuda_extension.py::test_b[bf16]
tests/test_cuda_extension.py::test_stuck
[gw1] [ 40%] FAILED tests/test_cuda_extension.py::test_b[bf16]
"""


def test_summary_names_every_failure_from_junit_and_from_a_cut_log(tmp_path):
    (tmp_path / "junit-tests.xml").write_text(JUNIT)
    (tmp_path / "pytest-tests.log").write_text("6 workers [6 items]\n")
    (tmp_path / "pytest-tests-cuda.log").write_text(CUT_LOG)
    (tmp_path / "steps.tsv").write_text("tests\t1\t200\t330\twhole suite\ntests-cuda\t124\t60\t60\tcuda\n")
    (tmp_path / "versions.json").write_text(json.dumps({"gpu": "NVIDIA H200", "date_utc": "2026-12-01 10:00:00"}))
    text = session_summary.summarize(tmp_path, tmp_path / "out", "bash benchmarks/gpu_session.sh", 540)
    record = json.loads((tmp_path / "out" / "check.json").read_text())
    tests = record["tests"]
    assert tests["counts"] == {"passed": 3, "failed": 2, "error": 1, "skipped": 1, "xfailed": 0, "xpassed": 0}
    assert [f["test"] for f in tests["failed"]] == ["tests/test_gmu.py::test_bad",
                                                     "tests/test_cuda_extension.py::test_b[bf16]"]
    assert tests["failed"][0]["message"] == "AssertionError: dx / 0.02 > 0.01"
    assert "worker 'gw3' crashed" in tests["errors"][0]["message"]
    assert tests["unfinished"] == ["tests/test_cuda_extension.py::test_stuck"]
    assert tests["skip_reasons"] == {"needs a CUDA GPU": 1}
    assert tests["slowest"][0] == {"test": "tests/test_gmu.py::test_ok[a]", "seconds": 12.5}
    assert {"test": "tests/test_gmu.py::TestGroup::test_method", "seconds": 0.1} in tests["slowest"]
    assert not tests["complete"] and [r["complete"] for r in tests["runs"]] == [True, False]
    assert record["verdict"]["tests"] == "fail"
    assert record["results_dir"] == "benchmarks/results/NVIDIA-H200-2026-12-01"
    for name in ("test_bad", "test_b[bf16]", "test_hung", "test_stuck", "cut at its 60 s limit"):
        assert name in text


# ----------------------------------------------------------------------------- reading sanitizer logs

MEMCHECK_LOG = """$ compute-sanitizer --tool memcheck python3 benchmarks/sanitize_cases.py adapter-cuda-bf16
========= COMPUTE-SANITIZER
PHASE adapter-cuda-bf16 forward
========= Invalid __global__ read of size 16 bytes
=========     at 0x9670 in void adapter_block_fwd<__nv_bfloat16, 2>(Params)
=========     by thread (0,0,0) in block (0,0,0)
=========     Address 0x7f0000000200 is out of bounds
PHASE adapter-cuda-bf16 backward
========= Invalid __shared__ write of size 4 bytes
=========     at fusion_bwd_kernel+0x1c0 in /repo/kernels/fusion.py:241
=========     by thread (1,0,0) in block (2,0,0)
========= Program hit cudaErrorLaunchFailure (error 719) due to "unspecified launch failure" on CUDA API call to \
cudaDeviceSynchronize.
=========     Saved host backtrace up to driver entry point at error
========= ERROR SUMMARY: 3 errors
"""


def test_sanitizer_reports_are_attributed_to_kernel_and_phase():
    parsed = sanitize.parse_log(MEMCHECK_LOG)
    assert parsed["errors"] == 3
    assert [(r["kernel"], r["phase"], r["api"]) for r in parsed["reports"]] == [
        ("adapter_block_fwd", "forward", False), ("fusion_bwd_kernel", "backward", False), (None, "backward", True)]
    race = sanitize.parse_log("========= Error: Race reported between Write access at gmu_bwd_kernel+0x1a30 in "
                              "gmu.py:321\n=========     and Read access at gmu_bwd_kernel+0x1b00 in gmu.py:330\n"
                              "========= RACECHECK SUMMARY: 1 hazard displayed (1 error, 0 warnings)\n")
    assert race["errors"] == 1 and race["reports"][0]["kernel"] == "gmu_bwd_kernel"
    assert sanitize.parse_log("PHASE x forward\nKilled\n")["errors"] is None  # no summary: the run did not finish


# ----------------------------------------------------------------------------- the cases

@pytest.mark.slow
def test_every_case_runs_in_the_interpreter(tmp_path):
    names = subprocess.run([sys.executable, "benchmarks/sanitize_cases.py", "--list"], cwd=ROOT, env=ENV,
                           check=True, capture_output=True, text=True).stdout.split()
    assert {"adapter-triton-bf16", "adapter-cuda-fp32", "gmu-triton-fp32", "fusion-triton-bf16"} <= set(names)
    result = tmp_path / "cases.jsonl"
    done = subprocess.run([sys.executable, "benchmarks/sanitize_cases.py", "all", "--tiny", "--result", str(result)],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    cases = {c["case"]: c for c in map(json.loads, result.read_text().splitlines())}
    assert list(cases) == names, done.stdout[-3000:] + done.stderr[-3000:]
    for name, case in cases.items():
        if "-cuda-" in name and not torch_cuda():
            assert case["status"] == "skipped" and "cuda" in case["detail"], case
        elif "-triton-bf16" in name and not torch_cuda():  # the interpreter computes bf16 wrongly: refused
            assert case["status"] == "skipped" and "11584" in case["detail"], case
        else:
            assert case["status"] == "ok", case
            assert set(case["phase_seconds"]) == {"forward", "backward", "train"}
    for name in ("adapter-triton-fp32", "gmu-triton-fp32", "fusion-triton-fp32"):  # checked against float64
        assert 0 < max(cases[name]["rel_errors"].values()) < 1e-4, cases[name]
    assert done.returncode == 0
    phases = set(done.stdout.splitlines())
    for name in (n for n, c in cases.items() if c["status"] == "ok"):  # what places a sanitizer report
        assert {f"PHASE {name} forward", f"PHASE {name} backward", f"PHASE {name} train"} <= phases


def torch_cuda():
    import torch

    return torch.cuda.is_available()


def test_a_case_that_raises_is_reported_not_raised(monkeypatch):
    from benchmarks import sanitize_cases

    def broken(**kwargs):
        raise TypeError("adapter_block() got an unexpected keyword argument 'scaling'")

    monkeypatch.setitem(sanitize_cases.CASES, "broken", (broken, {}))
    result = sanitize_cases.run_case("broken")
    assert result["status"] == "raised" and "unexpected keyword argument" in result["detail"]
    assert result["traceback"][-1].startswith("TypeError")
    with pytest.raises(SystemExit) as exit_info:
        sanitize_cases.main(["no-such-case"])
    assert exit_info.value.code == 2


# ----------------------------------------------------------------------------- the sanitizer runner

FAKE_SANITIZER = """#!{python}
# Stands in for compute-sanitizer: prints what it prints. memcheck and initcheck find nothing,
# racecheck finds a race in the backward, synccheck hangs; the probe passes unless told otherwise.
import json, sys, time
args = sys.argv[1:]
tool = args[args.index("--tool") + 1]
print("========= COMPUTE-SANITIZER", flush=True)
if {old} and "--padding" in args:
    print("========= Error: Unrecognized option '--padding'")
    sys.exit(1)
if "-c" in args:
    if {gvisor}:
        print("========= Error: Device not supported\\n========= Error: Target application returned error 999")
        sys.exit(1)
    print("probe 2000.0\\n========= ERROR SUMMARY: 0 errors")
    sys.exit(0)
case, result = args[args.index("--result") - 1], args[args.index("--result") + 1]
print(f"PHASE {{case}} forward\\nPHASE {{case}} backward", flush=True)
if tool == "synccheck":
    time.sleep(60)
if tool == "racecheck":
    print("========= Error: Race reported between Write access at adapter_block_bwd_kernel+0x1a30 in a.py:3")
    print("=========     and Read access at adapter_block_bwd_kernel+0x1b00 in a.py:4 [4 hazards]")
print(f"PHASE {{case}} train")
print("========= RACECHECK SUMMARY: 1 hazard displayed (1 error, 0 warnings)" if tool == "racecheck"
      else "========= ERROR SUMMARY: 0 errors")
with open(result, "a") as f:
    f.write(json.dumps({{"case": case, "status": "ok", "detail": "fake"}}) + "\\n")
"""


def fake_sanitizer(tmp_path, gvisor=False, old=False):
    path = tmp_path / "compute-sanitizer"
    path.write_text(textwrap.dedent(FAKE_SANITIZER.format(python=sys.executable, gvisor=gvisor, old=old)))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return {**ENV, "COMPUTE_SANITIZER": str(path)}


def run_sanitizer(work, env, plain, *args):
    """The runner over cases whose plain runs are already recorded (as a second call finds them), so
    that only the fake sanitizer runs: seconds, not a Python start with torch per job."""
    out = work / "sanitizer"
    out.mkdir(parents=True)
    jobs = {f"{case}.plain": {"case": case, "tool": "plain", "log": f"{case}.plain.log", "status": status,
                              "case_status": status, "case_detail": "fake plain run"} for case, status in plain.items()}
    (out / "sanitizer.json").write_text(json.dumps({"jobs": jobs}))
    subprocess.run([sys.executable, "-m", "benchmarks.sanitize", "--out", str(out), "--cases", ",".join(plain), *args],
                   cwd=ROOT, env=env, check=True, capture_output=True, text=True, timeout=300)
    return json.loads((out / "sanitizer.json").read_text())["jobs"]


def test_runner_schedules_times_out_and_reads_reports(tmp_path):
    env = fake_sanitizer(tmp_path)
    jobs = run_sanitizer(tmp_path / "w", env, {"adapter-triton-fp32": "ok", "adapter-cuda-fp32": "skipped"},
                         "--jobs", "4", "--job-timeout-s", "3")
    triton = {tool: jobs[f"adapter-triton-fp32.{tool}"] for tool in sanitize.TOOLS}
    assert triton["memcheck"]["status"] == triton["initcheck"]["status"] == "clean"
    assert triton["racecheck"]["status"] == "errors" and triton["racecheck"]["kernels"] == ["adapter_block_bwd_kernel"]
    assert triton["racecheck"]["reports"][0]["phase"] == "backward"
    assert triton["synccheck"]["status"] == "timeout"
    assert jobs["adapter-cuda-fp32.memcheck"] == {
        "case": "adapter-cuda-fp32", "tool": "memcheck", "log": "adapter-cuda-fp32.memcheck.log",
        "status": "skipped", "detail": "case skipped: fake plain run"}
    record = session_summary.summarize_sanitizer(tmp_path / "w")
    assert record["status"] == "errors" and record["probe"]["status"] == "ok"
    cells = [session_summary.tool_cell(record["cases"]["adapter-triton-fp32"][t]) for t in sanitize.TOOLS]
    assert cells == ["clean", "clean", "**1 errors**: adapter_block_bwd_kernel (backward)", "**timeout** (3 s)"]


def test_runner_reports_a_sanitizer_that_refuses_the_device(tmp_path):
    # gVisor: compute-sanitizer starts, then refuses the device. No check runs; the record says why.
    jobs = run_sanitizer(tmp_path / "w", fake_sanitizer(tmp_path, gvisor=True), {"gmu-triton-bf16": "ok"})
    assert {job["detail"] for name, job in jobs.items() if name != "gmu-triton-bf16.plain"} == {
        "sanitizer unavailable"}
    record = session_summary.summarize_sanitizer(tmp_path / "w")
    assert record["status"] == "unavailable" and record["probe"]["gvisor_signature"]
    assert "Device not supported" in record["probe"]["detail"]


def test_runner_drops_flags_an_older_sanitizer_does_not_know(tmp_path):
    jobs = run_sanitizer(tmp_path / "w", fake_sanitizer(tmp_path, old=True), {"fusion-triton-fp32": "ok"},
                         "--tools", "memcheck")
    assert jobs["fusion-triton-fp32.memcheck"]["status"] == "clean"
    log = (tmp_path / "w" / "sanitizer" / "fusion-triton-fp32.memcheck.log").read_text()
    assert "--padding" not in log.splitlines()[0]


def test_cases_left_for_a_second_call_are_on_the_record_until_it_runs_them(tmp_path):
    # The stage's first call runs the Triton cases while the extension builds; the second, the rest.
    env = fake_sanitizer(tmp_path)
    run_sanitizer(tmp_path / "w", env, {"adapter-triton-fp32": "ok"}, "--tools", "memcheck", "--cases",
                  "adapter-triton-fp32,adapter-cuda-fp32", "--exclude", "*-cuda-*")
    record = session_summary.summarize_sanitizer(tmp_path / "w")
    assert record["status"] == "incomplete"  # not "clean": the CUDA case is still to run
    assert record["cases"]["adapter-cuda-fp32"]["memcheck"]["detail"] == "left for a later call"
    subprocess.run([sys.executable, "-m", "benchmarks.sanitize", "--out", str(tmp_path / "w" / "sanitizer"),
                    "--tools", "memcheck", "--cases", "adapter-triton-fp32,adapter-cuda-fp32", "--tiny"],
                   cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
    cuda = session_summary.summarize_sanitizer(tmp_path / "w")["cases"]["adapter-cuda-fp32"]
    if not torch_cuda():  # the real case ran, found no extension; its memcheck waited for that
        assert cuda["plain"]["status"] == "skipped"
        assert cuda["memcheck"]["detail"].startswith("case skipped: ")


# ----------------------------------------------------------------------------- the whole stage, dry

@pytest.mark.slow
def test_dry_run_of_the_session_writes_its_record(tmp_path):
    out = tmp_path / "out"
    env = {**ENV, "DRY_RUN": "1", "OUT": str(out), "PYTHON": sys.executable, "TMPDIR": str(tmp_path)}
    done = subprocess.run(["bash", "benchmarks/gpu_session.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = json.loads((out / "check.json").read_text())
    steps = {s["name"]: s for s in record["steps"]}
    assert set(steps) == {"versions", "build", "tests", "sanitize", "tests-cuda", "sanitize-cuda"}
    assert steps["build"]["rc"] == "skip" and all(s["rc"] == 0 for n, s in steps.items() if n != "build")
    assert record["verdict"]["tests"] == "pass" and record["tests"]["counts"]["passed"] >= 2
    assert record["verdict"]["sanitizer"] == "unavailable"  # no GPU: no sanitizer, or its probe fails
    assert record["sanitizer"]["cases"]["adapter-triton-fp32"]["plain"]["status"] == "ok"
    assert record["versions"]["torch"] and record["versions"]["source_digest"]
    assert (out / "check.md").read_text() in done.stdout  # printed last, for the device tool's output tail
    with tarfile.open(out / "check-logs.tar.gz") as tar:
        names = {pathlib.Path(n).name for n in tar.getnames()}
    assert {"steps.tsv", "versions.json", "junit-tests.xml", "pytest-tests.log", "sanitizer.json"} <= names
    assert sorted(p.name for p in out.iterdir()) == ["check-logs.tar.gz", "check.json", "check.md"]

