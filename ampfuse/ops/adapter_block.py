"""The fused adapter block (DESIGN.md section 2): reference, custom op, autograd, dispatch.

    a = LN(h + r)  if original_ln_before else h
    u = s * (f(LN_a(a) @ W_down^T + b_down) @ W_up^T + b_up)        (LN_a only with ln_before)
    y = LN(u + a_res + r)     a_res = h if residual_before_ln else a

LN is the frozen LayerNorm of the BERT sub-layer (ln_weight, ln_bias, ln_eps). Dropout with
probability dropout_p is applied to u in training.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _checks, backend as _backend
from ._gradients import needed, split_gradients
from .activations import ACTIVATIONS, canonical

MAX_TRITON_HIDDEN = 8192  # whole rows live in registers; wider rows need a different kernel


def adapter_block_reference(h, r, ln_weight, ln_bias, w_down, b_down, w_up, b_up, *, scaling=1.0,
                            adapter_ln_weight=None, adapter_ln_bias=None, ln_eps=1e-12, adapter_ln_eps=1e-5,
                            activation="relu", original_ln_before=True, residual_before_ln=True,
                            dropout_p=0.0, training=False, keep_mask=None):
    """Plain-PyTorch adapter block: the oracle of the tests and the CPU path.

    Parameters are cast to h's dtype (the semantics of autocast for the linear layers), so a
    float64 h gives a float64 oracle. ``keep_mask`` (bool, h's shape) replaces the random dropout
    mask, to compare with the fused kernels' mask; otherwise dropout is ``F.dropout``.
    """
    d = h.shape[-1]
    cast = (lambda t: t if t is None or not isinstance(t, Tensor) else t.to(h.dtype))
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


# ----------------------------------------------------------------------------- custom op

def _implementation(backend):
    """The module with adapter_block_fwd/bwd for this backend (imported late: TRITON_INTERPRET is
    read when the Triton kernels are imported, and the CUDA extension may not be built)."""
    if backend == "cuda":
        from . import cuda
        return cuda
    from ..kernels import adapter_block as kernels
    return kernels


@torch.library.custom_op("ampfuse::adapter_block", mutates_args=())
def _adapter_block_op(h: Tensor, r: Tensor, ln_weight: Tensor, ln_bias: Tensor, w_down: Tensor, b_down: Tensor,
                      w_up: Tensor, b_up: Tensor, scale: Optional[Tensor], adapter_ln_weight: Optional[Tensor],
                      adapter_ln_bias: Optional[Tensor], seed: Optional[Tensor], scale_value: float,
                      ln_eps: float, adapter_ln_eps: float, activation: str, original_ln_before: bool,
                      residual_before_ln: bool, dropout_p: float, backend: str) -> Tensor:
    if h.shape[0] == 0:
        return torch.empty_like(h)
    args = (h, r, ln_weight, ln_bias, w_down, b_down, w_up, b_up, scale, adapter_ln_weight, adapter_ln_bias,
            scale_value, ln_eps, adapter_ln_eps, activation, original_ln_before, residual_before_ln, dropout_p,
            seed)
    return _implementation(backend).adapter_block_fwd(*args)


@_adapter_block_op.register_fake
def _(h, r, *args):
    return torch.empty_like(h)


def gradient_layout(d, k, scale, ln_grad, ln_before):
    """[(name, offset, shape)] of the parameter gradients in the backward's flat fp32 buffer, and its
    length. Gradients that are not computed (frozen LayerNorm, float scaling) have no place."""
    shapes = [("w_down", (k, d)), ("b_down", (k,)), ("w_up", (d, k)), ("b_up", (d,))]
    if scale is not None:
        shapes.append(("scale", (scale.numel(),)))
    if ln_grad:
        shapes += [("ln_weight", (d,)), ("ln_bias", (d,))]
    if ln_before:
        shapes += [("adapter_ln_weight", (d,)), ("adapter_ln_bias", (d,))]
    layout, offset = [], 0
    for name, shape in shapes:
        layout.append((name, offset, shape))
        offset += shape[0] * (shape[1] if len(shape) == 2 else 1)
    return layout, offset


@torch.library.custom_op("ampfuse::adapter_block_backward", mutates_args=())
def _adapter_block_backward_op(dy: Tensor, h: Tensor, r: Tensor, ln_weight: Tensor, ln_bias: Tensor,
                               w_down: Tensor, b_down: Tensor, w_up: Tensor, b_up: Tensor, scale: Optional[Tensor],
                               adapter_ln_weight: Optional[Tensor], adapter_ln_bias: Optional[Tensor],
                               seed: Optional[Tensor], scale_value: float, ln_eps: float, adapter_ln_eps: float,
                               activation: str, original_ln_before: bool, residual_before_ln: bool,
                               dropout_p: float, backend: str, ln_grad: bool, input_grad: bool) -> list[Tensor]:
    """[dh, dr, flat]: flat holds every parameter gradient in fp32, placed by gradient_layout;
    dh and dr are empty when not ``input_grad``."""
    layout, total = gradient_layout(h.shape[1], w_down.shape[0], scale, ln_grad, adapter_ln_weight is not None)
    if h.shape[0] == 0:
        return [torch.empty_like(h), torch.empty_like(r), h.new_zeros(total, dtype=torch.float32)]
    args = (dy, h, r, ln_weight, ln_bias, w_down, b_down, w_up, b_up, scale, adapter_ln_weight, adapter_ln_bias,
            scale_value, ln_eps, adapter_ln_eps, activation, original_ln_before, residual_before_ln, dropout_p,
            seed, ln_grad, input_grad, layout, total)
    return list(_implementation(backend).adapter_block_bwd(*args))


@_adapter_block_backward_op.register_fake
def _(dy, h, r, ln_weight, ln_bias, w_down, b_down, w_up, b_up, scale, adapter_ln_weight, adapter_ln_bias,
      seed, *args):
    ln_grad, input_grad = args[-2:]
    _, total = gradient_layout(h.shape[1], w_down.shape[0], scale, ln_grad, adapter_ln_weight is not None)
    dx = (lambda t: torch.empty_like(t) if input_grad or t.shape[0] == 0 else t.new_empty(0))
    return [dx(h), dx(r), h.new_empty(total, dtype=torch.float32)]


_TENSOR_INPUTS = 12  # h, r, ln_weight, ln_bias, w_down, b_down, w_up, b_up, scale, adapter_ln_w, adapter_ln_b, seed


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:_TENSOR_INPUTS])
    ctx.options = inputs[_TENSOR_INPUTS:]


def _backward(ctx, dy):
    saved = ctx.saved_tensors
    needs = ctx.needs_input_grad
    ln_grad = bool(needs[2] or needs[3])
    input_grad = bool(needs[0] or needs[1])
    h, r, ln_weight, ln_bias, w_down, b_down, w_up, b_up, scale, adapter_ln_weight, adapter_ln_bias, _ = saved
    dh, dr, flat = _adapter_block_backward_op(dy.contiguous(), *saved, *ctx.options, ln_grad, input_grad)
    layout, _ = gradient_layout(h.shape[1], w_down.shape[0], scale, ln_grad, adapter_ln_weight is not None)
    tensors = dict(h=h, r=r, ln_weight=ln_weight, ln_bias=ln_bias, w_down=w_down, b_down=b_down, w_up=w_up,
                   b_up=b_up, scale=scale, adapter_ln_weight=adapter_ln_weight, adapter_ln_bias=adapter_ln_bias)
    grads = {"h": dh, "r": dr, **split_gradients(flat, layout, tensors)}
    return needed(grads, tensors, list(tensors), needs) + (None,) * (len(needs) - len(tensors))


_adapter_block_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public entry point

def adapter_block(h: Tensor, r: Tensor, ln_weight: Tensor, ln_bias: Tensor, w_down: Tensor, b_down: Tensor,
                  w_up: Tensor, b_up: Tensor, *, scaling=1.0, adapter_ln_weight: Optional[Tensor] = None,
                  adapter_ln_bias: Optional[Tensor] = None, ln_eps: float = 1e-12, adapter_ln_eps: float = 1e-5,
                  activation: str = "relu", original_ln_before: bool = True, residual_before_ln: bool = True,
                  dropout_p: float = 0.0, training: bool = False, seed: Optional[Tensor] = None,
                  backend: Optional[str] = None) -> Tensor:
    """Fused bottleneck adapter block with the sub-layer's frozen LayerNorm (DESIGN.md section 2).

    h, r: (..., d), same shape, dtype and device. ln_weight, ln_bias: (d,). w_down: (k, d),
    b_down: (k,), w_up: (d, k), b_up: (d,). ``scaling``: a float, a learned scalar tensor (shape ()
    or (1,)) or a per-channel tensor (d,). ``adapter_ln_weight``/``adapter_ln_bias``: the optional
    LayerNorm inside the adapter (ln_before). Dropout is applied to the scaled up-projection when
    ``training`` and ``dropout_p > 0``; the fused backends draw it from Philox with ``seed`` (an
    int64 tensor of one element on h's device; drawn from torch's generator when None), the torch
    backend from torch's generator. Non-contiguous inputs are copied; inputs are never modified.
    Returns y with h's shape and dtype.
    """
    d = _check_inputs(h, r, ln_weight, ln_bias, w_down, b_down, w_up, b_up, scaling, adapter_ln_weight,
                      adapter_ln_bias)
    activation = canonical(activation)
    dropout_p = _checks.probability("dropout_p", dropout_p)
    _checks.positive("ln_eps", ln_eps)
    _checks.positive("adapter_ln_eps", adapter_ln_eps)
    if not training:
        dropout_p = 0.0
    name = _backend.resolve(h.device, h.dtype, backend, op="adapter_block")
    if name != "torch" and d > MAX_TRITON_HIDDEN:
        raise _backend.BackendUnavailableError(
            f"ampfuse adapter_block: backend {name!r} supports hidden sizes up to {MAX_TRITON_HIDDEN}, got {d}")
    if name == "torch":
        return adapter_block_reference(
            h, r, ln_weight, ln_bias, w_down, b_down, w_up, b_up, scaling=scaling,
            adapter_ln_weight=adapter_ln_weight, adapter_ln_bias=adapter_ln_bias, ln_eps=ln_eps,
            adapter_ln_eps=adapter_ln_eps, activation=activation, original_ln_before=original_ln_before,
            residual_before_ln=residual_before_ln, dropout_p=dropout_p, training=training)
    if dropout_p > 0:
        if seed is None:
            seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=h.device)
        _checks.tensor("seed", seed, shape=(1,), device=h.device, floating=False)
    else:
        seed = None
    scale_tensor, scale_value = (scaling, 1.0) if isinstance(scaling, Tensor) else (None, float(scaling))
    contiguous = (lambda t: None if t is None else t.contiguous())
    y = _adapter_block_op(
        h.reshape(-1, d).contiguous(), r.reshape(-1, d).contiguous(), contiguous(ln_weight), contiguous(ln_bias),
        contiguous(w_down), contiguous(b_down), contiguous(w_up), contiguous(b_up),
        None if scale_tensor is None else scale_tensor.reshape(-1).contiguous(),
        contiguous(adapter_ln_weight), contiguous(adapter_ln_bias), seed, scale_value, float(ln_eps),
        float(adapter_ln_eps), activation, bool(original_ln_before), bool(residual_before_ln), dropout_p, name)
    return y.view(h.shape)


def _check_inputs(h, r, ln_weight, ln_bias, w_down, b_down, w_up, b_up, scaling, adapter_ln_weight,
                  adapter_ln_bias):
    """Validates shapes, dtypes and devices; returns the hidden size d."""
    _checks.tensor("h", h)
    if h.dim() < 1 or h.shape[-1] == 0:
        raise ValueError(f"h must have shape (..., d) with d >= 1, got {tuple(h.shape)}")
    d, dev = h.shape[-1], h.device
    _checks.tensor("r", r, shape=h.shape, device=dev)
    if r.dtype != h.dtype:
        raise ValueError(f"r must have h's dtype {h.dtype}, got {r.dtype}")
    _checks.tensor("ln_weight", ln_weight, shape=(d,), device=dev)
    _checks.tensor("ln_bias", ln_bias, shape=(d,), device=dev)
    _checks.tensor("w_down", w_down, device=dev)
    if w_down.dim() != 2 or w_down.shape[1] != d or w_down.shape[0] < 1:
        raise ValueError(f"w_down must have shape (k, d) = (k, {d}) with k >= 1, got {tuple(w_down.shape)}")
    k = w_down.shape[0]
    _checks.tensor("b_down", b_down, shape=(k,), device=dev)
    _checks.tensor("w_up", w_up, shape=(d, k), device=dev)
    _checks.tensor("b_up", b_up, shape=(d,), device=dev)
    if isinstance(scaling, Tensor):
        _checks.tensor("scaling", scaling, device=dev)
        if scaling.numel() != 1 and tuple(scaling.shape) != (d,):
            raise ValueError(f"scaling must be a float, a one-element tensor or a ({d},) tensor, "
                             f"got shape {tuple(scaling.shape)}")
    elif not isinstance(scaling, (int, float)):
        raise TypeError(f"scaling must be a float or a tensor, got {type(scaling).__name__}")
    if (adapter_ln_weight is None) != (adapter_ln_bias is None):
        raise ValueError("adapter_ln_weight and adapter_ln_bias must be given together")
    _checks.optional_tensor("adapter_ln_weight", adapter_ln_weight, shape=(d,), device=dev)
    _checks.optional_tensor("adapter_ln_bias", adapter_ln_bias, shape=(d,), device=dev)
    return d
