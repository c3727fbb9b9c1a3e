"""The adapter block on the compiled CUDA extension (csrc/, torch.ops.ampfuse_C), behind the same
forward/backward launcher interface as kernels/adapter_block.py, so the op switches backends by
name only. The CUDA kernels recompute everything in backward (forward saves nothing), read vector
parameters as fp32, take one activation dtype (h and r are promoted to a common one here), and
read the two weight matrices in that dtype, zero-padded to multiples of 16."""

import torch
import torch.nn.functional as F

from ..kernels import codes, runtime

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


def _operands(params, dtype):
    """The parameters in the order and form the kernels take them: vectors in fp32, the weight
    matrices padded to multiples of 16 and in the activation dtype (exact: every activation has f(0) = 0)."""
    k, d = params.w_down.shape
    pad_k, pad_d = -k % 16, -d % 16
    # contiguous: a zero pad clones, and a clone keeps a transposed weight's strides
    w_down = F.pad(params.w_down.to(dtype), (0, pad_d, 0, pad_k)).contiguous()
    w_up = F.pad(params.w_up.to(dtype), (0, pad_k, 0, pad_d)).contiguous()
    return (_fp32(params.ln_weight), _fp32(params.ln_bias), w_down, _fp32(params.b_down), w_up, _fp32(params.b_up),
            _fp32(params.scale), _fp32(params.adapter_ln_weight), _fp32(params.adapter_ln_bias))


def _options(spec):
    return (float(spec.scale_value), float(spec.ln_eps), float(spec.adapter_ln_eps),
            codes.ACTIVATIONS.index(spec.activation), bool(spec.original_ln_before), bool(spec.residual_before_ln),
            float(spec.dropout_p))


# The order in which adapter_block_bwd takes the offsets of the parameter gradients in its flat buffer
# (the extension's own; ops/adapter_block.py's GRAD_SLOTS places them).
GRADIENT_ORDER = ("w_up", "w_down", "b_up", "b_down", "scale", "ln_weight", "ln_bias", "adapter_ln_weight",
                  "adapter_ln_bias")


def forward(spec, h, r, params, seed, save):
    """(y, state) as kernels.adapter_block.forward; the CUDA backward recomputes: an empty state."""
    dtype, d = torch.promote_types(h.dtype, r.dtype), h.shape[-1]
    y = _ops().adapter_block_fwd(h.to(dtype).view(-1, d), r.to(dtype).view(-1, d), *_operands(params, dtype),
                                 *_options(spec), seed if spec.dropout_p > 0 else None)
    return y.view(h.shape), h.new_empty(0, dtype=torch.float32)


def reads_output(spec, k):
    """The CUDA backward recomputes from h and r: it never reads the forward's output."""
    return False


def backward(spec, dy, h, r, y, params, seed, state, input_grad, ln_grad, grad_dtype):
    """(dh, dr, flat) as kernels.adapter_block.backward (y unused): flat in ``grad_dtype``, as the op's fake
    kernel says under torch.compile (the extension writes fp32: one cast where the parameters are 16-bit)."""
    from .adapter_block import gradient_layout

    dtype, d = torch.promote_types(h.dtype, r.dtype), h.shape[-1]
    offsets, total = gradient_layout(d, params.w_down.shape[0])
    computed = {"w_down", "b_down", "w_up", "b_up"}
    if spec.scale_mode != "float":
        computed.add("scale")
    if ln_grad:
        computed |= {"ln_weight", "ln_bias"}
    if spec.ln_before:
        computed |= {"adapter_ln_weight", "adapter_ln_bias"}
    dh, dr, flat = _ops().adapter_block_bwd(
        dy.to(dtype).view(-1, d), h.to(dtype).view(-1, d), r.to(dtype).view(-1, d), *_operands(params, dtype),
        *_options(spec),
        seed if spec.dropout_p > 0 else None, bool(ln_grad), bool(input_grad),
        [offsets[name] if name in computed else -1 for name in GRADIENT_ORDER], int(total))
    if spec.scale_mode == "scalar":  # one value where the layout has d partials that sum to it
        flat[offsets["scale"] + 1:offsets["scale"] + d] = 0
    flat = flat.to(grad_dtype)
    if not input_grad:
        return None, None, flat
    return dh.to(h.dtype).view(h.shape), dr.to(r.dtype).view(h.shape), flat
