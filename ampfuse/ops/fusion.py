"""Layer-wise fusion (docs/design.md section 3b): the multimodal adaptation gate between BERT layers.

For text states x (B, T, d) and token-aligned modalities m (B, T, d_m):

    g_m   = relu([x; m] W_gm^T + b_gm)                    (d-wide gate per modality)
    shift = sum_m g_m * (m W_m^T + b_m)
    alpha = min(beta * ||x|| / (||shift|| + eps), 1)      (per token: the shift never outgrows x)
    y     = dropout(LN(x + alpha * shift))                (LN with its own trainable parameters)

Reference, spec, autograd and dispatch; the Triton kernels are in kernels/fusion.py.
"""

from typing import List, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _checks, backend as _backend
from . import _flat, _spec


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


class FusionSpec(NamedTuple):
    """The static options of one fusion call: everything but the tensors."""
    beta: float = 1.0
    eps: float = 1e-6
    ln_eps: float = 1e-12
    dropout_p: float = 0.0              # 0 outside training
    operands: str = "float32"           # dtype (torch name) of the tensor-core operands: autocast's, else x's

    encode = _spec.encode  # the spec as one string: how torch.compile's custom op carries it


_decode = _spec.decoder(FusionSpec)


class FusionParams(NamedTuple):
    """The fusion layer's parameters: a tuple per kind with one tensor per modality, and the LayerNorm's."""
    gate_w: tuple                       # (d, d + d_m) each
    gate_b: tuple                       # (d,)
    proj_w: tuple                       # (d, d_m)
    proj_b: tuple                       # (d,)
    ln_weight: Tensor
    ln_bias: Tensor

    def weights(self) -> list:
        """The gate and projection tensors modality by modality (gate_w, gate_b, proj_w, proj_b of each): the
        order of the backward's flat gradient buffer (kernels.fusion.gradient_layout)."""
        return [t for group in zip(self.gate_w, self.gate_b, self.proj_w, self.proj_b) for t in group]

    @classmethod
    def from_weights(cls, weights, ln_weight, ln_bias):
        return cls(tuple(weights[0::4]), tuple(weights[1::4]), tuple(weights[2::4]), tuple(weights[3::4]), ln_weight,
                   ln_bias)


# ----------------------------------------------------------------------------- autograd

_KERNELS = []


def _kernels():
    """kernels/fusion.py, imported on first use (TRITON_INTERPRET is read when Triton decorates the kernels)."""
    if not _KERNELS:
        from ..kernels import fusion

        _KERNELS.append(fusion)
    return _KERNELS[0]


def _grad_dtype(params):
    """The parameters' own dtype when they share one (no cast kernels after backward), else fp32."""
    dtypes = {t.dtype for t in params.weights()} | {params.ln_weight.dtype, params.ln_bias.dtype}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def _run_backward(spec, dy, x, seed, saved, mods, params, flags):
    """(dx, [dm], flat) from the kernels; saved: the forward's (shift, row statistics, packed weights); flags:
    (x, modalities, gate/projection weights, LayerNorm) gradients wanted."""
    return _kernels().backward(spec, dy.contiguous(), x, mods, params, saved, seed, *map(bool, flags),
                               _grad_dtype(params))


def _parameter_grads(flat, params, need_weights, need_ln):
    """Views of the flat buffer per parameter (gradient_layout places them one after another, in
    params.weights() order then ln_weight, ln_bias), cast only where a parameter has another dtype; None
    where not wanted."""
    tensors = params.weights() + [params.ln_weight, params.ln_bias]
    wanted = [need_weights] * (len(tensors) - 2) + [need_ln] * 2
    grads, offset = [], 0
    for param, want in zip(tensors, wanted):
        grads.append(_flat.gradient_view(flat, offset, param) if want else None)
        offset += param.numel()
    return grads


class _FusionFunction(torch.autograd.Function):
    """The eager path: an autograd.Function costs a fraction of a torch.library op's dispatch."""

    @staticmethod
    def forward(ctx, spec, count, x, seed, *tensors):
        mods, params = tensors[:count], FusionParams.from_weights(tensors[count:-2], *tensors[-2:])
        y, saved = _kernels().forward(spec, x, mods, params, seed, save=True)
        ctx.spec, ctx.count = spec, count
        ctx.save_for_backward(x, seed, *saved, *tensors)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, seed, s, stats, pack, *tensors = ctx.saved_tensors
        k = ctx.count
        mods, params = tensors[:k], FusionParams.from_weights(tensors[k:-2], *tensors[-2:])
        needs = ctx.needs_input_grad  # spec, count, x, seed, then the tensors
        flags = (needs[2], any(needs[4:4 + k]), any(needs[4 + k:-2]), needs[-2] or needs[-1])
        dx, dms, flat = _run_backward(ctx.spec, dy, x, seed, (s, stats, pack), mods, params, flags)
        grads = [None] * k if dms is None else list(dms)
        if flat is not None:
            grads += _parameter_grads(flat, params, flags[2], flags[3])
        else:
            grads += [None] * (len(tensors) - k)
        grads = [g if need else None for g, need in zip(grads, needs[4:])]
        return None, None, dx if needs[2] else None, None, *grads


# torch.compile's path: the same launchers behind torch.library custom ops (traceable, with fake kernels). Four
# tensor arguments group the inputs the way backward decides what to compute: x, the modalities, the gate and
# projection weights (FusionParams.weights order), and the LayerNorm's.

@torch.library.custom_op("ampfuse::fusion_layer", mutates_args=())
def _fusion_op(x: Tensor, seed: Optional[Tensor], modalities: List[Tensor], weights: List[Tensor], ln_weight: Tensor,
               ln_bias: Tensor, spec: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, shift, row statistics, packed weights): the last three are what backward needs."""
    params = FusionParams.from_weights(weights, ln_weight, ln_bias)
    y, saved = _kernels().forward(_decode(spec), x, modalities, params, seed, save=True)
    return y, *saved


@_fusion_op.register_fake
def _(x, seed, modalities, weights, ln_weight, ln_bias, spec):
    operands = getattr(torch, _decode(spec).operands)
    y = x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, ln_weight.dtype))
    pack = _kernels().weight_layout(x.shape[-1], tuple(m.shape[-1] for m in modalities))[3]
    stats = x.new_empty((_kernels().NUM_STATS, x.numel() // x.shape[-1]), dtype=torch.float32)
    return y, x.new_empty(x.shape, dtype=operands), stats, x.new_empty(pack, dtype=operands)


@torch.library.custom_op("ampfuse::fusion_layer_backward", mutates_args=())
def _fusion_backward_op(dy: Tensor, x: Tensor, seed: Optional[Tensor], saved: List[Tensor], modalities: List[Tensor],
                        weights: List[Tensor], ln_weight: Tensor, ln_bias: Tensor, spec: str,
                        flags: List[bool]) -> List[Tensor]:
    """[dx, flat, dm_0, ...], empty where flags (x, modalities, weights, LayerNorm) ask for none."""
    params = FusionParams.from_weights(weights, ln_weight, ln_bias)
    dx, dms, flat = _run_backward(_decode(spec), dy, x, seed, saved, modalities, params, flags)
    empty = x.new_empty(0)
    return [empty if dx is None else dx, empty if flat is None else flat,
            *([empty] * len(modalities) if dms is None else dms)]


@_fusion_backward_op.register_fake
def _(dy, x, seed, saved, modalities, weights, ln_weight, ln_bias, spec, flags):
    params = FusionParams.from_weights(weights, ln_weight, ln_bias)
    total = _kernels().gradient_layout(x.shape[-1], tuple(m.shape[-1] for m in modalities))[2]
    empty = x.new_empty(0)
    return [torch.empty_like(x) if flags[0] else empty,
            x.new_empty(total, dtype=_grad_dtype(params)) if flags[2] or flags[3] else empty,
            *[torch.empty_like(m) if flags[1] else empty for m in modalities]]


def _op_setup_context(ctx, inputs, output):
    x, seed, modalities, weights, ln_weight, ln_bias, spec = inputs
    ctx.spec, ctx.count = spec, len(modalities)
    ctx.save_for_backward(x, seed, *output[1:], *modalities, *weights, ln_weight, ln_bias)


def _op_backward(ctx, dy, _d_shift, _d_stats, _d_pack):
    x, seed, s, stats, pack, *tensors = ctx.saved_tensors
    k = ctx.count
    mods, weights, ln = tensors[:k], tensors[k:-2], tensors[-2:]
    needs = ctx.needs_input_grad
    flags = [bool(needs[0]), bool(needs[2]), bool(needs[3]), bool(needs[4] or needs[5])]
    dx, flat, *dms = _fusion_backward_op(dy, x, seed, [s, stats, pack], mods, weights, *ln, ctx.spec, flags)
    grads = [None] * (len(weights) + 2)
    if flags[2] or flags[3]:
        grads = _parameter_grads(flat, FusionParams.from_weights(weights, *ln), flags[2], flags[3])
    return (dx if flags[0] else None, None, dms if flags[1] else [None] * k, grads[:-2],
            grads[-2] if needs[4] else None, grads[-1] if needs[5] else None, None)


_fusion_op.register_autograd(_op_backward, setup_context=_op_setup_context)


# ----------------------------------------------------------------------------- public entry point

def fusion_layer(x: Tensor, modalities: Sequence[Tensor], gate_w: Sequence[Tensor], gate_b: Sequence[Tensor],
                 proj_w: Sequence[Tensor], proj_b: Sequence[Tensor], ln_weight: Tensor, ln_bias: Tensor, *,
                 beta: float = 1.0, eps: float = 1e-6, ln_eps: float = 1e-12, dropout_p: float = 0.0,
                 training: bool = False, backend: Optional[str] = None) -> Tensor:
    """Fusion layer (see the module docstring). x: (B, T, d); modalities[m]: (B, T, d_m), any number of them;
    gate_w[m]: (d, d + d_m), gate_b[m]: (d,), proj_w[m]: (d, d_m), proj_b[m]: (d,); ln_*: (d,).

    Dtypes may differ: under autocast (16-bit x and modalities, fp32 parameters, or an fp32 x) the kernels
    run the GEMMs with autocast's 16-bit operands, as F.linear would, accumulating in fp32; without
    autocast the operands have x's dtype. y has the dtype of x promoted with ln_weight's: fp32 for
    autocast's mix, which is also what the eager module gives under CUDA autocast (its LayerNorm runs in fp32).
    dx has x's dtype, each modality's and parameter's gradient its own. Dropout (``training`` and
    ``dropout_p > 0``) draws a Philox seed from torch's generator on the fused backends. Inputs are never
    modified; non-contiguous ones are copied.
    """
    d = _check_inputs(x, modalities, gate_w, gate_b, proj_w, proj_b, ln_weight, ln_bias)
    dropout_p = _checks.probability("dropout_p", dropout_p) if training else 0.0
    name = _backend.resolve(x.device, x.dtype, backend, op="fusion_layer")
    if name == "torch":
        return fusion_layer_reference(x, list(modalities), list(gate_w), list(gate_b), list(proj_w), list(proj_b),
                                      ln_weight, ln_bias, beta=beta, eps=eps, ln_eps=ln_eps, dropout_p=dropout_p,
                                      training=training)
    if name == "cuda":
        raise _backend.BackendUnavailableError("ampfuse fusion_layer: the cuda backend has no fusion kernel yet; "
                                               "use backend='triton'")
    if x.numel() == 0:  # no tokens: an empty y, and zero gradients through the reference's autograd
        dtype = torch.promote_types(x.dtype, ln_weight.dtype)
        cast = lambda seq: [t.to(dtype) for t in seq]  # noqa: E731
        return fusion_layer_reference(x.to(dtype), cast(modalities), cast(gate_w), cast(gate_b), cast(proj_w),
                                      cast(proj_b), ln_weight.to(dtype), ln_bias.to(dtype), beta=beta, eps=eps,
                                      ln_eps=ln_eps)
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=x.device) if dropout_p > 0 else None
    spec = FusionSpec(float(beta), float(eps), float(ln_eps), dropout_p, _operands(x))
    # the kernels read each tensor as row-major memory: x and the modalities as (tokens, width)
    x, mods = _contiguous(x), [_contiguous(m) for m in modalities]
    params = FusionParams(*(tuple(_contiguous(t) for t in seq) for seq in (gate_w, gate_b, proj_w, proj_b)),
                          _contiguous(ln_weight), _contiguous(ln_bias))
    if torch.compiler.is_compiling():
        return _fusion_op(x, seed, mods, params.weights(), params.ln_weight, params.ln_bias, spec.encode())[0]
    if torch.is_grad_enabled() and (x.requires_grad or ln_weight.requires_grad or ln_bias.requires_grad
                                    or any(t.requires_grad for t in mods)
                                    or any(t.requires_grad for t in params.weights())):
        return _FusionFunction.apply(spec, len(mods), x, seed, *mods, *params.weights(), params.ln_weight,
                                     params.ln_bias)
    return _kernels().forward(spec, x, mods, params, seed, save=False)[0]


def _contiguous(t):
    return t if t.is_contiguous() else t.contiguous()


def _operands(x):
    """Name of the tensor-core operands' dtype: autocast's where autocast is on for x's device (the dtype
    F.linear would compute in), else x's."""
    kind = x.device.type
    dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype
    return str(dtype).replace("torch.", "")


def _check_inputs(x, modalities, gate_w, gate_b, proj_w, proj_b, ln_weight, ln_bias):
    """Validates shapes, dtypes and devices; returns d. One combined test first (it is on every call's path);
    the named checks below run only to say what is wrong."""
    try:
        d, dev, lead = x.shape[-1], x.device, x.shape[:-1]
        fine = (x.dim() == 3 and d > 0 and x.is_floating_point() and len(modalities) >= 1
                and len(modalities) == len(gate_w) == len(gate_b) == len(proj_w) == len(proj_b)
                and ln_weight.shape == ln_bias.shape == (d,))
        for m, gw, gb, pw, pb in zip(modalities, gate_w, gate_b, proj_w, proj_b):
            w = m.shape[-1]
            fine = fine and (m.dim() == 3 and m.shape[:2] == lead and w > 0 and gw.shape == (d, d + w)
                             and gb.shape == pb.shape == (d,) and pw.shape == (d, w))
        for seq in (modalities, gate_w, gate_b, proj_w, proj_b, (ln_weight, ln_bias)):
            for t in seq:
                fine = fine and t.device == dev and t.is_floating_point()
    except (AttributeError, IndexError, TypeError):
        fine = False
    return d if fine else _explain_inputs(x, modalities, gate_w, gate_b, proj_w, proj_b, ln_weight, ln_bias)


def _explain_inputs(x, modalities, gate_w, gate_b, proj_w, proj_b, ln_weight, ln_bias):
    """Raises a ValueError/TypeError naming the first bad argument; returns d when all are fine."""
    _checks.tensor("x", x)
    if x.dim() != 3 or x.shape[-1] == 0:
        raise ValueError(f"x must have shape (batch, tokens, d) with d >= 1, got {tuple(x.shape)}")
    d, dev = x.shape[-1], x.device
    lists = (modalities, gate_w, gate_b, proj_w, proj_b)
    if not all(isinstance(seq, (list, tuple)) for seq in lists) or not 1 <= len(modalities) == len(gate_w) == len(
            gate_b) == len(proj_w) == len(proj_b):
        raise ValueError("fusion_layer takes a list of at least one modality and lists with one gate_w, gate_b, "
                         "proj_w, proj_b for each")
    for i, m in enumerate(modalities):
        _checks.tensor(f"modalities[{i}]", m, device=dev)
        if m.dim() != 3 or m.shape[:2] != x.shape[:2] or m.shape[2] == 0:
            raise ValueError(f"modalities[{i}] must be token-aligned {tuple(x.shape[:2])} + (d_m,) with d_m >= 1, "
                             f"got {tuple(m.shape)}")
        dm = m.shape[-1]
        _checks.tensor(f"gate_w[{i}]", gate_w[i], shape=(d, d + dm), device=dev)
        _checks.tensor(f"gate_b[{i}]", gate_b[i], shape=(d,), device=dev)
        _checks.tensor(f"proj_w[{i}]", proj_w[i], shape=(d, dm), device=dev)
        _checks.tensor(f"proj_b[{i}]", proj_b[i], shape=(d,), device=dev)
    _checks.tensor("ln_weight", ln_weight, shape=(d,), device=dev)
    _checks.tensor("ln_bias", ln_bias, shape=(d,), device=dev)
    return d
