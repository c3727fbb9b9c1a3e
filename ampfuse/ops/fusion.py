"""Layer-wise fusion (DESIGN.md section 3b): the multimodal adaptation gate between BERT layers.

For text states x (B, T, d) and token-aligned modalities m (B, T, d_m):

    g_m   = relu([x; m] W_gm^T + b_gm)                    (d-wide gate per modality)
    shift = sum_m g_m * (m W_m^T + b_m)
    alpha = min(beta * ||x|| / (||shift|| + eps), 1)      (per token: the shift never outgrows x)
    y     = dropout(LN(x + alpha * shift))                (LN with its own trainable parameters)
"""

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _checks, backend as _backend
from ._gradients import needed, split_gradients


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
    if name == "cuda":
        raise _backend.BackendUnavailableError("ampfuse fusion_layer: the cuda backend has no fusion kernel yet; "
                                               "use backend='triton'")
    seed = None
    if dropout_p > 0:
        seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=dev)
    flat = lambda seq: [t.contiguous() for t in seq]  # noqa: E731
    y = _fusion_op(x.reshape(-1, d).contiguous(), [m.reshape(-1, m.shape[-1]).contiguous() for m in modalities],
                   flat(gate_w), flat(gate_b), flat(proj_w), flat(proj_b), ln_weight.contiguous(), ln_bias.contiguous(),
                   seed, float(beta), float(eps), float(ln_eps), dropout_p, name)
    return y.view(x.shape)


# ----------------------------------------------------------------------------- custom op

def _kernels():
    from ..kernels import fusion as kernels  # deferred: TRITON_INTERPRET is read at import
    return kernels


@torch.library.custom_op("ampfuse::fusion_layer", mutates_args=())
def _fusion_op(x: Tensor, modalities: List[Tensor], gate_w: List[Tensor], gate_b: List[Tensor], proj_w: List[Tensor],
               proj_b: List[Tensor], ln_weight: Tensor, ln_bias: Tensor, seed: Optional[Tensor], beta: float,
               eps: float, ln_eps: float, dropout_p: float, backend: str) -> Tensor:
    if x.shape[0] == 0:
        return torch.empty_like(x)
    return _kernels().fusion_fwd(x, modalities, gate_w, gate_b, proj_w, proj_b, ln_weight, ln_bias, beta, eps, ln_eps,
                                 dropout_p, seed)


@_fusion_op.register_fake
def _(x, *args):
    return torch.empty_like(x)


def _flat_size(x, modalities, ln_grad):
    return _kernels().gradient_layout(x.shape[1], [m.shape[1] for m in modalities], ln_grad)[2]


@torch.library.custom_op("ampfuse::fusion_layer_backward", mutates_args=())
def _fusion_backward_op(dy: Tensor, x: Tensor, modalities: List[Tensor], gate_w: List[Tensor], gate_b: List[Tensor],
                        proj_w: List[Tensor], proj_b: List[Tensor], ln_weight: Tensor, ln_bias: Tensor,
                        seed: Optional[Tensor], beta: float, eps: float, ln_eps: float, dropout_p: float,
                        backend: str, ln_grad: bool, mod_grad: bool) -> List[Tensor]:
    """[dx, flat, dm_0, ...]: flat holds the parameter gradients in fp32 (kernels.fusion.gradient_layout)."""
    if x.shape[0] == 0:
        return [torch.empty_like(x), x.new_zeros(_flat_size(x, modalities, ln_grad), dtype=torch.float32),
                *[torch.empty_like(m) if mod_grad else m.new_empty(0) for m in modalities]]
    dx, dms, flat = _kernels().fusion_bwd(dy, x, modalities, gate_w, gate_b, proj_w, proj_b, ln_weight, ln_bias,
                                             beta, eps, ln_eps, dropout_p, seed, ln_grad, mod_grad)
    return [dx, flat, *dms]


@_fusion_backward_op.register_fake
def _(dy, x, modalities, *args):
    ln_grad, mod_grad = args[-2:]
    return [torch.empty_like(x), x.new_empty(_flat_size(x, modalities, ln_grad), dtype=torch.float32),
            *[torch.empty_like(m) if mod_grad else m.new_empty(0) for m in modalities]]


_OP_INPUTS = ("x", "modalities", "gate_w", "gate_b", "proj_w", "proj_b", "ln_weight", "ln_bias", "seed")
_LISTS = ("modalities", "gate_w", "gate_b", "proj_w", "proj_b")


def _setup_context(ctx, inputs, output):
    ctx.count = len(inputs[1])
    ctx.save_for_backward(inputs[0], *[t for name in _LISTS for t in inputs[_OP_INPUTS.index(name)]], *inputs[6:9])
    ctx.options = inputs[len(_OP_INPUTS):]


def _backward(ctx, dy):
    saved, n = ctx.saved_tensors, ctx.count
    x, lists, (ln_weight, ln_bias, seed) = saved[0], {}, saved[1 + 5 * n:]
    for i, name in enumerate(_LISTS):
        lists[name] = list(saved[1 + i * n:1 + (i + 1) * n])
    needs = dict(zip(_OP_INPUTS, ctx.needs_input_grad))
    ln_grad, mod_grad = bool(needs["ln_weight"] or needs["ln_bias"]), bool(needs["modalities"])
    dx, flat, *dms = _fusion_backward_op(dy.contiguous(), x, *(lists[name] for name in _LISTS), ln_weight, ln_bias,
                                         seed, *ctx.options, ln_grad, mod_grad)
    layout, _, _ = _kernels().gradient_layout(x.shape[1], [m.shape[1] for m in lists["modalities"]], ln_grad)
    tensors = {"x": x, **lists, "ln_weight": ln_weight, "ln_bias": ln_bias, "seed": seed}
    grads = {"x": dx, **split_gradients(flat, layout, tensors)}
    if mod_grad:
        grads["modalities"] = dms
    return needed(grads, tensors, _OP_INPUTS, ctx.needs_input_grad) + (None,) * len(ctx.options)


_fusion_op.register_autograd(_backward, setup_context=_setup_context)
