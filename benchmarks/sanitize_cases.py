"""Small cases of every fused op, for compute-sanitizer: one case per invocation, public ops only.

    python3 benchmarks/sanitize_cases.py --list
    python3 benchmarks/sanitize_cases.py CASE [CASE ...]|all [--result FILE] [--tiny]
    compute-sanitizer --tool memcheck python3 benchmarks/sanitize_cases.py adapter-triton-bf16

Each case runs its op in three phases on awkward shapes (token counts that are not a multiple of
any block, widths that are neither powers of two nor multiples of 16, bottlenecks wider than one
chunk):

    forward   inference, no autograd; y against the float64 reference
    backward  forward and the gradient of every input; y and every gradient against float64
    train     training mode (dropout where the op has it) with the inputs and the LayerNorm frozen:
              the kernels' other gradient paths; outputs must be finite

The device is synchronised after each phase and a line ``PHASE <case> <phase>`` printed before
it, so a sanitizer report in the same log falls under the phase whose kernels made it. The
numerical check is a sanity check at the tests' tolerances (the test suite is the authority on
correctness); what this script is for is giving the sanitizer every kernel to look at.

Only the public ops are called (ampfuse.adapter_block, gmu_adapter, fusion_layer, and the
references in ampfuse.ops), so the cases survive rewrites of the kernels. A case that raises is
reported as ``raised``, not a crash; a backend that cannot run here (the CUDA extension not built,
no GPU) as ``skipped``. Each case ends with one line ``CASE {json}`` (and appends it to --result).
Exit status: 0 when every case is ok or skipped, 1 otherwise, 2 for an unknown case name.

Without a GPU the Triton kernels run in Triton's CPU interpreter; bf16 arithmetic is not emulated
there, so bf16 results are not checked on the CPU (the cases still run). --tiny shrinks every
shape so that all cases run there in seconds (the CPU test of this script).
"""

import argparse
import dataclasses
import functools
import json
import os
import sys
import time
import traceback

import torch

if not torch.cuda.is_available():  # read when ampfuse's kernels are imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

# ||out - ref|| / ||ref|| against float64, per activation dtype: the test suite's bounds
# (ampfuse/testing.py), repeated here so that this script depends on the public ops alone.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2}
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@functools.cache
def package():
    """The package under test, imported when a case is built: an import error is then a case's
    result, and --list needs no import."""
    import ampfuse
    import ampfuse.ops

    return ampfuse


@dataclasses.dataclass
class Case:
    op: callable          # the public op, its backend bound
    reference: callable   # its plain-PyTorch reference (run in float64 on the CPU)
    tensors: dict         # argument name -> tensor or list of tensors, every one requiring grad
    options: dict         # non-tensor keyword arguments of both
    train: dict           # extra keyword arguments of the op in the train phase
    frozen: tuple         # tensors without gradient in the train phase
    activation_dtype: torch.dtype


class Rand:
    """Fresh random tensors from one seeded generator (never zeros: they hide unwritten outputs)."""

    def __init__(self, seed):
        self.g = torch.Generator().manual_seed(seed)

    def __call__(self, *shape, dtype, std=1.0, mean=0.0):
        t = torch.randn(*shape, generator=self.g, dtype=torch.float64) * std + mean
        return t.to(device=DEVICE, dtype=dtype).requires_grad_()


def adapter(backend, dtype, lead, d, k, *, scaling, ln_before, activation, placement, dropout_p, seed):
    """Adapter block; parameters in fp32 (as under autocast) whatever the activations' dtype."""
    rand, p = Rand(seed), torch.float32
    t = dict(h=rand(*lead, d, dtype=dtype), r=rand(*lead, d, dtype=dtype),
             ln_weight=rand(d, dtype=p, std=0.2, mean=1.0), ln_bias=rand(d, dtype=p, std=0.2),
             w_down=rand(k, d, dtype=p, std=d ** -0.5), b_down=rand(k, dtype=p, std=0.5),
             w_up=rand(d, k, dtype=p, std=k ** -0.5), b_up=rand(d, dtype=p, std=0.5))
    options = dict(activation=activation, original_ln_before=placement[0], residual_before_ln=placement[1])
    if scaling == "float":
        options["scaling"] = 0.7
    else:
        t["scaling"] = rand(d if scaling == "channel" else 1, dtype=p, std=0.2, mean=0.8)
    if ln_before:
        t["adapter_ln_weight"] = rand(d, dtype=p, std=0.2, mean=1.0)
        t["adapter_ln_bias"] = rand(d, dtype=p, std=0.2)
    ampfuse = package()
    return Case(functools.partial(ampfuse.adapter_block, backend=backend), ampfuse.adapter_block_reference, t,
                options, dict(training=True, dropout_p=dropout_p), ("h", "r", "ln_weight", "ln_bias"), dtype)


def gmu(dtype, B, T, d, k, widths, aligned, *, gate, form, stream_ln, fuse_ln, scaling, activation, seed):
    rand = Rand(seed)
    S, sizes = len(widths) + 1, [d, *widths]
    gates = 1 if gate == "sigmoid" else S
    t = dict(x=rand(B, T, d, dtype=dtype),
             modalities=[rand(B, T, w, dtype=dtype) if a else rand(B, w, dtype=dtype) for w, a in zip(widths, aligned)],
             stream_w=[rand(k, s, dtype=dtype, std=s ** -0.5) for s in sizes],
             stream_b=[rand(k, dtype=dtype, std=0.3) for _ in sizes],
             gate_w=rand(gates, k, S * k, dtype=dtype, std=(S * k) ** -0.5),
             gate_b=rand(gates, k, dtype=dtype, std=0.3),
             w_up=rand(d, k, dtype=dtype, std=k ** -0.5), b_up=rand(d, dtype=dtype, std=0.3))
    if form == "gmu":
        t["gmu_w"] = rand(S, k, k, dtype=dtype, std=k ** -0.5)
    if stream_ln:
        t["stream_ln_w"] = [rand(s, dtype=dtype, std=0.2, mean=1.0) for s in sizes]
        t["stream_ln_b"] = [rand(s, dtype=dtype, std=0.2) for s in sizes]
    if fuse_ln:
        t.update(r=rand(B, T, d, dtype=dtype), ln_weight=rand(d, dtype=dtype, std=0.2, mean=1.0),
                 ln_bias=rand(d, dtype=dtype, std=0.2))
    options = dict(gate=gate, activation=activation)
    if scaling == "float":
        options["scaling"] = 0.7
    else:
        t["scaling"] = rand(d if scaling == "channel" else 1, dtype=dtype, std=0.2, mean=0.8)
    ampfuse = package()
    return Case(functools.partial(ampfuse.gmu_adapter, backend="triton"), ampfuse.ops.gmu_adapter_reference, t,
                options, {}, ("modalities", "r", "ln_weight", "ln_bias"), dtype)


def fusion(dtype, B, T, d, widths, *, beta, dropout_p, seed):
    rand = Rand(seed)
    t = dict(x=rand(B, T, d, dtype=dtype), modalities=[rand(B, T, w, dtype=dtype) for w in widths],
             gate_w=[rand(d, d + w, dtype=dtype, std=(d + w) ** -0.5) for w in widths],
             gate_b=[rand(d, dtype=dtype, std=0.3) for _ in widths],
             proj_w=[rand(d, w, dtype=dtype, std=w ** -0.5) for w in widths],
             proj_b=[rand(d, dtype=dtype, std=0.3) for _ in widths],
             ln_weight=rand(d, dtype=dtype, std=0.2, mean=1.0), ln_bias=rand(d, dtype=dtype, std=0.2))
    ampfuse = package()
    return Case(functools.partial(ampfuse.fusion_layer, backend="triton"), ampfuse.ops.fusion_layer_reference, t,
                dict(beta=beta), dict(training=True, dropout_p=dropout_p), ("modalities", "ln_weight", "ln_bias"),
                dtype)


BF16, FP32 = torch.bfloat16, torch.float32
# Two cases per op and backend, bf16 and fp32, each with other options, so that between them they
# reach every scaling mode, both LayerNorm placements, the optional LayerNorms and several chunks
# of the bottleneck. name -> (builder, its arguments).
ADAPTER_BF16 = dict(lead=(3, 13), d=200, k=40, scaling="channel", ln_before=True, activation="gelu",
                    placement=(True, True), dropout_p=0.1, seed=1)
ADAPTER_FP32 = dict(lead=(37,), d=136, k=24, scaling="scalar", ln_before=False, activation="silu",
                    placement=(False, False), dropout_p=0.25, seed=2)
CASES = {
    "adapter-triton-bf16": (adapter, dict(backend="triton", dtype=BF16, **ADAPTER_BF16)),
    "adapter-triton-fp32": (adapter, dict(backend="triton", dtype=FP32, **ADAPTER_FP32)),
    "adapter-cuda-bf16": (adapter, dict(backend="cuda", dtype=BF16, **ADAPTER_BF16)),
    "adapter-cuda-fp32": (adapter, dict(backend="cuda", dtype=FP32, **ADAPTER_FP32)),
    "gmu-triton-bf16": (gmu, dict(dtype=BF16, B=3, T=13, d=200, k=24, widths=(20, 7, 30), aligned=(True, False, True),
                                  gate="softmax", form="gmu", stream_ln=True, fuse_ln=True, scaling="channel",
                                  activation="gelu", seed=3)),
    "gmu-triton-fp32": (gmu, dict(dtype=FP32, B=2, T=7, d=72, k=72, widths=(9,), aligned=(False,), gate="sigmoid",
                                  form="direct", stream_ln=False, fuse_ln=False, scaling="scalar", activation="relu",
                                  seed=4)),
    "fusion-triton-bf16": (fusion, dict(dtype=BF16, B=2, T=19, d=200, widths=(74, 35), beta=1.0, dropout_p=0.1,
                                        seed=5)),
    "fusion-triton-fp32": (fusion, dict(dtype=FP32, B=3, T=5, d=96, widths=(3, 17, 8, 12), beta=0.05, dropout_p=0.0,
                                        seed=6)),
}
# --tiny: a few tokens and narrow rows (still ragged, still not powers of two), so that the CPU
# smoke test of this script runs every case in Triton's interpreter in seconds.
TINY = {adapter: dict(lead=(5,), d=24, k=12), gmu: dict(B=2, T=3, d=24, k=8), fusion: dict(B=1, T=5, d=24)}


def build(name, tiny=False):
    builder, kwargs = CASES[name]
    return builder(**(kwargs | TINY[builder] if tiny else kwargs))


def leaves(tensors):
    return [t for v in tensors.values() for t in (v if isinstance(v, list) else [v])]


def mapped(fn, tensors, names=None):
    """tensors with fn applied to each tensor (lists too) of the named entries (default: all)."""
    return {name: ([fn(t) for t in v] if isinstance(v, list) else fn(v)) if names is None or name in names else v
            for name, v in tensors.items()}


def rel_err(out, ref):
    out = out.detach().to("cpu", torch.float64)
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref.detach()).norm() / ref.detach().norm().clamp_min(1e-30)).item()


def synchronize():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def run(name, case):
    """Runs the three phases; returns (status, detail, errors, seconds per phase)."""
    seconds, errors = {}, {}

    def phase(label):
        print(f"PHASE {name} {label}", flush=True)
        seconds[label] = time.perf_counter()

    def done(label):
        synchronize()
        seconds[label] = round(time.perf_counter() - seconds[label], 3)

    t, opts = case.tensors, case.options
    phase("forward")
    with torch.no_grad():
        y_inference = case.op(**t, **opts)
    done("forward")

    phase("backward")
    y = case.op(**t, **opts)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    grads = torch.autograd.grad(y, leaves(t), dy.to(y.device, y.dtype))
    done("backward")

    phase("train")
    t_train = mapped(torch.Tensor.detach, t, case.frozen)
    y_train = case.op(**t_train, **opts, **case.train)
    grads_train = torch.autograd.grad(y_train, [x for x in leaves(t_train) if x.requires_grad],
                                      dy.to(y.device, y.dtype))
    done("train")

    finite = all(torch.isfinite(x).all().item() for x in (y_train, *grads_train))
    if DEVICE.type == "cpu" and case.activation_dtype == torch.bfloat16:
        return "ok", "bf16 in the Triton interpreter: numerics not checked", errors, seconds
    ref = mapped(lambda x: x.detach().to("cpu", torch.float64).requires_grad_(), t)
    y64 = case.reference(**ref, **opts)
    grads64 = torch.autograd.grad(y64, leaves(ref), dy)
    names = [f"d{name}" + (f"[{i}]" if isinstance(v, list) else "") for name, v in t.items()
             for i in range(len(v) if isinstance(v, list) else 1)]
    errors = {"y (inference)": rel_err(y_inference, y64), "y": rel_err(y, y64)}
    errors.update({n: rel_err(g, g64) for n, g, g64 in zip(names, grads, grads64)})
    tol = TOLERANCE[case.activation_dtype]
    bad = {n: e for n, e in errors.items() if not e < tol}
    if bad or not finite:
        detail = f"over the {tol:g} tolerance: {bad}" if bad else "train phase: non-finite output or gradient"
        return "wrong", detail, errors, seconds
    return "ok", f"max relative error {max(errors.values()):.2e} (tolerance {tol:g})", errors, seconds


def run_case(name, tiny=False):
    """The case's result as a dict; never raises."""
    start = time.perf_counter()
    result = {"case": name, "device": str(DEVICE), "tiny": tiny}
    try:
        status, detail, errors, seconds = run(name, build(name, tiny))
        result.update(status=status, detail=detail, rel_errors=errors, phase_seconds=seconds)
    except Exception as exc:  # noqa: BLE001 - a failing case is a result to report, not a crash
        if type(exc).__name__ == "BackendUnavailableError":  # the backend cannot run here: not a failure
            result.update(status="skipped", detail=str(exc))
        else:
            tb = traceback.format_exc().strip().splitlines()
            result.update(status="raised", detail=f"{type(exc).__name__}: {exc}"[:2000], traceback=tb[-12:])
    result["seconds"] = round(time.perf_counter() - start, 3)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cases", nargs="*", help="case names, or 'all'")
    parser.add_argument("--list", action="store_true", help="print the case names and exit")
    parser.add_argument("--result", help="append each case's JSON line to this file")
    parser.add_argument("--tiny", action="store_true", help="shrink every shape (a smoke test on the CPU)")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(CASES))
        return 0
    names = list(CASES) if args.cases == ["all"] else args.cases
    unknown = [n for n in names if n not in CASES]
    if unknown or not names:
        parser.error(f"unknown case(s) {unknown}; choose from {list(CASES)} or 'all'" if unknown else
                     "name at least one case (or 'all', or --list)")
    failed = False
    for name in names:
        result = run_case(name, args.tiny)
        line = json.dumps(result)
        print(f"CASE {line}", flush=True)
        if args.result:
            with open(args.result, "a") as f:
                f.write(line + "\n")
        failed |= result["status"] not in ("ok", "skipped")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
