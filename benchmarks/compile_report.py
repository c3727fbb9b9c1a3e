"""Shared memory, registers and spills of each Triton kernel at the benchmark shapes, compiled for a
GPU target without a GPU (Triton compiles ahead of time for any target; nothing runs).

    python -m benchmarks.compile_report [--arch 90] [--only gmu] [--warps 16] [--jobs N]

Every launch the ops make is intercepted (kernels.runtime.launch), its arguments turned into a
signature, and the launch skipped, so outputs are garbage and only the report counts. Once every
case is traced, each distinct binary is compiled for the target, one process per core. A kernel
needing more shared memory than the target has (about 227 KiB on Hopper) would fail at its first
GPU launch with OutOfResources. Registers and
the stack frame come from the cubin (cuobjdump): a stack frame in these kernels is spilled
registers, read and written through local memory.
"""

import argparse
import itertools
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

if os.environ.get("TRITON_INTERPRET") == "1":
    raise SystemExit("run without TRITON_INTERPRET=1: compiling needs the kernels as JIT functions")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from ampfuse import backend  # noqa: E402
from ampfuse.kernels import runtime  # noqa: E402

TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int64: "i64",
         torch.int32: "i32", torch.int8: "i8", torch.bool: "i1"}
OPTIONS = ("num_warps", "num_stages", "maxnreg")


def signature(kernel, args, meta, target):
    """(sig, consts, attrs, options) of one launch: what the compiled binary depends on, from Triton's own
    launch-time binder for the target (an integer divisible by 16 or equal to 1, a tensor whose address is
    16-byte aligned, each element of a tuple argument, is specialised as a launch would): without that loads
    do not vectorise and the report would overstate registers."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **meta)
    options, sig, consts, attrs = kernel._pack_args(backend, meta, bound, specialization, options)
    return sig, consts, attrs, options.__dict__


def compile_launch(kernel, sig, consts, attrs, options, target):
    return triton.compile(ASTSource(kernel, sig, consts, attrs), target=target, options=options)


def compile_and_measure(kernel, sig, consts, attrs, options, target):
    """(shared memory KiB, registers, stack bytes) of one launch's binary, or (error text, None, None)."""
    try:
        compiled = compile_launch(kernel, sig, consts, attrs, options, target)
        return (compiled.metadata.shared / 1024, *resources(compiled.asm["cubin"]))
    except Exception as error:  # noqa: BLE001 - a kernel that does not compile is the worst finding
        root = error
        while root.__cause__ or root.__context__:
            root = root.__cause__ or root.__context__
        return f"{type(root).__name__}: {str(root).splitlines()[-1][:200] if str(root) else ''}", None, None


_PENDING = []  # the launches compile_all hands its forked workers (a JITFunction does not pickle)


def _compile_pending(index):
    return compile_and_measure(*_PENDING[index])


def compile_all(launches, jobs):
    """compile_and_measure over a list of launches' arguments, in `jobs` forked processes: compiling (LLVM,
    ptxas) is single-threaded and holds the GIL, and the report's 150-odd binaries take minutes per core.
    A worker that dies (a crash in the compiler, the OOM killer) raises BrokenProcessPool here."""
    if jobs <= 1 or len(launches) <= 1:
        return [compile_and_measure(*launch) for launch in launches]
    _PENDING[:] = launches
    sys.stdout.flush()  # a forked worker would write out whatever the parent still buffers
    sys.stderr.flush()
    try:  # fork: the workers inherit the traced launches; they run no torch op, only Triton's compiler
        with ProcessPoolExecutor(min(jobs, len(launches)), mp_context=multiprocessing.get_context("fork")) as pool:
            return list(pool.map(_compile_pending, range(len(launches))))
    finally:
        _PENDING.clear()


def usable_cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def resources(cubin):
    """(registers, stack frame bytes) per thread of a compiled kernel, or (None, None) without cuobjdump."""
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        try:
            dump = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name], capture_output=True,
                                  text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError, AttributeError):
            return None, None
    found = re.search(r"REG:(\d+) STACK:(\d+)", dump)
    return (int(found[1]), int(found[2])) if found else (None, None)


def spills_are_reported_only(case):
    """Spills that the report shows but CI does not fail on: fp32 cases (full-precision dots on CUDA cores, no
    tensor cores; the gate is for the layouts training runs in)."""
    return "fp32" in case.split()


# The adapter block's dtype layouts: (h, r, parameters); "mix" is autocast's (16-bit h, fp32 r and parameters).
ADAPTER_DTYPES = {"bf16": (torch.bfloat16,) * 3, "fp16": (torch.float16,) * 3,
                  "mix": (torch.bfloat16, torch.float32, torch.float32), "fp32": (torch.float32,) * 3}
# The adapter block's placements and options (adapter_block keywords; "+ln": the adapter's own LayerNorm). CI
# compiles the headline and each placement's heaviest variant; --all-placements adds the other corners (slower).
ADAPTER_PLACEMENTS = {"pfeiffer": {},
                      "pfeiffer+ln+dropout": dict(training=True, dropout_p=0.1),
                      "houlsby+ln+dropout": dict(original_ln_before=False, training=True, dropout_p=0.1)}
MORE_ADAPTER_PLACEMENTS = {"pfeiffer+ln": {}, "pfeiffer+dropout": dict(training=True, dropout_p=0.1),
                           "houlsby": dict(original_ln_before=False), "houlsby+ln": dict(original_ln_before=False),
                           "houlsby+dropout": dict(original_ln_before=False, training=True, dropout_p=0.1),
                           "residual-after+ln+dropout": dict(residual_before_ln=False, training=True, dropout_p=0.1)}
# The fusion layer's: (x and modalities, parameters, autocast dtype or None). "mix": 16-bit activations with fp32
# parameters; "autocast": fp32 activations (a BERT LayerNorm's output under autocast) with bf16 operands.
FUSION_DTYPES = {"bf16": (torch.bfloat16, torch.bfloat16, None), "fp16": (torch.float16, torch.float16, None),
                 "mix": (torch.bfloat16, torch.float32, None),
                 "autocast": (torch.float32, torch.float32, torch.bfloat16), "fp32": (torch.float32, torch.float32, None)}


# The GMU's dtype layouts (x and modalities, r, parameters) and modality sets (width, token-aligned): one
# token-aligned modality (the sigmoid gate, direct form), or an aligned one and a wide per-sample one (softmax
# gate, GMU form).
GMU_DTYPES = {"bf16": (torch.bfloat16,) * 3, "fp16": (torch.float16,) * 3,
              "mix": (torch.bfloat16, torch.float32, torch.float32)}
GMU_MODALITIES = {"1 aligned": ((74, True),), "aligned+per-sample": ((74, True), (2048, False))}


def gmu_case(d, k, modalities, x_dtype, r_dtype, p_dtype, B=2, T=8):
    """(tensors, options) of one GMU call: stream LayerNorms, the fused output LayerNorm, a per-channel
    scaling, every parameter requiring grad."""
    def rand(*shape, dtype=p_dtype):
        return torch.randn(*shape, dtype=dtype).requires_grad_()

    widths = [d, *(w for w, _ in modalities)]
    S = len(widths)
    gate = "sigmoid" if S == 2 else "softmax"
    gates = 1 if gate == "sigmoid" else S
    tensors = dict(x=rand(B, T, d, dtype=x_dtype), r=rand(B, T, d, dtype=r_dtype),
                   modalities=[torch.randn(B, T, w, dtype=x_dtype) if aligned else torch.randn(B, w, dtype=x_dtype)
                               for w, aligned in modalities],
                   stream_w=[rand(k, w) for w in widths], stream_b=[rand(k) for _ in widths],
                   stream_ln_w=[rand(w) for w in widths], stream_ln_b=[rand(w) for w in widths],
                   gate_w=rand(gates, k, S * k), gate_b=rand(gates, k), w_up=rand(d, k), b_up=rand(d),
                   scaling=rand(d), ln_weight=rand(d), ln_bias=rand(d))
    if S > 2:
        tensors["gmu_w"] = rand(S, k, k)
    return tensors, dict(gate=gate)


def cases(adapter_placements=ADAPTER_PLACEMENTS):
    from ampfuse import testing
    from ampfuse.ops.adapter_block import adapter_block
    from benchmarks.run import fusion_inputs
    from ampfuse.ops.fusion import fusion_layer
    from ampfuse.ops.gmu import gmu_adapter

    for d, k, layout in itertools.product((384, 768, 1024), (64, 256), ADAPTER_DTYPES):
        h_dtype, r_dtype, p_dtype = ADAPTER_DTYPES[layout]
        for placement, kwargs in adapter_placements.items():
            tensors, scale = testing.adapter_inputs(16, d, k, dtype=h_dtype, param_dtype=p_dtype, scale_kind="channel",
                                                    ln_before="+ln" in placement)
            tensors["r"] = tensors["r"].detach().to(r_dtype).requires_grad_()
            yield f"adapter d={d} k={k} {layout} {placement}", lambda t=tensors, kw=kwargs | scale: testing.call(
                adapter_block, t, backend="triton", **kw).sum().backward()
    for d, layout, (name, modalities) in itertools.product((384, 768, 1024), GMU_DTYPES, GMU_MODALITIES.items()):
        t, kwargs = gmu_case(d, 64, modalities, *GMU_DTYPES[layout])
        yield f"gmu d={d} k=64 {layout} {name}", lambda t=t, kw=kwargs: gmu_adapter(
            **t, **kw, backend="triton").sum().backward()
    for d, layout in itertools.product((384, 768, 1024), FUSION_DTYPES):
        dtype, params, autocast = FUSION_DTYPES[layout]
        t = fusion_inputs(16, d, dtype, "cpu", mix=params != dtype)()
        t.pop("autocast")  # the call below enters autocast itself, for the "autocast" layout
        for m in t["modalities"]:
            m.requires_grad_()  # every backward kernel's every job

        def step(t=t, autocast=autocast):
            with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
                y = fusion_layer(**t, beta=0.5, backend="triton")
            y.sum().backward()
        yield f"fusion d={d} {layout}", step


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.compile_report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (Hopper), 80 (Ampere)")
    p.add_argument("--limit-kib", type=float, default=227.0, help="shared memory per block of the target")
    p.add_argument("--warps", type=int, default=0, help="compile every kernel with this many warps (tuning)")
    p.add_argument("--stages", type=int, default=0,
                   help="set runtime.STREAM_STAGES and ROW_PASS_STAGES to this (what benchmarks.tune times)")
    p.add_argument("--only", action="append", default=[],
                   help="report only cases whose name contains this text (e.g. 'gmu'); repeat for several")
    p.add_argument("--no-spill-gate", action="store_true",
                   help="report spills without failing (to survey option corners or Tritons that CI does not gate)")
    p.add_argument("--jobs", type=int, default=usable_cores(),
                   help="compile in this many processes (default: one per core this process may use)")
    p.add_argument("--all-placements", action="store_true",
                   help="compile every corner of the adapter block's options, not only CI's three placements")
    args = p.parse_args(argv)
    target = GPUTarget("cuda", args.arch, 32)
    traced, seen, launches = [], set(), {}
    if args.stages:
        runtime.STREAM_STAGES = runtime.ROW_PASS_STAGES = args.stages

    def trace(kernel, grid, *a, **meta):
        meta = runtime.DEFAULT_META | meta
        if args.warps:
            meta["num_warps"] = args.warps
        sig, consts, attrs, options = signature(kernel, a, meta, target)
        key = (kernel.fn.__name__, str(sig), str(consts), str(attrs), tuple(meta.get(k) for k in OPTIONS))
        if (case, key) in seen:
            return
        seen.add((case, key))
        # one binary serves every width where d is only a runtime argument: compiled once
        launches.setdefault(key, (kernel, sig, consts, attrs, options, target))
        traced.append((case, kernel.fn.__name__, meta.get("num_warps", 4), meta.get("num_stages", 3), key))

    runtime.launch = trace
    backend.why_unavailable = lambda *a, **k: None  # the triton backend on CPU tensors: nothing runs
    for case, fn in cases(ADAPTER_PLACEMENTS | MORE_ADAPTER_PLACEMENTS if args.all_placements else ADAPTER_PLACEMENTS):
        if args.only and not any(text in case for text in args.only):
            continue
        try:
            fn()
        except Exception:  # noqa: BLE001 - outputs are garbage once launches are skipped
            pass
    measured = dict(zip(launches, compile_all(list(launches.values()), args.jobs)))
    rows = [(case, name, warps, stages, *measured[key]) for case, name, warps, stages, key in traced]
    print(f"{'case':40} {'kernel':29} {'warps':>5} {'stages':>6} {'smem KiB':>9} {'regs':>5} {'stack B':>8} "
          f"{'blocks/SM':>9}")
    failed = 0
    for case, name, warps, stages, kib, regs, stack in rows:
        if isinstance(kib, str):
            failed += 1
            print(f"{case:40} {name:29} {warps:5} {stages:6}  COMPILE ERROR {kib}")
            continue
        over = kib > args.limit_kib
        spills = bool(stack) and not (args.no_spill_gate or spills_are_reported_only(case))
        failed += over or spills
        flag = ("  OVER" if over else "") + ("  SPILLS" if spills else "  (spills, reported only)" if stack else "")
        print(f"{case:40} {name:29} {warps:5} {stages:6} {kib:9.1f} {regs if regs else '?':>5} "
              f"{stack if stack is not None else '?':>8} {blocks_per_sm(warps, regs, kib * 1024):>9}{flag}")
    return rows, failed


def blocks_per_sm(warps, regs, smem_bytes):
    """Resident blocks per Hopper SM: the least of the register file (64K 32-bit registers, allocated
    per warp in units of 256), shared memory (228 KiB, 1 KiB reserved per block) and 32 blocks."""
    if not regs:
        return "?"
    by_regs = 65536 // (warps * (-(-regs * 32 // 256) * 256))
    by_smem = int(228 * 1024 // (smem_bytes + 1024))
    return min(by_regs, by_smem, 32, 64 // warps)


if __name__ == "__main__":
    raise SystemExit(1 if main()[1] else 0)
