"""GMUAdapter: a bottleneck adapter whose bottleneck fuses text with K other modalities by a gate."""

from typing import Union

import torch
from torch import nn

from ..context import modality_tensors, record
from ..ops.activations import canonical
from ..ops.gmu import FORMS, GATES, gmu_adapter, gmu_adapter_reference
from . import shared


class GMUAdapter(nn.Module):
    """Multimodal adapter with a gated multimodal unit, fused with the sub-layer's LayerNorm.

    ``forward(h, r, layer_norm)`` returns ``LN(h + s * up(gate(streams)) + r)`` where the streams
    are the text ``h`` and the modalities named in ``modality_sizes`` (read from the current
    ampfuse.context.ForwardContext, which the model's forward enters). ``gate``: "sigmoid" (one
    modality) or "softmax"; ``form``: "direct" (gate the activated projections) or "gmu" (gate
    tanh(V a_j)). ``zero_init_up`` makes the adapter start as the identity. Set ``track_gates =
    True`` to keep the latest gate statistics in ``gate_stats`` (computed with the reference, so it
    costs an extra pass). Shared across layers (``MultimodalConfig(share="layers")``, made by
    ampfuse.modules.shared.share), it computes with the shared weights plus its own low-rank parts.
    """

    _ampfuse_share = None  # a shared.Link once shared across layers

    def __init__(self, hidden_size: int, modality_sizes: dict, bottleneck_size: int = 64, *,
                 activation: str = "relu", gate: str = "auto", form: str = "direct", stream_ln: bool = True,
                 scaling: Union[float, str] = 1.0, zero_init_up: bool = True, device=None, dtype=None):
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        self.modalities = list(modality_sizes)
        if not 1 <= len(self.modalities) <= 4:
            raise ValueError(f"GMUAdapter takes 1 to 4 modalities, got {self.modalities}")
        streams = 1 + len(self.modalities)
        self.gate = ("sigmoid" if streams == 2 else "softmax") if gate == "auto" else gate
        if self.gate not in GATES or (self.gate == "sigmoid" and streams != 2):
            raise ValueError(f"gate must be 'auto', 'softmax' or (with one modality) 'sigmoid', got {gate!r}")
        if form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {form!r}")
        self.form, self.activation = form, canonical(activation)
        sizes = [hidden_size, *modality_sizes.values()]
        k = bottleneck_size
        self.stream_norm = nn.ModuleList(nn.LayerNorm(s, **factory) for s in sizes) if stream_ln else None
        self.stream_down = nn.ModuleList(nn.Linear(s, k, **factory) for s in sizes)
        gates = 1 if self.gate == "sigmoid" else streams
        self.gate_weight = nn.Parameter(torch.randn(gates, k, streams * k, **factory) * (streams * k) ** -0.5)
        self.gate_bias = nn.Parameter(torch.zeros(gates, k, **factory))
        self.gmu_weight = (nn.Parameter(torch.randn(streams, k, k, **factory) * k ** -0.5) if form == "gmu"
                           else None)
        self.up = nn.Linear(k, hidden_size, **factory)
        if scaling == "learned":
            self.scaling = nn.Parameter(torch.ones(1, **factory))
        elif scaling == "channel":
            self.scaling = nn.Parameter(torch.ones(hidden_size, **factory))
        else:
            self.scaling = float(scaling)
        if zero_init_up:
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)
        self.track_gates = False
        self.gate_stats = None

    def shared_matrices(self):
        """The parameters shared across layers as W + U_l V_l^T (stacks of matrices for the gates;
        the rest are vectors)."""
        return ([f"stream_down.{j}.weight" for j in range(len(self.stream_down))] + ["gate_weight", "up.weight"]
                + (["gmu_weight"] if self.form == "gmu" else []))

    def modality_aliases(self):
        """{parameter: the parameter it shares} that makes modality streams of equal width share the
        first one's projection and LayerNorm (MultimodalConfig(share="layers+modalities"))."""
        first, aliases = {}, {}
        for j, linear in enumerate(self.stream_down):
            i = first.setdefault(linear.in_features, j) if j else 0  # the text stream (0) shares nothing
            if i != j:
                aliases.update({f"{part}.{j}.{attr}": f"{part}.{i}.{attr}" for part in ("stream_down", "stream_norm")
                                for attr in ("weight", "bias")})
        return aliases

    def _args(self):
        if self._ampfuse_share is not None:
            return self._shared_args(shared.tensors(self))
        norms = self.stream_norm
        return dict(
            stream_w=[lin.weight for lin in self.stream_down], stream_b=[lin.bias for lin in self.stream_down],
            gate_w=self.gate_weight, gate_b=self.gate_bias, w_up=self.up.weight, b_up=self.up.bias,
            gmu_w=self.gmu_weight, stream_ln_w=None if norms is None else [n.weight for n in norms],
            stream_ln_b=None if norms is None else [n.bias for n in norms], scaling=self.scaling,
            activation=self.activation, gate=self.gate)

    def _shared_args(self, t):
        """_args from the tensors a sharing adapter forms (keyed by an unshared adapter's parameter names)."""
        streams, norms = range(len(self.stream_down)), self.stream_norm is not None
        return dict(
            stream_w=[t[f"stream_down.{j}.weight"] for j in streams],
            stream_b=[t[f"stream_down.{j}.bias"] for j in streams], gate_w=t["gate_weight"],
            gate_b=t["gate_bias"], w_up=t["up.weight"], b_up=t["up.bias"],
            gmu_w=t.get("gmu_weight"), stream_ln_w=[t[f"stream_norm.{j}.weight"] for j in streams] if norms else None,
            stream_ln_b=[t[f"stream_norm.{j}.bias"] for j in streams] if norms else None,
            scaling=t.get("scaling", self.scaling), activation=self.activation, gate=self.gate)

    def forward(self, h: torch.Tensor, r: torch.Tensor, layer_norm: nn.LayerNorm) -> torch.Tensor:
        # h and r as they come (autocast: a 16-bit h, an fp32 r): the op runs that mix natively
        modalities = [m.to(h.dtype) for m in modality_tensors(self.modalities)]
        args = self._args()
        if self.track_gates:
            self.gate_stats = self.gate_statistics(h, modalities, args)
            record(self, self.gate_stats)  # this forward's own copy, safe from other threads
        return gmu_adapter(h, modalities, r=r, ln_weight=layer_norm.weight, ln_bias=layer_norm.bias,
                           ln_eps=layer_norm.eps, **args)

    @torch.no_grad()
    def gate_statistics(self, h, modalities, args=None):
        """Mean and std of the gate weight each stream gets, over tokens and bottleneck features."""
        args = args or self._args()
        _, z = gmu_adapter_reference(h.detach(), [m.detach() for m in modalities], return_gates=True, **args)
        z = torch.stack([z, 1 - z]) if self.gate == "sigmoid" else z
        names = ["text", *self.modalities]
        return {name: {"mean": z[j].float().mean().item(), "std": z[j].float().std().item()}
                for j, name in enumerate(names)}
