"""Calls into the compiled CUDA extension (csrc/, torch.ops.ampfuse_C) with the arguments the
Triton launchers take, so the custom ops switch backends by name only. The CUDA kernels read
vector parameters as fp32, and their tensor-core GEMMs read the two weight matrices in the
activation dtype, zero-padded to multiples of 16: both are prepared here (small copies)."""

import torch
import torch.nn.functional as F

from ..kernels import runtime  # ACTIVATION_CODES: the codes csrc/adapter_block.cu switches on too


_poison_sent = False  # the extension's copy of runtime.POISON_OUTPUTS


def _ops():
    global _poison_sent
    from .. import _C  # noqa: F401 - loading the library registers torch.ops.ampfuse_C
    ops = torch.ops.ampfuse_C
    if runtime.POISON_OUTPUTS != _poison_sent:  # the tests' NaN-filled outputs, for the CUDA kernels too
        ops.set_poison_outputs(runtime.POISON_OUTPUTS)
        _poison_sent = runtime.POISON_OUTPUTS
    return ops


def _fp32(t):
    return None if t is None else t.to(torch.float32).contiguous()


def _padded_weights(w_down, w_up, dtype):
    """W_down as (KP, DP) and W_up as (DP, KP) in dtype, zero-padded to multiples of 16."""
    k, d = w_down.shape
    pad_k, pad_d = -k % 16, -d % 16
    # contiguous: a zero pad clones, and a clone keeps a transposed weight's strides
    return (F.pad(w_down.to(dtype), (0, pad_d, 0, pad_k)).contiguous(),
            F.pad(w_up.to(dtype), (0, pad_k, 0, pad_d)).contiguous())


def _operands(h, ln_weight, ln_bias, w_down, b_down, w_up, b_up, scale, adapter_ln_weight, adapter_ln_bias):
    """The parameters in the order and form the kernels take them: vectors in fp32, the weight
    matrices padded and in h's dtype (never through an fp32 copy)."""
    w_down, w_up = _padded_weights(w_down, w_up, h.dtype)
    return (_fp32(ln_weight), _fp32(ln_bias), w_down, _fp32(b_down), w_up, _fp32(b_up), _fp32(scale),
            _fp32(adapter_ln_weight), _fp32(adapter_ln_bias))


def adapter_block_fwd(h, r, ln_weight, ln_bias, w_down, b_down, w_up, b_up, scale, adapter_ln_weight,
                      adapter_ln_bias, scale_value, ln_eps, adapter_ln_eps, activation, original_ln_before,
                      residual_before_ln, dropout_p, seed):
    operands = _operands(h, ln_weight, ln_bias, w_down, b_down, w_up, b_up, scale, adapter_ln_weight,
                         adapter_ln_bias)
    return _ops().adapter_block_fwd(h, r, *operands, float(scale_value), float(ln_eps), float(adapter_ln_eps),
                                    runtime.ACTIVATION_CODES[activation], bool(original_ln_before),
                                    bool(residual_before_ln), float(dropout_p), seed if dropout_p > 0 else None)


GRADIENT_ORDER = ("w_up", "w_down", "b_up", "b_down", "scale", "ln_weight", "ln_bias", "adapter_ln_weight",
                  "adapter_ln_bias")


def adapter_block_bwd(dy, h, r, ln_weight, ln_bias, w_down, b_down, w_up, b_up, scale, adapter_ln_weight,
                      adapter_ln_bias, scale_value, ln_eps, adapter_ln_eps, activation, original_ln_before,
                      residual_before_ln, dropout_p, seed, ln_grad, input_grad, layout, total):
    operands = _operands(h, ln_weight, ln_bias, w_down, b_down, w_up, b_up, scale, adapter_ln_weight,
                         adapter_ln_bias)
    offsets = {name: offset for name, offset, _ in layout}
    return _ops().adapter_block_bwd(
        dy, h, r, *operands, float(scale_value), float(ln_eps), float(adapter_ln_eps),
        runtime.ACTIVATION_CODES[activation], bool(original_ln_before), bool(residual_before_ln), float(dropout_p),
        seed if dropout_p > 0 else None, bool(ln_grad), bool(input_grad),
        [offsets.get(name, -1) for name in GRADIENT_ORDER], int(total))
