"""BottleneckAdapter: the parameters of one fused adapter block (docs/design.md section 2)."""

import math
from typing import Optional, Union

import torch
from torch import nn

from ..ops.activations import canonical
from ..ops.adapter_block import adapter_block
from . import shared

INITS = ("houlsby", "bert", "lora")


class BottleneckAdapter(nn.Module):
    """Bottleneck adapter fused with the frozen LayerNorm of the sub-layer it sits in.

    ``forward(h, r, layer_norm)`` takes the sub-layer's output after its dense layer (h), its input
    (r) and its LayerNorm, and returns what that LayerNorm would have returned with the adapter in
    place: ``LN(s * up(f(down(LN_a(a)))) + a_res + r)``, a and a_res as set by the placement flags
    (Pfeiffer: ``original_ln_before=True``; Houlsby: ``False``).

    init: ``"houlsby"`` near-identity (truncated normal, std ``init_std`` = 1e-2, zero biases, as the
    adapters library),
    ``"bert"`` (normal, std 0.02, zero biases: the adapters library's default), ``"lora"`` (Kaiming
    uniform down-projection, zero up-projection). ``zero_init_up=True`` zeroes the up-projection
    after any init, so the adapted model starts exactly equal to the frozen one.
    scaling: a float, ``"learned"`` (one trainable scalar) or ``"channel"`` (one per hidden unit).

    Adapters shared across layers (``AdapterConfig(share="layers")``) are made from fresh ones by
    ampfuse.modules.shared.share; they then compute with the shared weights plus their own
    low-rank parts.
    """

    _ampfuse_share = None  # a shared.Link once shared across layers

    def __init__(self, hidden_size: int, bottleneck_size: Optional[int] = None, *, reduction_factor: float = 16,
                 activation: str = "relu", ln_before: bool = False, original_ln_before: bool = True,
                 residual_before_ln: bool = True, scaling: Union[float, str] = 1.0, dropout: float = 0.0,
                 init: str = "houlsby", init_std: float = 1e-2, zero_init_up: bool = False,
                 adapter_ln_eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        if bottleneck_size is None:
            bottleneck_size = max(1, int(hidden_size // reduction_factor))
        if hidden_size < 1 or bottleneck_size < 1:
            raise ValueError(f"hidden_size and bottleneck_size must be >= 1, got {hidden_size}, {bottleneck_size}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        factory = dict(device=device, dtype=dtype)
        self.hidden_size, self.bottleneck_size = hidden_size, bottleneck_size
        self.activation = canonical(activation)
        self.original_ln_before, self.residual_before_ln = original_ln_before, residual_before_ln
        self.dropout = dropout
        self.adapter_ln_eps = adapter_ln_eps
        self.adapter_norm = nn.LayerNorm(hidden_size, eps=adapter_ln_eps, **factory) if ln_before else None
        self.down = nn.Linear(hidden_size, bottleneck_size, **factory)
        self.up = nn.Linear(bottleneck_size, hidden_size, **factory)
        if scaling == "learned":
            self.scaling = nn.Parameter(torch.ones(1, **factory))
        elif scaling == "channel":
            self.scaling = nn.Parameter(torch.ones(hidden_size, **factory))
        elif isinstance(scaling, (int, float)):
            self.scaling = float(scaling)
        else:
            raise ValueError(f"scaling must be a float, 'learned' or 'channel', got {scaling!r}")
        self.reset_parameters(init, init_std, zero_init_up)

    @torch.no_grad()
    def reset_parameters(self, init: str = "houlsby", init_std: float = 1e-2, zero_init_up: bool = False):
        if init == "houlsby":
            for linear in (self.down, self.up):
                nn.init.trunc_normal_(linear.weight, std=init_std, a=-2 * init_std, b=2 * init_std)
                nn.init.zeros_(linear.bias)
        elif init == "bert":
            for linear in (self.down, self.up):
                nn.init.normal_(linear.weight, std=0.02)
                nn.init.zeros_(linear.bias)
        else:
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.down.bias)
            zero_init_up = True
        if zero_init_up:
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def shared_matrices(self):
        """The parameters shared across layers as W + U_l V_l^T (the rest are vectors)."""
        return ["down.weight", "up.weight"]

    def forward(self, h: torch.Tensor, r: torch.Tensor, layer_norm: nn.LayerNorm) -> torch.Tensor:
        w_down, b_down, w_up, b_up, scaling, ln_w, ln_b = self._tensors()
        # under autocast h is 16-bit and r fp32: the op runs that mix natively (y in the dtype of h + r)
        return adapter_block(
            h, r, layer_norm.weight, layer_norm.bias, w_down, b_down, w_up, b_up,
            scaling=scaling, adapter_ln_weight=ln_w, adapter_ln_bias=ln_b, ln_eps=layer_norm.eps,
            adapter_ln_eps=self.adapter_ln_eps, activation=self.activation,
            original_ln_before=self.original_ln_before, residual_before_ln=self.residual_before_ln,
            dropout_p=self.dropout, training=self.training)

    def _tensors(self):
        """(w_down, b_down, w_up, b_up, scaling, adapter_norm weight, bias): this adapter's own, or
        when shared across layers, those it forms from the shared ones."""
        if self._ampfuse_share is not None:
            t = shared.tensors(self)
            return (t["down.weight"], t["down.bias"], t["up.weight"], t["up.bias"], t.get("scaling", self.scaling),
                    t.get("adapter_norm.weight"), t.get("adapter_norm.bias"))
        norm = self.adapter_norm
        return (self.down.weight, self.down.bias, self.up.weight, self.up.bias, self.scaling,
                None if norm is None else norm.weight, None if norm is None else norm.bias)

    def extra_repr(self) -> str:
        scaling = self.scaling if not isinstance(self.scaling, torch.Tensor) else f"learned{tuple(self.scaling.shape)}"
        return (f"hidden_size={self.hidden_size}, bottleneck_size={self.bottleneck_size}, "
                f"activation={self.activation}, original_ln_before={self.original_ln_before}, "
                f"residual_before_ln={self.residual_before_ln}, scaling={scaling}, dropout={self.dropout}"
                + shared.describe(self))
