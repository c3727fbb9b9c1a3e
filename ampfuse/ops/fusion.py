"""Layer-wise fusion (DESIGN.md section 3b): the multimodal adaptation gate between BERT layers.

For text states x (B, T, d) and token-aligned modalities m (B, T, d_m):

    g_m   = relu([x; m] W_gm^T + b_gm)                    (d-wide gate per modality)
    shift = sum_m g_m * (m W_m^T + b_m)
    alpha = min(beta * ||x|| / (||shift|| + eps), 1)      (per token: the shift never outgrows x)
    y     = dropout(LN(x + alpha * shift))                (LN with its own trainable parameters)
"""

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _checks, backend as _backend


def fusion_shift(x, modalities, gate_w, gate_b, proj_w, proj_b):
    """sum_m relu([x; m] W_gm^T + b_gm) * (m W_m^T + b_m)."""
    shift = 0
    for m, gw, gb, pw, pb in zip(modalities, gate_w, gate_b, proj_w, proj_b):
        shift = shift + F.relu(F.linear(torch.cat([x, m], dim=-1), gw, gb)) * F.linear(m, pw, pb)
    return shift


def fusion_layer_reference(x, modalities, gate_w, gate_b, proj_w, proj_b, ln_weight, ln_bias, *, beta=1.0,
                           eps=1e-6, ln_eps=1e-12, dropout_p=0.0, training=False):
    """Plain-PyTorch fusion layer: the oracle of the tests and the CPU path."""
    shift = fusion_shift(x, modalities, gate_w, gate_b, proj_w, proj_b)
    alpha = torch.clamp(beta * x.norm(dim=-1, keepdim=True) / (shift.norm(dim=-1, keepdim=True) + eps), max=1.0)
    y = F.layer_norm(x + alpha * shift, x.shape[-1:], ln_weight, ln_bias, ln_eps)
    return F.dropout(y, dropout_p, training=training) if dropout_p > 0 else y


def fusion_layer(x: Tensor, modalities: Sequence[Tensor], gate_w: Sequence[Tensor], gate_b: Sequence[Tensor],
                 proj_w: Sequence[Tensor], proj_b: Sequence[Tensor], ln_weight: Tensor, ln_bias: Tensor, *,
                 beta: float = 1.0, eps: float = 1e-6, ln_eps: float = 1e-12, dropout_p: float = 0.0,
                 training: bool = False, backend: Optional[str] = None) -> Tensor:
    """Fusion layer (see the module docstring). x: (B, T, d); modalities[m]: (B, T, d_m);
    gate_w[m]: (d, d + d_m), gate_b[m]: (d,), proj_w[m]: (d, d_m), proj_b[m]: (d,); ln_*: (d,)."""
    _checks.tensor("x", x)
    if x.dim() != 3:
        raise ValueError(f"x must have shape (batch, tokens, d), got {tuple(x.shape)}")
    d, dev = x.shape[-1], x.device
    if not 1 <= len(modalities) <= 4 or not len(modalities) == len(gate_w) == len(gate_b) == len(proj_w) == len(
            proj_b):
        raise ValueError("fusion_layer takes 1 to 4 modalities and one gate_w, gate_b, proj_w, proj_b for each")
    for i, m in enumerate(modalities):
        _checks.tensor(f"modalities[{i}]", m, device=dev)
        if m.dim() != 3 or m.shape[:2] != x.shape[:2]:
            raise ValueError(f"modalities[{i}] must be token-aligned {tuple(x.shape[:2])} + (d_m,), "
                             f"got {tuple(m.shape)}")
        dm = m.shape[-1]
        _checks.tensor(f"gate_w[{i}]", gate_w[i], shape=(d, d + dm), device=dev)
        _checks.tensor(f"gate_b[{i}]", gate_b[i], shape=(d,), device=dev)
        _checks.tensor(f"proj_w[{i}]", proj_w[i], shape=(d, dm), device=dev)
        _checks.tensor(f"proj_b[{i}]", proj_b[i], shape=(d,), device=dev)
    _checks.tensor("ln_weight", ln_weight, shape=(d,), device=dev)
    _checks.tensor("ln_bias", ln_bias, shape=(d,), device=dev)
    dropout_p = _checks.probability("dropout_p", dropout_p) if training else 0.0
    name = _backend.resolve(dev, x.dtype, backend, op="fusion_layer")
    kwargs = dict(beta=beta, eps=eps, ln_eps=ln_eps, dropout_p=dropout_p, training=training)
    if name == "torch":
        return fusion_layer_reference(x, list(modalities), list(gate_w), list(gate_b), list(proj_w), list(proj_b),
                                      ln_weight, ln_bias, **kwargs)
    from .fusion_fused import fusion_layer_fused
    return fusion_layer_fused(x, list(modalities), list(gate_w), list(gate_b), list(proj_w), list(proj_b),
                              ln_weight, ln_bias, backend=name, **kwargs)
