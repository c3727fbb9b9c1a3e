"""Spawn targets of the distributed tests (tests/test_distributed.py): torch.multiprocessing needs
them in an importable module. Each runs in a gloo process group on the CPU and saves what it saw
to ``out_dir`` for the test process to compare with a single-process run."""

import os

import torch
import torch.distributed as dist

import ampfuse
from ampfuse import sites
from ampfuse.testing import tiny_bert

STEPS, BATCH, SEQ, LR = 3, 4, 9, 0.05  # BATCH is the global batch; each of the 2 ranks takes half


def patched_bert(dtype=None):
    """A tiny BERT without dropout (so one process and two see the same computation), Houlsby
    adapters with moved weights. ``dtype``: the base's dtype (the adapters stay float32)."""
    model = tiny_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if dtype is not None:
        model = model.to(dtype)
    ampfuse.patch(model, ampfuse.AdapterConfig.houlsby(scaling="learned", layers=[2, 3]), dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.1)
    return model.train()


def batches(rank=None, world=2):
    """The global batch of each step, or rank ``rank``'s slice of it."""
    g = torch.Generator().manual_seed(100)
    for _ in range(STEPS):
        ids = torch.randint(0, 120, (BATCH, SEQ), generator=g)
        yield ids if rank is None else ids.chunk(world)[rank]


def loss_of(model, ids):
    # distance to a fixed target: a LayerNorm output's own mean square would hardly depend on the adapters
    hidden = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state.float()
    target = torch.randn(hidden.shape[-1], generator=torch.Generator().manual_seed(2))
    return (hidden - target).square().mean()


def train(model, ids_per_step):
    """SGD steps; returns (losses, {name: full gradient} of the first step, names of the parameters
    that got a gradient in it)."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    losses, first = [], None
    for ids in ids_per_step:
        loss = loss_of(model, ids)
        loss.backward()
        if first is None:
            first = {n: _full(p.grad) for n, p in model.named_parameters() if p.requires_grad}
            with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach().clone())
    return losses, first, with_grad


def _full(t):
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def shard(model, mp_policy=None):
    """The documented wrapping: each transformer layer a unit, then the root."""
    from torch.distributed.fsdp import fully_shard

    kwargs = {} if mp_policy is None else {"mp_policy": mp_policy}
    for layer in sites.find(model).modules:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


def count_reduced_elements(record):
    """Makes every gradient reduce-scatter add its input's element count to ``record``."""
    for name in ("reduce_scatter_single", "reduce_scatter_tensor"):
        original = getattr(dist, name, None)
        if original is not None:
            def spy(*args, _original=original, **kwargs):
                tensor = kwargs.get("input", args[1] if len(args) > 1 else None)
                record.append(tensor.numel())
                return _original(*args, **kwargs)
            setattr(dist, name, spy)


def fsdp_adapter_training(rank, world, init_file, out_dir):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    result = {}

    # 1. float32: losses and adapter gradients, to compare with one process on the global batch
    reduced = []
    count_reduced_elements(reduced)
    with ampfuse.use_backend("torch"):
        model = shard(patched_bert())
        losses, grads, with_grad = train(model, batches(rank, world))
    result["losses"] = [_mean(loss) for loss in losses]
    result["grads"], result["with_grad"] = grads, with_grad
    result["reduced_elements_per_step"] = sum(reduced) // STEPS

    # 2. save_adapters from every rank: rank 0 writes the full weights, once; then every rank loads them back
    ampfuse.save_adapters(model, os.path.join(out_dir, f"saved-by-rank{rank}"))
    dist.barrier()
    with torch.no_grad(), ampfuse.use_backend("torch"):
        ids = next(iter(batches(rank, world)))
        before = loss_of(model, ids)
        for p in model.parameters():
            if p.requires_grad:
                p.zero_()
        ampfuse.load_adapters(model, os.path.join(out_dir, "saved-by-rank0"))
        result["reloaded_loss_equal"] = bool(torch.equal(loss_of(model, ids), before))

    # 3. bfloat16 frozen base, float32 adapter master weights, computed in bfloat16, reduced in float32
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    with ampfuse.use_backend("torch"):
        model = shard(patched_bert(dtype=torch.bfloat16), policy)
        storage = {n: (p.dtype, p.requires_grad) for n, p in model.named_parameters()}
        compute = []
        for adapter in sites.adapters(sites.find(model)).values():
            adapter.register_forward_pre_hook(lambda m, args: compute.append(m.down.weight.dtype))
        initial = {n: _full(p) for n, p in model.named_parameters() if p.requires_grad}
        losses, grads, _ = train(model, batches(rank, world))
    result["mp"] = {"storage": storage, "compute": compute, "losses": [_mean(loss) for loss in losses],
                    "grad_dtypes": {n: g.dtype for n, g in grads.items()},
                    "initial": initial,
                    "final": {n: _full(p) for n, p in model.named_parameters() if p.requires_grad}}
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _mean(loss):
    """The mean of a per-rank loss over the ranks (each rank's batch slice has the same size)."""
    loss = loss.detach().clone()
    dist.all_reduce(loss)
    return loss / dist.get_world_size()
