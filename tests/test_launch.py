"""kernels/runtime.py: direct launches (tests/launch_checks.py, in a process of its own) and the device
switch of the ops' launchers."""

import os
import subprocess
import sys

import torch

from ampfuse.kernels import runtime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_direct_launches_match_tritons_own():
    # compiles real sm_90 kernels: a process of its own, where Triton's interpreter has run nothing
    # (pyproject's addopts replaced: they ask for xdist workers, which the GPU machine may lack)
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-o", "addopts=--import-mode=importlib", "-p",
                           "no:cacheprovider", "tests/launch_checks.py"], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0 and "6 passed" in done.stdout, done.stdout[-4000:] + done.stderr[-2000:]


def test_cuda_tensors_off_the_current_device_switch_it(monkeypatch):
    # the decision of runtime.device_switch, with current_device faked (no two-GPU machine to run it on)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    switch = runtime.device_switch(torch.device("cuda", 0))
    assert isinstance(switch, torch.cuda.device) and switch.idx == 0
    assert runtime.device_switch(torch.device("cuda", 1)) is None
    assert runtime.device_switch(torch.device("cpu")) is None


def test_stage_settings_reach_every_launch_they_govern(monkeypatch):
    # runtime.STREAM_STAGES and ROW_PASS_STAGES are read at each call (benchmarks.tune changes them between
    # calls), so launch settings cached per argument must follow them. A GPU's launch settings, the launches
    # recorded instead of run (outputs garbage), the caches cleared before and after (the interpreter's
    # settings are cached under the same arguments).
    from ampfuse import backend, testing
    from ampfuse.kernels import gmu as gmu_kernels
    from ampfuse.ops.adapter_block import adapter_block
    from ampfuse.ops.gmu import gmu_adapter

    caches = (runtime.row_tiles, runtime.column_tiles, gmu_kernels._tiles)
    launches = {}
    monkeypatch.setattr(runtime, "_INTERPRETING", False)
    monkeypatch.setattr(runtime, "launch", lambda kernel, grid, *args, **meta: launches.__setitem__(
        kernel.fn.__name__, meta.get("num_stages", 1)))
    monkeypatch.setattr(backend, "why_unavailable", lambda *args, **kwargs: None)
    adapter, options = testing.adapter_inputs(16, 64, 8, dtype=torch.float16)
    half = lambda *shape: torch.randn(*shape, dtype=torch.float16).requires_grad_()  # noqa: E731
    gmu = dict(x=half(2, 8, 64), r=half(2, 8, 64), modalities=[half(2, 8, 20)], stream_w=[half(8, 64), half(8, 20)],
               stream_b=[half(8), half(8)], stream_ln_w=[half(64), half(20)], stream_ln_b=[half(64), half(20)],
               gate_w=half(1, 8, 16), gate_b=half(1, 8), w_up=half(64, 8), b_up=half(64), scaling=half(64),
               ln_weight=half(64), ln_bias=half(64))
    gmu_options = dict(gate="sigmoid")
    try:
        for cache in caches:
            cache.cache_clear()
        for stream, row_pass in ((2, 3), (3, 4), (1, 2)):
            monkeypatch.setattr(runtime, "STREAM_STAGES", stream)
            monkeypatch.setattr(runtime, "ROW_PASS_STAGES", row_pass)
            launches.clear()
            testing.call(adapter_block, adapter, backend="triton", **options).sum().backward()
            gmu_adapter(**gmu, **gmu_options, backend="triton").sum().backward()
            assert launches["adapter_fwd_kernel"] == stream and launches["adapter_bwd_cols_kernel"] == stream
            assert launches["adapter_bwd_rows_kernel"] == row_pass
            assert launches["gmu_bwd_rows_kernel"] == stream and launches["gmu_bwd_cols_kernel"] == stream
    finally:
        for cache in caches:
            cache.cache_clear()
