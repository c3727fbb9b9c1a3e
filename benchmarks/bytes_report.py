"""Bytes each kernel moves per token, counted from its own loads and stores, against the floor.

    TRITON_INTERPRET=1 python -m benchmarks.bytes_report [--tokens 256] [--d 768] [--k 64]

The kernels run in Triton's CPU interpreter with every load and store counted (masked-off lanes
excluded): "moved" is every byte a kernel loads or stores, re-reads included (what the memory
system serves, L2 or HBM), "unique" counts each address once per launch (what HBM must serve at
best). Bytes in the activation tensors (h, r, y, dy, dh, dr) are reported apart from the rest (the
k-wide tensors saved between kernels, the weights and constants, which a larger token count
amortises). The floor is docs/design.md section 5's: the adapter block's forward reads h and r and
writes y; its backward reads dy, h, r and writes dh and dr. The kernels run with the tile sizes a
GPU launch uses (not the interpreter's small test tiles), so re-reads per token are the GPU's.
"""

import argparse
import itertools
import os

if os.environ.get("TRITON_INTERPRET") != "1":
    raise SystemExit("run with TRITON_INTERPRET=1: the counting hooks Triton's CPU interpreter")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from triton.runtime import interpreter  # noqa: E402

from ampfuse.kernels import runtime  # noqa: E402


class Counter:
    """Counts the bytes of every interpreted load and store, per kernel launch."""

    def __init__(self):
        self.launches = []  # (kernel name, {"load"/"store": [(addresses, itemsize)]})
        self._current = None

    def record(self, kind, ptrs, mask, itemsize):
        if self._current is not None:
            # the interpreter may hold a mask as int32 (a bool block & a scalar comparison): index with bools
            addresses = ptrs.data if mask is None else ptrs.data[mask.data.astype(bool)]
            self._current[kind].append((np.asarray(addresses, dtype=np.uint64).ravel(), itemsize))

    def launch(self, kernel, grid, *args, **meta):
        self._current = {"load": [], "store": []}
        self.launches.append((kernel.fn.__name__, self._current))
        _launch(kernel, grid, *args, **meta)
        self._current = None


_launch = runtime.launch
COUNTER = Counter()


def _install():
    builder = interpreter.InterpreterBuilder

    def wrap(name, kind, ptr_index, mask_index):
        original = getattr(builder, name)

        def counted(self, *args):
            ptrs = args[ptr_index]
            mask = args[mask_index] if mask_index is not None else None
            itemsize = np.dtype(interpreter._get_np_dtype(ptrs.get_element_ty())).itemsize
            COUNTER.record(kind, ptrs, mask, itemsize)
            return original(self, *args)
        setattr(builder, name, counted)

    wrap("create_load", "load", 0, None)
    wrap("create_masked_load", "load", 0, 1)
    wrap("create_store", "store", 0, None)
    wrap("create_masked_store", "store", 0, 2)
    runtime.launch = COUNTER.launch


def summarize(launches, activations, tokens):
    """Rows per kernel: bytes per token moved and unique, in the activation tensors and elsewhere."""
    spans = [(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in activations]

    def in_activations(addresses):
        hit = np.zeros(addresses.shape, dtype=bool)
        for lo, hi in spans:
            hit |= (addresses >= lo) & (addresses < hi)
        return hit

    rows = []
    for name, accesses in launches:
        row = {"kernel": name}
        for kind, parts in accesses.items():
            moved = {True: 0, False: 0}
            unique = {True: 0, False: 0}
            for act in (True, False):
                chosen = [(a[in_activations(a) == act], size) for a, size in parts]
                moved[act] = sum(len(a) * size for a, size in chosen)
                by_size = {}
                for a, size in chosen:
                    by_size.setdefault(size, []).append(a)
                unique[act] = sum(len(np.unique(np.concatenate(v))) * size for size, v in by_size.items() if v)
            row[f"{kind}_act_moved"] = moved[True] / tokens
            row[f"{kind}_act_unique"] = unique[True] / tokens
            row[f"{kind}_other_moved"] = moved[False] / tokens
            row[f"{kind}_other_unique"] = unique[False] / tokens
        rows.append(row)
    return rows


def adapter_block(tokens, d, k, dtype, r_dtype):
    """(forward rows, backward rows, forward floor, backward floor), bytes per token."""
    from ampfuse import testing
    from ampfuse.ops.adapter_block import adapter_block as op

    tensors, kwargs = testing.adapter_inputs(tokens, d, k, dtype=dtype, r_dtype=r_dtype, param_dtype=torch.float32,
                                             scale_kind="float")
    h, r = tensors["h"], tensors["r"]
    COUNTER.launches.clear()
    y = testing.call(op, tensors, backend="triton", **kwargs)
    forward = summarize(COUNTER.launches, [h, r, y], tokens)
    dy = torch.randn_like(y)
    grads = {}

    def keep(name):
        def hook(g):
            grads[name] = g
        return hook
    h.register_hook(keep("h"))
    r.register_hook(keep("r"))
    COUNTER.launches.clear()
    y.backward(dy)
    backward = summarize(COUNTER.launches, [dy, h, r, y, grads["h"], grads["r"]], tokens)
    e_h, e_r, e_y = h.element_size(), r.element_size(), y.element_size()
    return forward, backward, d * (e_h + e_r + e_y), d * (e_y + e_h + e_r + e_h + e_r)


def gmu_adapter(tokens, d, k, dtype, r_dtype):
    """(forward rows, backward rows, forward floor, backward floor), bytes per token, for the run.py gmu suite's
    configuration: a token-aligned 74-wide and a per-sample 35-wide modality, the softmax gate, stream
    LayerNorms and the fused output LayerNorm; parameters in r's dtype (autocast's layout when it differs from
    x's). The kernels run with their GPU tile settings (the interpreter's own are smaller), so the re-reads
    counted are those a GPU would make."""
    from ampfuse.kernels import gmu as kernels
    from ampfuse.ops.gmu import gmu_adapter as op

    g = torch.Generator().manual_seed(0)
    B, T, sizes = 2, tokens // 2, (d, 74, 35)

    def rand(*shape, dt=r_dtype, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(dt).requires_grad_()

    x, r = rand(B, T, d, dt=dtype), rand(B, T, d)
    m = torch.randn(B, T, 74, generator=g).to(dtype)
    tensors = dict(modalities=[m, torch.randn(B, 35, generator=g).to(dtype)],
                   stream_w=[rand(k, s, std=s ** -0.5) for s in sizes], stream_b=[rand(k) for _ in sizes],
                   stream_ln_w=[rand(s) for s in sizes], stream_ln_b=[rand(s) for s in sizes],
                   gate_w=rand(3, k, 3 * k, std=(3 * k) ** -0.5), gate_b=rand(3, k), w_up=rand(d, k, std=k ** -0.5),
                   b_up=rand(d), ln_weight=torch.ones(d, dtype=r_dtype), ln_bias=torch.zeros(d, dtype=r_dtype))
    interpreter_tiles = kernels.tiles

    def gpu_tiles(kind, K, S, op_dtype):
        runtime._INTERPRETING = False
        try:  # the uncached settings (the cache holds the interpreter's under the same arguments)
            settings = dict(kernels._tiles.__wrapped__(kind, K, S, op_dtype, runtime.STREAM_STAGES))
        finally:
            runtime._INTERPRETING = True
        settings.pop("num_warps", None)
        return settings

    kernels.tiles = gpu_tiles
    try:
        COUNTER.launches.clear()
        y = op(x, r=r, **tensors, gate="softmax", backend="triton")
        forward = summarize(COUNTER.launches, [x, r, m, y], tokens)
        dy = torch.randn_like(y)
        grads = {}
        x.register_hook(lambda grad: grads.__setitem__("x", grad))
        r.register_hook(lambda grad: grads.__setitem__("r", grad))
        COUNTER.launches.clear()
        y.backward(dy)
        backward = summarize(COUNTER.launches, [dy, x, r, m, grads["x"], grads["r"]], tokens)
    finally:
        kernels.tiles = interpreter_tiles
    e_x, e_r, e_y = x.element_size(), r.element_size(), y.element_size()
    return forward, backward, d * (e_x + e_r + e_y) + 74 * e_x, d * (e_y + e_x + e_r + e_x + e_r) + 74 * e_x


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.bytes_report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--op", default="", help="only ops whose name contains this text ('adapter', 'gmu')")
    args = p.parse_args(argv)
    _install()
    runtime._INTERPRETING = False  # the GPU's tile settings (the kernels still run in the interpreter)
    results = {}
    # fp16 stands for bf16 here (same sizes; the interpreter cannot do bf16 arithmetic)
    for (op, measure), (label, dtype, r_dtype) in itertools.product(
            (("adapter block", adapter_block), ("gmu adapter", gmu_adapter)),
            (("fp16", torch.float16, torch.float16), ("mix", torch.float16, torch.float32))):
        if args.op not in op:
            continue
        fwd, bwd, floor_f, floor_b = measure(args.tokens, args.d, args.k, dtype, r_dtype)
        results[(op, label)] = (fwd, bwd, floor_f, floor_b)
        print(f"{op}, {label} (x/h {dtype}, r {r_dtype}), {args.tokens} tokens, d={args.d}, k={args.k}: "
              "bytes per token")
        print(f"  {'kernel':28} {'act read':>9} {'unique':>7} {'act write':>9} {'other moved':>11} {'other unique':>12}")
        for part, rows, floor in (("forward", fwd, floor_f), ("backward", bwd, floor_b)):
            act_unique = 0.0
            for row in rows:
                act_unique += row["load_act_unique"] + row["store_act_unique"]
                other = row["load_other_moved"] + row["store_other_moved"]
                other_u = row["load_other_unique"] + row["store_other_unique"]
                print(f"  {row['kernel']:28} {row['load_act_moved']:9.0f} {row['load_act_unique']:7.0f} "
                      f"{row['store_act_moved']:9.0f} {other:11.0f} {other_u:12.0f}")
            print(f"  {part}: activation bytes read or written once per kernel {act_unique:.0f} per token; "
                  f"floor {floor:.0f} ({floor / max(act_unique, 1e-9):.0%} of it is the floor)")
    return results


if __name__ == "__main__":
    main()
