"""Memory accounting for training forwards: what autograd keeps for backward."""

import torch


def saved_tensor_bytes(fn, *args, exclude=(), **kwargs):
    """Runs ``fn(*args, **kwargs)`` and returns (its output, bytes autograd saved for backward).

    Counts each saved storage once; storages of the tensors in ``exclude`` (e.g. the model's
    parameters, which are kept anyway) are not counted, so the figure is the activations."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded:
            seen[(storage.data_ptr(), t.device)] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args, **kwargs)
    return out, sum(seen.values())
