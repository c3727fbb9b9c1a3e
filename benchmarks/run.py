"""ampfuse benchmarks: every backend against the baselines, in one process, with the roofline.

    python -m benchmarks.run --suite adapter        # adapter block, docs/design.md section 5 sizes
    python -m benchmarks.run --suite all --quick    # small sizes: the CPU smoke CI runs
    python -m benchmarks.run --sizes headline      # the headline shapes, what a GPU session runs

Suites: adapter (fused adapter block vs eager reference, torch.compile default and max-autotune,
the adapters library's Adapter), gmu, fusion (the multimodal ops vs eager and torch.compile),
e2e (BERT-base shape, frozen, adapters in every layer or the top half, batch 32 x 128, bf16
autocast: a training step and an inference pass, against adapters-library adapters and against
no adapters). Rows: median ms, achieved GB/s, % of roofline, kernel launches per call (CUDA
profiler), peak memory of training rows, and the ratio to every baseline of the same size.
Writes results.json, results.md and a plot (time vs tokens) to --out. On a CPU the numbers are
labelled as CPU numbers and only show that the scripts run.
"""

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch

SUITES = ("adapter", "gmu", "fusion", "e2e")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ----------------------------------------------------------------------------- timing and ceilings

def bench(fn, device, reps=None):
    """Median milliseconds of fn(); on a GPU via triton.testing.do_bench (warm-up, L2 flush)."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=reps or 100, return_mode="median"))
    fn()
    times = []
    for _ in range(reps or 5):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def count_launches(fn, device):
    """CUDA kernels one call of fn launches (profiler), None on the CPU."""
    profiled = kernel_profile(fn, device, calls=1)  # a count needs one call (e2e's are whole training steps)
    return None if profiled is None else profiled[0]


def kernel_profile(fn, device, calls=5):
    """(kernels one call of fn launches, [[kernel name, median us of its time per call], ...] in launch order)
    from the profiler's CUDA events over ``calls`` calls; None on the CPU. The per-kernel split shows where a
    fused op's time goes: a small latency-bound kernel (docs/design.md, rule 8) next to the streaming ones."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    events = [(e.name, e.time_range.elapsed_us()) for e in prof.events()
              if e.device_type == torch.autograd.DeviceType.CUDA]
    return len(events) // calls, per_kernel_us(events, calls)


def per_kernel_us(events, calls):
    """[[name, median us per call]] in first-launch order, from (name, us) events of ``calls`` calls; a kernel
    launched several times a call counts the sum of its launches in that call."""
    per_call = len(events) // calls
    totals = {}
    for index, (name, us) in enumerate(events[:per_call * calls]):
        totals.setdefault(name, [0.0] * calls)[index // per_call] += us
    return [[name, statistics.median(times)] for name, times in totals.items()]


def ceilings(device):
    """(copy GB/s counting read + write, bf16 matmul TFLOP/s), measured on this device."""
    n = (1 << 28) if device.type == "cuda" else (1 << 22)
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    copy_ms = bench(lambda: dst.copy_(src), device)
    m = 8192 if device.type == "cuda" else 512
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = torch.randn(m, m, device=device, dtype=dtype), torch.randn(m, m, device=device, dtype=dtype)
    mm_ms = bench(lambda: a @ b, device)
    return 2 * src.numel() * src.element_size() / copy_ms / 1e6, 2 * m ** 3 / mm_ms / 1e9


class Rotating:
    """Several copies of the inputs, used in turn, so that small sizes do not run from L2."""

    def __init__(self, make, device, min_bytes=256 << 20):
        first = make()
        size = sum(t.numel() * t.element_size() for t in first.values() if isinstance(t, torch.Tensor))
        count = 1 if device.type != "cuda" else max(1, min(16, min_bytes // max(size, 1)))
        self.sets, self.i = [first] + [make() for _ in range(count - 1)], 0

    def next(self):
        self.i = (self.i + 1) % len(self.sets)
        return self.sets[self.i]


# ----------------------------------------------------------------------------- op suites

def adapter_cases(sizes, device):
    if sizes == "quick":
        return [(256, 96, 16)] if device.type == "cpu" else [(4096, 768, 64)]
    if sizes == "headline":  # docs/design.md's headline shape (d=768, k=64) over N
        return [(n, 768, 64) for n in (4096, 16384, 65536)]
    return [(n, d, k) for d in (384, 768, 1024) for k in (16, 64, 256) for n in (1024, 4096, 16384, 65536)]


def fused_adapter(backend):
    """The adapter block on ``backend`` over a case's tensors (adapter_inputs' names), as every benchmark calls it."""
    from ampfuse.ops.adapter_block import adapter_block

    return lambda t: adapter_block(t["h"], t["r"], t["ln_w"], t["ln_b"], t["wd"], t["bd"], t["wu"], t["bu"],
                                   backend=backend)


def adapter_implementations(device, dtype, sizes):
    from ampfuse.ops.adapter_block import adapter_block_reference

    def reference(t):
        return adapter_block_reference(t["h"], t["r"], t["ln_w"], t["ln_b"], t["wd"], t["bd"], t["wu"], t["bu"],
                                       activation="relu", ln_eps=1e-12)

    impls = {"eager": reference}
    if device.type == "cuda":
        impls["ampfuse-triton"] = fused_adapter("triton")
        from ampfuse.backend import why_unavailable
        if why_unavailable("cuda", device, dtype) is None:
            impls["ampfuse-cuda"] = fused_adapter("cuda")
    else:
        impls["ampfuse-torch"] = fused_adapter("torch")
    impls["torch.compile"] = torch.compile(reference)
    if sizes != "quick":
        impls["torch.compile max-autotune"] = torch.compile(reference, mode="max-autotune")
    hub = adapters_library_block(device)
    if hub is not None:
        impls["adapters library"] = hub
    return impls


def adapters_library_block(device):
    """The adapters library's own Adapter module run as its bottleneck layer runs it (Pfeiffer:
    pre_forward, forward, post_forward), with the benchmark's tensors as its weights
    (functional_call), so every row computes the same function and the same gradients."""
    try:
        import torch.nn.functional as F
        from adapters import SeqBnConfig
        from adapters.methods.modeling import Adapter
    except Exception:  # noqa: BLE001 - optional baseline
        return None
    modules = {}

    def run(t):
        d, k = t["h"].shape[-1], t["wd"].shape[0]
        if (d, k) not in modules:
            modules[(d, k)] = Adapter("bench", d, k, SeqBnConfig(reduction_factor=d / k)).to(device)
        module = modules[(d, k)]
        weights = {"adapter_down.0.weight": t["wd"], "adapter_down.0.bias": t["bd"], "adapter_up.weight": t["wu"],
                   "adapter_up.bias": t["bu"]}
        ln = lambda x: F.layer_norm(x, (d,), t["ln_w"], t["ln_b"], 1e-12)  # noqa: E731
        h, _, residual = module.pre_forward(t["h"], t["r"], ln)
        out, _, _ = torch.func.functional_call(module, weights, (h, residual))
        return module.post_forward(out, None, t["r"], ln)

    return run


def adapter_inputs(n, d, k, dtype, device, mix=False):
    """Inputs of one adapter-block call; ``mix``: autocast's layout, h in ``dtype``, r and the parameters
    in fp32 (what a BERT sub-layer hands the op under bf16 autocast)."""
    def make():
        g = dict(device=device, dtype=dtype)
        p = dict(device=device, dtype=torch.float32 if mix else dtype)
        return dict(h=torch.randn(n, d, **g).requires_grad_(), r=torch.randn(n, d, **p).requires_grad_(),
                    ln_w=torch.randn(d, **p) * 0.1 + 1, ln_b=torch.randn(d, **p) * 0.1,
                    wd=(torch.randn(k, d, **p) * d ** -0.5).requires_grad_(), bd=torch.zeros(k, **p).requires_grad_(),
                    wu=(torch.randn(d, k, **p) * k ** -0.5).requires_grad_(), bu=torch.zeros(d, **p).requires_grad_())
    return make


def run_op_suite(name, cases, impls_for, inputs_for, bytes_for, flops_for, device, dtype, sizes, ceil, log, emit,
                 mix=False, only=None):
    """Times every implementation on every case (those named in ``only``, when given); each row goes to
    emit as soon as it is measured. With ``mix`` (16-bit dtypes on a GPU) every case runs a second time in
    autocast's dtype layout. Each row also gives the call replayed as a CUDA graph (host time removed),
    where it can be captured."""
    impls = impls_for(device, dtype, sizes)
    if only:
        log(f"  {name}: only {', '.join(n for n in impls if n in only)} (not here: "
            f"{', '.join(n for n in only if n not in impls) or 'none'})")
        impls = {n: fn for n, fn in impls.items() if n in only}
    layouts = [False] + ([True] if mix and device.type == "cuda" and dtype != torch.float32 else [])
    for case in cases:
        for layout in layouts:
            rot = Rotating(inputs_for(*case, dtype, device, **({"mix": True} if layout else {})), device)
            for mode in ("forward", "forward+backward"):
                for impl, fn in impls.items():
                    call = _call(fn, rot, mode)
                    try:
                        ms = bench(call, device)
                        launches, kernels = kernel_profile(call, device) or (None, None)
                    except Exception as exc:  # noqa: BLE001 - a baseline that cannot run this size
                        log(f"  {name} {impl} {mode} {case}: skipped ({type(exc).__name__}: {exc})")
                        continue
                    graph = graph_ms(fn, rot, mode, device)
                    nbytes = bytes_for(*case, dtype, mode, **({"mix": True} if layout else {}))
                    flops = flops_for(*case, mode)
                    roof_ms = max(nbytes / ceil["copy_GBps"] / 1e6, flops / ceil["matmul_TFLOPs"] / 1e9)
                    label = str(dtype).replace("torch.", "") + (" mix" if layout else "")
                    emit(dict(suite=name, op=name, mode=mode, backend=impl, dtype=label, shape=list(case),
                              median_ms=ms, graph_ms=graph, GBps=nbytes / ms / 1e6, roofline_pct=100 * roof_ms / ms,
                              launches=launches, kernel_us=kernels))
                    log(f"  {name:8} {mode:17} {label:10} {str(case):22} {impl:28} {ms:9.4f} ms "
                        f"{'' if graph is None else f'(graph {graph:.4f})'} {100 * roof_ms / ms:6.1f}% roof")


def graph_ms(fn, rot, mode, device):
    """Median ms of the call captured once as a CUDA graph and replayed (one input set), None on the CPU
    or where capture fails: what the GPU work takes without the host."""
    if device.type != "cuda":
        return None
    t = rot.next()
    call = _call(fn, type("Fixed", (), {"next": lambda self: t})(), mode)
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                call()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            call()
        return bench(graph.replay, device)
    except Exception:  # noqa: BLE001 - e.g. a baseline that synchronises inside
        return None


def _call(fn, rot, mode):
    if mode == "forward":
        def forward():
            with torch.no_grad():
                fn(rot.next())
        return forward

    def step():
        t = rot.next()
        out = fn(t)
        # every input that requires grad, list inputs (the GMU's and fusion's weights) included
        leaves = [p for v in t.values() for p in (v if isinstance(v, list) else [v])
                  if isinstance(p, torch.Tensor) and p.requires_grad]
        torch.autograd.grad(out, leaves, out.detach(), allow_unused=True)
    return step


def add_ratios(rows, key):
    """speedup_vs[baseline] = baseline ms / this row's ms, for rows of the same shape and mode."""
    groups = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in key) + (tuple(row["shape"]),), []).append(row)
    for group in groups.values():
        for row in group:
            row["speedup_vs"] = {o["backend"]: o["median_ms"] / row["median_ms"] for o in group if o is not row}


def adapter_bytes(n, d, k, dtype, mode, mix=False):
    """docs/design.md section 4's floor: forward reads h, r and writes y; backward reads dy, h, r and writes
    dh, dr (plus the weights once each way). In autocast's layout r, y, dy, dr and the weights are fp32."""
    e = torch.tensor([], dtype=dtype).element_size()
    e_r = 4 if mix else e  # r, y = h + r, dy, dr, parameters
    weights = e_r * (2 * d * k + 3 * d + k)
    forward = n * d * (e + e_r + e_r) + weights
    backward = n * d * (e_r + e + e_r + e + e_r) + 2 * weights
    return forward if mode == "forward" else forward + backward


def adapter_flops(n, d, k, mode):
    return 4 * n * d * k * (1 if mode == "forward" else 3)


def gmu_cases(sizes, device):
    if sizes == "quick":
        return [(4, 24, 96, 16)] if device.type == "cpu" else [(32, 128, 768, 64)]
    if sizes == "headline":
        return [(b, 128, 768, 64) for b in (32, 128)]
    return [(b, 128, d, k) for d in (384, 768, 1024) for k in (16, 64) for b in (8, 32, 128, 512)]


def gmu_inputs(b, t, d, k, dtype, device, mix=False):
    """The gmu suite's tensors: text, a token-aligned 74-wide and a per-sample 35-wide modality (frozen features),
    softmax gate, stream LayerNorms, the sub-layer's LayerNorm fused. ``mix``: autocast's layout, x and the
    modalities in ``dtype``, r and the parameters in fp32."""
    sizes = [d, 74, 35]
    p_dtype = torch.float32 if mix else dtype

    def make():
        g = dict(device=device, dtype=p_dtype)
        req = lambda x: x.requires_grad_()  # noqa: E731
        return dict(x=req(torch.randn(b, t, d, device=device, dtype=dtype)),
                    modalities=[torch.randn(b, t, 74, device=device, dtype=dtype),
                                torch.randn(b, 35, device=device, dtype=dtype)],
                    stream_w=[req(torch.randn(k, s, **g) * s ** -0.5) for s in sizes],
                    stream_b=[req(torch.zeros(k, **g)) for _ in sizes],
                    stream_ln_w=[req(torch.ones(s, **g)) for s in sizes],
                    stream_ln_b=[req(torch.zeros(s, **g)) for s in sizes],
                    gate_w=req(torch.randn(3, k, 3 * k, **g) * (3 * k) ** -0.5), gate_b=req(torch.zeros(3, k, **g)),
                    w_up=req(torch.randn(d, k, **g) * k ** -0.5), b_up=req(torch.zeros(d, **g)),
                    r=req(torch.randn(b, t, d, **g)), ln_weight=torch.ones(d, **g), ln_bias=torch.zeros(d, **g))
    return make


def gmu_implementations(device, dtype, sizes):
    from ampfuse.ops.gmu import gmu_adapter, gmu_adapter_reference

    def reference(t):
        return gmu_adapter_reference(**t, gate="softmax", activation="relu")

    impls = {"eager": reference,
             ("ampfuse-triton" if device.type == "cuda" else "ampfuse-torch"):
                 lambda t: gmu_adapter(**t, gate="softmax", backend="triton" if device.type == "cuda" else "torch"),
             "torch.compile": torch.compile(reference)}
    if sizes != "quick":
        impls["torch.compile max-autotune"] = torch.compile(reference, mode="max-autotune")
    return impls


def gmu_bytes(b, t, d, k, dtype, mode, mix=False):
    """Activation bytes of one call: forward reads x, r and the token-aligned modality and writes y (in the dtype
    of x + r); backward reads dy, x, r and the modality and writes dx, dr. The per-sample modality (b x 35) and
    the weights add little."""
    e = torch.tensor([], dtype=dtype).element_size()
    e_r = 4 if mix else e
    e_y = max(e, e_r)
    n = b * t
    if mode == "forward":
        return n * ((e + e_r + e_y) * d + e * 74) + b * 35 * e
    return n * ((e_y + 2 * e + 2 * e_r) * d + e * 74) + b * 35 * e


def gmu_flops(b, t, d, k, mode):
    n = b * t
    fwd = 2 * n * k * (d + 74 + 3 * 3 * k + d) + 2 * b * k * 35
    return fwd if mode == "forward" else 3 * fwd


FUSION_WIDTHS = (74, 35)  # the modalities: CMU-MOSEI's audio (COVAREP) and visual (FACET) feature widths


def fusion_cases(sizes, device):
    if sizes == "quick":
        return [(64, 96)] if device.type == "cpu" else [(4096, 768)]
    if sizes == "headline":
        return [(n, 768) for n in (4096, 16384)]
    return [(n, d) for d in (384, 768, 1024) for n in (1024, 4096, 16384)]


def fusion_inputs(n, d, dtype, device, mix=False):
    """Inputs of one fusion call; ``mix``: autocast's layout, x and the modalities in ``dtype``, the parameters
    in fp32, and every implementation called under autocast (the "autocast" entry says so)."""
    def make():
        g = dict(device=device, dtype=dtype)
        p = dict(device=device, dtype=torch.float32 if mix else dtype)
        req = lambda x: x.requires_grad_()  # noqa: E731
        mods = [torch.randn(1, n, w, **g) for w in FUSION_WIDTHS]
        return dict(x=req(torch.randn(1, n, d, **g)), modalities=mods,
                    gate_w=[req(torch.randn(d, d + w, **p) * d ** -0.5) for w in FUSION_WIDTHS],
                    gate_b=[req(torch.zeros(d, **p)) for _ in FUSION_WIDTHS],
                    proj_w=[req(torch.randn(d, w, **p) * 0.1) for w in FUSION_WIDTHS],
                    proj_b=[req(torch.zeros(d, **p)) for _ in FUSION_WIDTHS],
                    ln_weight=req(torch.ones(d, **p)), ln_bias=req(torch.zeros(d, **p)), autocast=mix)
    return make


def fusion_implementations(device, dtype, sizes):
    from ampfuse.ops.fusion import fusion_layer, fusion_layer_reference

    def reference(t):
        return fusion_layer_reference(**t, beta=0.5)

    def under_autocast(fn):  # the "mix" layout: the call runs under autocast, as in a model trained with it
        def run(t):
            tensors = {k: v for k, v in t.items() if k != "autocast"}
            with torch.autocast(device.type, dtype=dtype, enabled=t["autocast"]):
                return fn(tensors)
        return run

    impls = {"eager": reference,
             ("ampfuse-triton" if device.type == "cuda" else "ampfuse-torch"):
                 lambda t: fusion_layer(**t, beta=0.5, backend="triton" if device.type == "cuda" else "torch"),
             "torch.compile": torch.compile(reference)}
    if sizes != "quick":
        impls["torch.compile max-autotune"] = torch.compile(reference, mode="max-autotune")
    return {name: under_autocast(fn) for name, fn in impls.items()}


def fusion_bytes(n, d, dtype, mode, mix=False):
    """Least traffic: read x and the modalities, write y (fp32 in the mix), the parameters once; backward
    reads dy, x and the modalities again, writes dx and the parameters' gradients."""
    e = torch.tensor([], dtype=dtype).element_size()
    e_p = 4 if mix else e  # y, dy and the parameters
    weights = e_p * (sum(d * (d + 2 * w) + 2 * d for w in FUSION_WIDTHS) + 2 * d)
    m = sum(FUSION_WIDTHS)
    forward = e * n * (d + m) + e_p * n * d + weights
    return forward if mode == "forward" else forward + e_p * n * d + e * n * (2 * d + m) + 2 * weights


def fusion_flops(n, d, mode):
    """The GEMMs: [x; m_i] W_gi^T and m_i W_pi^T per modality; backward (minimal: the forward's products
    saved) twice that."""
    forward = 2 * n * d * sum(d + 2 * w for w in FUSION_WIDTHS)
    return forward if mode == "forward" else 3 * forward


# ----------------------------------------------------------------------------- end to end

def run_e2e(device, sizes, log, emit):
    import copy

    import transformers

    import ampfuse

    if sizes == "quick":
        config = transformers.BertConfig(vocab_size=1000, hidden_size=96, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=192)
        batch, seq = 4, 16
    else:
        config = transformers.BertConfig()  # BERT-base shape: 12 layers, d=768
        batch, seq = 32, 128
    torch.manual_seed(0)
    base = transformers.BertModel(config).to(device).eval()
    ids = torch.randint(0, config.vocab_size, (batch, seq), device=device)
    variants = {"no adapters": lambda m: m.requires_grad_(False)}
    for backend in (["triton"] if device.type == "cuda" else ["torch"]):
        variants[f"ampfuse-{backend} all layers"] = lambda m, b=backend: (
            ampfuse.patch(m, ampfuse.AdapterConfig.pfeiffer(reduction_factor=12)), b)
        variants[f"ampfuse-{backend} top half"] = lambda m, b=backend: (
            ampfuse.patch(m, ampfuse.AdapterConfig.pfeiffer(reduction_factor=12,
                                                            layers=list(range(config.num_hidden_layers // 2,
                                                                              config.num_hidden_layers)))), b)
    try:
        import adapters

        def hub(m):
            adapters.init(m)
            m.add_adapter("bench", config=adapters.SeqBnConfig(reduction_factor=12))
            m.train_adapter("bench")
            return m
        variants["adapters library all layers"] = hub
    except Exception as exc:  # noqa: BLE001
        log(f"  e2e: adapters library unavailable ({exc})")
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    for name, build in variants.items():
        model = copy.deepcopy(base)
        built = build(model)
        backend = built[1] if isinstance(built, tuple) else None
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4) if params else None
        ctx = (lambda b=backend: ampfuse.use_backend(b) if b else contextlib.nullcontext())  # noqa: E731

        def train_step():
            with ctx(), torch.autocast(**autocast):
                loss = model(input_ids=ids).last_hidden_state.float().square().mean()
            if opt is not None:
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

        def infer():
            with torch.no_grad(), ctx(), torch.autocast(**autocast):
                model(input_ids=ids)

        # a model with nothing to train has no training step to time (it would be a forward only)
        modes = (("training step", train_step),) * (opt is not None) + (("inference", infer),)
        for mode, fn in modes:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            ms = bench(fn, device, reps=20 if device.type == "cuda" else 3)
            peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
            emit(dict(suite="e2e", op="bert", mode=mode, backend=name,
                      dtype="bf16 autocast" if device.type == "cuda" else "fp32",
                      shape=[batch, seq, config.hidden_size, config.num_hidden_layers], median_ms=ms,
                      peak_memory_bytes=peak, launches=count_launches(fn, device)))
            log(f"  e2e      {mode:17} {name:34} {ms:9.3f} ms")


# ----------------------------------------------------------------------------- report

def write_report(rows, header, out, with_plot=True):
    add_ratios(rows, key=("suite", "mode", "dtype"))
    os.makedirs(out, exist_ok=True)
    stem = "results"
    with open(os.path.join(out, f"{stem}.json"), "w") as f:
        json.dump({**header, "rows": rows}, f, indent=2)
    lines = [f"# ampfuse benchmarks ({header['device_name']})", "",
             f"{header['date']}; torch {header['torch']}, triton {header['triton']}, transformers "
             f"{header['transformers']}; ceilings: copy {header['copy_GBps']:.0f} GB/s, matmul "
             f"{header['matmul_TFLOPs']:.1f} TFLOP/s; command `{header['command']}`", ""]
    if header["device"] == "cpu":
        lines += ["**CPU numbers**: they show that the scripts run, not how fast the kernels are.", ""]
    lines += ["| suite | mode | backend | dtype | shape | median ms | CUDA graph ms | GB/s | % roofline | launches "
              "| time / eager (e2e: / no adapters) |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        vs = r.get("speedup_vs", {}).get("eager") or r.get("speedup_vs", {}).get("no adapters")
        graph = r.get("graph_ms")
        lines.append(f"| {r['suite']} | {r['mode']} | {r['backend']} | {r['dtype']} | {r['shape']} | "
                     f"{r['median_ms']:.4f} | {'' if graph is None else f'{graph:.4f}'} | "
                     f"{r.get('GBps', float('nan')):.0f} | "
                     f"{r.get('roofline_pct', float('nan')):.1f} | {r.get('launches')} | "
                     f"{'' if vs is None else f'{1 / vs:.2f}x time'} |")
    split = [r for r in rows if r.get("kernel_us") and r["backend"].startswith("ampfuse")]
    if split:
        lines += ["", "Each ampfuse row's kernels (profiler, median us per call of 5 calls):", "",
                  "| suite | mode | backend | dtype | shape | kernels (us) |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['suite']} | {r['mode']} | {r['backend']} | {r['dtype']} | {r['shape']} | "
                  + "; ".join(f"{name} {us:.1f}" for name, us in r["kernel_us"]) + " |" for r in split]
    with open(os.path.join(out, f"{stem}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    if with_plot:
        plot(rows, os.path.join(out, f"{stem}.png"), header)


def plot(rows, path, header):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = [r for r in rows if r["suite"] == "adapter" and r["mode"] == "forward+backward"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = {}
    for r in ops:
        series.setdefault((r["backend"], r["shape"][1], r["shape"][2]), []).append((r["shape"][0], r["median_ms"]))
    for (backend, d, k), points in sorted(series.items()):
        if d == (768 if header["device"] != "cpu" else ops[0]["shape"][1]):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"{backend} (d={d}, k={k})")
    ax.set(xscale="log", yscale="log", xlabel="tokens", ylabel="median ms",
           title=f"adapter block forward+backward, {header['device_name']}")
    if series:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", default="all", choices=[*SUITES, "all"])
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--sizes", default="full", choices=["quick", "headline", "full"],
                   help="quick: one small size per suite (the CI smoke); headline: docs/design.md's headline shapes "
                        "(fits a 10-minute GPU lease); full: the whole grid")
    p.add_argument("--quick", action="store_const", dest="sizes", const="quick", help="same as --sizes quick")
    p.add_argument("--impls", default=None, type=lambda text: [n.strip() for n in text.split(",") if n.strip()],
                   help="time only these implementations of the op suites, comma-separated (e.g. "
                        "'eager,ampfuse-triton,torch.compile' to leave max-autotune's minutes of compiling out of a "
                        "short GPU lease; e2e runs whole); default: all")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None, help="output folder (default benchmarks/results/<gpu>-<date> or a "
                                                "cpu-smoke folder)")
    args = p.parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    dtype = DTYPES[args.dtype] if device.type == "cuda" else torch.float32
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    copy_gbps, mm_tflops = ceilings(device)
    ceil = {"copy_GBps": copy_gbps, "matmul_TFLOPs": mm_tflops}
    log(f"device {device}: copy {copy_gbps:.0f} GB/s, matmul {mm_tflops:.2f} TFLOP/s")
    import transformers

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or 'cpu'})"
    header = dict(device=device.type, device_name=name, date=datetime.date.today().isoformat(),
                  torch=torch.__version__, triton=triton_version, transformers=transformers.__version__,
                  command=" ".join(["python -m benchmarks.run", *(argv if argv is not None else sys.argv[1:])]),
                  **ceil)
    out = args.out or os.path.join("benchmarks", "results",
                                   f"{name.replace(' ', '-')}-{header['date']}" if device.type == "cuda"
                                   else "cpu-smoke")
    rows = []

    def emit(row):
        # the report is rewritten after every row, so a run cut by a time limit keeps what it measured
        rows.append(row)
        write_report(rows, header, out, with_plot=False)

    suites = SUITES if args.suite == "all" else [args.suite]
    if "adapter" in suites:
        run_op_suite("adapter", adapter_cases(args.sizes, device), adapter_implementations, adapter_inputs,
                     adapter_bytes, adapter_flops, device, dtype, args.sizes, ceil, log, emit, mix=True,
                     only=args.impls)
    if "gmu" in suites:
        run_op_suite("gmu", gmu_cases(args.sizes, device), gmu_implementations, gmu_inputs, gmu_bytes, gmu_flops,
                     device, dtype, args.sizes, ceil, log, emit, mix=True, only=args.impls)
    if "fusion" in suites:
        run_op_suite("fusion", fusion_cases(args.sizes, device), fusion_implementations, fusion_inputs, fusion_bytes,
                     fusion_flops, device, dtype, args.sizes, ceil, log, emit, mix=True, only=args.impls)
    if "e2e" in suites:
        run_e2e(device, args.sizes, log, emit)
    write_report(rows, header, out)
    log(f"wrote {out}/results.json, results.md, results.png")
    return rows


if __name__ == "__main__":
    main()
