"""The GMU adapter (docs/design.md section 3a): reference, spec, autograd, dispatch.

Per token t of sample b, with text state x_t (d) and modalities m_i, token-aligned (B, T, d_i)
or per-sample (B, d_i):

    a_0 = f(LN_0(x_t) W_0^T + c_0)      a_i = f(LN_i(m_i[b or t]) W_i^T + c_i)       (width k)
    gate "sigmoid" (two streams):  z = sigmoid([a_0; a_1] G_0^T + g_0),  fused = z h_0 + (1 - z) h_1
    gate "softmax" (S = K+1 streams): z_j = softmax_j([a_0; ...; a_K] G_j^T + g_j),  fused = sum_j z_j h_j
    form "direct": h_j = a_j        form "gmu" (Arevalo et al.): h_j = tanh(a_j V_j^T)
    u = s * (fused W_up^T + c_up)
    y = LN(x + u + r)   with the sub-layer's LayerNorm (ln_weight given), else  y = x + u

Per-sample modalities are projected once per sample (B rows), never per token. A per-sample
modality given as a sequence is mean-pooled over its mask first (``masked_mean``). Any number of
modalities: the kernels take the streams as tuples, so a fifth is configuration, not code.
"""

import functools
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _checks, backend as _backend
from . import _flat, _spec
from .activations import ACTIVATIONS, canonical

GATES = ("sigmoid", "softmax")
FORMS = ("direct", "gmu")


class GMUSpec(NamedTuple):
    """The static options of one GMU adapter call: everything but the tensors."""
    activation: str = "relu"
    gate: str = "sigmoid"           # GATES
    form: str = "direct"            # FORMS
    stream_ln: bool = True          # a LayerNorm on each stream before its projection
    fuse_ln: bool = False           # y = LN(x + u + r) with the sub-layer's LayerNorm
    scale_mode: str = "float"       # kernels/codes.py SCALE_MODES: float, scalar (learned), channel
    scale_value: float = 1.0        # the float scaling (scale_mode "float")
    stream_ln_eps: float = 1e-5
    ln_eps: float = 1e-12

    encode = _spec.encode  # the spec as one string: how torch.compile's custom op carries it


_decode = _spec.decoder(GMUSpec)


class GMUParams(NamedTuple):
    """The GMU adapter's parameters: per-stream tuples (text first), then the shared ones (None where the
    spec has no such parameter)."""
    stream_w: tuple
    stream_b: tuple
    stream_ln_w: Optional[tuple]
    stream_ln_b: Optional[tuple]
    gate_w: Tensor
    gate_b: Tensor
    gmu_w: Optional[Tensor]
    w_up: Tensor
    b_up: Tensor
    scale: Optional[Tensor]
    ln_weight: Optional[Tensor]
    ln_bias: Optional[Tensor]

    def flat(self):
        """Every tensor slot in a fixed order (None for absent ones): the autograd.Function's inputs."""
        lists = [*self.stream_w, *self.stream_b, *(self.stream_ln_w or ()), *(self.stream_ln_b or ())]
        return [*lists, *self[4:]]

    @classmethod
    def unflat(cls, values, S, stream_ln):
        per = 4 if stream_ln else 2
        lists = [tuple(values[i * S:(i + 1) * S]) for i in range(per)] + [None] * (4 - per)
        return cls(*lists, *values[per * S:])


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
    """Plain-PyTorch GMU adapter: the oracle of the tests and the CPU path. Returns y, or (y, z).

    Computed in the dtype y has: that of ``x + r`` with the fused LayerNorm (under autocast a 16-bit x
    meets an fp32 r: fp32), x's otherwise; inputs and parameters are cast to it, so a float64 x gives a
    float64 oracle."""
    fuse = ln_weight is not None
    dtype = torch.promote_types(x.dtype, r.dtype) if fuse else x.dtype
    cast = (lambda t: t.to(dtype) if isinstance(t, Tensor) else t)  # noqa: E731
    casts = (lambda seq: None if seq is None else [cast(t) for t in seq])  # noqa: E731
    x = cast(x)
    streams = gmu_streams(x, casts(modalities), casts(stream_w), casts(stream_b), casts(stream_ln_w),
                          casts(stream_ln_b), activation, stream_ln_eps)
    fused, z = gmu_gate(streams, cast(gate_w), cast(gate_b), gate, cast(gmu_w))
    y = x + cast(scaling) * F.linear(fused, cast(w_up), cast(b_up))
    if fuse:
        y = F.layer_norm(y + cast(r), x.shape[-1:], cast(ln_weight), cast(ln_bias), ln_eps)
    return (y, z) if return_gates else y


# ----------------------------------------------------------------------------- autograd

_KERNELS = []


def _kernels():
    """kernels/gmu.py, imported on first use (TRITON_INTERPRET is read when the kernels are imported)."""
    if not _KERNELS:
        from ..kernels import gmu as kernels
        _KERNELS.append(kernels)
    return _KERNELS[0]


def _grad_dtype(params):
    """The parameters' own dtype when they share one (no cast kernels after), fp32 otherwise."""
    dtypes = {p.dtype for p in params.flat() if p is not None}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


@functools.lru_cache(maxsize=None)
def _gradient_places(entries):
    """[(name, field, index, offset, numel)]: the gradient ``name`` of the GMUParams field ``field`` (its
    element ``index`` for a per-stream tuple, else None) lies at ``offset`` of the flat buffer. Cached:
    names are parsed once per layout."""
    places = []
    for name, offset, shape in entries:
        field, _, index = name.partition(".")
        places.append((name, field, int(index) if index else None, offset, int(torch.Size(shape).numel())))
    return tuple(places)


def _named_gradients(spec, flat, params, widths, aligned, ln_grad):
    """{name: gradient}: views of ``flat`` (cast only where it is not the parameter's dtype); "stream_w.1"
    names element 1 of a per-stream tuple. A learned scalar's gradient is the sum of its d partials."""
    entries, _, _ = _kernels().gradient_layout(widths, aligned, params.w_up.shape[1], spec, ln_grad)
    grads = {}
    for name, field, index, offset, numel in _gradient_places(entries):
        param = getattr(params, field) if index is None else getattr(params, field)[index]
        if name == "scale" and spec.scale_mode == "scalar":
            grads[name] = _flat.summed_partials(flat, offset, numel, param)
        else:
            grads[name] = _flat.gradient_view(flat, offset, param)
    return grads


def _backward(spec, dy, x, r, modalities, params, bufs, needs, traced=False):
    """(dx, dr, [dm_i], {name: gradient}) for needs = (dr, ln_weight or ln_bias, any modality); ``traced``:
    through the backward custom op (torch.compile's path)."""
    dr_grad, ln_grad, mod_grad = needs
    if traced:
        dx, dr, flat, *dms = _gmu_backward_op(
            dy.contiguous(), x, r, list(modalities), list(params.stream_w), list(params.stream_b),
            list(params.stream_ln_w or ()), list(params.stream_ln_b or ()), *params[4:], *bufs[:4], spec.encode(),
            list(needs))
        dr = dr if dr_grad else None
        dms = dms if mod_grad else [None] * len(modalities)
    else:
        dx, dr, dms, flat = _kernels().backward(spec, dy.contiguous(), x, r, modalities, params, bufs, dr_grad,
                                                ln_grad, mod_grad, _grad_dtype(params))
    widths = tuple(t.shape[-1] for t in (x, *modalities))
    aligned = tuple(t.dim() == 3 for t in (x, *modalities))
    return dx, dr, dms, _named_gradients(spec, flat, params, widths, aligned, ln_grad)


@functools.lru_cache(maxsize=None)
def _flat_names(S, stream_ln):
    names = [f"stream_w.{j}" for j in range(S)] + [f"stream_b.{j}" for j in range(S)]
    if stream_ln:
        names += [f"stream_ln_w.{j}" for j in range(S)] + [f"stream_ln_b.{j}" for j in range(S)]
    return tuple(names + ["gate_w", "gate_b", "gmu_w", "w_up", "b_up", "scale", "ln_weight", "ln_bias"])


class _GMUFunction(torch.autograd.Function):
    """The eager path: an autograd.Function costs a fraction of a torch.library op's dispatch.
    Inputs: spec, backend, the number of modalities, x, r, the modalities, GMUParams.flat()."""

    @staticmethod
    def forward(ctx, spec, backend, n_mod, x, r, *tensors):
        modalities, params = list(tensors[:n_mod]), GMUParams.unflat(tensors[n_mod:], n_mod + 1, spec.stream_ln)
        y, bufs = _kernels().forward(spec, x, r, modalities, params, save=True)
        ctx.spec, ctx.n_mod = spec, n_mod
        ctx.save_for_backward(x, r, *bufs[:4], *tensors)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, r, consts, weights, saved, fused, *tensors = ctx.saved_tensors
        n_mod, spec = ctx.n_mod, ctx.spec
        modalities, params = tensors[:n_mod], GMUParams.unflat(tensors[n_mod:], n_mod + 1, spec.stream_ln)
        needs = ctx.needs_input_grad[5:]
        names = _flat_names(n_mod + 1, spec.stream_ln)
        ln_grad = any(need for name, need in zip(names, needs[n_mod:]) if name in ("ln_weight", "ln_bias"))
        dx, dr, dms, grads = _backward(spec, dy, x, r, modalities, params,
                                       _kernels().Buffers(consts, weights, saved, fused),
                                       (bool(ctx.needs_input_grad[4]), ln_grad, any(needs[:n_mod])))
        out = [None, None, None, dx if ctx.needs_input_grad[3] else None, dr]
        out += [dm if need else None for dm, need in zip(dms, needs[:n_mod])]
        out += [grads.get(name) if need else None for name, need in zip(names, needs[n_mod:])]
        return tuple(out)


# torch.compile's path: the same launchers behind torch.library custom ops (traceable, with fake kernels).

def _op_params(stream_w, stream_b, stream_ln_w, stream_ln_b, gate_w, gate_b, gmu_w, w_up, b_up, scale, ln_weight,
               ln_bias):
    return GMUParams(tuple(stream_w), tuple(stream_b), tuple(stream_ln_w) or None, tuple(stream_ln_b) or None,
                     gate_w, gate_b, gmu_w, w_up, b_up, scale, ln_weight, ln_bias)


@torch.library.custom_op("ampfuse::gmu_adapter", mutates_args=())
def _gmu_op(x: Tensor, r: Optional[Tensor], modalities: List[Tensor], stream_w: List[Tensor], stream_b: List[Tensor],
            stream_ln_w: List[Tensor], stream_ln_b: List[Tensor], gate_w: Tensor, gate_b: Tensor,
            gmu_w: Optional[Tensor], w_up: Tensor, b_up: Tensor, scale: Optional[Tensor], ln_weight: Optional[Tensor],
            ln_bias: Optional[Tensor], spec: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(y, consts, weights, saved, fused): y and the buffers backward reads."""
    params = _op_params(stream_w, stream_b, stream_ln_w, stream_ln_b, gate_w, gate_b, gmu_w, w_up, b_up, scale,
                        ln_weight, ln_bias)
    y, bufs = _kernels().forward(_decode(spec), x, r, modalities, params, save=True)
    return y, *bufs[:4]


@_gmu_op.register_fake
def _(x, r, modalities, stream_w, stream_b, stream_ln_w, stream_ln_b, gate_w, gate_b, gmu_w, w_up, b_up, scale,
      ln_weight, ln_bias, spec):
    spec_ = _decode(spec)
    B, T, D = x.shape
    K = w_up.shape[1]
    n_tok = 1 + sum(m.dim() == 3 for m in modalities)
    kernels = _kernels()
    y = x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, r.dtype) if spec_.fuse_ln else x.dtype)
    consts = x.new_empty(kernels.consts_size(D, K, len(modalities) + 1, B, len(modalities) + 1 - n_tok),
                         dtype=torch.float32)
    op = kernels.operand_dtype(x, r if spec_.fuse_ln else None)
    S = len(modalities) + 1
    weights = x.new_empty(kernels.weights_size(K, S, gate_w.shape[0], gmu_w is not None), dtype=op)
    saved = x.new_empty(kernels.saved_size(B * T, K, n_tok), dtype=torch.float32)
    fused = x.new_empty((B * T, K), dtype=op)
    return y, consts, weights, saved, fused


@torch.library.custom_op("ampfuse::gmu_adapter_backward", mutates_args=())
def _gmu_backward_op(dy: Tensor, x: Tensor, r: Optional[Tensor], modalities: List[Tensor], stream_w: List[Tensor],
                     stream_b: List[Tensor], stream_ln_w: List[Tensor], stream_ln_b: List[Tensor], gate_w: Tensor,
                     gate_b: Tensor, gmu_w: Optional[Tensor], w_up: Tensor, b_up: Tensor, scale: Optional[Tensor],
                     ln_weight: Optional[Tensor], ln_bias: Optional[Tensor], consts: Tensor, weights: Tensor,
                     saved: Tensor, fused: Tensor, spec: str, needs: List[bool]) -> List[Tensor]:
    """[dx, dr, flat, dm_0, ...]: flat as kernels.gmu.gradient_layout places it; dr, dm_i empty when not
    wanted."""
    params = _op_params(stream_w, stream_b, stream_ln_w, stream_ln_b, gate_w, gate_b, gmu_w, w_up, b_up, scale,
                        ln_weight, ln_bias)
    dx, dr, dms, flat = _kernels().backward(_decode(spec), dy, x, r, modalities, params,
                                            _kernels().Buffers(consts, weights, saved, fused), *needs,
                                            _grad_dtype(params))
    empty = x.new_empty(0)
    return [dx, empty if dr is None else dr, flat, *(empty if dm is None else dm for dm in dms)]


@_gmu_backward_op.register_fake
def _(dy, x, r, modalities, stream_w, stream_b, stream_ln_w, stream_ln_b, gate_w, gate_b, gmu_w, w_up, b_up, scale,
      ln_weight, ln_bias, consts, weights, saved, fused, spec, needs):
    params = _op_params(stream_w, stream_b, stream_ln_w, stream_ln_b, gate_w, gate_b, gmu_w, w_up, b_up, scale,
                        ln_weight, ln_bias)
    widths = tuple(t.shape[-1] for t in (x, *modalities))
    aligned = tuple(t.dim() == 3 for t in (x, *modalities))
    _, _, total = _kernels().gradient_layout(widths, aligned, w_up.shape[1], _decode(spec), needs[1])
    empty = x.new_empty(0)
    return [torch.empty_like(x), torch.empty_like(r) if needs[0] else empty,
            x.new_empty(total, dtype=_grad_dtype(params)), *(torch.empty_like(m) if needs[2] else empty
                                                             for m in modalities)]


_OP_LISTS = ("stream_w", "stream_b", "stream_ln_w", "stream_ln_b")


def _op_setup_context(ctx, inputs, output):
    x, r, modalities, *rest = inputs[:15]
    ctx.spec = inputs[15]
    ctx.counts = [len(modalities)] + [len(t) for t in rest[:4]]
    ctx.save_for_backward(x, r, *output[1:], *modalities, *rest[0], *rest[1], *rest[2], *rest[3], *rest[4:])


def _op_backward(ctx, dy, _d_consts, _d_weights, _d_saved, _d_fused):
    x, r, consts, weights, saved, fused, *tensors = ctx.saved_tensors
    n_mod, *lens = ctx.counts
    modalities, tensors = tensors[:n_mod], tensors[n_mod:]
    lists = []
    for n in lens:
        lists.append(tensors[:n])
        tensors = tensors[n:]
    params = _op_params(*lists, *tensors)
    spec = _decode(ctx.spec)
    needs = ctx.needs_input_grad
    ln_grad = bool(needs[13] or needs[14])
    dx, dr, dms, grads = _backward(spec, dy, x, r, modalities, params,
                                   _kernels().Buffers(consts, weights, saved, fused),
                                   (bool(needs[1]), ln_grad, bool(needs[2])), traced=True)
    per_stream = [[grads.get(f"{name}.{j}") for j in range(n)] if needs[3 + i] else [None] * n
                  for i, (name, n) in enumerate(zip(_OP_LISTS, lens))]
    shared = [grads.get(name) if need else None
              for name, need in zip(("gate_w", "gate_b", "gmu_w", "w_up", "b_up", "scale", "ln_weight", "ln_bias"),
                                    needs[7:15])]
    return (dx if needs[0] else None, dr if needs[1] else None, list(dms) if needs[2] else [None] * n_mod,
            *per_stream, *shared, None)


_gmu_op.register_autograd(_op_backward, setup_context=_op_setup_context)


# ----------------------------------------------------------------------------- public entry point

def gmu_adapter(x: Tensor, modalities: Sequence[Tensor], stream_w: Sequence[Tensor], stream_b: Sequence[Tensor],
                gate_w: Tensor, gate_b: Tensor, w_up: Tensor, b_up: Tensor, *, gmu_w: Optional[Tensor] = None,
                stream_ln_w=None, stream_ln_b=None, stream_ln_eps: float = 1e-5, scaling=1.0,
                activation: str = "relu", gate: str = "sigmoid", r: Optional[Tensor] = None,
                ln_weight: Optional[Tensor] = None, ln_bias: Optional[Tensor] = None, ln_eps: float = 1e-12,
                backend: Optional[str] = None) -> Tensor:
    """GMU adapter (see the module docstring). x: (B, T, d); modalities: each (B, T, d_i) or (B, d_i), in x's
    dtype; stream_w[j]: (k, d_j), stream_b[j]: (k,) for j = text, modality 0, ...; gate_w: (1, k, 2k) for the
    sigmoid gate or (S, k, S*k) for the softmax gate, gate_b: (1 or S, k); gmu_w: (S, k, k) for the GMU form
    (None: direct form); w_up: (d, k), b_up: (d,); ``scaling``: a float, a learned scalar tensor or a
    per-channel (d,) tensor; with ln_weight/ln_bias the output is LN(x + u + r), the sub-layer's LayerNorm
    fused. Dtypes may mix the way autocast mixes them (16-bit x and modalities, fp32 r and parameters): the
    kernels then compute with 16-bit tensor-core operands and fp32 accumulation; y has the dtype of x + r
    (of x without the fused LayerNorm); gradients come back in each input's dtype. Non-contiguous inputs
    are copied; inputs are never modified.
    """
    modalities, stream_w, stream_b = list(modalities), list(stream_w), list(stream_b)
    stream_ln_w = None if stream_ln_w is None else list(stream_ln_w)
    stream_ln_b = None if stream_ln_b is None else list(stream_ln_b)
    _check_inputs(x, modalities, stream_w, stream_b, gate_w, gate_b, w_up, b_up, gmu_w, stream_ln_w, stream_ln_b,
                  scaling, gate, r, ln_weight, ln_bias)
    activation = canonical(activation)
    fuse = ln_weight is not None
    name = _backend.resolve(x.device, torch.promote_types(x.dtype, r.dtype) if fuse else x.dtype, backend,
                            op="gmu_adapter")
    if name == "torch" or x.numel() == 0:  # (no tokens: an empty y, and zero gradients from the reference)
        return gmu_adapter_reference(x, modalities, stream_w, stream_b, gate_w, gate_b, w_up, b_up, gmu_w=gmu_w,
                                     stream_ln_w=stream_ln_w, stream_ln_b=stream_ln_b, stream_ln_eps=stream_ln_eps,
                                     scaling=scaling, activation=activation, gate=gate, r=r, ln_weight=ln_weight,
                                     ln_bias=ln_bias, ln_eps=ln_eps)
    if name == "cuda":
        raise _backend.BackendUnavailableError("ampfuse gmu_adapter: the cuda backend has no GMU kernel yet; "
                                               "use backend='triton'")
    if isinstance(scaling, Tensor):
        scale_mode, scale_value, scale = ("scalar" if scaling.numel() == 1 else "channel"), 1.0, scaling.reshape(-1)
    else:
        scale_mode, scale_value, scale = "float", float(scaling), None
    spec = GMUSpec(activation, gate, "direct" if gmu_w is None else "gmu", stream_ln_w is not None, fuse, scale_mode,
                   scale_value, float(stream_ln_eps), float(ln_eps))
    # the kernels read every tensor as row-major memory
    x, r, gate_w, gate_b, gmu_w, w_up, b_up, scale, ln_weight, ln_bias = _contiguous(
        (x, r if fuse else None, gate_w, gate_b, gmu_w, w_up, b_up, scale, ln_weight, ln_bias))
    modalities = _contiguous(modalities)
    params = GMUParams(tuple(_contiguous(stream_w)), tuple(_contiguous(stream_b)),
                       None if stream_ln_w is None else tuple(_contiguous(stream_ln_w)),
                       None if stream_ln_b is None else tuple(_contiguous(stream_ln_b)), gate_w, gate_b, gmu_w, w_up,
                       b_up, scale, ln_weight, ln_bias)
    if torch.compiler.is_compiling():
        return _gmu_op(x, r, modalities, list(params.stream_w), list(params.stream_b),
                       list(params.stream_ln_w or ()), list(params.stream_ln_b or ()), *params[4:], spec.encode())[0]
    if torch.is_grad_enabled():
        flat = params.flat()
        if any(t is not None and t.requires_grad for t in (x, r, *modalities, *flat)):
            return _GMUFunction.apply(spec, name, len(modalities), x, r, *modalities, *flat)
    return _kernels().forward(spec, x, r, modalities, params, save=False)[0]


def _contiguous(seq):
    """The tensors of ``seq`` as a list, each copied only where it is not contiguous (None kept)."""
    out = []
    for t in seq:
        out.append(t if t is None or t.is_contiguous() else t.contiguous())
    return out


def _check_inputs(x, modalities, stream_w, stream_b, gate_w, gate_b, w_up, b_up, gmu_w, stream_ln_w, stream_ln_b,
                  scaling, gate, r, ln_weight, ln_bias):
    """Validates shapes, dtypes and devices. One combined test first (it is on every call's path: plain loops,
    no per-argument messages); the named checks below run only to say what is wrong."""
    try:
        B, T, d = x.shape
        k, S, dev = w_up.shape[1], len(modalities) + 1, x.device
        ln = stream_ln_w is not None
        fine = (d > 0 and k > 0 and S >= 2 and x.is_floating_point() and len(stream_w) == S and len(stream_b) == S
                and (gate == "softmax" or gate == "sigmoid" and S == 2) and ln == (stream_ln_b is not None)
                and (not ln or len(stream_ln_w) == S and len(stream_ln_b) == S))
        if fine:
            gates = 1 if gate == "sigmoid" else S
            fine = (gate_w.shape == (gates, k, S * k) and gate_b.shape == (gates, k) and w_up.shape == (d, k)
                    and b_up.shape == (d,) and (gmu_w is None or gmu_w.shape == (S, k, k))
                    and (isinstance(scaling, float) or isinstance(scaling, Tensor) and (scaling.numel() == 1
                                                                                        or scaling.shape == (d,)))
                    and (ln_weight is None or r.shape == x.shape and ln_weight.shape == (d,)
                         and ln_bias.shape == (d,)))
            tensors = [gate_w, gate_b, w_up, b_up, *stream_w, *stream_b]
            for t in (gmu_w, scaling, ln_weight, ln_bias):
                if isinstance(t, Tensor):
                    tensors.append(t)
            if ln_weight is not None:
                tensors.append(r)
            for j in range(S):
                width = d
                if j:
                    m = modalities[j - 1]
                    fine = fine and m.dtype == x.dtype and m.device == dev and (
                        m.shape[:2] == (B, T) if m.dim() == 3 else m.dim() == 2 and m.shape[0] == B)
                    width = m.shape[-1]
                fine = fine and stream_w[j].shape == (k, width) and stream_b[j].shape == (k,)
                if ln:
                    fine = fine and stream_ln_w[j].shape == (width,) and stream_ln_b[j].shape == (width,)
                    tensors += (stream_ln_w[j], stream_ln_b[j])
            for t in tensors:
                fine = fine and t.device == dev and t.is_floating_point()
    except (AttributeError, IndexError, TypeError, ValueError):
        fine = False
    if not fine:
        _explain_inputs(x, modalities, stream_w, stream_b, gate_w, gate_b, w_up, b_up, gmu_w, stream_ln_w,
                        stream_ln_b, scaling, gate, r, ln_weight, ln_bias)


def _explain_inputs(x, modalities, stream_w, stream_b, gate_w, gate_b, w_up, b_up, gmu_w, stream_ln_w, stream_ln_b,
                    scaling, gate, r, ln_weight, ln_bias):
    """Raises a ValueError/TypeError naming the first bad argument."""
    _checks.tensor("x", x)
    if x.dim() != 3 or x.shape[-1] == 0:
        raise ValueError(f"x must have shape (batch, tokens, d) with d >= 1, got {tuple(x.shape)}")
    B, T, d = x.shape
    dev = x.device
    S = len(modalities) + 1
    if not modalities:
        raise ValueError("the GMU adapter takes at least one modality, got none")
    if len(stream_w) != S or len(stream_b) != S:
        raise ValueError(f"stream_w and stream_b need one entry per stream (text + {S - 1} modalities = {S}), "
                         f"got {len(stream_w)} and {len(stream_b)}")
    _checks.tensor("stream_w[0]", stream_w[0], device=dev)
    if stream_w[0].dim() != 2 or stream_w[0].shape[0] < 1:
        raise ValueError(f"stream_w[0] must have shape (k, {d}) with k >= 1, got {tuple(stream_w[0].shape)}")
    k = stream_w[0].shape[0]
    for j, m in enumerate(modalities):
        _checks.tensor(f"modalities[{j}]", m, device=dev)
        if m.dtype != x.dtype:
            raise ValueError(f"modalities[{j}] must have x's dtype {x.dtype}, got {m.dtype}")
        if not (m.dim() == 3 and m.shape[:2] == (B, T)) and not (m.dim() == 2 and m.shape[0] == B):
            raise ValueError(f"modalities[{j}] must be token-aligned ({B}, {T}, d_i) or per-sample ({B}, d_i), "
                             f"got {tuple(m.shape)}")
    if (stream_ln_w is None) != (stream_ln_b is None):
        raise ValueError("stream_ln_w and stream_ln_b must be given together")
    if stream_ln_w is not None and (len(stream_ln_w) != S or len(stream_ln_b) != S):
        raise ValueError(f"stream_ln_w and stream_ln_b need one entry per stream ({S}), got {len(stream_ln_w)} "
                         f"and {len(stream_ln_b)}")
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
    _checks.optional_tensor("gmu_w", gmu_w, shape=(S, k, k), device=dev)
    _checks.tensor("w_up", w_up, shape=(d, k), device=dev)
    _checks.tensor("b_up", b_up, shape=(d,), device=dev)
    _checks.scaling(scaling, d, dev)
    if ln_weight is not None:
        _checks.tensor("r", r, shape=x.shape, device=dev)
        _checks.tensor("ln_weight", ln_weight, shape=(d,), device=dev)
        _checks.tensor("ln_bias", ln_bias, shape=(d,), device=dev)
    elif ln_bias is not None:
        raise ValueError("ln_bias needs ln_weight (the fused LayerNorm takes both)")
