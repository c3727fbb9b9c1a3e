"""Shared memory, registers and spills of each Triton kernel at the benchmark shapes, compiled for a
GPU target without a GPU (Triton compiles ahead of time for any target; nothing runs).

    python -m benchmarks.compile_report [--arch 90] [--only gmu] [--warps 16]

Every launch the ops make is intercepted (kernels.runtime.launch), its arguments turned into a
signature, and the kernel compiled for the target; the launch itself is skipped, so outputs are
garbage and only the report counts. A kernel needing more shared memory than the target has
(about 227 KiB on Hopper) would fail at its first GPU launch with OutOfResources. Registers and
the stack frame come from the cubin (cuobjdump): a stack frame in these kernels is spilled
registers, read and written through local memory.
"""

import argparse
import itertools
import os
import re
import subprocess
import tempfile

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
OPTIONS = ("num_warps", "num_stages")


def compile_launch(kernel, args, meta, target):
    fn = kernel
    names, sig, consts = fn.arg_names, {}, {}
    values = dict(zip(names, args), **{k: v for k, v in meta.items() if k not in OPTIONS})
    for i, name in enumerate(names):
        v = values[name]
        if name in meta or fn.params[i].is_constexpr:
            sig[name], consts[(i,)] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[name] = "*" + TYPES[v.dtype]
        elif isinstance(v, bool):
            sig[name] = "i1"
        elif isinstance(v, int):
            sig[name] = "i64" if abs(v) >= 2 ** 31 else "i32"
        else:
            sig[name] = "fp32"
    options = {k: meta[k] for k in OPTIONS if k in meta}
    return triton.compile(ASTSource(fn, sig, consts), target=target, options=options)


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


def cases():
    from ampfuse import testing
    from ampfuse.ops.adapter_block import adapter_block
    from benchmarks.run import fusion_inputs, gmu_inputs
    from ampfuse.ops.fusion import fusion_layer
    from ampfuse.ops.gmu import gmu_adapter

    for (d, k), dtype in itertools.product(((384, 64), (768, 64), (1024, 64), (768, 256)),
                                           (torch.bfloat16, torch.float32)):
        tensors, kwargs = testing.adapter_inputs(16, d, k, dtype=dtype, ln_before=True, scale_kind="channel")
        yield f"adapter d={d} k={k} {TYPES[dtype]}", lambda t=tensors, kw=kwargs: testing.call(
            adapter_block, t, backend="triton", **kw).sum().backward()
    for d, dtype in itertools.product((384, 768, 1024), (torch.bfloat16, torch.float32)):
        t = gmu_inputs(2, 8, d, 64, dtype, "cpu")()
        yield f"gmu d={d} k=64 {TYPES[dtype]}", lambda t=t: gmu_adapter(**t, gate="softmax",
                                                                         backend="triton").sum().backward()
        t = fusion_inputs(16, d, dtype, "cpu")()
        yield f"fusion d={d} {TYPES[dtype]}", lambda t=t: fusion_layer(**t, beta=0.5, backend="triton").sum().backward()


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.compile_report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (Hopper), 80 (Ampere)")
    p.add_argument("--limit-kib", type=float, default=227.0, help="shared memory per block of the target")
    p.add_argument("--warps", type=int, default=0, help="compile every kernel with this many warps (tuning)")
    p.add_argument("--only", default="", help="report only cases whose name contains this text (e.g. 'gmu')")
    args = p.parse_args(argv)
    target = GPUTarget("cuda", args.arch, 32)
    rows, seen = [], set()

    def report(kernel, grid, *a, **meta):
        meta = runtime.DEFAULT_META | meta
        key = (case, kernel.fn.__name__, tuple(sorted((k, v) for k, v in meta.items())))
        if key in seen:
            return
        seen.add(key)
        if args.warps:
            meta["num_warps"] = args.warps
        regs = stack = None
        try:
            compiled = compile_launch(kernel, a, meta, target)
            kib = compiled.metadata.shared / 1024
            regs, stack = resources(compiled.asm["cubin"])
        except Exception as error:  # noqa: BLE001 - a kernel that does not compile is the worst finding
            root = error
            while root.__cause__ or root.__context__:
                root = root.__cause__ or root.__context__
            kib = f"{type(root).__name__}: {str(root).splitlines()[-1][:200] if str(root) else ''}"
        rows.append((case, kernel.fn.__name__, meta.get("num_warps", 4), meta.get("num_stages", 3), kib, regs, stack))

    runtime.launch = report
    backend.why_unavailable = lambda *a, **k: None  # the triton backend on CPU tensors: nothing runs
    for case, fn in cases():
        if args.only not in case:
            continue
        try:
            fn()
        except Exception:  # noqa: BLE001 - outputs are garbage once launches are skipped
            pass
    print(f"{'case':27} {'kernel':29} {'warps':>5} {'stages':>6} {'smem KiB':>9} {'regs':>5} {'stack B':>8}")
    failed = 0
    for case, name, warps, stages, kib, regs, stack in rows:
        if isinstance(kib, str):
            failed += 1
            print(f"{case:27} {name:29} {warps:5} {stages:6}  COMPILE ERROR {kib}")
            continue
        failed += kib > args.limit_kib
        flag = "  OVER" if kib > args.limit_kib else ""
        print(f"{case:27} {name:29} {warps:5} {stages:6} {kib:9.1f} {regs if regs else '?':>5} "
              f"{stack if stack is not None else '?':>8}{flag}")
    return rows, failed


if __name__ == "__main__":
    raise SystemExit(1 if main()[1] else 0)
