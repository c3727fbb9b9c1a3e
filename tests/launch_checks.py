"""kernels/runtime.launch's direct launches against Triton's own launch path (JITFunction.run).

Both run for real here, on the CPU: testing.triton_without_gpu compiles for sm_90 and records what reaches
the driver's launcher. The kernels are built as plain JITFunctions (the suite's TRITON_INTERPRET only
changes what @triton.jit returns) and never run. tests/test_launch.py runs this file in a process of its
own: one where Triton's interpreter has run kernels keeps parts of triton.language patched and cannot
compile."""

import itertools
import os
import subprocess
import sys
from typing import NamedTuple

import pytest
import torch
import triton.language as tl
from triton.runtime.jit import JITFunction

from ampfuse.kernels import runtime
from ampfuse.testing import triton_without_gpu


def _scale_rows(x_ptr, y_ptr, n, scale, flag, N_COLS: tl.constexpr, BLOCK: tl.constexpr = 32):
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    x = tl.load(x_ptr + tl.program_id(0) * N_COLS + cols, mask=mask)
    tl.store(y_ptr + tl.program_id(0) * N_COLS + cols, (x * scale).to(y_ptr.dtype.element_ty), mask=mask & flag)


class Pair(NamedTuple):
    first: torch.Tensor
    second: torch.Tensor


def _add_pair(pair, out_ptr, n, BLOCK: tl.constexpr):
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    tl.store(out_ptr + cols, tl.load(pair[0] + cols, mask=mask) + tl.load(pair[1] + cols, mask=mask), mask=mask)


@pytest.fixture(params=[_scale_rows])
def direct(monkeypatch, request):
    """(kernel, launches): a fresh compiled-mode kernel, Triton's path counted, launches recorded."""
    monkeypatch.setattr(runtime, "DIRECT_LAUNCH", True)
    kernel = JITFunction(request.param)
    runs = []
    run = kernel.run
    kernel.run = lambda *a, **kw: runs.append(1) or run(*a, **kw)
    kernel.triton_runs = runs
    with triton_without_gpu() as launches:
        yield kernel, launches


def _via_triton(kernel, grid, args, meta, launches):
    """The launcher call Triton's own path makes for these arguments."""
    kernel[grid](*args, **(runtime.DEFAULT_META | meta))
    return launches[-1]


def test_direct_launch_passes_what_tritons_launcher_gets(direct):
    kernel, launches = direct
    x, y = torch.randn(4, 40), torch.empty(4, 40, dtype=torch.float16)
    args, meta = (x, y, 40, 0.5, True), dict(N_COLS=40, BLOCK=64, num_warps=2)
    runtime.launch(kernel, (4,), *args, **meta)  # first launch of this specialisation: Triton's path
    assert len(kernel.triton_runs) == 1
    runtime.launch(kernel, (4,), *args, **meta)
    assert len(kernel.triton_runs) == 1, "the second launch went through JITFunction.run"
    direct_call = launches[-1]
    triton_call = _via_triton(kernel, (4,), args, meta, launches)
    assert direct_call[:3] == triton_call[:3]  # compiled kernel, grid padded to 3, stream
    assert len(direct_call[3]) == len(triton_call[3]) == 7  # every parameter, the constexprs last
    assert all(a is b for a, b in zip(direct_call[3], triton_call[3]))
    # a constexpr left to its default is passed with that default, as Triton's binder does
    runtime.launch(kernel, (2, 3), x, y, 40, 0.5, True, N_COLS=40)
    runtime.launch(kernel, (2, 3), x, y, 40, 0.5, True, N_COLS=40)
    assert launches[-1][1] == (2, 3, 1) and launches[-1][3][-1] == 32
    assert launches[-1] == _via_triton(kernel, (2, 3), (x, y, 40, 0.5, True), dict(N_COLS=40), launches)


def test_direct_launch_picks_the_compiled_kernel_triton_picks(direct):
    # arguments that change Triton's specialisation (alignment, divisibility by 16, == 1, integer width,
    # dtype, a bool) and some that do not (an unaligned-but-equal address class, a float's value)
    kernel, launches = direct
    buf = torch.randn(4 * 64 + 8)
    f16 = torch.randn(4, 64).half()
    variants = [(buf[:256], buf[:256], 48), (buf[1:257], buf[:256], 48), (buf[4:260], buf[:256], 48),
                (buf[:256], buf[2:258], 48), (buf[:256], buf[:256], 40), (buf[:256], buf[:256], 1),
                (buf[:256], buf[:256], 2**31 + 16), (f16, buf[:256], 48), (buf[:256], f16, 48)]
    calls = [((x, y, n, scale, flag), dict(N_COLS=64, BLOCK=64)) for (x, y, n), scale, flag
             in itertools.product(variants, (0.5, 2.0), (True, False))]
    for args, meta in calls:  # every specialisation seen once, in an order that interleaves them
        runtime.launch(kernel, (4,), *args, **meta)
    runs = len(kernel.triton_runs)
    for args, meta in calls:
        runtime.launch(kernel, (4,), *args, **meta)
        direct_call = launches[-1]
        assert len(kernel.triton_runs) == runs
        assert direct_call == _via_triton(kernel, (4,), args, meta, launches), args[2:]
        runs += 1
    assert len({call[0] for call in launches}) > 5, "the variants should compile to several kernels"


@pytest.mark.parametrize("direct", [_add_pair], indirect=True)
def test_direct_launch_of_tuple_arguments(direct):
    # each element of a tuple is specialised (kernels/fusion.py passes its modalities as tuples)
    kernel, launches = direct
    buf = torch.randn(80)
    out = torch.empty(64)
    calls = [((buf[i:i + 64], buf[j:j + 64]), out, n) for i, j, n in ((0, 0, 64), (1, 0, 64), (0, 2, 64), (0, 0, 1))]
    calls.append((Pair(buf[:64], buf[1:65]), out, 64))  # a named tuple (kernels/gmu.py passes them)
    for args in calls * 2:
        runtime.launch(kernel, (1,), *args, BLOCK=64)
    assert len(kernel.triton_runs) == 4  # the named tuple's specialisation is calls[2]'s (Triton's cache agrees)
    for args in calls:
        runtime.launch(kernel, (1,), *args, BLOCK=64)
        assert launches[-1] == _via_triton(kernel, (1,), args, dict(BLOCK=64), launches)
    assert len({call[0] for call in launches}) == 4


def test_direct_launch_follows_options_device_and_debug(direct):
    # what else picks the compiled kernel: the launch options (num_warps), the current device (its own
    # compiled kernels and stream) and Triton's debug setting, changed after the first launches
    from triton import knobs

    kernel, launches = direct
    x = torch.randn(4, 32)
    args = (x, x, 32, 1.0, True)
    settings = [dict(N_COLS=32, num_warps=2), dict(N_COLS=32, num_warps=4)]
    for device in (0, 1, 0):
        launches.device = device
        for meta in settings * 2:
            runtime.launch(kernel, (4,), *args, **meta)
            direct_call = launches[-1]
            assert direct_call == _via_triton(kernel, (4,), args, meta, launches)
            assert direct_call[2] == 7 + 1000 * device  # the device's stream
    handles = {call[0] for call in launches}
    assert len(handles) == 4  # two num_warps on each of two devices
    debug = knobs.runtime.debug
    knobs.runtime.debug = True
    try:
        runs = len(kernel.triton_runs)
        for _ in range(2):
            runtime.launch(kernel, (4,), *args, **settings[0])
        assert len(kernel.triton_runs) == runs + 1 and launches[-1][0] not in handles
        assert launches[-1] == _via_triton(kernel, (4,), args, settings[0], launches)
    finally:
        knobs.runtime.debug = debug


def test_direct_launch_calls_the_launch_hooks(direct):
    # a profiler's launch hooks (Triton's knobs) see the launch metadata on both paths
    from triton import knobs

    kernel, launches = direct
    x = torch.randn(4, 32)
    for hooks in (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook):
        seen = []

        def hook(metadata):
            data = metadata.get()  # Triton's LazyDict
            seen.append((data["name"], data["stream"]))
        hooks.add(hook)
        try:
            for _ in range(2):
                runtime.launch(kernel, (4,), x, x, 32, 1.0, True, N_COLS=32)
            _via_triton(kernel, (4,), (x, x, 32, 1.0, True), dict(N_COLS=32), launches)
        finally:
            hooks.remove(hook)
        assert seen == [("_scale_rows", 7)] * 3


def test_direct_launch_can_be_turned_off(monkeypatch):
    kernel = JITFunction(_scale_rows)
    x = torch.randn(4, 32)
    monkeypatch.setattr(runtime, "DIRECT_LAUNCH", False)
    with triton_without_gpu() as launches:
        for _ in range(2):
            runtime.launch(kernel, (4,), x, x, 32, 1.0, True, N_COLS=32)
        assert len(launches) == 2 and not runtime._COMPILED
    # the setting that turns it off, read at import
    code = "from ampfuse.kernels import runtime; print(runtime.DIRECT_LAUNCH)"
    env = dict(os.environ, AMPFUSE_TRITON_LAUNCH="triton")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.stdout.strip() == "False", done.stderr[-2000:]
