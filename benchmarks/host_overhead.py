"""What one call of each fused op costs on the host, with the kernel launches stubbed out.

    python -m benchmarks.host_overhead [--reps 2000] [--json FILE]

At BERT batch sizes (32 x 128 = 4,096 tokens a layer) the GPU work of an adapter block takes tens
of microseconds, so the Python between the user's call and the launches decides what a call
costs (docs/design.md, rule 4). Here every Triton launch is replaced by a no-op (outputs are
garbage, shapes are right) and the ops run on tiny CPU tensors, so what is timed is ampfuse's own
host path: argument checks, spec, autograd, allocations, launch arguments. Each op is timed as a
no-grad forward, a training forward (inputs requiring grad) and a forward plus backward, next to
a tiny torch.add and the eager reference of the same op on the same tiny tensors. The launches
themselves (Triton's own host cost, a few microseconds each) are counted, not timed: a GPU run
adds them. Targets (issue 12): forward at most 8 torch.adds, forward plus backward at most 30.
"""

import argparse
import json
import os
import statistics
import time

if os.environ.get("TRITON_INTERPRET") == "1":
    raise SystemExit("run without TRITON_INTERPRET=1: the interpreter would run the kernels")

import torch  # noqa: E402

from ampfuse import backend  # noqa: E402
from ampfuse.kernels import runtime  # noqa: E402

TARGETS = {"forward (no grad)": 8, "forward (training)": 8, "forward + backward": 30}


def per_call_us(fn, reps):
    """Median microseconds of fn() over ``reps`` calls, in 20 batches after a warm-up. The clock is the
    calling thread's CPU time: host cost is CPU work, and this clock does not count the time the
    thread waits while other processes have the CPU (wall time on a shared machine would)."""
    for _ in range(max(10, reps // 20)):
        fn()
    batch = max(1, reps // 20)
    times = []
    for _ in range(20):
        start = time.thread_time_ns()
        for _ in range(batch):
            fn()
        times.append((time.thread_time_ns() - start) / batch / 1e3)
    return statistics.median(times)


def adapter_case():
    """(fused op, eager reference, tensors) of the adapter block, Pfeiffer placement, tiny and on the CPU."""
    from ampfuse import testing
    from ampfuse.ops.adapter_block import adapter_block, adapter_block_reference

    tensors, kwargs = testing.adapter_inputs(8, 64, 16, scale_kind="float")

    def call(fn, **options):
        return lambda t: fn(t["h"], t["r"], t["ln_weight"], t["ln_bias"], t["w_down"], t["b_down"], t["w_up"],
                            t["b_up"], **kwargs, **options)
    return call(adapter_block, backend="triton"), call(adapter_block_reference), tensors


def gmu_case():
    """(fused op, eager reference, tensors) of the GMU adapter: text, one token-aligned and one per-sample
    modality, softmax gate, GMU form, stream LayerNorms and the fused output LayerNorm, tiny and on the CPU."""
    from ampfuse.ops.gmu import gmu_adapter, gmu_adapter_reference

    g = torch.Generator().manual_seed(0)
    d, k, sizes = 64, 16, (64, 24, 12)

    def rand(*shape):
        return (torch.randn(*shape, generator=g) * 0.1).requires_grad_()

    tensors = dict(x=rand(2, 4, d), r=rand(2, 4, d), modalities=[torch.randn(2, 4, 24), torch.randn(2, 12)],
                   stream_w=[rand(k, s) for s in sizes], stream_b=[rand(k) for _ in sizes],
                   stream_ln_w=[rand(s) for s in sizes], stream_ln_b=[rand(s) for s in sizes],
                   gate_w=rand(3, k, 3 * k), gate_b=rand(3, k), gmu_w=rand(3, k, k), w_up=rand(d, k), b_up=rand(d),
                   ln_weight=torch.ones(d), ln_bias=torch.zeros(d))

    def call(fn, **options):
        return lambda t: fn(**t, gate="softmax", scaling=0.5, **options)
    return call(gmu_adapter, backend="triton"), call(gmu_adapter_reference), tensors


def fusion_case():
    """(fused op, eager reference, tensors) of the fusion layer with two modalities (frozen features), tiny and
    on the CPU."""
    from ampfuse.ops.fusion import fusion_layer, fusion_layer_reference

    g = torch.Generator().manual_seed(0)
    d, widths = 64, (20, 12)

    def rand(*shape, grad=True):
        return (torch.randn(*shape, generator=g) * shape[-1] ** -0.5).requires_grad_(grad)

    tensors = dict(x=rand(2, 4, d), modalities=[rand(2, 4, w, grad=False) for w in widths],
                   gate_w=[rand(d, d + w) for w in widths], gate_b=[rand(d) for _ in widths],
                   proj_w=[rand(d, w) for w in widths], proj_b=[rand(d) for _ in widths], ln_weight=rand(d),
                   ln_bias=rand(d))

    def call(fn, **options):
        return lambda t: fn(**t, beta=0.5, **options)
    return call(fusion_layer, backend="triton"), call(fusion_layer_reference), tensors


CASES = {"adapter_block": adapter_case, "gmu_adapter": gmu_case, "fusion_layer": fusion_case}


def measure(name, reps):
    fused, eager, tensors = CASES[name]()  # fn(tensors) -> output
    frozen = {n: [t.detach() for t in v] if isinstance(v, list) else v.detach() for n, v in tensors.items()}
    dy = torch.randn_like(_no_grad(eager, frozen))
    rows = []

    def launches(fn):
        before = runtime.launch_count
        fn()
        return runtime.launch_count - before

    for label, make in (("forward (no grad)", lambda f: lambda: _no_grad(f, frozen)),
                        ("forward (training)", lambda f: lambda: f(tensors)),
                        ("forward + backward", lambda f: lambda: f(tensors).backward(dy))):
        row = {"op": name, "mode": label, "fused_us": per_call_us(make(fused), reps),
               "eager_us": per_call_us(make(eager), reps), "launches": launches(make(fused))}
        rows.append(row)
    return rows


class _Identity(torch.autograd.Function):
    """The least an autograd.Function costs: save the inputs, return an empty output, pass dy back."""

    @staticmethod
    def forward(ctx, h, *params):
        ctx.save_for_backward(h, *params)
        return torch.empty_like(h)

    @staticmethod
    def backward(ctx, dy):
        return (dy,) + (None,) * (len(ctx.saved_tensors) - 1)


def function_floor_us(reps):
    """(forward, forward + backward) microseconds of _Identity over the adapter block's twelve tensors."""
    _, _, tensors = adapter_case()
    h, params = tensors["h"], [t for n, t in tensors.items() if n != "h"] + [tensors["h"]] * 3
    dy = torch.randn_like(h)
    return (per_call_us(lambda: _Identity.apply(h, *params), reps),
            per_call_us(lambda: _Identity.apply(h, *params).backward(dy), reps))


def _no_grad(fn, tensors):
    with torch.no_grad():
        return fn(tensors)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.host_overhead", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=2000, help="calls per measurement")
    p.add_argument("--json", default="", help="also write the rows to this file")
    args = p.parse_args(argv)
    runtime.launch = _stub_launch
    backend.why_unavailable = lambda *a, **k: None  # the triton backend on CPU tensors (nothing launches)
    torch.set_num_threads(1)
    x, y = torch.ones(2), torch.ones(2)
    add_us = per_call_us(lambda: torch.add(x, y), args.reps * 5)
    rows = [row for name in CASES for row in measure(name, args.reps)]
    floor_fwd, floor_fwd_bwd = function_floor_us(args.reps)
    print(f"torch.add of two 2-element tensors: {add_us:.2f} us (the unit below); an empty autograd.Function of "
          f"12 tensors costs {floor_fwd / add_us:.1f} adds forward, {floor_fwd_bwd / add_us:.1f} forward + backward")
    print(f"{'op':14} {'mode':20} {'fused us':>9} {'x add':>6} {'target':>7} {'launches':>8} {'eager us':>9}")
    for row in rows:
        row["adds"] = row["fused_us"] / add_us
        row["target_adds"] = TARGETS[row["mode"]]
        flag = "" if row["adds"] <= row["target_adds"] else "  over target"
        print(f"{row['op']:14} {row['mode']:20} {row['fused_us']:9.1f} {row['adds']:6.1f} {row['target_adds']:>7} "
              f"{row['launches']:8} {row['eager_us']:9.1f}{flag}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch_add_us": add_us, "function_floor_us": [floor_fwd, floor_fwd_bwd],
                   "torch": torch.__version__, "rows": rows}, f, indent=1)
    return rows


def _stub_launch(kernel, grid, *args, **meta):
    runtime.launch_count += 1


if __name__ == "__main__":
    main()
