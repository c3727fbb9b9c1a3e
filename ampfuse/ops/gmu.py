"""The GMU adapter (DESIGN.md section 3a): text plus K modalities fused by a gate into a bottleneck.

Per token t of sample b, with text state x_t (d) and modalities m_i, token-aligned (B, T, d_i)
or per-sample (B, d_i):

    a_0 = f(LN_0(x_t) W_0^T + c_0)      a_i = f(LN_i(m_i[b or t]) W_i^T + c_i)       (width k)
    gate "sigmoid" (two streams):  z = sigmoid([a_0; a_1] G_0^T + g_0),  fused = z h_0 + (1 - z) h_1
    gate "softmax" (S = K+1 streams): z_j = softmax_j([a_0; ...; a_K] G_j^T + g_j),  fused = sum_j z_j h_j
    form "direct": h_j = a_j        form "gmu" (Arevalo et al.): h_j = tanh(a_j V_j^T)
    u = s * (fused W_up^T + c_up)
    y = LN(x + u + r)   with the sub-layer's LayerNorm (ln_weight given), else  y = x + u

Per-sample modalities are projected once per sample (B rows), never per token. A per-sample
modality given as a sequence is mean-pooled over its mask first (``masked_mean``).
"""

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _checks, backend as _backend
from ._gradients import needed, split_gradients
from .activations import ACTIVATIONS, canonical

GATES = ("sigmoid", "softmax")
FORMS = ("direct", "gmu")


def masked_mean(seq: Tensor, mask: Optional[Tensor]) -> Tensor:
    """Mean over dim 1 of (B, L, d) counting only positions where mask (B, L) is nonzero.
    A sample whose mask is all zero pools to 0."""
    if mask is None:
        return seq.mean(dim=1)
    weights = mask.to(seq.dtype).unsqueeze(-1)
    return (seq * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def gmu_streams(x, modalities, stream_w, stream_b, stream_ln_w, stream_ln_b, activation, stream_ln_eps):
    """[a_0, ..., a_K]: a_0 has x's shape[:-1] + (k,), a per-sample a_i has (B, 1, k) (broadcasts)."""
    f = ACTIVATIONS[canonical(activation)]
    streams = []
    for j, inp in enumerate([x, *modalities]):
        if stream_ln_w is not None:
            inp = F.layer_norm(inp, inp.shape[-1:], stream_ln_w[j], stream_ln_b[j], stream_ln_eps)
        a = f(F.linear(inp, stream_w[j], stream_b[j]))
        streams.append(a if a.dim() == x.dim() else a.unsqueeze(1))
    return streams


def gmu_gate(streams, gate_w, gate_b, gate, gmu_w):
    """(fused, z): z is (…, k) for the sigmoid gate and (S, …, k) for the softmax gate."""
    shape = torch.broadcast_shapes(*(a.shape for a in streams))
    cat = torch.cat([a.expand(shape) for a in streams], dim=-1)
    hs = [a if gmu_w is None else torch.tanh(F.linear(a, gmu_w[j])) for j, a in enumerate(streams)]
    if gate == "sigmoid":
        z = torch.sigmoid(F.linear(cat, gate_w[0], gate_b[0]))
        return z * hs[0] + (1 - z) * hs[1], z
    z = torch.softmax(torch.stack([F.linear(cat, gate_w[j], gate_b[j]) for j in range(len(streams))]), dim=0)
    return sum(z[j] * hs[j] for j in range(len(streams))), z


def gmu_adapter_reference(x, modalities, stream_w, stream_b, gate_w, gate_b, w_up, b_up, *, gmu_w=None,
                          stream_ln_w=None, stream_ln_b=None, stream_ln_eps=1e-5, scaling=1.0, activation="relu",
                          gate="sigmoid", r=None, ln_weight=None, ln_bias=None, ln_eps=1e-12, return_gates=False):
    """Plain-PyTorch GMU adapter: the oracle of the tests and the CPU path. Returns y, or (y, z)."""
    streams = gmu_streams(x, modalities, stream_w, stream_b, stream_ln_w, stream_ln_b, activation, stream_ln_eps)
    fused, z = gmu_gate(streams, gate_w, gate_b, gate, gmu_w)
    y = x + scaling * F.linear(fused, w_up, b_up)
    if ln_weight is not None:
        y = F.layer_norm(y + r, x.shape[-1:], ln_weight, ln_bias, ln_eps)
    return (y, z) if return_gates else y


def check_gmu_inputs(x, modalities, stream_w, stream_b, gate_w, gate_b, w_up, b_up, gmu_w, stream_ln_w,
                     stream_ln_b, gate, r, ln_weight, ln_bias):
    """Validates shapes and devices (naming the argument at fault); returns (S, k)."""
    _checks.tensor("x", x)
    if x.dim() != 3:
        raise ValueError(f"x must have shape (batch, tokens, d), got {tuple(x.shape)}")
    B, T, d = x.shape
    dev = x.device
    S = len(modalities) + 1
    if not 1 <= len(modalities) <= 4:
        raise ValueError(f"the GMU adapter takes 1 to 4 modalities, got {len(modalities)}")
    if len(stream_w) != S or len(stream_b) != S:
        raise ValueError(f"stream_w and stream_b need one entry per stream (text + {S - 1} modalities = {S}), "
                         f"got {len(stream_w)} and {len(stream_b)}")
    k = stream_w[0].shape[0]
    for j, m in enumerate(modalities):
        _checks.tensor(f"modalities[{j}]", m, device=dev)
        if m.dtype != x.dtype:
            raise ValueError(f"modalities[{j}] must have x's dtype {x.dtype}, got {m.dtype}")
        if not (m.dim() == 3 and m.shape[:2] == (B, T)) and not (m.dim() == 2 and m.shape[0] == B):
            raise ValueError(f"modalities[{j}] must be token-aligned ({B}, {T}, d_i) or per-sample ({B}, d_i), "
                             f"got {tuple(m.shape)}")
    for j, inp in enumerate([x, *modalities]):
        _checks.tensor(f"stream_w[{j}]", stream_w[j], shape=(k, inp.shape[-1]), device=dev)
        _checks.tensor(f"stream_b[{j}]", stream_b[j], shape=(k,), device=dev)
        if stream_ln_w is not None:
            _checks.tensor(f"stream_ln_w[{j}]", stream_ln_w[j], shape=(inp.shape[-1],), device=dev)
            _checks.tensor(f"stream_ln_b[{j}]", stream_ln_b[j], shape=(inp.shape[-1],), device=dev)
    _checks.choice("gate", gate, GATES)
    if gate == "sigmoid" and S != 2:
        raise ValueError(f"the sigmoid gate fuses exactly two streams (one modality); got {S}: use gate='softmax'")
    gates = 1 if gate == "sigmoid" else S
    _checks.tensor("gate_w", gate_w, shape=(gates, k, S * k), device=dev)
    _checks.tensor("gate_b", gate_b, shape=(gates, k), device=dev)
    if gmu_w is not None:
        _checks.tensor("gmu_w", gmu_w, shape=(S, k, k), device=dev)
    _checks.tensor("w_up", w_up, shape=(d, k), device=dev)
    _checks.tensor("b_up", b_up, shape=(d,), device=dev)
    if ln_weight is not None:
        _checks.tensor("r", r, shape=x.shape, device=dev)
        _checks.tensor("ln_weight", ln_weight, shape=(d,), device=dev)
        _checks.tensor("ln_bias", ln_bias, shape=(d,), device=dev)
    return S, k


def gmu_adapter(x: Tensor, modalities: Sequence[Tensor], stream_w: Sequence[Tensor], stream_b: Sequence[Tensor],
                gate_w: Tensor, gate_b: Tensor, w_up: Tensor, b_up: Tensor, *, gmu_w: Optional[Tensor] = None,
                stream_ln_w=None, stream_ln_b=None, stream_ln_eps: float = 1e-5, scaling=1.0,
                activation: str = "relu", gate: str = "sigmoid", r: Optional[Tensor] = None,
                ln_weight: Optional[Tensor] = None, ln_bias: Optional[Tensor] = None, ln_eps: float = 1e-12,
                backend: Optional[str] = None) -> Tensor:
    """GMU adapter (see the module docstring). x: (B, T, d); modalities: each (B, T, d_i) or (B, d_i);
    stream_w[j]: (k, d_j), stream_b[j]: (k,) for j = text, modality 0, ...; gate_w: (1, k, 2k) for
    the sigmoid gate or (S, k, S*k) for the softmax gate, gate_b: (1 or S, k); gmu_w: (S, k, k) for
    the GMU form (None: direct form); w_up: (d, k), b_up: (d,); with ln_weight/ln_bias the output is
    LN(x + u + r), the sub-layer's LayerNorm fused. Returns y with x's shape.
    """
    check_gmu_inputs(x, modalities, stream_w, stream_b, gate_w, gate_b, w_up, b_up, gmu_w, stream_ln_w,
                     stream_ln_b, gate, r, ln_weight, ln_bias)
    activation = canonical(activation)
    name = _backend.resolve(x.device, x.dtype, backend, op="gmu_adapter")
    kwargs = dict(gmu_w=gmu_w, stream_ln_w=stream_ln_w, stream_ln_b=stream_ln_b, stream_ln_eps=stream_ln_eps,
                  scaling=scaling, activation=activation, gate=gate, r=r, ln_weight=ln_weight, ln_bias=ln_bias,
                  ln_eps=ln_eps)
    if name == "torch":
        return gmu_adapter_reference(x, list(modalities), list(stream_w), list(stream_b), gate_w, gate_b, w_up, b_up,
                                     **kwargs)
    if name == "cuda":
        raise _backend.BackendUnavailableError("ampfuse gmu_adapter: the cuda backend has no GMU kernel yet; "
                                               "use backend='triton'")
    contiguous = (lambda seq: [t.contiguous() for t in seq] if seq is not None else [])
    scale_tensor, scale_value = (scaling, 1.0) if isinstance(scaling, Tensor) else (None, float(scaling))
    return _gmu_op(x.contiguous(), contiguous(modalities), contiguous(stream_w), contiguous(stream_b),
                   contiguous(stream_ln_w), contiguous(stream_ln_b), gate_w.contiguous(), gate_b.contiguous(),
                   None if gmu_w is None else gmu_w.contiguous(), w_up.contiguous(), b_up.contiguous(),
                   None if scale_tensor is None else scale_tensor.reshape(-1).contiguous(),
                   None if r is None else r.contiguous(), ln_weight, ln_bias, scale_value, float(stream_ln_eps),
                   float(ln_eps), activation, name)


# ----------------------------------------------------------------------------- custom op

def _kernels():
    from ..kernels import gmu as kernels  # deferred: TRITON_INTERPRET is read at import
    return kernels


@torch.library.custom_op("ampfuse::gmu_adapter", mutates_args=())
def _gmu_op(x: Tensor, modalities: List[Tensor], stream_w: List[Tensor], stream_b: List[Tensor],
            stream_ln_w: List[Tensor], stream_ln_b: List[Tensor], gate_w: Tensor, gate_b: Tensor,
            gmu_w: Optional[Tensor], w_up: Tensor, b_up: Tensor, scale: Optional[Tensor], r: Optional[Tensor],
            ln_weight: Optional[Tensor], ln_bias: Optional[Tensor], scale_value: float, stream_ln_eps: float,
            ln_eps: float, activation: str, backend: str) -> Tensor:
    if x.numel() == 0:
        return torch.empty_like(x)
    return _kernels().gmu_fwd(x, r, modalities, stream_w, stream_b, stream_ln_w, stream_ln_b, gate_w, gate_b, gmu_w,
                              w_up, b_up, scale, scale_value, ln_weight, ln_bias, stream_ln_eps, ln_eps, activation)


@_gmu_op.register_fake
def _(x, *args):
    return torch.empty_like(x)


def _layout(x, modalities, gate_w, gmu_w, stream_ln_w, w_up, scale, ln_grad, mod_grad):
    B, _, D = x.shape
    return _kernels().gmu_gradient_layout(
        B, D, [m.shape[-1] for m in modalities], [m.dim() == 3 for m in modalities], w_up.shape[1],
        gate_w.shape[0], bool(stream_ln_w), gmu_w is not None, 0 if scale is None else scale.numel(), ln_grad,
        mod_grad)


@torch.library.custom_op("ampfuse::gmu_adapter_backward", mutates_args=())
def _gmu_backward_op(dy: Tensor, x: Tensor, modalities: List[Tensor], stream_w: List[Tensor],
                     stream_b: List[Tensor], stream_ln_w: List[Tensor], stream_ln_b: List[Tensor], gate_w: Tensor,
                     gate_b: Tensor, gmu_w: Optional[Tensor], w_up: Tensor, b_up: Tensor, scale: Optional[Tensor],
                     r: Optional[Tensor], ln_weight: Optional[Tensor], ln_bias: Optional[Tensor],
                     scale_value: float, stream_ln_eps: float, ln_eps: float, activation: str, backend: str,
                     ln_grad: bool, mod_grad: bool) -> List[Tensor]:
    """[dx, dr, flat, dm_0, ...]: flat as gmu_gradient_layout places it; dm_i of token-aligned
    modalities (empty when not mod_grad or per-sample: those are in flat); dr empty without r."""
    layout, table, total = _layout(x, modalities, gate_w, gmu_w, stream_ln_w, w_up, scale, ln_grad, mod_grad)
    if x.numel() == 0:
        dms = [torch.zeros_like(m) if mod_grad and m.dim() == 3 else m.new_empty(0) for m in modalities]
        return [torch.empty_like(x), x.new_empty(x.shape if r is not None else (0,)),
                x.new_zeros(total, dtype=torch.float32), *dms]
    dx, dr, dms, flat = _kernels().gmu_bwd(
        dy, x, r, modalities, stream_w, stream_b, stream_ln_w, stream_ln_b, gate_w, gate_b, gmu_w, w_up, b_up, scale,
        scale_value, ln_weight, ln_bias, stream_ln_eps, ln_eps, activation, ln_grad, mod_grad, table, total)
    return [dx, dr, flat, *dms]


@_gmu_backward_op.register_fake
def _(dy, x, modalities, stream_w, stream_b, stream_ln_w, stream_ln_b, gate_w, gate_b, gmu_w, w_up, b_up, scale, r,
      ln_weight, ln_bias, scale_value, stream_ln_eps, ln_eps, activation, backend, ln_grad, mod_grad):
    _, _, total = _layout(x, modalities, gate_w, gmu_w, stream_ln_w, w_up, scale, ln_grad, mod_grad)
    dms = [torch.empty_like(m) if mod_grad and m.dim() == 3 else m.new_empty(0) for m in modalities]
    return [torch.empty_like(x), x.new_empty(x.shape if r is not None else (0,)),
            x.new_empty(total, dtype=torch.float32), *dms]


_OP_INPUTS = ("x", "modalities", "stream_w", "stream_b", "stream_ln_w", "stream_ln_b", "gate_w", "gate_b", "gmu_w",
              "w_up", "b_up", "scale", "r", "ln_weight", "ln_bias")


def _setup_context(ctx, inputs, output):
    tensors = dict(zip(_OP_INPUTS, inputs))
    ctx.lists = {name: len(tensors[name]) for name in _OP_INPUTS if isinstance(tensors[name], (list, tuple))}
    flat = []
    for name in _OP_INPUTS:
        flat += list(tensors[name]) if name in ctx.lists else [tensors[name]]
    ctx.save_for_backward(*flat)
    ctx.options = inputs[len(_OP_INPUTS):]


def _backward(ctx, dy):
    saved, tensors = list(ctx.saved_tensors), {}
    for name in _OP_INPUTS:
        n = ctx.lists.get(name)
        tensors[name] = saved[:n] if n is not None else saved[0]
        saved = saved[n if n is not None else 1:]
    needs = dict(zip(_OP_INPUTS, ctx.needs_input_grad))
    ln_grad = bool(needs["ln_weight"] or needs["ln_bias"])
    mod_grad = bool(needs["modalities"])
    dx, dr, flat, *dms = _gmu_backward_op(dy.contiguous(), *(tensors[n] for n in _OP_INPUTS), *ctx.options,
                                          ln_grad, mod_grad)
    layout, _, _ = _layout(tensors["x"], tensors["modalities"], tensors["gate_w"], tensors["gmu_w"],
                           tensors["stream_ln_w"], tensors["w_up"], tensors["scale"], ln_grad, mod_grad)
    grads = {"x": dx, "r": dr, **split_gradients(flat, layout, tensors)}
    for i, (m, dm) in enumerate(zip(tensors["modalities"], dms)):
        if mod_grad and m.dim() == 3:  # token-aligned: its own output; per-sample ones are in flat
            grads["modalities"][i] = dm
    return needed(grads, tensors, _OP_INPUTS, ctx.needs_input_grad) + (None,) * len(ctx.options)


_gmu_op.register_autograd(_backward, setup_context=_setup_context)
