"""FusionLayer: the layer-wise multimodal adaptation gate between BERT layers (docs/design.md section 3b)."""

import torch
from torch import nn

from ..context import modality_tensors
from ..ops.fusion import fusion_layer


class FusionLayer(nn.Module):
    """Shifts text states by gated, norm-bounded projections of token-aligned modalities, then
    applies its own LayerNorm: ``forward(x) -> dropout(LN(x + alpha * shift))`` (modalities from
    the current ampfuse.context.ForwardContext). ``beta`` bounds the shift's norm relative to
    ``||x||``."""

    def __init__(self, hidden_size: int, modality_sizes: dict, *, beta: float = 1.0,
                 eps: float = 1e-6, dropout: float = 0.1, ln_eps: float = 1e-12, device=None, dtype=None):
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        self.modalities = list(modality_sizes)
        self.beta, self.eps, self.dropout = beta, eps, dropout
        self.gates = nn.ModuleList(nn.Linear(hidden_size + s, hidden_size, **factory)
                                   for s in modality_sizes.values())
        self.projections = nn.ModuleList(nn.Linear(s, hidden_size, **factory) for s in modality_sizes.values())
        self.norm = nn.LayerNorm(hidden_size, eps=ln_eps, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        modalities = [m.to(x.dtype) for m in modality_tensors(self.modalities)]
        return fusion_layer(x, modalities, [g.weight for g in self.gates], [g.bias for g in self.gates],
                            [p.weight for p in self.projections], [p.bias for p in self.projections],
                            self.norm.weight, self.norm.bias, beta=self.beta, eps=self.eps, ln_eps=self.norm.eps,
                            dropout_p=self.dropout, training=self.training)
