"""Dtype agreement at the module boundary.

Under autocast the residual tail sees a 16-bit dense output h and an fp32 residual r (LayerNorm
runs in fp32), and eager PyTorch computes ``LayerNorm(h + r)`` in the promoted dtype. The fused
ops take one activation dtype, so the modules promote their inputs the way ``h + r`` would."""

import torch


def promoted(*tensors):
    """The tensors cast to their common promoted dtype (no copy for those already in it)."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return [t if t.dtype == dtype else t.to(dtype) for t in tensors]
