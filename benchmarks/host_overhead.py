"""What one call of each fused op costs on the host: everything up to the GPU driver's launch.

    python -m benchmarks.host_overhead [--reps 2000] [--json FILE]

At BERT batch sizes (32 x 128 = 4,096 tokens a layer) the GPU work of an adapter block takes tens
of microseconds, so the Python between the user's call and the launches decides what a call
costs (docs/design.md, rule 4). The ops run on tiny CPU tensors with Triton's real launch path up
to the driver (ampfuse.testing.triton_without_gpu: the kernels compile for sm_90 on their first
launch, and the driver's launcher records the launch instead of running it; outputs are garbage,
shapes are right). So what is timed is ampfuse's host path (argument checks, spec, autograd,
allocations, launch arguments) and its launches (kernels/runtime.py's direct launch), all but the
driver's own C launcher. Each op is timed as a no-grad forward, a training forward (inputs
requiring grad) and a forward plus backward, next to a tiny torch.add and the eager reference of
the same op on the same tiny tensors. The ``via triton us`` column is the same call with every
launch through Triton's JITFunction.run (AMPFUSE_TRITON_LAUNCH=triton); before timing, the launches
of both paths are compared (same compiled kernels, grids and arguments) and a difference is an
error. Targets (issue 12): forward at most 8 torch.adds, forward plus backward at most 30.

A lone ``y.backward(dy)`` pays autograd's entry, which a training step pays once for the whole
model. So one more row times a step as training runs it: gradients set to None (``zero_grad``), a
chain of LAYERS calls, each layer with its own parameters and fed the previous layer's output (as
h and as r: in BERT both the sub-layer and the residual start from it, so autograd sums two
gradients into each layer's input there too), and one backward; it reports the step's time per
layer, against the forward plus backward target. The first line gives the floor of any op built
on an autograd.Function: an empty one over the adapter block's tensors, in the same three
measures. Each row's unit (the torch.add) is measured next to it, since this machine's speed
drifts over a run.
"""

import argparse
import contextlib
import json
import os
import time

if os.environ.get("TRITON_INTERPRET") == "1":
    raise SystemExit("run without TRITON_INTERPRET=1: the interpreter would run the kernels")

import torch  # noqa: E402

from ampfuse import backend, testing  # noqa: E402
from ampfuse.kernels import runtime  # noqa: E402

TARGETS = {"forward (no grad)": 8, "forward (training)": 8, "forward + backward": 30, "step, per layer": 30}
LAYERS = 12  # BERT-base


def per_call_us(fn, reps):
    """Microseconds of one fn() call: ``reps`` calls in 20 batches after a warm-up, the fastest batch's
    mean. The clock is the calling thread's CPU time: host cost is CPU work, and this clock does not count
    the time the thread waits while other processes have the CPU (wall time on a shared machine would).
    The fastest batch, not the median: on a shared machine the same thread CPU time still swings by 2x
    with the neighbours' load (caches, frequency), and interference only ever adds to it."""
    for _ in range(max(10, reps // 20)):
        fn()
    batch = max(1, reps // 20)
    times = []
    for _ in range(20):
        start = time.thread_time_ns()
        for _ in range(batch):
            fn()
        times.append((time.thread_time_ns() - start) / batch / 1e3)
    return min(times)


def adapter_case():
    """(fused op, eager reference, tensors) of the adapter block, Pfeiffer placement, tiny and on the CPU. The
    sub-layer's LayerNorm is frozen, as ampfuse.patch leaves it; the adapter's weights train."""
    from ampfuse.ops.adapter_block import adapter_block, adapter_block_reference

    tensors, kwargs = testing.adapter_inputs(8, 64, 16, scale_kind="float")
    tensors["ln_weight"].requires_grad_(False)
    tensors["ln_bias"].requires_grad_(False)

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
# The input a layer's output feeds in the next layer of a chain (the rest of a layer's tensors are its own).
CHAINED = {"adapter_block": ("h", "r"), "gmu_adapter": ("x", "r"), "fusion_layer": ("x",)}


def training_step(fn, tensors, chained, dy):
    """A step of LAYERS chained calls as training runs it (see the module's doc): each layer gets its
    own copy of the trainable tensors (what requires grad, but the chained inputs), gradients are set
    to None first, and one backward runs at the end. Returns a function of no arguments."""
    def own(value):
        if isinstance(value, list):
            return [own(v) for v in value]
        return value.detach().clone().requires_grad_() if value.requires_grad else value
    layers = [{n: (v if n in chained else own(v)) for n, v in tensors.items()} for _ in range(LAYERS)]
    leaves = [t for layer in layers for v in layer.values() for t in (v if isinstance(v, list) else [v])
              if t.requires_grad]

    def step():
        for t in leaves:
            t.grad = None
        y = tensors[chained[0]]
        for layer in layers:
            y = fn(layer | {n: y for n in chained})
        y.backward(dy)
    return step


def add_us(reps):
    """The unit: microseconds of a torch.add of two 2-element tensors."""
    x, y = torch.ones(2), torch.ones(2)
    return per_call_us(lambda: torch.add(x, y), reps * 5)


def measure(name, reps, launches):
    """The rows of one op; ``launches`` is triton_without_gpu's record."""
    fused, eager, tensors = CASES[name]()  # fn(tensors) -> output
    frozen = {n: [t.detach() for t in v] if isinstance(v, list) else v.detach() for n, v in tensors.items()}
    dy = torch.randn_like(_no_grad(eager, frozen))
    rows = []
    for label, make in (("forward (no grad)", lambda f: lambda: _no_grad(f, frozen)),
                        ("forward (training)", lambda f: lambda: f(tensors)),
                        ("forward + backward", lambda f: lambda: f(tensors).backward(dy)),
                        ("step, per layer", lambda f: training_step(f, tensors, CHAINED[name], dy))):
        per = LAYERS if label == "step, per layer" else 1
        call = make(fused)
        made = recorded(call, launches)
        with triton_launches():
            if recorded(call, launches) != made:
                raise SystemExit(f"{name}, {label}: the direct launches differ from Triton's own")
            via_triton = per_call_us(call, reps // per) / per
        row = {"op": name, "mode": label, "add_us": add_us(reps), "fused_us": per_call_us(call, reps // per) / per,
               "via_triton_us": via_triton, "eager_us": per_call_us(make(eager), reps // per) / per,
               "launches": len(made) / per}
        launches.clear()
        rows.append(row)
    return rows


@contextlib.contextmanager
def triton_launches():
    """Every launch through Triton's JITFunction.run inside the block (AMPFUSE_TRITON_LAUNCH=triton)."""
    runtime.DIRECT_LAUNCH = False
    try:
        yield
    finally:
        runtime.DIRECT_LAUNCH = True


def _without_addresses(args):
    return tuple(_without_addresses(a) if isinstance(a, tuple) else (a.dtype, a.shape) if isinstance(a, torch.Tensor)
                 else a for a in args)


def recorded(call, launches):
    """The launches of one call (after a first call, which compiles), each as (compiled kernel, grid,
    arguments), a tensor argument by dtype and shape (its address changes from call to call)."""
    call()
    launches.clear()
    call()
    made = [(function, grid, stream, _without_addresses(args)) for function, grid, stream, args in launches]
    launches.clear()
    return made


class _Empty(torch.autograd.Function):
    """The least an autograd.Function costs: save the inputs, return an empty output, hand back dy for the
    first input and an empty gradient for each other one that wants one."""

    @staticmethod
    def forward(ctx, h, *tensors):
        ctx.save_for_backward(h, *tensors)
        return torch.empty_like(h)

    @staticmethod
    def backward(ctx, dy):
        _, *tensors = ctx.saved_tensors
        return (dy, *(torch.empty_like(t) if need else None for t, need in zip(tensors, ctx.needs_input_grad[1:])))


def function_floor_us(reps):
    """Microseconds of _Empty over the adapter block's tensors (h, r and its six parameters): forward,
    forward + backward, and per layer of a training step."""
    _, _, tensors = adapter_case()
    names = list(tensors)  # h, r, ln_weight, ln_bias, w_down, b_down, w_up, b_up

    def empty_op(t):
        return _Empty.apply(*(t[n] for n in names))
    dy = torch.randn_like(tensors["h"])
    return (per_call_us(lambda: empty_op(tensors), reps), per_call_us(lambda: empty_op(tensors).backward(dy), reps),
            per_call_us(training_step(empty_op, tensors, CHAINED["adapter_block"], dy), reps // LAYERS) / LAYERS)


def _no_grad(fn, tensors):
    with torch.no_grad():
        return fn(tensors)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.host_overhead", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=2000, help="calls per measurement")
    p.add_argument("--json", default="", help="also write the rows to this file")
    args = p.parse_args(argv)
    backend.why_unavailable = lambda *a, **k: None  # the triton backend on CPU tensors (nothing runs)
    torch.set_num_threads(1)
    with testing.triton_without_gpu() as launches:
        rows = [row for name in CASES for row in measure(name, args.reps, launches)]
    unit = add_us(args.reps)  # measured next to the floor: the machine's speed drifts over a run
    floor = function_floor_us(args.reps)
    print(f"an empty autograd.Function of the adapter block's 8 tensors costs {floor[0] / unit:.1f} torch.adds "
          f"forward, {floor[1] / unit:.1f} forward + backward, {floor[2] / unit:.1f} per layer of a step "
          f"(torch.add of two 2-element tensors: {unit:.2f} us)")
    print(f"{'op':14} {'mode':20} {'add us':>6} {'fused us':>9} {'x add':>6} {'target':>7} {'launches':>8} "
          f"{'via triton us':>13} {'eager us':>9}")
    print(f"  (step, per layer: {LAYERS} chained calls, zero_grad, one backward; the step's time / {LAYERS}. "
          "via triton us: the same call, every launch through Triton's JITFunction.run)")
    for row in rows:
        row["adds"] = row["fused_us"] / row["add_us"]
        row["target_adds"] = TARGETS[row["mode"]]
        flag = "" if row["adds"] <= row["target_adds"] else "  over target"
        print(f"{row['op']:14} {row['mode']:20} {row['add_us']:6.2f} {row['fused_us']:9.1f} {row['adds']:6.1f} "
              f"{row['target_adds']:>7} {row['launches']:8g} {row['via_triton_us']:13.1f} {row['eager_us']:9.1f}{flag}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch_add_us": unit, "function_floor_us": dict(zip(("forward", "forward + backward",
                                                                           "step, per layer"), floor)),
                   "torch": torch.__version__, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
