"""Triton building blocks shared by the fused ops: activations, streamed LayerNorm moments, dropout,
a tuple's element at a runtime index, the fixed-order sum of split partials.

All arithmetic here is fp32: callers convert loaded tiles with ``.to(tl.float32)`` first, which
also keeps bf16 out of the Triton interpreter's arithmetic (it stores bf16 as raw bits).
"""

import torch
import triton
import triton.language as tl

from . import codes, runtime

# Globals a kernel reads must be tl.constexpr objects (triton 3.6 rejects annotated plain numbers).
# The codes themselves live in kernels/codes.py, shared with the Python ops and the CUDA sources.
ACT_IDENTITY, ACT_RELU, ACT_GELU, ACT_GELU_TANH, ACT_SILU, ACT_TANH = (
    tl.constexpr(codes.code(codes.ACTIVATIONS, name))
    for name in ("identity", "relu", "gelu", "gelu_tanh", "silu", "tanh"))
# Scaling kinds (constexpr SCALE_MODE): a Python float (no gradient), a learned scalar, per channel.
SCALE_FLOAT, SCALE_SCALAR, SCALE_CHANNEL = (tl.constexpr(codes.code(codes.SCALE_MODES, name))
                                            for name in ("float", "scalar", "channel"))

# Float constants stay literals in the kernels: a float tl.constexpr global breaks the interpreter.
# 0.7071067811865476 = 1/sqrt(2), 0.3989422804014327 = 1/sqrt(2 pi), 0.7978845608028654 = sqrt(2/pi).


@triton.jit
def tanh_f32(x):
    # tanh(x) = 2 * sigmoid(2x) - 1: exact limits at +-inf, no libdevice dependency.
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def activation(z, ACT: tl.constexpr):
    if ACT == ACT_RELU:
        out = tl.maximum(z, 0.0)
    elif ACT == ACT_GELU:
        out = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACT == ACT_GELU_TANH:
        out = 0.5 * z * (1.0 + tanh_f32(0.7978845608028654 * (z + 0.044715 * z * z * z)))
    elif ACT == ACT_SILU:
        out = z * tl.sigmoid(z)
    elif ACT == ACT_TANH:
        out = tanh_f32(z)
    else:
        out = z
    return out


@triton.jit
def activation_grad(z, ACT: tl.constexpr):
    """d activation(z) / dz, matching torch's autograd (relu'(0) = 0)."""
    if ACT == ACT_RELU:
        out = tl.where(z > 0.0, 1.0, 0.0)
    elif ACT == ACT_GELU:
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        out = cdf + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)
    elif ACT == ACT_GELU_TANH:
        t = tanh_f32(0.7978845608028654 * (z + 0.044715 * z * z * z))
        out = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * z * z)
    elif ACT == ACT_SILU:
        sig = tl.sigmoid(z)
        out = sig * (1.0 + z * (1.0 - sig))
    elif ACT == ACT_TANH:
        t = tanh_f32(z)
        out = 1.0 - t * t
    else:
        out = z * 0.0 + 1.0
    return out


@triton.jit
def merge_moments(mean, m2, x, col_mask, before, D):
    """Per-row (mean, M2) of the ``before`` columns a walk has passed, merged with those of the chunk x
    ([BLOCK_M, BLOCK_D] fp32, of which col_mask marks the real columns): Chan's pairwise update, so a
    row's large mean does not cancel its variance away the way sum(x^2) - n mean^2 would. In a walk
    from column 0, ``before`` is the chunk's first column (walk_chunk gives it for either direction)."""
    n_a = before * 1.0
    n_b = tl.sum(col_mask.to(tl.float32), axis=0)
    chunk_mean = tl.sum(tl.where(col_mask[None, :], x, 0.0), axis=1) / n_b
    centred = tl.where(col_mask[None, :], x - chunk_mean[:, None], 0.0)
    delta = chunk_mean - mean
    n = n_a + n_b
    return mean + delta * (n_b / n), m2 + tl.sum(centred * centred, axis=1) + delta * delta * (n_a * n_b / n)


@triton.jit
def walk_chunk(i, D, REVERSE: tl.constexpr, BLOCK_D: tl.constexpr):
    """Step i of a walk over D columns in chunks of BLOCK_D, from column 0 or (REVERSE) from the last
    chunk: (the chunk's first column, how many columns the walk passed before it). Passes over the same
    rows alternate directions, so each starts on the chunks the one before read last, while they are
    still in L2 (docs/design.md, rule 7)."""
    c0 = i * BLOCK_D
    before = c0
    if REVERSE:
        c0 = (tl.cdiv(D, BLOCK_D) - 1 - i) * BLOCK_D
        before = D - tl.minimum(c0 + BLOCK_D, D)
    return c0, before


@triton.jit
def select(t, i, S: tl.constexpr):
    """t[i] for a runtime index i < S, from a tuple (of tiles, pointers' offsets or ints): one copy of the code
    that uses it, where a tl.static_range over the tuple would inline one per element."""
    out = t[0]
    for j in tl.static_range(1, S):
        out = tl.where(i == j, t[j], out)
    return out


@triton.jit
def dropout_keep(seed, offsets, p):
    """Keep-mask of inverted dropout: Philox uniform per element index, kept when >= p."""
    return tl.rand(seed, offsets) >= p


# Partials reduce_partials_kernel loads at once: a loop of one load a step waits out a round trip to memory
# a split (Triton's pipeliner leaves loads that feed no dot alone); four unrolled loads go out together.
SPLITS_AT_ONCE = tl.constexpr(4)


@triton.jit
def reduce_partials_kernel(part_ptr, out_ptr, P, T, BLOCK_T: tl.constexpr):
    """out[t] = sum_p part[p, t], summed in fp32 in a fixed order (deterministic), stored in out's dtype."""
    cols = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask = cols < T
    acc = tl.zeros([BLOCK_T], dtype=tl.float32)
    for p0 in range(0, P, SPLITS_AT_ONCE):
        for q in tl.static_range(SPLITS_AT_ONCE):  # loads independent of acc: the compiler issues them first
            acc += tl.load(part_ptr + (p0 + q) * T + cols, mask=mask & (p0 + q < P), other=0.0)
    tl.store(out_ptr + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


def sum_partials(part, dtype=torch.float32):
    """[P, T] fp32 partials -> their column sums [T] in ``dtype`` (the parameters' own, so that no cast
    kernel follows), in one launch."""
    P, T = part.shape
    flat = runtime.empty_output((T,), dtype, part.device)
    block = 1024
    runtime.launch(reduce_partials_kernel, (runtime.cdiv(T, block),), part, flat, P, T, BLOCK_T=block)
    return flat
