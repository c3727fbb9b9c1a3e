"""Launch-setting A/B runs for a GPU session: the adapter block at the headline shape under each setting.

    python -m benchmarks.tune [--label NAME] [--out DIR] [--sizes 4096,16384,65536] [--settings 2/3,3/3] [--quick]

The streaming kernels' software-pipelining stages are runtime settings (kernels/runtime.py): STREAM_STAGES
(the adapter forward and the backward's column kernel) and ROW_PASS_STAGES (the backward's row kernel), read
at each call, so one process times every setting against the default on the same warm GPU. Each row: the
setting, N (d = 768, k = 64), the dtype layout (bf16, and autocast's mix: bf16 h, fp32 r and parameters),
the mode (forward, forward+backward), the median ms (triton.testing.do_bench over rotating inputs), the %
of the copy ceiling measured at the start, and each kernel's time (profiler). Every setting used here
compiles for sm_90 without a spill under triton 3.6 and 3.8 at the headline shape (README, "Tuning on a
GPU"). A setting that is a source edit (the walk direction of the forward's out pass) is a second run with
another --label. Rows are appended to DIR/tune.jsonl as they are measured (a lease that ends mid-run keeps
them) and the whole table is printed at the end. Each new setting compiles its kernels on its first call
(seconds each), so all six settings at three sizes take minutes: pick with --settings and --sizes on a
short lease.

On a CPU (Triton's interpreter, TRITON_INTERPRET=1) it runs at a tiny size as a smoke test (--quick): the
interpreter ignores stages, so its numbers say nothing.
"""

import argparse
import json
import os
import time

import torch

from benchmarks import run

# (STREAM_STAGES, ROW_PASS_STAGES): the defaults first, then one change at a time
SETTINGS = ((2, 3), (1, 3), (3, 3), (4, 3), (2, 2), (2, 4))
HEADLINE = (768, 64)


def rows_for(label, sizes, device, ceil, emit, settings=SETTINGS, shape=HEADLINE, reps=None):
    """Times each setting at each size, layout and mode, emitting a row each; the settings are restored after."""
    from ampfuse.kernels import runtime

    defaults = runtime.STREAM_STAGES, runtime.ROW_PASS_STAGES
    try:
        _time_settings(label, sizes, device, ceil, emit, settings, shape, reps)
    finally:
        runtime.STREAM_STAGES, runtime.ROW_PASS_STAGES = defaults


def _time_settings(label, sizes, device, ceil, emit, settings, shape, reps):
    from ampfuse.kernels import runtime

    fused = run.fused_adapter("triton")
    d, k = shape
    # bf16 on a GPU; fp16 in the interpreter, which keeps bf16 as raw bits
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float16
    name = str(dtype).replace("torch.", "")
    for n in sizes:
        for mix in (False, True):
            rot = run.Rotating(run.adapter_inputs(n, d, k, dtype, device, mix=mix), device)
            for stream, row_pass in settings:
                runtime.STREAM_STAGES, runtime.ROW_PASS_STAGES = stream, row_pass
                for mode in ("forward", "forward+backward"):
                    call = run._call(fused, rot, mode)
                    ms = run.bench(call, device, reps)
                    profiled = run.kernel_profile(call, device)
                    roof_ms = run.adapter_bytes(n, d, k, dtype, mode, mix=mix) / ceil / 1e6
                    emit(dict(label=label, stream_stages=stream, row_pass_stages=row_pass, tokens=n, d=d, k=k,
                              dtype=f"{name} mix" if mix else name, mode=mode, median_ms=ms,
                              roofline_pct=100 * roof_ms / ms, kernel_us=profiled and profiled[1]))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--label", default="default source", help="names this run's source (e.g. a sed applied)")
    parser.add_argument("--out", default="tune-out")
    parser.add_argument("--sizes", default="4096,16384,65536", help="token counts, comma-separated")
    parser.add_argument("--settings", default=",".join(f"{a}/{b}" for a, b in SETTINGS),
                        help="STREAM_STAGES/ROW_PASS_STAGES pairs, comma-separated (default: all of SETTINGS)")
    parser.add_argument("--quick", action="store_true", help="a tiny size and two settings: a smoke test")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("without a GPU, run with TRITON_INTERPRET=1 (a smoke test in Triton's interpreter)")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "tune.jsonl")
    ceil, _ = run.ceilings(device)
    print(f"{device} {torch.cuda.get_device_name() if device.type == 'cuda' else ''}; copy ceiling {ceil:.0f} GB/s; "
          f"rows to {path}", flush=True)
    rows = []

    def emit(row):
        row["date"] = time.strftime("%Y-%m-%d %H:%M")
        rows.append(row)
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"  {row['label']:16} stages {row['stream_stages']}/{row['row_pass_stages']} {row['tokens']:6} "
              f"{row['dtype']:13} {row['mode']:17} {row['median_ms']:9.4f} ms {row['roofline_pct']:6.1f}% roof",
              flush=True)

    if args.quick:
        rows_for(args.label, [40], device, ceil, emit, settings=SETTINGS[:2], shape=(96, 16), reps=1)
    else:
        settings = [tuple(int(v) for v in pair.split("/")) for pair in args.settings.split(",")]
        rows_for(args.label, [int(n) for n in args.sizes.split(",")], device, ceil, emit, settings=settings)
    print("label | stream/row stages | tokens | dtype | mode | median ms | % roofline")
    for r in rows:
        print(f"{r['label']} | {r['stream_stages']}/{r['row_pass_stages']} | {r['tokens']} | {r['dtype']} | "
              f"{r['mode']} | {r['median_ms']:.4f} | {r['roofline_pct']:.1f}")


if __name__ == "__main__":
    main()
