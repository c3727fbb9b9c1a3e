"""The fused adapter block (docs/design.md section 2): reference, spec, autograd, dispatch.

    a = LN(h + r)  if original_ln_before else h
    u = s * (f(LN_a(a) @ W_down^T + b_down) @ W_up^T + b_up)        (LN_a only with ln_before)
    y = LN(u + a_res + r)     a_res = h if residual_before_ln else a

LN is the frozen LayerNorm of the BERT sub-layer (ln_weight, ln_bias, ln_eps). Dropout with
probability dropout_p is applied to u in training.
"""

import functools
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _checks, backend as _backend
from . import _flat, _spec
from .activations import ACTIVATIONS, canonical


class AdapterBlockSpec(NamedTuple):
    """The static options of one adapter block call: everything but the tensors."""
    activation: str = "relu"
    original_ln_before: bool = True     # a = LN(h + r) (Pfeiffer) or h (Houlsby)
    residual_before_ln: bool = True     # the residual is h (True) or a
    ln_before: bool = False             # the adapter's own LayerNorm on a
    scale_mode: str = "float"           # kernels/codes.py SCALE_MODES: float, scalar (learned), channel
    scale_value: float = 1.0            # the float scaling (scale_mode "float")
    ln_eps: float = 1e-12
    adapter_ln_eps: float = 1e-5
    dropout_p: float = 0.0              # 0 outside training

    encode = _spec.encode  # the spec as one string: how torch.compile's custom op carries it


_decode = _spec.decoder(AdapterBlockSpec)


class AdapterParams(NamedTuple):
    """The adapter block's parameter tensors (None where the spec has no such parameter)."""
    ln_weight: Tensor
    ln_bias: Tensor
    w_down: Tensor
    b_down: Tensor
    w_up: Tensor
    b_up: Tensor
    scale: Optional[Tensor] = None
    adapter_ln_weight: Optional[Tensor] = None
    adapter_ln_bias: Optional[Tensor] = None


# Where backward places each parameter gradient in its flat buffer: this order, two k x d matrices,
# then vectors of k and d (kernels/adapter_block.py's _grad_offset mirrors it).
GRAD_SLOTS = ("w_down", "b_down", "w_up", "b_up", "scale", "ln_weight", "ln_bias", "adapter_ln_weight",
              "adapter_ln_bias")


def _slot_sizes(d, k):
    """The lengths of GRAD_SLOTS in the flat gradient buffer, in order."""
    return (k * d, k, d * k) + (d,) * 6


def gradient_layout(d, k):
    """{name: offset} of GRAD_SLOTS in the flat gradient buffer, and its length."""
    offsets, offset = {}, 0
    for name, size in zip(GRAD_SLOTS, _slot_sizes(d, k)):
        offsets[name] = offset
        offset += size
    return offsets, offset


def adapter_block_reference(h, r, ln_weight, ln_bias, w_down, b_down, w_up, b_up, *, scaling=1.0,
                            adapter_ln_weight=None, adapter_ln_bias=None, ln_eps=1e-12, adapter_ln_eps=1e-5,
                            activation="relu", original_ln_before=True, residual_before_ln=True,
                            dropout_p=0.0, training=False, keep_mask=None):
    """Plain-PyTorch adapter block: the oracle of the tests and the CPU path.

    Computed in the dtype of ``h + r`` (under autocast a 16-bit h meets an fp32 r: fp32), parameters
    cast to it, so a float64 h gives a float64 oracle. ``keep_mask`` (bool, h's shape) replaces the
    random dropout mask, to compare with the fused kernels' mask; otherwise dropout is ``F.dropout``.
    """
    d = h.shape[-1]
    dtype = torch.promote_types(h.dtype, r.dtype)
    h, r = h.to(dtype), r.to(dtype)
    cast = (lambda t: t if t is None or not isinstance(t, Tensor) else t.to(dtype))
    a = F.layer_norm(h + r, (d,), cast(ln_weight), cast(ln_bias), ln_eps) if original_ln_before else h
    an = a
    if adapter_ln_weight is not None:
        an = F.layer_norm(a, (d,), cast(adapter_ln_weight), cast(adapter_ln_bias), adapter_ln_eps)
    z = F.linear(an, cast(w_down), cast(b_down))
    u = F.linear(ACTIVATIONS[canonical(activation)](z), cast(w_up), cast(b_up)) * cast(scaling)
    if keep_mask is not None:
        u = u * keep_mask.to(u.dtype) / (1.0 - dropout_p)
    elif training and dropout_p > 0:
        u = F.dropout(u, dropout_p, training=True)
    o = u + (h if residual_before_ln else a) + r
    return F.layer_norm(o, (d,), cast(ln_weight), cast(ln_bias), ln_eps)


# ----------------------------------------------------------------------------- autograd

def _implementation(backend):
    """The module with forward/backward launchers for this backend (imported on first use: TRITON_INTERPRET
    is read when the Triton kernels are imported, and the CUDA extension may not be built)."""
    module = _IMPLEMENTATIONS.get(backend)
    if module is None:
        if backend == "cuda":
            from . import cuda as module
        else:
            from ..kernels import adapter_block as module
        _IMPLEMENTATIONS[backend] = module
    return module


_IMPLEMENTATIONS = {}


@functools.lru_cache(maxsize=None)
def _param_offsets(d, k):
    """Each parameter's offset in the flat gradient buffer, in AdapterParams order."""
    offsets, _ = gradient_layout(d, k)
    return tuple(offsets[name] for name in AdapterParams._fields)


def _gradients(spec, flat, params, needs):
    """Per-parameter gradients in parameter order: views of ``flat`` (cast only where it is not the
    parameter's dtype), None where not needed. The host path of every backward: one view per gradient."""
    k, d = params.w_down.shape
    grads = []
    for param, need, offset, name in zip(params, needs, _param_offsets(d, k), AdapterParams._fields):
        if not need or param is None:
            grads.append(None)
        elif name == "scale" and spec.scale_mode == "scalar":  # per-channel partials of one scalar
            grads.append(_flat.summed_partials(flat, offset, d, param))
        else:
            grads.append(_flat.gradient_view(flat, offset, param))
    return grads


def _grad_dtype(spec, params):
    """The dtype backward writes the parameter gradients in: the parameters' own when they share one
    (no cast kernels after), fp32 otherwise or for a learned scalar (summed from d partials)."""
    dtypes = {p.dtype for p in params if p is not None}
    return dtypes.pop() if len(dtypes) == 1 and spec.scale_mode != "scalar" else torch.float32


def _saved_output(spec, backend, y, k):
    """y where the backend's backward reads the forward's output (then autograd saves it), else None."""
    return y if _implementation(backend).reads_output(spec, k) else None


def _backward(ctx, dy, spec, backend, needs):
    h, r, y, seed, state, *params = ctx.saved_tensors
    params = AdapterParams(*params)
    input_grad = bool(needs[0] or needs[1])
    ln_grad = bool(needs[2] or needs[3])  # the frozen LayerNorm's weight or bias
    dh, dr, flat = _implementation(backend).backward(
        spec, dy.contiguous(), h, r, y, params, seed, state, input_grad, ln_grad, _grad_dtype(spec, params))
    grads = _gradients(spec, flat, params, needs[2:])
    return (dh if needs[0] else None), (dr if needs[1] else None), grads


class _AdapterBlockFunction(torch.autograd.Function):
    """The eager path: an autograd.Function costs a fraction of a torch.library op's dispatch."""

    @staticmethod
    def forward(ctx, spec, backend, h, r, seed, *params):
        params = AdapterParams(*params)
        y, state = _implementation(backend).forward(spec, h, r, params, seed, save=True)
        ctx.spec, ctx.backend = spec, backend
        ctx.save_for_backward(h, r, _saved_output(spec, backend, y, params.w_down.shape[0]), seed, state, *params)
        return y

    @staticmethod
    def backward(ctx, dy):
        dh, dr, grads = _backward(ctx, dy, ctx.spec, ctx.backend, ctx.needs_input_grad[2:4] + ctx.needs_input_grad[5:])
        return None, None, dh, dr, None, *grads


# torch.compile's path: the same launchers behind torch.library custom ops (traceable, with fake kernels).

@torch.library.custom_op("ampfuse::adapter_block", mutates_args=())
def _adapter_block_op(h: Tensor, r: Tensor, seed: Optional[Tensor], ln_weight: Tensor, ln_bias: Tensor,
                      w_down: Tensor, b_down: Tensor, w_up: Tensor, b_up: Tensor, scale: Optional[Tensor],
                      adapter_ln_weight: Optional[Tensor], adapter_ln_bias: Optional[Tensor], spec: str,
                      backend: str) -> tuple[Tensor, Tensor]:
    params = AdapterParams(ln_weight, ln_bias, w_down, b_down, w_up, b_up, scale, adapter_ln_weight, adapter_ln_bias)
    return _implementation(backend).forward(_decode(spec), h, r, params, seed, save=True)


@_adapter_block_op.register_fake
def _(h, r, seed, ln_weight, ln_bias, w_down, b_down, w_up, b_up, scale, adapter_ln_weight, adapter_ln_bias, spec,
      backend):
    d, k = h.shape[-1], w_down.shape[0]
    y = h.new_empty(h.shape, dtype=torch.promote_types(h.dtype, r.dtype))
    size = 0 if backend == "cuda" else _implementation(backend).state_size(h.numel() // d, d, k, _decode(spec), True)
    return y, h.new_empty(size, dtype=torch.float32)


@torch.library.custom_op("ampfuse::adapter_block_backward", mutates_args=())
def _adapter_block_backward_op(dy: Tensor, h: Tensor, r: Tensor, y: Optional[Tensor], seed: Optional[Tensor],
                               state: Tensor,
                               ln_weight: Tensor, ln_bias: Tensor, w_down: Tensor, b_down: Tensor,
                               w_up: Tensor, b_up: Tensor, scale: Optional[Tensor],
                               adapter_ln_weight: Optional[Tensor], adapter_ln_bias: Optional[Tensor], spec: str,
                               backend: str, input_grad: bool, ln_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    params = AdapterParams(ln_weight, ln_bias, w_down, b_down, w_up, b_up, scale, adapter_ln_weight, adapter_ln_bias)
    spec_ = _decode(spec)
    dh, dr, flat = _implementation(backend).backward(spec_, dy, h, r, y, params, seed, state, input_grad, ln_grad,
                                                     _grad_dtype(spec_, params))
    empty = h.new_empty(0)
    # outputs may not alias each other: a dr that is dh comes back as a copy under torch.compile
    return (empty if dh is None else dh), (empty if dr is None else (dr.clone() if dr is dh else dr)), flat


@_adapter_block_backward_op.register_fake
def _(dy, h, r, y, seed, state, ln_weight, ln_bias, w_down, b_down, w_up, b_up, scale, adapter_ln_weight,
      adapter_ln_bias, spec, backend, input_grad, ln_grad):
    params = AdapterParams(ln_weight, ln_bias, w_down, b_down, w_up, b_up, scale, adapter_ln_weight, adapter_ln_bias)
    _, total = gradient_layout(h.shape[-1], w_down.shape[0])
    dh = torch.empty_like(h) if input_grad else h.new_empty(0)
    dr = torch.empty_like(r) if input_grad else r.new_empty(0)
    return dh, dr, h.new_empty(total, dtype=_grad_dtype(_decode(spec), params))


def _op_setup_context(ctx, inputs, output):
    h, r, seed, *params = inputs[:12]
    ctx.spec, ctx.backend = inputs[12], inputs[13]
    y = _saved_output(_decode(ctx.spec), ctx.backend, output[0], AdapterParams(*params).w_down.shape[0])
    ctx.save_for_backward(h, r, y, seed, output[1], *params)


def _op_backward(ctx, dy, _d_state):
    h, r, y, seed, state, *params = ctx.saved_tensors
    needs = ctx.needs_input_grad
    input_grad, ln_grad = bool(needs[0] or needs[1]), bool(needs[3] or needs[4])
    dh, dr, flat = _adapter_block_backward_op(dy.contiguous(), h, r, y, seed, state, *params, ctx.spec, ctx.backend,
                                              input_grad, ln_grad)
    params = AdapterParams(*params)
    grads = _gradients(_decode(ctx.spec), flat, params, needs[3:12])
    return (dh if needs[0] else None, dr if needs[1] else None, None, *grads, None, None)


_adapter_block_op.register_autograd(_op_backward, setup_context=_op_setup_context)


# ----------------------------------------------------------------------------- public entry point

def adapter_block(h: Tensor, r: Tensor, ln_weight: Tensor, ln_bias: Tensor, w_down: Tensor, b_down: Tensor,
                  w_up: Tensor, b_up: Tensor, *, scaling=1.0, adapter_ln_weight: Optional[Tensor] = None,
                  adapter_ln_bias: Optional[Tensor] = None, ln_eps: float = 1e-12, adapter_ln_eps: float = 1e-5,
                  activation: str = "relu", original_ln_before: bool = True, residual_before_ln: bool = True,
                  dropout_p: float = 0.0, training: bool = False, seed: Optional[Tensor] = None,
                  backend: Optional[str] = None) -> Tensor:
    """Fused bottleneck adapter block with the sub-layer's frozen LayerNorm (docs/design.md section 2).

    h, r: (..., d), same shape and device; their dtypes may differ (autocast hands a 16-bit h and an
    fp32 r: the kernels then compute with 16-bit tensor-core operands and fp32 accumulation, and y
    has the dtype of ``h + r``). ln_weight, ln_bias: (d,). w_down: (k, d), b_down: (k,), w_up: (d, k),
    b_up: (d,). ``scaling``: a float, a learned scalar tensor (shape () or (1,)) or a per-channel
    tensor (d,). ``adapter_ln_weight``/``adapter_ln_bias``: the optional LayerNorm inside the adapter
    (ln_before). Dropout is applied to the scaled up-projection when ``training`` and
    ``dropout_p > 0``; the fused backends draw it from Philox with ``seed`` (an int64 tensor of one
    element on h's device; drawn from torch's generator when None), the torch backend from torch's
    generator. Non-contiguous inputs are copied; inputs are never modified. Without dropout and for
    k <= 64 the Triton backward reads the output y (autograd saves it): y must then not be changed in
    place before backward (autograd raises if it is).
    """
    d = _check_inputs(h, r, ln_weight, ln_bias, w_down, b_down, w_up, b_up, scaling, adapter_ln_weight,
                      adapter_ln_bias)
    activation = canonical(activation)
    dropout_p = _checks.probability("dropout_p", dropout_p)
    if not training:
        dropout_p = 0.0
    _checks.positive("ln_eps", ln_eps)
    _checks.positive("adapter_ln_eps", adapter_ln_eps)
    name = _backend.resolve(h.device, (h.dtype, r.dtype), backend, op="adapter_block")
    if name == "torch":
        return adapter_block_reference(
            h, r, ln_weight, ln_bias, w_down, b_down, w_up, b_up, scaling=scaling,
            adapter_ln_weight=adapter_ln_weight, adapter_ln_bias=adapter_ln_bias, ln_eps=ln_eps,
            adapter_ln_eps=adapter_ln_eps, activation=activation, original_ln_before=original_ln_before,
            residual_before_ln=residual_before_ln, dropout_p=dropout_p, training=training)
    if dropout_p > 0:
        if seed is None:
            seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=h.device)
        _checks.tensor("seed", seed, shape=(1,), device=h.device, dtype=torch.int64)
    else:
        seed = None
    if isinstance(scaling, Tensor):
        scale_mode, scale_value, scale = ("scalar" if scaling.numel() == 1 else "channel"), 1.0, scaling.reshape(-1)
    else:
        scale_mode, scale_value, scale = "float", float(scaling), None
    spec = AdapterBlockSpec(activation, bool(original_ln_before), bool(residual_before_ln),
                            adapter_ln_weight is not None, scale_mode, scale_value, float(ln_eps),
                            float(adapter_ln_eps), dropout_p)
    # the kernels read h and r as (tokens, d) row-major memory, whatever their leading dimensions
    params = [t if t is None or t.is_contiguous() else t.contiguous()
              for t in (ln_weight, ln_bias, w_down, b_down, w_up, b_up, scale, adapter_ln_weight, adapter_ln_bias)]
    h = h if h.is_contiguous() else h.contiguous()
    r = r if r.is_contiguous() else r.contiguous()
    if h.numel() == 0:  # no tokens: an empty y, and zero gradients from the reference's autograd
        return adapter_block_reference(h, r, ln_weight, ln_bias, w_down, b_down, w_up, b_up, scaling=scaling,
                                       adapter_ln_weight=adapter_ln_weight, adapter_ln_bias=adapter_ln_bias,
                                       activation=activation)
    if torch.compiler.is_compiling():
        return _adapter_block_op(h, r, seed, *params, spec.encode(), name)[0]
    if torch.is_grad_enabled() and (h.requires_grad or r.requires_grad
                                    or any(t is not None and t.requires_grad for t in params)):
        return _AdapterBlockFunction.apply(spec, name, h, r, seed, *params)
    return _implementation(name).forward(spec, h, r, AdapterParams(*params), seed, save=False)[0]  # y


def _check_inputs(h, r, ln_weight, ln_bias, w_down, b_down, w_up, b_up, scaling, adapter_ln_weight,
                  adapter_ln_bias):
    """Validates shapes, dtypes and devices; returns the hidden size d. One combined test first (it is
    on every call's path); the named checks below run only to say what is wrong."""
    try:
        d, k, dev = h.shape[-1], w_down.shape[0], h.device
        fine = (r.shape == h.shape and d > 0 and k > 0 and ln_weight.dim() == ln_bias.dim() == b_up.dim() == 1
                and ln_weight.shape[0] == ln_bias.shape[0] == b_up.shape[0] == d and b_down.dim() == 1
                and b_down.shape[0] == k and w_down.dim() == w_up.dim() == 2 and w_down.shape[1] == w_up.shape[0] == d
                and w_up.shape[1] == k
                and (isinstance(scaling, float) or (isinstance(scaling, Tensor) and scaling.device == dev
                                                     and (scaling.numel() == 1 or tuple(scaling.shape) == (d,))))
                and (adapter_ln_weight is None and adapter_ln_bias is None
                     or tuple(adapter_ln_weight.shape) == tuple(adapter_ln_bias.shape) == (d,))
                and all(t.device == dev and t.is_floating_point()
                        for t in (h, r, ln_weight, ln_bias, w_down, b_down, w_up, b_up, *(
                            t for t in (scaling, adapter_ln_weight, adapter_ln_bias) if isinstance(t, Tensor)))))
    except (AttributeError, IndexError, TypeError):
        fine = False
    return d if fine else _explain_inputs(h, r, ln_weight, ln_bias, w_down, b_down, w_up, b_up, scaling,
                                          adapter_ln_weight, adapter_ln_bias)


def _explain_inputs(h, r, ln_weight, ln_bias, w_down, b_down, w_up, b_up, scaling, adapter_ln_weight,
                    adapter_ln_bias):
    """Raises a ValueError/TypeError naming the first bad argument; returns d when all are fine."""
    _checks.tensor("h", h)
    if h.dim() < 1 or h.shape[-1] == 0:
        raise ValueError(f"h must have shape (..., d) with d >= 1, got {tuple(h.shape)}")
    d, dev = h.shape[-1], h.device
    _checks.tensor("r", r, shape=h.shape, device=dev)
    _checks.tensor("ln_weight", ln_weight, shape=(d,), device=dev)
    _checks.tensor("ln_bias", ln_bias, shape=(d,), device=dev)
    _checks.tensor("w_down", w_down, device=dev)
    if w_down.dim() != 2 or w_down.shape[1] != d or w_down.shape[0] < 1:
        raise ValueError(f"w_down must have shape (k, d) = (k, {d}) with k >= 1, got {tuple(w_down.shape)}")
    k = w_down.shape[0]
    _checks.tensor("b_down", b_down, shape=(k,), device=dev)
    _checks.tensor("w_up", w_up, shape=(d, k), device=dev)
    _checks.tensor("b_up", b_up, shape=(d,), device=dev)
    _checks.scaling(scaling, d, dev)
    if (adapter_ln_weight is None) != (adapter_ln_bias is None):
        raise ValueError("adapter_ln_weight and adapter_ln_bias must be given together")
    _checks.optional_tensor("adapter_ln_weight", adapter_ln_weight, shape=(d,), device=dev)
    _checks.optional_tensor("adapter_ln_bias", adapter_ln_bias, shape=(d,), device=dev)
    return d
