"""Fused bottleneck adapter block (docs/design.md section 2), streamed over the hidden width.

No d-wide row lives in registers (design rule 1). A program owns BLOCK_M rows and walks the
hidden width d in chunks of BLOCK_D columns, once per pass; passes after the first re-read h and
r from L2. Between chunks only k-wide tiles ([BLOCK_M, BLOCK_K]) and per-row scalars stay on chip.

forward, 2 launches
  adapter_constants_kernel  per-call constants of the parameters, in one fp32 buffer (layout
                            below): the vector parameters (a float scaling becomes a vector), the
                            LayerNorm fold vectors W_down gamma and W_down beta + b_down, and the
                            centred Gram matrix of s o W_up that gives the output LayerNorm's
                            variance without another pass. Latency-bound: one pass over d in
                            256-column chunks, the centred sums taken about a shift.
  adapter_fwd_kernel        [moments of x1 = h + r] [moments of a]  (only when a must be exact)
                            down: z = an W_down^T + b_down on tensor cores; for the Pfeiffer
                                  placement LN(x1) is folded into the product,
                                  LN(x1) W^T = rstd (((x1 - c) o gamma) W^T - (mean - c) W gamma) + W beta,
                                  with c a per-row shift (the first chunk's mean) so the 16-bit
                                  operand does not carry the row's mean; the residual's moments and
                                  its product with s o W_up (the output moments, algebraically)
                            [exact output moments, with dropout]
                            out:  y = LN(dropout(s (f(z) W_up^T + b_up)) + residual)
                            It saves z (tokens x k, fp32), seven row statistics and, where the
                            output moments are algebraic, the residual's product with s o W_up
                            (tokens x k, fp32) for backward.
backward, 3 launches
  adapter_bwd_rows_kernel   one pass per row block over dy and y where the forward's output
                            moments were algebraic (no dropout, k <= 64), else over dy, h, r with o
                            recomputed (and its exact moments): the output LayerNorm's row sums
                            and dp = dv W_up, folded as rstd_o (g W' - mean(g) W' 1 - mean(g ohat)
                            ohat W') with W' = s o W_up (dots that need no row sum first; from y,
                            g ohat = dy o (y - beta) and ohat W' comes from the Gram constants and
                            the saved product); dz = dp f'(z); the LayerNorm row
                            scalars below the adapter (algebraic for Pfeiffer and Houlsby, one more
                            pass otherwise). Writes p = f(z) and dz in the operand dtype, and eight
                            row scalars.
  adapter_bwd_cols_kernel   grid of column chunks x token splits x bottleneck slices: dh (and dr
                            where it differs), elementwise from the row scalars (the products
                            p W_up^T and dz W_down it recomputes step through k 64 columns at a
                            time), and the weight gradients as GEMMs over the split's tokens
                            accumulated on chip ([BLOCK_KS, BLOCK_D] each: a slice of at most 128
                            of the k columns), the d-wide vector gradients as column sums; one
                            fp32 partial per split.
  reduce_partials_kernel    sums the splits in a fixed order (deterministic), casting to the
                            parameters' dtype.
"""

from typing import NamedTuple

import triton
import triton.language as tl

from .common import (SCALE_FLOAT, SCALE_SCALAR, activation, activation_grad, dropout_keep, merge_moments,
                     sum_partials, walk_chunk)

# Rows of the constants buffer's vector blocks (offsets: row * D for VEC_*, 6 * D + row * K for KVEC_*,
# then the K x K Gram matrix, then two scalars).
VEC_GAMMA, VEC_BETA, VEC_GA, VEC_BA, VEC_S, VEC_BU = map(tl.constexpr, range(6))
NUM_VEC = tl.constexpr(6)  # (host code below uses plain ints: constexpr arithmetic is slow in Python)
KVEC_BD, KVEC_F1, KVEC_F2, KVEC_ASUM, KVEC_GBC = map(tl.constexpr, range(5))
NUM_KVEC = tl.constexpr(5)
# What the forward saves for backward, one fp32 buffer: z (M, K), then 7 rows of M statistics (mean
# and rstd of o, of x1, of a; and, where o's moments are algebraic, shift - mean of the residual), then,
# where they are algebraic, sum_c (res_c - shift) W'[c, :] (M, K), from which backward gets T = res Ac^T.
# The backward's row kernel hands the column kernel p = f(z) and dz side by side, (M, 2K) in the operand
# dtype (what the column kernel's dots take), and 8 rows of M fp32 row scalars: mean(g), mean(g ohat), the adapter
# LayerNorm's two, the frozen one's two, and the mean and rstd of o the output LayerNorm's backward
# takes: the forward's where they were algebraic (those that wrote y, from which mean(g ohat) comes),
# else exact ones that backward takes as it recomputes o (with dropout).
SAVED_ROWS, ROWGRAD_ROWS = 7, 8
_SAVED_ROWS = tl.constexpr(SAVED_ROWS)  # for the kernels, which cannot read a plain int global
ROW_T_SHIFT = tl.constexpr(6)  # the saved row statistic shift - mean of the residual
# Parameter gradients in the backward's flat buffer, in the order of ampfuse.ops.adapter_block.GRAD_SLOTS
# (w_down, b_down, w_up, b_up, scale, ln_weight, ln_bias, adapter_ln_weight, adapter_ln_bias; see
# _grad_offset); slots of gradients not computed stay unwritten.
G_WD, G_BD, G_WU, G_BU, G_S, G_LNW, G_LNB, G_AW, G_AB = map(tl.constexpr, range(9))


class Flags(NamedTuple):
    """The static options every adapter-block kernel specialises on, as one tl.constexpr (CFG)."""
    ORIG_LN_BEFORE: bool        # a = LN(h + r) (Pfeiffer) or a = h (Houlsby)
    LN_BEFORE: bool             # the adapter's own LayerNorm on a
    RESIDUAL_BEFORE_LN: bool    # the residual is h + r (else a + r)
    DROPOUT: bool
    ACT: int                    # kernels/codes.py ACTIVATIONS
    SCALE_MODE: int             # kernels/codes.py SCALE_MODES
    INPUT_GRAD: bool = False    # backward: dh (and dr) wanted
    DR_IS_DH: bool = False      # backward: Pfeiffer placement, h and r of one dtype: dr equals dh, written once
    LN_GRAD: bool = False       # backward: the frozen LayerNorm's parameters want gradients


# ----------------------------------------------------------------------------- shared pieces

@triton.constexpr_function
def _operand_type(h_type, r_type):
    """The tensor-core operands' type: the 16-bit one of h's and r's (autocast hands the op a 16-bit h and an
    fp32 r), else fp32; operand_dtype below is the host's copy."""
    return r_type if h_type == tl.float32 else h_type


@triton.jit
def _vec(consts, row, cols, col_mask, D):
    """Row ``row`` of the constants' d-vector block, at ``cols``."""
    return tl.load(consts + row * D + cols, mask=col_mask, other=0.0)


@triton.jit
def _kvec(consts, row, kk, k_mask, D, K):
    return tl.load(consts + NUM_VEC * D + row * K + kk, mask=k_mask, other=0.0)


@triton.jit
def _row_scalar(buf, i, rows, row_mask, M):
    """Row scalar i (of a [rows, M] block of them) at ``rows``."""
    return tl.load(buf + i * M + rows, mask=row_mask, other=0.0)


@triton.jit
def _row_scalars(buf, rows, row_mask, M):
    """The first six row scalars of a [rows, M] block at ``rows``."""
    return (_row_scalar(buf, 0, rows, row_mask, M), _row_scalar(buf, 1, rows, row_mask, M),
            _row_scalar(buf, 2, rows, row_mask, M), _row_scalar(buf, 3, rows, row_mask, M),
            _row_scalar(buf, 4, rows, row_mask, M), _row_scalar(buf, 5, rows, row_mask, M))


@triton.jit
def _store_row_scalars(buf, rows, row_mask, M, v0, v1, v2, v3, v4, v5):
    base = buf + rows
    tl.store(base, v0, mask=row_mask)
    tl.store(base + M, v1, mask=row_mask)
    tl.store(base + 2 * M, v2, mask=row_mask)
    tl.store(base + 3 * M, v3, mask=row_mask)
    tl.store(base + 4 * M, v4, mask=row_mask)
    tl.store(base + 5 * M, v5, mask=row_mask)


@triton.jit
def _grad_offset(slot, D, K):
    """Offset of GRAD_SLOTS[slot] in the flat gradient buffer: two K x D matrices and K + 6 D vectors."""
    if slot == G_WD:
        off = 0
    elif slot == G_BD:
        off = K * D
    elif slot == G_WU:
        off = K * D + K
    else:
        off = 2 * K * D + K + (slot - G_BU) * D
    return off


@triton.jit
def _saved_part(consts, saved_offset):
    """The saved part of the forward's state: z (M, K), then SAVED_ROWS rows of M statistics. saved_offset is
    even, and "// 2 * 2" tells the compiler so: the saved part is 8-byte aligned, which it cannot know from an
    int argument (sm_90, d = 768, k = 64, bf16: the forward took 120 registers and 2 blocks per SM with it,
    164 without; the previous head's 8-byte aligned view gave 144). It must never learn 16-byte alignment
    (the kernels do not specialise saved_offset): that vectorises the store of z, and the forward in the
    autocast mix with the adapter LayerNorm and dropout at k = 256 then spills (benchmarks/compile_report)."""
    return consts + saved_offset // 2 * 2


@triton.jit
def _gram(consts, kk, k_mask, D, K):
    """The centred Gram matrix Gc = Ac Ac^T of the constants, [BLOCK_K, BLOCK_K] fp32."""
    return tl.load(consts + NUM_VEC * D + NUM_KVEC * K + kk[:, None] * K + kk[None, :],
                   mask=k_mask[:, None] & k_mask[None, :], other=0.0)


@triton.jit
def _saved_t(saved_ptr, rows, kk, M, K):
    """Pointers to T's rows ``rows`` at columns ``kk`` in the saved part (after z and the row statistics)."""
    return saved_ptr + (M * K + _SAVED_ROWS * M) + rows[:, None] * K + kk[None, :]


@triton.jit
def _chunk(ptr, rows, row_mask, cols, col_mask, D):
    """[BLOCK_M, BLOCK_D] fp32 chunk of a (M, D) row-major tensor, 0 outside."""
    mask = row_mask[:, None] & col_mask[None, :]
    return tl.load(ptr + rows[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _inputs(h_ptr, r_ptr, consts, rows, row_mask, cols, col_mask, D, mean1, rstd1, mean_a, rstd_a,
            CFG: tl.constexpr):
    """One chunk of the adapter's inputs, exact given the row statistics it needs:
    (x1 = h + r, x1_hat, a, a_hat, an, residual); padded columns hold 0. Unused ones cost nothing
    (the compiler drops them)."""
    h = _chunk(h_ptr, rows, row_mask, cols, col_mask, D)
    r = _chunk(r_ptr, rows, row_mask, cols, col_mask, D)
    x1 = h + r
    x1hat = tl.where(col_mask[None, :], (x1 - mean1[:, None]) * rstd1[:, None], 0.0)
    if CFG.ORIG_LN_BEFORE:
        a = x1hat * _vec(consts, VEC_GAMMA, cols, col_mask, D)[None, :] + _vec(consts, VEC_BETA, cols, col_mask,
                                                                               D)[None, :]
    else:
        a = h
    ahat = tl.where(col_mask[None, :], (a - mean_a[:, None]) * rstd_a[:, None], 0.0)
    if CFG.LN_BEFORE:
        an = ahat * _vec(consts, VEC_GA, cols, col_mask, D)[None, :] + _vec(consts, VEC_BA, cols, col_mask, D)[None, :]
    else:
        an = a
    if CFG.RESIDUAL_BEFORE_LN:
        res = x1
    else:
        res = a + r
    return x1, x1hat, a, ahat, an, res


@triton.jit
def _weight_tile(w_ptr, stride_k, stride_d, kk, k_mask, cols, col_mask):
    """[len(kk), BLOCK_D] tile of a k x d view of a weight at bottleneck indices kk and hidden columns cols,
    element (j, c) at w_ptr + j stride_k + c stride_d: W_down is (D, 1), W_up^T is (1, K); 0 outside."""
    return tl.load(w_ptr + kk[:, None] * stride_k + cols[None, :] * stride_d, mask=k_mask[:, None] & col_mask[None, :],
                   other=0.0)


@triton.jit
def _up_product(p_op, wu_ptr, cols, col_mask, kk, k_mask, K, PRECISION: tl.constexpr):
    """p W_up^T at one chunk of columns, for the bottleneck columns kk: [BLOCK_M, BLOCK_D] fp32."""
    wut = _weight_tile(wu_ptr, 1, K, kk, k_mask, cols, col_mask)
    return tl.dot(p_op, wut.to(p_op.dtype), input_precision=PRECISION)


@triton.jit
def _up_chunk(p_op, wu_ptr, consts, rows, row_mask, cols, col_mask, kk, k_mask, D, K, seed_ptr, p_drop,
              CFG: tl.constexpr, PRECISION: tl.constexpr):
    """(w, v, keep) of one chunk: v = p W_up^T + b_up, w = dropout(s v) (keep: the dropout mask)."""
    return _up_from_product(_up_product(p_op, wu_ptr, cols, col_mask, kk, k_mask, K, PRECISION), consts, rows, cols,
                            col_mask, D, seed_ptr, p_drop, CFG)


@triton.jit
def _up_from_product(pw, consts, rows, cols, col_mask, D, seed_ptr, p_drop, CFG: tl.constexpr):
    """_up_chunk given the product pw = p W_up^T."""
    v = pw + _vec(consts, VEC_BU, cols, col_mask, D)[None, :]
    w = v * _vec(consts, VEC_S, cols, col_mask, D)[None, :]
    keep = w == w  # all kept without dropout
    if CFG.DROPOUT:
        keep = dropout_keep(tl.load(seed_ptr), rows[:, None] * D + cols[None, :], p_drop)
        w = tl.where(keep, w / (1.0 - p_drop), 0.0)
    return w, v, keep


@triton.jit
def _scaled_w_up(wu_ptr, consts, cols, col_mask, kk, k_mask, D, K):
    """W' = s o W_up for one chunk, [BLOCK_D, BLOCK_K] fp32."""
    wu = tl.load(wu_ptr + cols[:, None] * K + kk[None, :], mask=col_mask[:, None] & k_mask[None, :], other=0.0)
    return wu.to(tl.float32) * _vec(consts, VEC_S, cols, col_mask, D)[:, None]


@triton.jit
def _first_chunk_mean(h_ptr, r_ptr, consts, rows, row_mask, D, mean1, rstd1, mean_a, rstd_a,
                      CFG: tl.constexpr, BLOCK_D: tl.constexpr):
    """Per-row mean of the residual's first chunk (x1 in the Pfeiffer placement): the shift that keeps a
    row's common offset out of 16-bit dot operands."""
    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < D
    _x1, _x1hat, _a, _ahat, _an, res = _inputs(h_ptr, r_ptr, consts, rows, row_mask, cols, col_mask, D, mean1, rstd1,
                                               mean_a, rstd_a, CFG)
    return tl.sum(res, axis=1) / tl.minimum(D, BLOCK_D)


# ----------------------------------------------------------------------------- forward

@triton.jit
def adapter_constants_kernel(
    gamma_ptr, beta_ptr,            # frozen LayerNorm (d)
    ga_ptr, ba_ptr,                 # adapter LayerNorm (d), read when LN_BEFORE
    wd_ptr, bd_ptr,                 # W_down (k, d), b_down (k)
    wu_ptr, bu_ptr,                 # W_up (d, k), b_up (d)
    s_ptr, s_value,                 # scaling: tensor (SCALE_MODE scalar/channel) or float
    consts,                         # out: fp32 constants buffer (layout at the top of this file)
    D, K,
    LN_BEFORE: tl.constexpr,
    SCALE_MODE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_G: tl.constexpr,          # rows of k a program owns
):
    """Grid (k / BLOCK_G, 1 + k / BLOCK_G with the Gram block, else 1). Program (i, 0) writes the fold vectors,
    b_down and the row sums of A for rows i (and program (0, 0) the d-vectors); program (i, 1 + j) tile (i, j)
    of the Gram block, programs (i, 1) also Ac bc for rows i, and program (0, 1) the two scalars. A
    latency-bound kernel (a few programs over about a hundred KB of weights): its time is its dependent round
    trips to memory, so each program makes one pass over d in a few wide chunks (docs/design.md, rule 8)."""
    pi = tl.program_id(0)
    pj = tl.program_id(1)
    gi = pi * BLOCK_G + tl.arange(0, BLOCK_G)
    i_mask = gi < K
    kvec = consts + NUM_VEC * D
    # Each step issues all its loads before any arithmetic: a reduction or layout change between two loads
    # puts a barrier between them, and then a second round trip into the step.
    if pj == 0:
        # W_down's fold vectors, and the row sums of A = W'^T (W' = s o W_up: A[i, c] = s_c W_up[c, i])
        sum_i = tl.zeros([BLOCK_G], dtype=tl.float32)
        f1 = tl.zeros([BLOCK_G], dtype=tl.float32)
        f2 = tl.zeros([BLOCK_G], dtype=tl.float32)
        for c0 in range(0, D, BLOCK_D):
            cols = c0 + tl.arange(0, BLOCK_D)
            col_mask = cols < D
            s = _scale_chunk(s_ptr, s_value, cols, col_mask, SCALE_MODE)
            wu = _up_rows(wu_ptr, gi, i_mask, cols, col_mask, K)
            wd = tl.load(wd_ptr + gi[:, None] * D + cols[None, :], mask=i_mask[:, None] & col_mask[None, :], other=0.0)
            if LN_BEFORE:  # fold vectors of the LayerNorm right before W_down
                lam = tl.load(ga_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
                mu = tl.load(ba_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
            else:
                lam = tl.load(gamma_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
                mu = tl.load(beta_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
            if pi == 0:  # the d-vectors of this chunk (loads first: a store may alias a later load)
                gamma, beta = lam, mu
                if LN_BEFORE:
                    gamma = tl.load(gamma_ptr + cols, mask=col_mask)
                    beta = tl.load(beta_ptr + cols, mask=col_mask)
                b_up = tl.load(bu_ptr + cols, mask=col_mask)
                tl.store(consts + VEC_GAMMA * D + cols, gamma, mask=col_mask)
                tl.store(consts + VEC_BETA * D + cols, beta, mask=col_mask)
                tl.store(consts + VEC_BU * D + cols, b_up, mask=col_mask)
                tl.store(consts + VEC_S * D + cols, s, mask=col_mask)
                if LN_BEFORE:
                    tl.store(consts + VEC_GA * D + cols, lam, mask=col_mask)
                    tl.store(consts + VEC_BA * D + cols, mu, mask=col_mask)
            sum_i += tl.sum(wu * s[None, :], axis=1)
            wd = wd.to(tl.float32)
            f1 += tl.sum(wd * lam[None, :], axis=1)
            f2 += tl.sum(wd * mu[None, :], axis=1)
        b_down = tl.load(bd_ptr + gi, mask=i_mask, other=0.0).to(tl.float32)
        tl.store(kvec + KVEC_BD * K + gi, b_down, mask=i_mask)
        tl.store(kvec + KVEC_F1 * K + gi, f1, mask=i_mask)
        tl.store(kvec + KVEC_F2 * K + gi, f2 + b_down, mask=i_mask)
        tl.store(kvec + KVEC_ASUM * K + gi, sum_i, mask=i_mask)
    else:
        # the centred Gram tile Gc[i, j] = sum_c (A[i, c] - m_i)(A[j, c] - m_j), (Ac bc)[i] with b = s o b_up,
        # and |bc|^2, from one pass of sums about a shift (each row's mean over the first chunk, sa):
        #   sum_c (a_c - m)(b_c - n) = sum_c (a_c - sa)(b_c - sb) - D (m - sa)(n - sb)
        # m - sa is small, so a large mean does not cancel the spread away (as in a one-pass sum of squares)
        gj = (pj - 1) * BLOCK_G + tl.arange(0, BLOCK_G)
        j_mask = gj < K
        zero = tl.zeros([BLOCK_G], dtype=tl.float32)
        shift_i, shift_j, sum_i, sum_j, gb = zero, zero, zero, zero, zero  # gb: sum_c (A[i, c] - sa_i)(b_c - sb)
        gram = tl.zeros([BLOCK_G, BLOCK_G], dtype=tl.float32)
        shift_b = tl.sum(zero, axis=0)
        sum_b, sq_b = shift_b, shift_b  # sum_c (b_c - sb), sum_c (b_c - sb)^2
        for c0 in range(0, D, BLOCK_D):
            cols = c0 + tl.arange(0, BLOCK_D)
            col_mask = cols < D
            s = _scale_chunk(s_ptr, s_value, cols, col_mask, SCALE_MODE)
            wu_i = _up_rows(wu_ptr, gi, i_mask, cols, col_mask, K)
            wu_j = _up_rows(wu_ptr, gj, j_mask, cols, col_mask, K)
            b = s * tl.load(bu_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
            a_i = wu_i * s[None, :]
            a_j = wu_j * s[None, :]
            if c0 == 0:  # the shifts, from the first chunk's own loads
                first = tl.sum(col_mask.to(tl.float32), axis=0)
                shift_i = tl.sum(a_i, axis=1) / first
                shift_j = tl.sum(a_j, axis=1) / first
                shift_b = tl.sum(b, axis=0) / first
            a_i = tl.where(col_mask[None, :], a_i - shift_i[:, None], 0.0)
            a_j = tl.where(col_mask[None, :], a_j - shift_j[:, None], 0.0)
            b = tl.where(col_mask, b - shift_b, 0.0)
            sum_i += tl.sum(a_i, axis=1)
            sum_j += tl.sum(a_j, axis=1)
            gram = tl.dot(a_i, tl.trans(a_j), acc=gram, input_precision=PRECISION)
            gb += tl.sum(a_i * b[None, :], axis=1)
            sum_b += tl.sum(b, axis=0)
            sq_b += tl.sum(b * b, axis=0)
        dm_i, dm_j, dm_b = sum_i / D, sum_j / D, sum_b / D  # the means' distances from the shifts
        tl.store(kvec + NUM_KVEC * K + gi[:, None] * K + gj[None, :], gram - D * dm_i[:, None] * dm_j[None, :],
                 mask=i_mask[:, None] & j_mask[None, :])
        if pj == 1:
            tl.store(kvec + KVEC_GBC * K + gi, gb - D * dm_i * dm_b, mask=i_mask)
            if pi == 0:  # the scalars |bc|^2 and sum_c b_c
                tail = kvec + NUM_KVEC * K + K * K
                tl.store(tail, sq_b - D * dm_b * dm_b)
                tl.store(tail + 1, sum_b + D * shift_b)


@triton.jit
def _scale_chunk(s_ptr, s_value, cols, col_mask, SCALE_MODE: tl.constexpr):
    """The scaling s at ``cols`` as an fp32 vector, whatever its kind."""
    if SCALE_MODE == SCALE_FLOAT:
        s = tl.where(col_mask, s_value, 0.0)
    elif SCALE_MODE == SCALE_SCALAR:
        s = tl.where(col_mask, tl.load(s_ptr).to(tl.float32), 0.0)
    else:
        s = tl.load(s_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    return s


@triton.jit
def _up_rows(wu_ptr, rows_k, k_mask, cols, col_mask, K):
    """Rows rows_k of W_up^T at ``cols``: [len(rows_k), BLOCK_D] fp32. Its own load, as the constants
    kernel's W_down load: through _weight_tile, triton 3.6 spilled 8 bytes in that kernel (mix and fp32)."""
    wu = tl.load(wu_ptr + cols[None, :] * K + rows_k[:, None], mask=k_mask[:, None] & col_mask[None, :], other=0.0)
    return wu.to(tl.float32)


@triton.jit(do_not_specialize=["saved_offset"])
def adapter_fwd_kernel(
    h_ptr, r_ptr,                   # (M, D) inputs: dense output h, residual r (dtypes may differ: autocast)
    y_ptr,                          # (M, D) out, in the dtype of h + r
    consts,                         # adapter_constants_kernel's buffer, the head of the forward's state
    saved_offset,                   # where the state's saved part starts: out when SAVE, z (M, K) then
                                    # SAVED_ROWS rows of M statistics, fp32
    wd_ptr, wu_ptr,                 # W_down (K, D), W_up (D, K)
    seed_ptr, p_drop,               # dropout: Philox seed (int64[1]) and probability
    M, D, K, eps, eps_a,
    CFG: tl.constexpr,              # Flags (the static options)
    OUT_PASS: tl.constexpr,         # the output moments by an exact pass (dropout, or a k too wide for the Gram tile)
    SAVE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # LN(x1) folded into the down-projection: a itself is then never needed (Pfeiffer placement)
    FOLD: tl.constexpr = CFG.ORIG_LN_BEFORE and CFG.RESIDUAL_BEFORE_LN and not CFG.LN_BEFORE
    saved_ptr = _saved_part(consts, saved_offset)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    kk = tl.arange(0, BLOCK_K)
    k_mask = kk < K
    op = _operand_type(h_ptr.dtype.element_ty, r_ptr.dtype.element_ty)
    zero = tl.zeros([BLOCK_M], dtype=tl.float32)
    mean1, rstd1, mean_a, rstd_a = zero, zero, zero, zero

    # ---- exact statistics a needs: of x1 (when a = LN(x1) is used as is), then of a (adapter LN) ----
    # The passes over h and r alternate directions (walk_chunk) and the down pass walks from column 0.
    if CFG.ORIG_LN_BEFORE and not FOLD:
        mean1, m2 = zero, zero
        for i in range(0, tl.cdiv(D, BLOCK_D)):
            c0, before = walk_chunk(i, D, not CFG.LN_BEFORE, BLOCK_D)
            cols = c0 + tl.arange(0, BLOCK_D)
            col_mask = cols < D
            x1, _x1hat, _a, _ahat, _an, _res = _inputs(h_ptr, r_ptr, consts, rows, row_mask, cols, col_mask, D, zero,
                                                       zero, zero, zero, CFG)
            mean1, m2 = merge_moments(mean1, m2, x1, col_mask, before, D)
        rstd1 = 1.0 / tl.sqrt(m2 / D + eps)
    if CFG.LN_BEFORE:
        mean_a, m2 = zero, zero
        for i in range(0, tl.cdiv(D, BLOCK_D)):
            c0, before = walk_chunk(i, D, True, BLOCK_D)
            cols = c0 + tl.arange(0, BLOCK_D)
            col_mask = cols < D
            _x1, _x1hat, a, _ahat, _an, _res = _inputs(h_ptr, r_ptr, consts, rows, row_mask, cols, col_mask, D,
                                                       mean1, rstd1, zero, zero, CFG)
            mean_a, m2 = merge_moments(mean_a, m2, a, col_mask, before, D)
        rstd_a = 1.0 / tl.sqrt(m2 / D + eps_a)

    # ---- down: z, and (without dropout) the residual's moments and its product with W' = s o W_up ----
    shift = _first_chunk_mean(h_ptr, r_ptr, consts, rows, row_mask, D, mean1, rstd1, mean_a, rstd_a,
                              CFG, BLOCK_D)
    acc_z = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    acc_t = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)  # sum_c (res_c - shift) W'[c, :]
    acc_b = zero  # sum_c (res_c - shift) s_c b_up_c
    mean_r, m2_r = zero, zero
    for c0 in range(0, D, BLOCK_D):
        cols = c0 + tl.arange(0, BLOCK_D)
        col_mask = cols < D
        x1, _x1hat, _a, _ahat, an, res = _inputs(h_ptr, r_ptr, consts, rows, row_mask, cols, col_mask, D, mean1,
                                                 rstd1, mean_a, rstd_a, CFG)
        wd = _weight_tile(wd_ptr, D, 1, kk, k_mask, cols, col_mask).to(tl.float32)
        res_c = tl.where(col_mask[None, :], res - shift[:, None], 0.0)
        if FOLD:  # gamma joins the activation side: W_down stays exact when it is 16-bit already
            gx = res_c * _vec(consts, VEC_GAMMA, cols, col_mask, D)[None, :]
            acc_z = tl.dot(gx.to(op), tl.trans(wd.to(op)), acc=acc_z, input_precision=PRECISION)
        else:
            acc_z = tl.dot(an.to(op), tl.trans(wd.to(op)), acc=acc_z, input_precision=PRECISION)
        if FOLD or not OUT_PASS:
            mean_r, m2_r = merge_moments(mean_r, m2_r, res, col_mask, c0, D)
        if not OUT_PASS:
            acc_t = tl.dot(res_c.to(op), _scaled_w_up(wu_ptr, consts, cols, col_mask, kk, k_mask, D, K).to(op),
                           acc=acc_t, input_precision=PRECISION)
            b = _vec(consts, VEC_S, cols, col_mask, D) * _vec(consts, VEC_BU, cols, col_mask, D)
            acc_b += tl.sum(res_c * b[None, :], axis=1)

    if SAVE and not OUT_PASS:  # for the backward's pass over dy and y. Stored here, as the raw sum (T after
        # the "t =" below took 140 registers on sm_90 and 56 KiB), and shift - mean_r with the row statistics
        tl.store(_saved_t(saved_ptr, rows, kk, M, K), acc_t, mask=row_mask[:, None] & k_mask[None, :])
    f1 = _kvec(consts, KVEC_F1, kk, k_mask, D, K)
    f2 = _kvec(consts, KVEC_F2, kk, k_mask, D, K)
    if FOLD:
        mean1 = mean_r
        rstd1 = 1.0 / tl.sqrt(m2_r / D + eps)
        z = rstd1[:, None] * (acc_z + (shift - mean1)[:, None] * f1[None, :]) + f2[None, :]
    else:
        z = acc_z + _kvec(consts, KVEC_BD, kk, k_mask, D, K)[None, :]
    p = activation(z, CFG.ACT)
    p_op = p.to(op)
    if SAVE:
        tl.store(saved_ptr + rows[:, None] * K + kk[None, :], z, mask=row_mask[:, None] & k_mask[None, :])

    # ---- the output LayerNorm's statistics: o = w + res with w = s o v (and dropout) ----
    if OUT_PASS:  # dropout's mask breaks the algebra (and a wide k's Gram tile would not fit): an exact pass
        mean_o, m2 = zero, zero
        for i in range(0, tl.cdiv(D, BLOCK_D)):
            c0, before = walk_chunk(i, D, True, BLOCK_D)
            cols = c0 + tl.arange(0, BLOCK_D)
            col_mask = cols < D
            _x1, _x1hat, _a, _ahat, _an, res = _inputs(h_ptr, r_ptr, consts, rows, row_mask, cols, col_mask, D,
                                                       mean1, rstd1, mean_a, rstd_a, CFG)
            w, _v, _keep = _up_chunk(p_op, wu_ptr, consts, rows, row_mask, cols, col_mask, kk, k_mask, D, K,
                                     seed_ptr, p_drop, CFG, PRECISION)
            mean_o, m2 = merge_moments(mean_o, m2, w + res, col_mask, before, D)
        rstd_o = 1.0 / tl.sqrt(m2 / D + eps)
    else:
        # with Ac = centred rows of W'^T, bc = centred s o b_up, T = sum_c (res_c - mean_r) W'[c, :]:
        #   sum_c (w_c - mean w)^2 = p Gc p^T + 2 p . (Ac bc) + |bc|^2
        #   sum_c (w_c - mean w)(res_c - mean_r) = p . T + sum_c (res_c - mean_r) b_c
        asum = _kvec(consts, KVEC_ASUM, kk, k_mask, D, K)
        gram = _gram(consts, kk, k_mask, D, K)
        tail = consts + NUM_VEC * D + NUM_KVEC * K + K * K
        bsq, bsum = tl.load(tail), tl.load(tail + 1)
        t = acc_t + (shift - mean_r)[:, None] * asum[None, :]
        cross = tl.sum(p * t, axis=1) + acc_b + (shift - mean_r) * bsum
        quad = tl.sum(tl.dot(p, gram, input_precision=PRECISION) * p, axis=1)
        quad += 2.0 * tl.sum(p * _kvec(consts, KVEC_GBC, kk, k_mask, D, K)[None, :], axis=1) + bsq
        mean_o = mean_r + (tl.sum(p * asum[None, :], axis=1) + bsum) / D
        rstd_o = 1.0 / tl.sqrt(tl.maximum(quad + 2.0 * cross + m2_r, 0.0) / D + eps)

    # ---- out: starting on the chunk where the pass before ended ----
    for i in range(0, tl.cdiv(D, BLOCK_D)):
        c0, _before = walk_chunk(i, D, not OUT_PASS, BLOCK_D)
        cols = c0 + tl.arange(0, BLOCK_D)
        col_mask = cols < D
        _x1, _x1hat, _a, _ahat, _an, res = _inputs(h_ptr, r_ptr, consts, rows, row_mask, cols, col_mask, D, mean1,
                                                   rstd1, mean_a, rstd_a, CFG)
        w, _v, _keep = _up_chunk(p_op, wu_ptr, consts, rows, row_mask, cols, col_mask, kk, k_mask, D, K,
                                 seed_ptr, p_drop, CFG, PRECISION)
        y = ((w + res) - mean_o[:, None]) * rstd_o[:, None] * _vec(consts, VEC_GAMMA, cols, col_mask, D)[None, :] \
            + _vec(consts, VEC_BETA, cols, col_mask, D)[None, :]
        tl.store(y_ptr + rows[:, None] * D + cols[None, :], y.to(y_ptr.dtype.element_ty),
                 mask=row_mask[:, None] & col_mask[None, :])
    if SAVE:
        _store_row_scalars(saved_ptr + M * K, rows, row_mask, M, mean_o, rstd_o, mean1, rstd1, mean_a, rstd_a)
        if not OUT_PASS:  # T = acc_t + (shift - mean_r) asum in backward
            tl.store(saved_ptr + M * K + ROW_T_SHIFT * M + rows, shift - mean_r, mask=row_mask)


# ----------------------------------------------------------------------------- backward

@triton.jit
def _output_sums_from_y(dy_ptr, y_ptr, wu_ptr, consts, p, t, rstd_o, rows, row_mask, kk, k_mask, D, K, op,
                        PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr):
    """The output LayerNorm's sums over one pass of dy and y, without dropout, given p = f(z) (fp32) and the
    forward's T = res Ac^T: g ohat = dy o (y - beta) needs no o (y = gamma o ohat + beta, with the moments
    of o the forward took), and xo = ohat W' = rstd_o o Ac^T (Ac: W'^T with centred rows, so o's mean drops
    out) = rstd_o (p Gc + Ac bc + T) from the Gram constants. (mean(g), mean(g ohat), xg, xk, xo)."""
    sum_g = tl.zeros([BLOCK_M], dtype=tl.float32)
    sum_go = tl.zeros([BLOCK_M], dtype=tl.float32)
    xg = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    for c0 in range(0, D, BLOCK_D):
        cols = c0 + tl.arange(0, BLOCK_D)
        col_mask = cols < D
        dy = _chunk(dy_ptr, rows, row_mask, cols, col_mask, D)
        y = _chunk(y_ptr, rows, row_mask, cols, col_mask, D)
        g = dy * _vec(consts, VEC_GAMMA, cols, col_mask, D)[None, :]
        sum_g += tl.sum(g, axis=1)
        sum_go += tl.sum(dy * (y - _vec(consts, VEC_BETA, cols, col_mask, D)[None, :]), axis=1)
        wp = _scaled_w_up(wu_ptr, consts, cols, col_mask, kk, k_mask, D, K).to(op)
        xg = tl.dot(g.to(op), wp, acc=xg, input_precision=PRECISION)
    xo = tl.dot(p, _gram(consts, kk, k_mask, D, K), input_precision=PRECISION) + t \
        + _kvec(consts, KVEC_GBC, kk, k_mask, D, K)[None, :]
    xk = _kvec(consts, KVEC_ASUM, kk, k_mask, D, K)[None, :]  # the same for every row: [1, BLOCK_K]
    return sum_g / D, sum_go / D, xg, xk, rstd_o[:, None] * xo


@triton.jit
def _output_sums(dy_ptr, h_ptr, r_ptr, wu_ptr, consts, p_op, shift, rows, row_mask, kk, k_mask, D, K, eps, mean1,
                 rstd1, mean_a, rstd_a, seed_ptr, p_drop, op, CFG: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr):
    """The output LayerNorm's sums over one pass of dy, h, r, with o recomputed (dropout, or a bottleneck too
    wide for the forward's Gram algebra). o's statistics are taken exactly in this same pass, so ohat =
    rstd_o ((o - shift) - (mean_o - shift)) with shift the forward's mean of o: sums over o - shift now, the
    correction after. (mean_o, rstd_o, mean(g), mean(g ohat), xg, xk, xo)."""
    mean_o = tl.zeros([BLOCK_M], dtype=tl.float32)
    m2_o = tl.zeros([BLOCK_M], dtype=tl.float32)
    sum_g = tl.zeros([BLOCK_M], dtype=tl.float32)
    sum_go = tl.zeros([BLOCK_M], dtype=tl.float32)
    xg = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    xk = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    xo = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    for c0 in range(0, D, BLOCK_D):
        cols = c0 + tl.arange(0, BLOCK_D)
        col_mask = cols < D
        _x1, _x1hat, _a, _ahat, _an, res = _inputs(h_ptr, r_ptr, consts, rows, row_mask, cols, col_mask, D, mean1,
                                                   rstd1, mean_a, rstd_a, CFG)
        w, _v, keep = _up_chunk(p_op, wu_ptr, consts, rows, row_mask, cols, col_mask, kk, k_mask, D, K, seed_ptr,
                                p_drop, CFG, PRECISION)
        mean_o, m2_o = merge_moments(mean_o, m2_o, w + res, col_mask, c0, D)
        oc = tl.where(col_mask[None, :], w + res - shift[:, None], 0.0)
        g = _chunk(dy_ptr, rows, row_mask, cols, col_mask, D) * _vec(consts, VEC_GAMMA, cols, col_mask, D)[None, :]
        sum_g += tl.sum(g, axis=1)
        sum_go += tl.sum(g * oc, axis=1)
        wp = _scaled_w_up(wu_ptr, consts, cols, col_mask, kk, k_mask, D, K).to(op)
        if CFG.DROPOUT:
            kappa = tl.where(keep & col_mask[None, :], 1.0 / (1.0 - p_drop), 0.0)
            g = g * kappa
            oc = oc * kappa
            xk = tl.dot(kappa.to(op), wp, acc=xk, input_precision=PRECISION)
        xg = tl.dot(g.to(op), wp, acc=xg, input_precision=PRECISION)
        xo = tl.dot(oc.to(op), wp, acc=xo, input_precision=PRECISION)
    if not CFG.DROPOUT:
        xk = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32) + _kvec(consts, KVEC_ASUM, kk, k_mask, D, K)[None, :]
    rstd_o = 1.0 / tl.sqrt(m2_o / D + eps)
    delta = mean_o - shift
    mgo = rstd_o * (sum_go - delta * sum_g) / D
    xo = rstd_o[:, None] * (xo - delta[:, None] * xk)
    return mean_o, rstd_o, sum_g / D, mgo, xg, xk, xo


@triton.jit(do_not_specialize=["saved_offset"])
def adapter_bwd_rows_kernel(
    dy_ptr, h_ptr, r_ptr,           # (M, D)
    y_ptr,                          # (M, D) the forward's output (read when FROM_Y)
    pd_ptr,                         # out: p and dz, (M, 2K) in the operand dtype
    rowgrad_ptr,                    # out: ROWGRAD_ROWS rows of M row scalars, fp32
    consts, saved_offset,           # the forward's state: its constants, and where its saved part starts
    wd_ptr, wu_ptr,
    seed_ptr, p_drop,
    M, D, K, eps,
    CFG: tl.constexpr,              # Flags (the static options)
    LN_SWEEP: tl.constexpr,         # the LayerNorm below the adapter needs an exact pass (see below)
    FROM_Y: tl.constexpr,           # the forward took o's moments algebraically and saved T: read dy and y
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    kk = tl.arange(0, BLOCK_K)
    k_mask = kk < K
    op = _operand_type(h_ptr.dtype.element_ty, r_ptr.dtype.element_ty)
    tile_mask = row_mask[:, None] & k_mask[None, :]
    saved_ptr = _saved_part(consts, saved_offset)
    z_ptrs = saved_ptr + rows[:, None] * K + kk[None, :]
    p_op = activation(tl.load(z_ptrs, mask=tile_mask, other=0.0), CFG.ACT).to(op)
    mean_fwd, rstd_fwd, mean1, rstd1, mean_a, rstd_a = _row_scalars(saved_ptr + M * K, rows, row_mask, M)

    # ---- output LayerNorm: g = dy o gamma, do = rstd_o (g - mean(g) - ohat mean(g ohat)); with
    # kappa the dropout scale and W' = s o W_up, dp = dv W_up = sum_c kappa_c do_c W'[c, :]
    #   = rstd_o (xg - mean(g) xk - mean(g ohat) xo),  xg = (kappa g) W', xk = kappa W', xo = (kappa ohat) W'.
    if FROM_Y:
        mean_o, rstd_o = mean_fwd, rstd_fwd  # the moments of o with which the forward wrote y
        p = activation(tl.load(z_ptrs, mask=tile_mask, other=0.0), CFG.ACT)
        # T = res Ac^T = sum_c (res_c - mean_r) W'[c, :], saved as sum_c (res_c - shift) W'[c, :] and shift - mean_r
        t_shift = _row_scalar(saved_ptr + M * K, ROW_T_SHIFT, rows, row_mask, M)
        t = tl.load(_saved_t(saved_ptr, rows, kk, M, K), mask=tile_mask, other=0.0) \
            + t_shift[:, None] * _kvec(consts, KVEC_ASUM, kk, k_mask, D, K)[None, :]
        mg, mgo, xg, xk, xo = _output_sums_from_y(dy_ptr, y_ptr, wu_ptr, consts, p, t, rstd_o, rows, row_mask, kk,
                                                  k_mask, D, K, op, PRECISION, BLOCK_M, BLOCK_D, BLOCK_K)
    else:
        mean_o, rstd_o, mg, mgo, xg, xk, xo = _output_sums(dy_ptr, h_ptr, r_ptr, wu_ptr, consts, p_op, mean_fwd, rows,
                                                           row_mask, kk, k_mask, D, K, eps, mean1, rstd1, mean_a,
                                                           rstd_a, seed_ptr, p_drop, op, CFG, PRECISION, BLOCK_M,
                                                           BLOCK_D, BLOCK_K)
    dp = rstd_o[:, None] * (xg - mg[:, None] * xk - mgo[:, None] * xo)
    z = tl.load(z_ptrs, mask=tile_mask, other=0.0)  # again (a cache hit) rather than held through the sweep
    dz = dp * activation_grad(z, CFG.ACT)
    pd = pd_ptr + rows[:, None] * (2 * K) + kk[None, :]
    tl.store(pd, p_op, mask=tile_mask)
    tl.store(pd + K, dz.to(op), mask=tile_mask)

    # ---- LayerNorms below the adapter. f1 = W_down lam, f2 = W_down mu + b_down for the LayerNorm
    # (lam, mu) right before W_down, whose normalised input nhat satisfies nhat (lam o W_down)^T =
    # z - f2; so mean(dan o lam) = dz . f1 / D and mean(dan o lam o nhat) = dz . (z - f2) / D.
    f1 = _kvec(consts, KVEC_F1, kk, k_mask, D, K)
    f2 = _kvec(consts, KVEC_F2, kk, k_mask, D, K)
    ma1 = tl.sum(dz * f1[None, :], axis=1) / D
    ma2 = tl.sum(dz * (z - f2[None, :]), axis=1) / D
    c1, c2 = ma1, ma2  # Pfeiffer: the frozen LayerNorm is the one right before W_down
    if LN_SWEEP:  # adapter LayerNorm in between, or do joins da: exact sums over da
        c1 = tl.zeros([BLOCK_M], dtype=tl.float32)
        c2 = tl.zeros([BLOCK_M], dtype=tl.float32)
        dz_op = dz.to(op)
        for i in range(0, tl.cdiv(D, BLOCK_D)):  # from the last chunk, where the output's pass ended
            c0, _before = walk_chunk(i, D, True, BLOCK_D)
            cols = c0 + tl.arange(0, BLOCK_D)
            col_mask = cols < D
            do = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
            if not CFG.RESIDUAL_BEFORE_LN:
                pw = _up_product(p_op, wu_ptr, cols, col_mask, kk, k_mask, K, PRECISION)
                do, _dy, _ohat, _v, _keep = _output_grad(
                    dy_ptr, h_ptr, r_ptr, consts, pw, rows, row_mask, cols, col_mask, D, mean1, rstd1, mean_a, rstd_a,
                    mean_o, rstd_o, mg, mgo, seed_ptr, p_drop, CFG)
            wd = _weight_tile(wd_ptr, D, 1, kk, k_mask, cols, col_mask)
            dan = tl.dot(dz_op, wd.to(op), input_precision=PRECISION)
            da, x1hat, _ahat, _an = _input_grad(
                h_ptr, r_ptr, consts, dan, do, rows, row_mask, cols, col_mask, D, mean1, rstd1, mean_a, rstd_a, ma1,
                ma2, CFG)
            gda = da * _vec(consts, VEC_GAMMA, cols, col_mask, D)[None, :]
            c1 += tl.sum(gda, axis=1)
            c2 += tl.sum(gda * x1hat, axis=1)
        c1 = c1 / D
        c2 = c2 / D
    _store_row_scalars(rowgrad_ptr, rows, row_mask, M, mg, mgo, ma1, ma2, c1, c2)
    tl.store(rowgrad_ptr + 6 * M + rows, mean_o, mask=row_mask)
    tl.store(rowgrad_ptr + 7 * M + rows, rstd_o, mask=row_mask)


@triton.jit
def _output_grad(dy_ptr, h_ptr, r_ptr, consts, pw, rows, row_mask, cols, col_mask, D, mean1, rstd1, mean_a, rstd_a,
                 mean_o, rstd_o, mg, mgo, seed_ptr, p_drop, CFG: tl.constexpr):
    """One chunk of the output LayerNorm's backward, exact from the row scalars, given pw = p W_up^T:
    (do: gradient of o, dy, o_hat, v, the dropout mask)."""
    _x1, _x1hat, _a, _ahat, _an, res = _inputs(h_ptr, r_ptr, consts, rows, row_mask, cols, col_mask, D, mean1, rstd1,
                                               mean_a, rstd_a, CFG)
    w, v, keep = _up_from_product(pw, consts, rows, cols, col_mask, D, seed_ptr, p_drop, CFG)
    ohat = tl.where(col_mask[None, :], (w + res - mean_o[:, None]) * rstd_o[:, None], 0.0)
    dy = _chunk(dy_ptr, rows, row_mask, cols, col_mask, D)
    g = dy * _vec(consts, VEC_GAMMA, cols, col_mask, D)[None, :]
    do = tl.where(col_mask[None, :], (g - mg[:, None] - ohat * mgo[:, None]) * rstd_o[:, None], 0.0)
    return do, dy, ohat, v, keep


@triton.jit
def _input_grad(h_ptr, r_ptr, consts, dan, do, rows, row_mask, cols, col_mask, D, mean1, rstd1, mean_a, rstd_a, ma1,
                ma2, CFG: tl.constexpr):
    """One chunk of the gradient below the bottleneck, exact from the row scalars, given do and
    dan = dz W_down (the gradient of the adapter's input an): (da: gradient of a, x1_hat, a_hat, an). h
    and r are read again here (cache hits) rather than held through the output's backward."""
    _x1, x1hat, _a, ahat, an, _res = _inputs(h_ptr, r_ptr, consts, rows, row_mask, cols, col_mask, D, mean1, rstd1,
                                             mean_a, rstd_a, CFG)
    if CFG.LN_BEFORE:
        ga = _vec(consts, VEC_GA, cols, col_mask, D)
        da = tl.where(col_mask[None, :], (dan * ga[None, :] - ma1[:, None] - ahat * ma2[:, None]) * rstd_a[:, None],
                      0.0)
    else:
        da = dan
    if not CFG.RESIDUAL_BEFORE_LN:
        da += do
    return da, x1hat, ahat, an


@triton.jit
def _stepped_product(a_ptr, row_mask, w_ptr, stride_k, stride_d, cols, col_mask, K, PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_KC: tl.constexpr):
    """a W at one chunk of columns, [BLOCK_M, BLOCK_D] fp32: a is a row tile's k-wide operand (row pointers
    ``a_ptr``), W[j, c] is at w_ptr + j stride_k + c stride_d; reduced over k in steps of BLOCK_KC."""
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_KC):
        kc = k0 + tl.arange(0, BLOCK_KC)
        kc_mask = kc < K
        a = tl.load(a_ptr + kc[None, :], mask=row_mask[:, None] & kc_mask[None, :], other=0.0)
        w = _weight_tile(w_ptr, stride_k, stride_d, kc, kc_mask, cols, col_mask)
        acc = tl.dot(a, w.to(a.dtype), acc=acc, input_precision=PRECISION)
    return acc


@triton.jit(do_not_specialize=["saved_offset"])
def adapter_bwd_cols_kernel(
    dy_ptr, h_ptr, r_ptr,           # (M, D)
    dh_ptr, dr_ptr,                 # out (INPUT_GRAD): (M, D) in h's and r's dtypes; dr unused when DR_IS_DH
    pd_ptr, rowgrad_ptr,            # adapter_bwd_rows_kernel's outputs
    part_ptr,                       # out: (splits, T) fp32 partial gradients, placed by GRAD_SLOTS
    consts, saved_offset,           # the forward's state: its constants, and where its saved part starts
    wd_ptr, wu_ptr,
    seed_ptr, p_drop,
    M, D, K, tiles_per_split,
    CFG: tl.constexpr,              # Flags (the static options)
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_KS: tl.constexpr,         # the bottleneck columns a program accumulates weight gradients for
    BLOCK_KC: tl.constexpr,         # the bottleneck columns per step of the products p W_up^T and dz W_down
):
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < D
    split = tl.program_id(1)
    kk = tl.arange(0, BLOCK_K)
    k_mask = kk < K
    # Grid axis 2 slices the bottleneck for the weight-gradient accumulators alone (k = 256: two
    # [256, BLOCK_D] fp32 tiles do not fit the registers). Every slice recomputes the chunk's elementwise
    # backward, which needs all of k; the first slice alone writes dh, dr and the vector gradients.
    ks = tl.program_id(2) * BLOCK_KS + tl.arange(0, BLOCK_KS)
    ks_mask = ks < K
    first_slice = tl.program_id(2) == 0
    op = _operand_type(h_ptr.dtype.element_ty, r_ptr.dtype.element_ty)
    gamma = _vec(consts, VEC_GAMMA, cols, col_mask, D)
    s = _vec(consts, VEC_S, cols, col_mask, D)
    # The products p W_up^T and dz W_down that the elementwise backward recomputes reduce over all of k.
    # When one step of BLOCK_KC covers k, the tile's p and dz are loaded whole and W_down's chunk is held
    # across tiles; a wider k (128, 256) steps through it: with whole [BLOCK_M, 256] operands the kernel
    # spilled 16 to 192 bytes per thread in the variants with dropout or the adapter LayerNorm
    # (benchmarks/compile_report --all-placements).
    ONE_STEP: tl.constexpr = BLOCK_KC == BLOCK_K
    if ONE_STEP:
        wd_op = _weight_tile(wd_ptr, D, 1, kk, k_mask, cols, col_mask).to(op)
    acc_wu = tl.zeros([BLOCK_KS, BLOCK_D], dtype=tl.float32)  # dW_up[cols, ks]^T = p[:, ks]^T dv
    acc_wd = tl.zeros([BLOCK_KS, BLOCK_D], dtype=tl.float32)  # dW_down[ks, cols] = dz[:, ks]^T an
    acc_bd = tl.zeros([BLOCK_KS], dtype=tl.float32)
    acc_bu = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_s = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_lnw = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_lnb = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_aw = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_ab = tl.zeros([BLOCK_D], dtype=tl.float32)
    saved_rows = _saved_part(consts, saved_offset) + M * K  # the forward's row statistics
    first = split * tiles_per_split
    for tile in range(first, tl.minimum(first + tiles_per_split, tl.cdiv(M, BLOCK_M))):
        rows = tl.arange(0, BLOCK_M).to(tl.int64) + tile * BLOCK_M
        row_mask = rows < M
        pd = pd_ptr + rows[:, None] * (2 * K)
        if ONE_STEP:
            tile_mask = row_mask[:, None] & k_mask[None, :]
            p_op = tl.load(pd + kk[None, :], mask=tile_mask, other=0.0)
            dz_op = tl.load(pd + K + kk[None, :], mask=tile_mask, other=0.0)
            pw = _up_product(p_op, wu_ptr, cols, col_mask, kk, k_mask, K, PRECISION)
        else:
            pw = _stepped_product(pd, row_mask, wu_ptr, 1, K, cols, col_mask, K, PRECISION, BLOCK_M, BLOCK_D, BLOCK_KC)
        if ONE_STEP and BLOCK_KS == BLOCK_K:
            p_ks, dz_ks = p_op, dz_op
        else:  # the slice's columns, read again (cache hits)
            slice_mask = row_mask[:, None] & ks_mask[None, :]
            p_ks = tl.load(pd + ks[None, :], mask=slice_mask, other=0.0)
            dz_ks = tl.load(pd + K + ks[None, :], mask=slice_mask, other=0.0)
        _mean, _rstd, mean1, rstd1, mean_a, rstd_a = _row_scalars(saved_rows, rows, row_mask, M)
        mg, mgo, ma1, ma2, c1, c2 = _row_scalars(rowgrad_ptr, rows, row_mask, M)
        mean_o, rstd_o = _row_scalar(rowgrad_ptr, 6, rows, row_mask, M), _row_scalar(rowgrad_ptr, 7, rows, row_mask, M)

        # ---- the output LayerNorm and the up-projection ----
        do, dy, ohat, v, keep = _output_grad(
            dy_ptr, h_ptr, r_ptr, consts, pw, rows, row_mask, cols, col_mask, D, mean1, rstd1, mean_a, rstd_a, mean_o,
            rstd_o, mg, mgo, seed_ptr, p_drop, CFG)
        if CFG.LN_GRAD:
            acc_lnw += tl.sum(dy * ohat, axis=0)
            acc_lnb += tl.sum(dy, axis=0)
        du = do
        if CFG.DROPOUT:
            du = tl.where(keep, do / (1.0 - p_drop), 0.0)
        if CFG.SCALE_MODE != SCALE_FLOAT:
            acc_s += tl.sum(du * v, axis=0)
        dv = du * s[None, :]
        acc_bu += tl.sum(dv, axis=0)
        acc_wu = tl.dot(tl.trans(p_ks), dv.to(op), acc=acc_wu, input_precision=PRECISION)

        # ---- the down-projection and the LayerNorms below it ----
        if ONE_STEP:
            dan = tl.dot(dz_op, wd_op, input_precision=PRECISION)
        else:
            dan = _stepped_product(pd + K, row_mask, wd_ptr, D, 1, cols, col_mask, K, PRECISION, BLOCK_M, BLOCK_D,
                                   BLOCK_KC)
        da, x1hat, ahat, an = _input_grad(
            h_ptr, r_ptr, consts, dan, do, rows, row_mask, cols, col_mask, D, mean1, rstd1, mean_a, rstd_a, ma1, ma2,
            CFG)
        acc_wd = tl.dot(tl.trans(dz_ks), an.to(op), acc=acc_wd, input_precision=PRECISION)
        acc_bd += tl.sum(dz_ks.to(tl.float32), axis=0)
        if CFG.LN_BEFORE:
            acc_aw += tl.sum(dan * ahat, axis=0)
            acc_ab += tl.sum(dan, axis=0)
        if CFG.ORIG_LN_BEFORE:
            if CFG.LN_GRAD:
                acc_lnw += tl.sum(da * x1hat, axis=0)
                acc_lnb += tl.sum(da, axis=0)
            dx1 = tl.where(col_mask[None, :], (da * gamma[None, :] - c1[:, None] - x1hat * c2[:, None]) * rstd1[:, None],
                           0.0)
            dr = do + dx1
        else:
            dx1 = da  # a = h
            dr = do
        if CFG.RESIDUAL_BEFORE_LN:
            dh = do + dx1
        else:
            dh = dx1
        if CFG.INPUT_GRAD:
            offs = rows[:, None] * D + cols[None, :]
            mask = row_mask[:, None] & col_mask[None, :] & first_slice
            tl.store(dh_ptr + offs, dh.to(dh_ptr.dtype.element_ty), mask=mask)
            if not CFG.DR_IS_DH:
                tl.store(dr_ptr + offs, dr.to(dr_ptr.dtype.element_ty), mask=mask)

    part = part_ptr + split.to(tl.int64) * (2 * K * D + K + 6 * D)
    tl.store(part + _grad_offset(G_WU, D, K) + cols[None, :] * K + ks[:, None], acc_wu,
             mask=ks_mask[:, None] & col_mask[None, :])
    tl.store(part + _grad_offset(G_WD, D, K) + ks[:, None] * D + cols[None, :], acc_wd,
             mask=ks_mask[:, None] & col_mask[None, :])
    if tl.program_id(0) == 0:
        tl.store(part + _grad_offset(G_BD, D, K) + ks, acc_bd, mask=ks_mask)
    col_mask = col_mask & first_slice  # the vector gradients: the first slice's
    tl.store(part + _grad_offset(G_BU, D, K) + cols, acc_bu, mask=col_mask)
    if CFG.SCALE_MODE != SCALE_FLOAT:  # per channel; a learned scalar sums them afterwards
        tl.store(part + _grad_offset(G_S, D, K) + cols, acc_s, mask=col_mask)
    if CFG.LN_GRAD:
        tl.store(part + _grad_offset(G_LNW, D, K) + cols, acc_lnw, mask=col_mask)
        tl.store(part + _grad_offset(G_LNB, D, K) + cols, acc_lnb, mask=col_mask)
    if CFG.LN_BEFORE:
        tl.store(part + _grad_offset(G_AW, D, K) + cols, acc_aw, mask=col_mask)
        tl.store(part + _grad_offset(G_AB, D, K) + cols, acc_ab, mask=col_mask)


@triton.jit
def dropout_mask_kernel(seed_ptr, keep_ptr, numel, p_drop, BLOCK: tl.constexpr):
    """Materialises the keep-mask the fused kernels use (for tests and debugging only)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    keep = dropout_keep(tl.load(seed_ptr), offs, p_drop)
    tl.store(keep_ptr + offs, keep.to(tl.int8), mask=offs < numel)


# ----------------------------------------------------------------------------- launchers

import functools  # noqa: E402  (below the kernels: they need only triton)

import torch  # noqa: E402

from . import runtime  # noqa: E402
from .runtime import cdiv  # noqa: E402
from .codes import ACTIVATIONS, SCALE_MODES  # noqa: E402


def operand_dtype(h, r):
    """The dtype of the tensor-core operands (chosen the same way inside the kernels)."""
    return r.dtype if h.dtype == torch.float32 else h.dtype


def _flags(spec, **backward_options):
    return _flags_of(spec.original_ln_before, spec.ln_before, spec.residual_before_ln, spec.dropout_p > 0,
                     spec.activation, spec.scale_mode, **backward_options)


@functools.lru_cache(maxsize=None)  # keyed on what the kernels specialise on: a handful of entries
def _flags_of(original_ln_before, ln_before, residual_before_ln, dropout, activation, scale_mode, **backward_options):
    return Flags(original_ln_before, ln_before, residual_before_ln, dropout, ACTIVATIONS.index(activation),
                 SCALE_MODES.index(scale_mode), **backward_options)


def saved_part_offset(D, K):
    """Where the saved part of the forward's fp32 state starts: right after the constants. The kernels take
    the offset, not a second tensor (no view to make on every call). Rounded up to even (an 8-byte aligned
    start; _saved_part says why not more)."""
    return cdiv(6 * D + 5 * K + K * K + 2, 2) * 2


def algebraic(spec, K):
    """Whether the forward takes the output LayerNorm's moments algebraically (from the Gram constants) rather
    than by an exact pass: not with dropout (its mask breaks the algebra), nor for k > 64 (a [k, k] fp32 Gram
    operand beyond 16 KiB). The backward's row kernel then reads dy and y (FROM_Y), not dy, h and r."""
    return spec.dropout_p == 0 and runtime.block_width(K) <= 64


def reads_output(spec, K):
    """Whether backward reads the forward's output y (autograd then saves it)."""
    return algebraic(spec, K)


def state_size(M, D, K, spec, save):
    """Length of the forward's fp32 state: the constants, then (for backward) z, the row statistics and, when
    the moments are algebraic, T (M, K)."""
    if not save:
        return saved_part_offset(D, K)
    return saved_part_offset(D, K) + M * K + SAVED_ROWS * M + (M * K if algebraic(spec, K) else 0)


def constants(spec, params, consts, D, K, gram):
    """Fills ``consts`` (the head of the forward's state) with adapter_constants_kernel; ``gram``: with the
    Gram block, for the forward's algebraic output moments."""
    scale = params.scale
    tiles = runtime.constants_tiles(D, K)
    rows = cdiv(K, tiles["BLOCK_G"])
    any_tensor = params.ln_weight  # stands in for absent pointers (never read)
    runtime.launch(adapter_constants_kernel, (rows, 1 + rows if gram else 1),
                   params.ln_weight, params.ln_bias,
                   params.adapter_ln_weight if spec.ln_before else any_tensor,
                   params.adapter_ln_bias if spec.ln_before else any_tensor,
                   params.w_down, params.b_down, params.w_up, params.b_up,
                   any_tensor if scale is None else scale, float(spec.scale_value), consts, D, K,
                   LN_BEFORE=spec.ln_before, SCALE_MODE=SCALE_MODES.index(spec.scale_mode), PRECISION="ieee",
                   **tiles)


@runtime.on_tensors_device
def forward(spec, h, r, params, seed, save):
    """(y, state) for contiguous h, r of shape (..., D), M rows in all: y in the dtype of h + r; state
    (fp32) holds the constants and, when ``save``, z and the row statistics, for backward."""
    D = h.shape[-1]
    M = h.numel() // D
    K = params.w_down.shape[0]
    op = operand_dtype(h, r)
    # pipelined in 16-bit but with the adapter LayerNorm (two stages spill there under triton 3.6)
    pipelined = op != torch.float32 and not spec.ln_before
    cfg = runtime.row_tiles(D, K, op, stages=runtime.STREAM_STAGES if pipelined else 1, two_blocks=True)
    out_pass = not algebraic(spec, K)
    state = runtime.empty_output((state_size(M, D, K, spec, save),), torch.float32, h.device)
    constants(spec, params, state, D, K, gram=not out_pass)
    y = runtime.empty_output(h.shape, torch.promote_types(h.dtype, r.dtype), h.device)
    runtime.launch(adapter_fwd_kernel, (cdiv(M, cfg["BLOCK_M"]),),
                   h, r, y, state, saved_part_offset(D, K), params.w_down, params.w_up,
                   h if seed is None else seed, float(spec.dropout_p),
                   M, D, K, float(spec.ln_eps), float(spec.adapter_ln_eps),
                   SAVE=save, OUT_PASS=out_pass, CFG=_flags(spec), **cfg)
    return y, state


@runtime.on_tensors_device
def backward(spec, dy, h, r, y, params, seed, state, input_grad, ln_grad, grad_dtype):
    """(dh, dr, flat) for contiguous inputs of shape (..., D), the forward's output y (needed where
    ``reads_output``, else may be None) and the forward's state: flat holds the
    parameter gradients in ``grad_dtype``, placed by GRAD_SLOTS (2 K D + K + 6 D elements); dh, dr are
    None unless ``input_grad`` (dr is dh itself in the Pfeiffer placement, where the two are equal)."""
    D = h.shape[-1]
    M = h.numel() // D
    K = params.w_down.shape[0]
    saved_offset = saved_part_offset(D, K)
    op = operand_dtype(h, r)
    per_element = spec.ln_before or spec.dropout_p > 0  # the adapter LayerNorm or dropout, recomputed per element
    pipelined = op != torch.float32 and not per_element  # where the stages cost no spill (runtime.STREAM_STAGES)
    rows = runtime.row_tiles(D, K, op, per_element or h.dtype != r.dtype,  # heavy: narrower tiles
                             stages=runtime.ROW_PASS_STAGES if pipelined else 1)
    pd = runtime.empty_output((M, 2 * K), op, h.device)
    rowgrad = runtime.empty_output((ROWGRAD_ROWS, M), torch.float32, h.device)
    seed_arg = h if seed is None else seed
    from_y = algebraic(spec, K)
    if from_y and y is None:
        raise ValueError("adapter block backward: this spec reads the forward's output y, got None")
    runtime.launch(adapter_bwd_rows_kernel, (cdiv(M, rows["BLOCK_M"]),),
                   dy, h, r, y if from_y else h, pd, rowgrad, state, saved_offset, params.w_down, params.w_up,
                   seed_arg, float(spec.dropout_p),
                   M, D, K, float(spec.ln_eps), CFG=_flags(spec),
                   LN_SWEEP=spec.original_ln_before and (spec.ln_before or not spec.residual_before_ln),
                   FROM_Y=from_y, **rows)

    cols = runtime.column_tiles(D, K, op, per_element, stages=runtime.STREAM_STAGES if pipelined else 1)
    tiles = cdiv(M, cols["BLOCK_M"])
    splits = runtime.token_splits(tiles, cdiv(D, cols["BLOCK_D"]))
    tiles_per_split = cdiv(tiles, splits)
    splits = cdiv(tiles, tiles_per_split)
    part = runtime.empty_output((splits, 2 * K * D + K + 6 * D), torch.float32, h.device)
    dh = dr = None
    if input_grad:
        dh = runtime.empty_output(h.shape, h.dtype, h.device)
        same = spec.original_ln_before and spec.residual_before_ln and r.dtype == h.dtype
        dr = dh if same else runtime.empty_output(h.shape, r.dtype, h.device)
    runtime.launch(adapter_bwd_cols_kernel, (cdiv(D, cols["BLOCK_D"]), splits, cdiv(K, cols["BLOCK_KS"])),
                   dy, h, r, h if dh is None else dh, h if dr is None else dr, pd, rowgrad, part, state,
                   saved_offset, params.w_down, params.w_up, seed_arg, float(spec.dropout_p), M, D, K,
                   tiles_per_split,
                   CFG=_flags(spec, INPUT_GRAD=input_grad, DR_IS_DH=dr is dh, LN_GRAD=ln_grad), **cols)
    return dh, dr, sum_partials(part, grad_dtype)


def dropout_keep_mask(seed, shape, dropout_p):
    """The int8 keep-mask (1 = kept) that the fused kernels apply for this seed, as a tensor."""
    numel = int(torch.Size(shape).numel())
    keep = torch.empty(shape, dtype=torch.int8, device=seed.device)
    block = 1024
    runtime.launch(dropout_mask_kernel, (max(1, cdiv(numel, block)),), seed, keep, numel,
                   float(dropout_p), BLOCK=block)
    return keep.bool()
